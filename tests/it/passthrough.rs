//! Passthrough mode (no `upstream.api_key`) with `[[clients]]`: callers named by the key they
//! present, everyone else `other` and forwarded, the upstream judging the key.

use crate::harness::*;

/// Two clients by the SHA-256 of their own keys; no organization key.
fn config(extra: &str) -> String {
    format!(
        "[[clients]]\nname = \"search\"\nkey_sha256 = \"{}\"\nmodels = [\"gpt-4o*\"]\n\n[[clients]]\nname = \"batch\"\nkey_sha256 = \"{}\"\n{extra}",
        sha256_hex("sk-search-app"),
        sha256_hex("sk-batch-app")
    )
}

/// The `Authorization` the upstream saw for one request.
async fn upstream_authorization(emu: &Emulator, request_id: &str) -> Option<String> {
    let entry = emu
        .entry(request_id)
        .await
        .unwrap_or_else(|| panic!("{request_id} reached the upstream"));
    logged_header(&entry, "authorization").map(str::to_owned)
}

#[tokio::test]
async fn known_keys_name_their_client_and_unknown_keys_pass_as_other() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), &config("")).await;
    let search = ("authorization", "Bearer sk-search-app");
    let r = gw.chat(&[search, ("x-request-id", "pt-search")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        upstream_authorization(&emu, "pt-search").await.as_deref(),
        Some("Bearer sk-search-app"),
        "passthrough: the application's own key goes upstream"
    );
    assert_eq!(gw.access_log("pt-search").await["client"], "search");

    // A key no client holds: forwarded as it is, the upstream judges it.
    let r = gw
        .chat(&[
            ("authorization", "Bearer sk-unlisted"),
            ("x-request-id", "pt-unlisted"),
        ])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        upstream_authorization(&emu, "pt-unlisted").await.as_deref(),
        Some("Bearer sk-unlisted")
    );
    let fp = format!("fp:{}", &sha256_hex("sk-unlisted")[..12]);
    assert_eq!(
        gw.access_log("pt-unlisted").await["client"],
        fp.as_str(),
        "the access log shows an unknown key's fingerprint"
    );
    // No key at all: not refused either.
    let r = gw.chat(&[("x-request-id", "pt-nokey")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(upstream_authorization(&emu, "pt-nokey").await, None);
    // The upstream refuses a key: its answer, counted as `other`.
    let r = gw
        .chat(&[
            ("authorization", "Bearer sk-revoked"),
            ("x-emu-status", "401"),
        ])
        .await;
    assert_eq!(r.status, 401);

    let m = gw.metrics().await;
    let count =
        |labels: &str| metric_value(&m, &format!("ezgate_client_requests_total{{{labels}}}"));
    assert_eq!(count("client=\"search\",status=\"200\""), 1.0, "{m}");
    assert_eq!(count("client=\"other\",status=\"200\""), 2.0, "{m}");
    assert_eq!(count("client=\"other\",status=\"401\""), 1.0, "{m}");
    assert!(!m.contains("client=\"anonymous\""), "{m}");
    for secret in ["sk-search-app", "sk-unlisted", "sk-revoked"] {
        assert!(!m.contains(secret), "no key in the metrics");
        assert!(!gw.logs.text().contains(secret), "no key in the logs");
    }
}

#[tokio::test]
async fn a_client_keyed_limit_applies_per_client_in_passthrough() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        &config("\n[[limits]]\nname = \"per-client\"\nkey = \"client\"\nrequests = \"2/min\"\n"),
    )
    .await;
    let search = ("authorization", "Bearer sk-search-app");
    for i in 0..2 {
        assert_eq!(gw.chat(&[search]).await.status, 200, "search {i}");
    }
    let r = gw.chat(&[search, ("x-request-id", "pt-limited")]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error()["code"], "rate_limited");
    assert!(
        emu.entry("pt-limited").await.is_none(),
        "a refused request never reaches the upstream"
    );
    // Each client has its own bucket; so has each unknown key (by its fingerprint).
    let batch = ("authorization", "Bearer sk-batch-app");
    assert_eq!(gw.chat(&[batch]).await.status, 200, "batch's own bucket");
    let unlisted = ("authorization", "Bearer sk-unlisted");
    assert_eq!(gw.chat(&[unlisted]).await.status, 200);
    assert_eq!(gw.chat(&[unlisted]).await.status, 200);
    assert_eq!(gw.chat(&[unlisted]).await.status, 429);
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "ezgate_client_requests_total{client=\"search\",status=\"429\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "ezgate_client_requests_total{client=\"other\",status=\"429\"}"
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_client_allow_list_applies_in_passthrough() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), &config("")).await;
    let o1 = r#"{"model":"o1","messages":[{"role":"user","content":"hi"}]}"#;
    let json = ("content-type", "application/json");
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                json,
                ("authorization", "Bearer sk-search-app"),
                ("x-request-id", "pt-o1"),
            ],
            o1,
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error()["code"], "model_not_allowed");
    assert!(
        emu.entry("pt-o1").await.is_none(),
        "refused before the upstream"
    );
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                json,
                ("authorization", "Bearer sk-search-app"),
                ("x-request-id", "pt-4o"),
            ],
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    // The list is the listed key's: another key (batch's, or an unknown one) has none.
    // Hiding the listed key behind another one: refused, whichever the upstream would use.
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                json,
                ("authorization", "Bearer sk-x"),
                ("authorization", "Bearer sk-search-app"),
                ("x-request-id", "pt-two-keys"),
            ],
            o1,
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error()["code"], "bad_request");
    assert!(emu.entry("pt-two-keys").await.is_none());
    for (key, id) in [
        ("Bearer sk-batch-app", "pt-batch-o1"),
        ("Bearer sk-x", "pt-x-o1"),
    ] {
        let r = gw
            .post(
                "/v1/chat/completions",
                &[json, ("authorization", key), ("x-request-id", id)],
                o1,
            )
            .await;
        assert_eq!(r.status, 200, "{id}");
        assert!(emu.entry(id).await.is_some(), "{id} forwarded");
    }
}

//! Managed mode and rate limits (docs/rate-limits.md), end to end.

use std::time::Duration;

use bytes::Bytes;
use http::Method;

use crate::harness::*;

fn hash(key: &str) -> String {
    sha256_hex(key)
}

fn managed_config(extra: &str) -> String {
    format!(
        "[upstream]\napi_key = \"${{EZLINK_API_KEY}}\"\n\n[[clients]]\nname = \"search\"\nkey_sha256 = \"{}\"\nmodels = [\"gpt-4o*\"]\n\n[[clients]]\nname = \"batch\"\nkey_sha256 = \"{}\"\n{extra}",
        hash("key-search"),
        hash("key-batch")
    )
}

#[tokio::test]
async fn managed_mode_authenticates_and_injects_the_org_key() {
    let emu = Emulator::start().await;
    let gw = Gateway::start_env(
        &emu.url(),
        &managed_config(""),
        &[("EZLINK_API_KEY", "sk-org-key")],
    )
    .await;
    let r = gw.chat(&[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error()["code"], "missing_api_key");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let r = gw.chat(&[("authorization", "Bearer key-unknown")]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error()["code"], "invalid_api_key");
    let r = gw
        .chat(&[
            ("authorization", "Bearer key-search"),
            ("x-request-id", "managed-ok"),
        ])
        .await;
    assert_eq!(r.status, 200);
    let seen = emu.entry("managed-ok").await.unwrap();
    let auth: Vec<&str> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "authorization")
        .map(|h| h[1].as_str().unwrap())
        .collect();
    assert_eq!(
        auth,
        vec!["Bearer sk-org-key"],
        "only the organization's key reaches the upstream"
    );
    assert!(
        !seen.to_string().contains("key-search"),
        "the client's key never reaches the upstream"
    );
    // Model allow-list.
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                ("authorization", "Bearer key-search"),
                ("content-type", "application/json"),
            ],
            r#"{"model":"o1","messages":[]}"#,
        )
        .await;
    assert_eq!(r.status, 403);
    let e = r.error();
    assert_eq!(e["code"], "model_not_allowed");
    assert_eq!(e["param"], "model");
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                ("authorization", "Bearer key-batch"),
                ("content-type", "application/json"),
            ],
            r#"{"model":"o1","messages":[]}"#,
        )
        .await;
    assert_eq!(r.status, 200, "a client without a list may use any model");
}

#[tokio::test]
async fn rate_limited_requests_get_429_and_a_retry_at_retry_after_succeeds() {
    let emu = Emulator::start().await;
    let config = managed_config(
        "\n[[limits]]\nname = \"per-client\"\nkey = \"client\"\nrequests = \"2/s\"\nburst = 2\n",
    );
    let gw = Gateway::start_env(&emu.url(), &config, &[("EZLINK_API_KEY", "sk-org")]).await;
    let auth = [("authorization", "Bearer key-batch")];
    let ok = gw.chat(&auth).await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.header("ratelimit-policy"),
        Some("\"per-client\";q=2;w=1")
    );
    assert!(ok
        .header("ratelimit")
        .unwrap()
        .starts_with("\"per-client\";r=1;"));
    assert_eq!(gw.chat(&auth).await.status, 200);
    let before = emu.log().await.len();
    let r = gw
        .chat(&[
            ("authorization", "Bearer key-batch"),
            ("x-request-id", "limited-1"),
        ])
        .await;
    assert_eq!(r.status, 429);
    let e = r.error();
    assert_eq!(e["code"], "rate_limited");
    assert_eq!(e["source"], "gateway");
    let ms = e["retry_after_ms"].as_u64().unwrap();
    assert!(ms > 0 && ms <= 500, "{ms}");
    assert_eq!(r.header("retry-after-ms"), Some(ms.to_string().as_str()));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    assert!(r.header("ratelimit-policy").is_some());
    assert_eq!(
        emu.log().await.len(),
        before,
        "refused locally: the upstream saw nothing"
    );
    // The other client has its own budget.
    assert_eq!(
        gw.chat(&[("authorization", "Bearer key-search")])
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(ms)).await;
    assert_eq!(
        gw.chat(&auth).await.status,
        200,
        "a retry at retry-after-ms succeeds"
    );
    assert_eq!(
        gw.wait_metric(
            "ezgate_ratelimit_decisions_total{decision=\"limited\",policy=\"per-client\"}",
            |v| v >= 1.0
        )
        .await,
        1.0
    );
    assert_eq!(
        gw.wait_metric("ezgate_gateway_errors_total{code=\"rate_limited\"}", |v| v
            >= 1.0)
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_upstream_429_holds_back_that_key_until_retry_after() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let key = [
        ("authorization", "Bearer sk-app-one"),
        ("content-type", "application/json"),
    ];
    let limited = send(
        &http1(),
        Method::POST,
        &gw.url("/v1/embeddings"),
        &[
            key[0],
            key[1],
            ("x-emu-status", "429"),
            ("x-emu-retry-after", "2"),
        ],
        Bytes::from(r#"{"model":"text-embedding-3-small","input":"x"}"#),
    )
    .await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.error()["source"], "upstream");
    let before = emu.log().await.len();
    for _ in 0..3 {
        let r = send(
            &http1(),
            Method::POST,
            &gw.url("/v1/embeddings"),
            &key,
            Bytes::from(r#"{"model":"text-embedding-3-small","input":"x"}"#),
        )
        .await;
        assert_eq!(r.status, 429);
        let e = r.error();
        assert_eq!(e["code"], "upstream_rate_limited");
        assert_eq!(e["source"], "gateway");
        assert!(e["retry_after_ms"].as_u64().unwrap() <= 2000);
    }
    assert_eq!(
        emu.log().await.len(),
        before,
        "the upstream received none of the held requests"
    );
    let other = send(
        &http1(),
        Method::POST,
        &gw.url("/v1/embeddings"),
        &[("authorization", "Bearer sk-app-two"), key[1]],
        Bytes::from(r#"{"model":"text-embedding-3-small","input":"x"}"#),
    )
    .await;
    assert_eq!(other.status, 200, "another key is not held back");
}

#[tokio::test]
async fn concurrency_slots_are_released_by_cancelled_streams() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[[limits]]\nname = \"one-at-a-time\"\nkey = \"global\"\nconcurrency = 1\n",
    )
    .await;
    // A stream that fails mid-way releases its slot.
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-emu-cut-after", "1"),
                ("x-emu-stream-events", "5"),
            ],
            r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.chat(&[]).await.status, 200);
    // A stream whose client left releases its slot.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let req = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-emu-stream-events: 1000\r\nx-emu-stream-interval-ms: 50\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await.unwrap();
        let r = gw.chat(&[]).await;
        assert_eq!(r.status, 429, "the open stream holds the only slot");
        assert_eq!(r.error()["code"], "concurrency_limited");
    }
    let mut ok = false;
    for _ in 0..100 {
        if gw.chat(&[]).await.status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the slot came back when the client left");
}

#[tokio::test]
async fn token_limits_refuse_with_token_headers() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[[limits]]\nname = \"tpm\"\nkey = \"global\"\ntokens = \"1000/min\"\n",
    )
    .await;
    let body = r#"{"model":"gpt-4o","max_tokens":600,"messages":[{"role":"user","content":"hi"}]}"#;
    let h = [
        ("content-type", "application/json"),
        ("x-emu-completion-tokens", "590"),
    ];
    let ok = gw.post("/v1/chat/completions", &h, body).await;
    assert_eq!(ok.status, 200);
    assert!(
        ok.header("ratelimit")
            .unwrap()
            .starts_with("\"tpm\";r=399;"),
        "{:?}",
        ok.header("ratelimit")
    );
    // 601 + 590 used ≈ 1000: the second request's 601-token estimate no longer fits.
    let r = gw.post("/v1/chat/completions", &h, body).await;
    assert_eq!(r.status, 429);
    let e = r.error();
    assert_eq!(e["code"], "token_rate_limited");
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
    // What is left after the first request settled at its reported 591 tokens.
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("409"));
    assert!(
        e["message"].as_str().unwrap().contains(
            "1,000 tokens per minute, 409 left; this request is estimated at 601 tokens (1 prompt + 600 max_tokens"
        ),
        "{e}"
    );
    // Usage was read from the response and charged.
    assert_eq!(
        gw.wait_metric(
            "ezgate_tokens_total{client=\"anonymous\",kind=\"completion\",model=\"gpt-4o\"}",
            |v| v >= 590.0
        )
        .await,
        590.0
    );
}

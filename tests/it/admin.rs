//! The admin listener's operator view: `GET /status`, `POST /cooldowns/clear` with
//! `server.admin_token`, and the metrics that read the same state.

use bytes::Bytes;
use http::Method;
use serde_json::Value;

use crate::harness::*;

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

fn policy<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no policy {name} in {status}"))
}

/// The `hash` label of the one `ezgate_config_info` series.
fn config_info_hashes(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("ezgate_config_info{hash=\""))
        .map(|rest| rest.split('"').next().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn status_names_keys_by_client_or_fingerprint_never_the_key() {
    let emu = Emulator::start().await;
    let config = format!(
        r#"[upstream]
api_key = "sk-org-secret-0001"

[[clients]]
name = "search"
key_sha256 = "{}"

[[limits]]
name = "per-client"
key = "client"
requests = "10/h"

[[limits]]
name = "per-key"
key = "api_key"
requests = "10/h"

[[limits]]
name = "per-ip"
key = "ip"
requests = "10/h"

[[limits]]
name = "per-team"
key = "header:x-team"
requests = "10/h"
"#,
        sha256_hex("sk-client-search-1")
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    let ask = || {
        gw.chat(&[
            ("authorization", "Bearer sk-client-search-1"),
            ("x-team", "team-secret-value"),
        ])
    };
    for _ in 0..3 {
        assert_eq!(ask().await.status, 200);
    }
    assert_eq!(
        gw.metric("ezgate_ratelimit_utilization{policy=\"per-client\"}")
            .await,
        0.3
    );
    let (status, text) = gw.status().await;
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["draining"], false);
    assert_eq!(
        status["config"]["source"],
        gw.config_path.display().to_string()
    );
    let hash = status["config"]["hash"].as_str().unwrap().to_owned();
    assert_eq!(hash.len(), 16);
    assert_eq!(config_info_hashes(&gw.metrics().await), [hash]);
    let reload = &status["config"]["last_reload"];
    assert_eq!(
        (&reload["trigger"], &reload["result"], &reload["error"]),
        (
            &Value::from("startup"),
            &Value::from("applied"),
            &Value::Null
        )
    );
    assert!(reload["at"].as_str().unwrap().ends_with('Z'), "{reload}");
    let expect = [
        ("per-client", "client", "search".to_owned()),
        ("per-key", "api_key", fingerprint_of("sk-client-search-1")),
        ("per-ip", "ip", fingerprint_of("127.0.0.1")),
        (
            "per-team",
            "header:x-team",
            fingerprint_of("team-secret-value"),
        ),
    ];
    for (name, key, shown) in expect {
        let p = policy(&status, name);
        assert_eq!(
            (&p["key"], &p["store"], &p["view"]),
            (
                &Value::from(key),
                &Value::from("local"),
                &Value::from("local")
            ),
            "{p}"
        );
        assert_eq!(
            (&p["mode"], &p["keys"]),
            (&Value::from("enforce"), &Value::from(1)),
            "{p}"
        );
        let top = &p["busiest"][0];
        assert_eq!(top["key"], shown, "{p}");
        assert_eq!(top["requests"]["remaining"], 7, "{p}");
        let reset = top["requests"]["reset_ms"].as_u64().unwrap();
        assert!(reset > 2 * 360_000 && reset <= 3 * 360_000, "{p}");
        assert_eq!(top["used"], 0.3, "{p}");
        assert_eq!(p["utilization"], 0.3, "{p}");
    }
    for secret in [
        "sk-client-search-1",
        "sk-org-secret-0001",
        "127.0.0.1",
        "team-secret-value",
    ] {
        assert!(!text.contains(secret), "{secret} in /status:\n{text}");
    }
    assert_eq!(status["upstream_cooldowns"], Value::Array(vec![]));
    assert_eq!(status["store"], Value::Null);
    // The gauge rises as the busiest key is used.
    for _ in 0..2 {
        assert_eq!(ask().await.status, 200);
    }
    assert_eq!(
        gw.metric("ezgate_ratelimit_utilization{policy=\"per-team\"}")
            .await,
        0.5
    );
}

#[tokio::test]
async fn reloads_are_recorded_applied_and_refused() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let (first, _) = gw.status().await;
    let first_hash = first["config"]["hash"].as_str().unwrap().to_owned();

    std::fs::write(
        &gw.config_path,
        "[[limits]]\nname = \"reloaded\"\nkey = \"global\"\nrequests = \"5/h\"\n",
    )
    .unwrap();
    gw.signal("HUP");
    gw.wait_logs("config reloaded", 1).await;
    let (status, _) = gw.status().await;
    let reload = &status["config"]["last_reload"];
    assert_eq!(
        (&reload["trigger"], &reload["result"], &reload["error"]),
        (
            &Value::from("signal"),
            &Value::from("applied"),
            &Value::Null
        )
    );
    let hash = status["config"]["hash"].as_str().unwrap().to_owned();
    assert_ne!(hash, first_hash);
    assert_eq!(policy(&status, "reloaded")["keys"], 0);
    let metrics = gw.metrics().await;
    assert_eq!(config_info_hashes(&metrics), [hash.as_str()], "one series");
    assert_eq!(
        metric_value(&metrics, "ezgate_config_reloads_total{result=\"applied\"}"),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "ezgate_config_reloads_total{result=\"refused\"}"),
        0.0
    );

    std::fs::write(
        &gw.config_path,
        "[[limits]]\nname = \"broken\"\nkey = \"global\"\nrequests = \"5/fortnight\"\n",
    )
    .unwrap();
    gw.signal("HUP");
    gw.wait_logs("config reload refused", 1).await;
    let (status, _) = gw.status().await;
    let reload = &status["config"]["last_reload"];
    assert_eq!(
        (&reload["trigger"], &reload["result"]),
        (&Value::from("signal"), &Value::from("refused"))
    );
    let error = reload["error"].as_str().unwrap();
    assert!(error.contains("limits[0].requests"), "{error}");
    assert_eq!(status["config"]["hash"], hash, "the previous config serves");
    assert!(status["limits"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "reloaded"));
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(&metrics, "ezgate_config_reloads_total{result=\"refused\"}"),
        1.0
    );
    assert_eq!(config_info_hashes(&metrics), [hash]);
}

async fn embeddings(gw: &Gateway, extra: &[(&str, &str)]) -> Resp {
    let mut h = vec![
        ("authorization", "Bearer sk-app-one"),
        ("content-type", "application/json"),
    ];
    h.extend_from_slice(extra);
    send(
        &http1(),
        Method::POST,
        &gw.url("/v1/embeddings"),
        &h,
        Bytes::from(r#"{"model":"text-embedding-3-small","input":"x"}"#),
    )
    .await
}

#[tokio::test]
async fn cooldowns_are_shown_and_lifted_with_the_admin_token() {
    let emu = Emulator::start().await;
    let gw = Gateway::start_env(
        &emu.url(),
        "[server]\nadmin_token = \"${EZGATE_ADMIN_TOKEN}\"\n",
        &[("EZGATE_ADMIN_TOKEN", ADMIN_TOKEN)],
    )
    .await;
    let limited = [("x-emu-status", "429"), ("x-emu-retry-after", "120")];
    assert_eq!(embeddings(&gw, &limited).await.status, 429);
    let mut chat_headers = vec![("authorization", "Bearer sk-app-one")];
    chat_headers.extend_from_slice(&limited);
    assert_eq!(gw.chat(&chat_headers).await.status, 429);

    let (status, text) = gw.status().await;
    let mut listed: Vec<(String, String)> = status["upstream_cooldowns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ms = c["retry_after_ms"].as_u64().unwrap();
            assert!(ms > 0 && ms <= 120_000, "{c}");
            (
                c["credential"].as_str().unwrap().to_owned(),
                c["model"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    listed.sort();
    let fp = fingerprint_of("sk-app-one");
    // The embeddings request's model is not read (no policy needs its body): `*`.
    assert_eq!(
        listed,
        [(fp.clone(), "*".to_owned()), (fp, "gpt-4o".to_owned())]
    );
    assert!(!text.contains("sk-app-one"));
    assert_eq!(gw.metric("ezgate_upstream_cooldowns").await, 2.0);

    // Missing or wrong tokens: 401 in the error schema, naming the setting, echoing nothing.
    for auth in [
        None,
        Some("Bearer wrong-token-0123456789-0123"),
        Some("Bearer admin-token-for-tests-012345678"),
        Some("Basic admin-token-for-tests-0123456789"),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let r = gw.admin(Method::POST, "/cooldowns/clear", &headers).await;
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let e = r.error();
        assert_eq!(
            (&e["code"], &e["type"]),
            (
                &Value::from("invalid_admin_token"),
                &Value::from("unauthorized")
            )
        );
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("server.admin_token"),
            "{e}"
        );
        assert!(!String::from_utf8_lossy(&r.body).contains("wrong-token"));
    }
    assert_eq!(
        gw.metric("ezgate_upstream_cooldowns").await,
        2.0,
        "nothing lifted"
    );

    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let r = gw
        .admin(Method::POST, "/cooldowns/clear?model=gpt-4o", &auth)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.json(),
        serde_json::json!({"cleared": 1, "model": "gpt-4o"})
    );
    gw.wait_logs("upstream cooldowns cleared", 1).await;
    assert!(
        !gw.logs.text().contains(ADMIN_TOKEN),
        "the token is never logged"
    );
    assert_eq!(gw.metric("ezgate_upstream_cooldowns").await, 1.0);

    // The lifted model goes upstream again; the other is still held back.
    let before = emu.log().await.len();
    assert_eq!(
        gw.chat(&[("authorization", "Bearer sk-app-one")])
            .await
            .status,
        200
    );
    assert_eq!(
        emu.log().await.len(),
        before + 1,
        "the chat request reached the upstream"
    );
    let held = embeddings(&gw, &[]).await;
    assert_eq!(
        (held.status.as_u16(), &held.error()["code"]),
        (429, &Value::from("upstream_rate_limited"))
    );
    assert_eq!(
        emu.log().await.len(),
        before + 1,
        "the held request did not"
    );

    let r = gw.admin(Method::POST, "/cooldowns/clear", &auth).await;
    assert_eq!(r.json(), serde_json::json!({"cleared": 1, "model": null}));
    assert_eq!(embeddings(&gw, &[]).await.status, 200);
    let (status, _) = gw.status().await;
    assert_eq!(status["upstream_cooldowns"], Value::Array(vec![]));
    assert_eq!(gw.metric("ezgate_upstream_cooldowns").await, 0.0);

    // Other methods and bad queries are refused in the schema.
    let r = gw.admin(Method::GET, "/cooldowns/clear", &auth).await;
    assert_eq!((r.status.as_u16(), r.header("allow")), (405, Some("POST")));
    assert_eq!(r.error()["code"], "method_not_allowed");
    let r = gw.admin(Method::POST, "/status", &auth).await;
    assert_eq!(r.status, 405);
    let r = gw
        .admin(Method::POST, "/cooldowns/clear?model=a&model=b", &auth)
        .await;
    assert_eq!(
        (r.status.as_u16(), &r.error()["code"]),
        (400, &Value::from("bad_request"))
    );
}

#[tokio::test]
async fn the_post_endpoints_are_off_without_an_admin_token() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    for headers in [
        &[][..],
        &[("authorization", "Bearer anything-at-all-0123456789")][..],
    ] {
        let r = gw.admin(Method::POST, "/cooldowns/clear", headers).await;
        assert_eq!(r.status, 403);
        let e = r.error();
        assert_eq!(
            (&e["code"], &e["type"], &e["status"]),
            (
                &Value::from("admin_token_not_configured"),
                &Value::from("forbidden"),
                &Value::from(403)
            )
        );
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("server.admin_token"),
            "{e}"
        );
    }
}

/// A shared store shows its mode, health, last error and fleet; a Redis-shared policy shows
/// its local fallback, keyed by fingerprints.
#[tokio::test]
async fn status_shows_the_shared_store_and_the_fallback_view() {
    use crate::redis_servers::{eventually, Redis};
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    let config = format!(
        "[log]\naccess_log = false\n[redis]\nurl = \"redis://127.0.0.1:{}\"\nreplicas = 1\ntimeout = \"200ms\"\n\n[[limits]]\nname = \"shared\"\nkey = \"header:x-user\"\nrequests = \"30/h\"\nstore = \"redis\"\n",
        redis.port
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    eventually("the heartbeat counts this gateway", || async {
        gw.status().await.0["store"]["fleet"] == 1
    })
    .await;
    let (status, _) = gw.status().await;
    let store = &status["store"];
    assert_eq!(
        (&store["mode"], &store["up"], &store["last_error"]),
        (&Value::from("standalone"), &Value::from(true), &Value::Null)
    );
    let p = policy(&status, "shared");
    assert_eq!(
        (&p["store"], &p["view"]),
        (&Value::from("redis"), &Value::from("local_fallback"))
    );
    assert_eq!(p["keys"], 0, "nothing charged locally while Redis answers");

    let port = redis.stop().await;
    for _ in 0..3 {
        gw.get_with("/v1/models", &[("x-user", "user-secret-name")])
            .await;
    }
    let (status, text) = gw.status().await;
    let store = &status["store"];
    assert_eq!(store["up"], false, "{store}");
    let error = store["last_error"].as_str().unwrap();
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    let p = policy(&status, "shared");
    assert_eq!(
        p["busiest"][0]["key"],
        fingerprint_of("user-secret-name"),
        "{p}"
    );
    assert_eq!(p["busiest"][0]["requests"]["remaining"], 27, "{p}");
    assert!(!text.contains("user-secret-name"));
}

//! CONTRACT §7: one JSON line per request; never a key or a body.

use crate::harness::*;

#[tokio::test]
async fn access_log_has_the_fields_and_never_a_secret() {
    let emu = Emulator::start().await;
    let client_key = "sk-client-secret-7f3a";
    let org_key = "sk-org-secret-91bc";
    let hash: String = ezgate::clients::sha256(client_key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let config = format!(
        "[upstream]\napi_key = \"${{EZLINK_API_KEY}}\"\n[[clients]]\nname = \"search-team\"\nkey_sha256 = \"{hash}\"\n"
    );
    let gw = Gateway::start_env(&emu.url(), &config, &[("EZLINK_API_KEY", org_key)]).await;
    let auth = format!("Bearer {client_key}");
    let r = gw
        .chat(&[("authorization", &auth), ("x-request-id", "log-ok")])
        .await;
    assert_eq!(r.status, 200);
    let r = gw
        .chat(&[
            ("authorization", "Bearer sk-wrong-key-5555"),
            ("x-request-id", "log-bad"),
        ])
        .await;
    assert_eq!(r.status, 401);
    let ok = gw.access_log("log-ok").await;
    for field in [
        "timestamp",
        "request_id",
        "method",
        "route",
        "status",
        "source",
        "duration_ms",
        "upstream_ms",
        "bytes",
        "client",
        "model",
    ] {
        assert!(ok.get(field).is_some(), "access log lacks {field}: {ok}");
    }
    assert_eq!(ok["client"], "search-team");
    assert_eq!(ok["model"], "gpt-4o");
    assert_eq!(ok["route"], "/v1/chat/completions");
    let bad = gw.access_log("log-bad").await;
    assert_eq!(bad["code"], "invalid_api_key");
    let all = gw.logs.text();
    for secret in [
        client_key,
        org_key,
        "sk-wrong-key-5555",
        "Say hello to the gateway tests",
    ] {
        assert!(!all.contains(secret), "{secret} leaked into the logs");
    }
    let metrics = gw.metrics().await;
    for secret in [client_key, org_key, "sk-wrong-key-5555"] {
        assert!(!metrics.contains(secret), "{secret} leaked into metrics");
    }
}

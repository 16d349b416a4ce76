//! The access log (docs/metrics.md): one JSON line per request; never a key or a body.

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
    let metrics = gw.settled_metrics().await;
    for secret in [client_key, org_key, "sk-wrong-key-5555"] {
        assert!(!metrics.contains(secret), "{secret} leaked into metrics");
    }
}

#[tokio::test]
async fn text_format_writes_key_value_access_lines() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[log]\nformat = \"text\"\n").await;
    let r = gw.chat(&[("x-request-id", "log-text")]).await;
    assert_eq!(r.status, 200);
    let line = wait_for_line(&gw, "request_id=log-text").await;
    assert!(
        line.contains("  INFO ezgate::access: request_id=log-text method=\"POST\""),
        "{line}"
    );
    for field in [
        "route=\"/v1/chat/completions\"",
        "status=200",
        "source=\"upstream\"",
        "model=\"gpt-4o\"",
        "duration_ms=",
        "prompt_tokens=",
    ] {
        assert!(line.contains(field), "access line lacks {field}: {line}");
    }
}

#[tokio::test]
async fn no_access_lines_when_turned_off_or_filtered_out() {
    let emu = Emulator::start().await;
    let filtered =
        Gateway::start_env(&emu.url(), "", &[("RUST_LOG", "info,ezgate::access=off")]).await;
    let off = Gateway::start(&emu.url(), "[log]\naccess_log = false\n").await;
    for gw in [filtered, off] {
        assert_eq!(gw.chat(&[("x-request-id", "log-none")]).await.status, 200);
        // Every request has been recorded once the drain finished, and its line would
        // have been queued before this one.
        gw.signal("TERM");
        wait_for_line(&gw, "all connections finished").await;
        let text = gw.logs.text();
        assert!(text.contains("ezgate started"), "{text}");
        assert!(!text.contains("ezgate::access"), "{text}");
        assert!(!text.contains("log-none"), "{text}");
    }
}

async fn wait_for_line(gw: &Gateway, needle: &str) -> String {
    let start = std::time::Instant::now();
    loop {
        if let Some(l) = gw.logs.all().into_iter().find(|l| l.contains(needle)) {
            return l;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no log line with {needle}:\n{}",
            gw.logs.text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

//! The upstream's quota, learned from the `x-ratelimit-*` headers of its responses
//! (`[upstream.quota]`, docs/rate-limits.md): shown in `ezgate_upstream_quota_*` and in
//! `/status`, per key fingerprint and model, never trusted past its reset.

use http::header::{HeaderName, HeaderValue};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::client_async;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::{fingerprint_of, Emulator, Gateway, DEADLINE};

const FULL: &str = "limit-requests=100,remaining-requests=99,reset-requests=6m0s,limit-tokens=30000,remaining-tokens=29000,reset-tokens=1h2m3.5s";
const LIMIT_REQ: &str = "ezgate_upstream_quota_limit{model=\"gpt-4o\",unit=\"requests\"}";
const REMAINING_REQ: &str = "ezgate_upstream_quota_remaining{model=\"gpt-4o\",unit=\"requests\"}";
const LIMIT_TOK: &str = "ezgate_upstream_quota_limit{model=\"gpt-4o\",unit=\"tokens\"}";
const REMAINING_TOK: &str = "ezgate_upstream_quota_remaining{model=\"gpt-4o\",unit=\"tokens\"}";
const STREAM_BODY: &str =
    r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const ORG_KEY: &str = "sk-org-quota-secret";

async fn managed(emu: &Emulator, extra: &str) -> Gateway {
    Gateway::start_env(
        &emu.url(),
        &format!("[upstream]\napi_key = \"${{ORG_KEY}}\"\n{extra}"),
        &[("ORG_KEY", ORG_KEY)],
    )
    .await
}

/// The `/status` entries of the learned quota.
async fn learned(gw: &Gateway) -> Vec<Value> {
    let (status, text) = gw.status().await;
    assert!(!text.contains(ORG_KEY), "{text}");
    status["upstream_quota"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The one entry of `model`, once `/status` shows it with `requests.remaining == want`.
async fn wait_entry(gw: &Gateway, model: &str, want: Value) -> Value {
    let start = std::time::Instant::now();
    loop {
        let all = learned(gw).await;
        if let Some(e) = all
            .iter()
            .find(|e| e["model"] == model && e["requests"]["remaining"] == want)
        {
            return e.clone();
        }
        assert!(start.elapsed() < DEADLINE, "{model}: never {want}: {all:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_kind_of_response_is_learned_and_nonsense_leaves_it_untouched() {
    let emu = Emulator::start().await;
    let gw = managed(&emu, "").await;

    // A plain success: all six headers.
    let r = gw.chat(&[("x-emu-ratelimit", FULL)]).await;
    assert_eq!(r.status, 200);
    // The headers reach the client untouched.
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("99"));
    gw.wait_metric(REMAINING_REQ, |v| v == 99.0).await;
    let m = gw.metrics().await;
    assert_eq!(crate::harness::metric_value(&m, LIMIT_REQ), 100.0);
    assert_eq!(crate::harness::metric_value(&m, LIMIT_TOK), 30000.0);
    assert_eq!(crate::harness::metric_value(&m, REMAINING_TOK), 29000.0);
    assert!(!m.contains(ORG_KEY));
    let e = wait_entry(&gw, "gpt-4o", 99.into()).await;
    let key = e["key"].as_str().unwrap();
    assert!(key.starts_with("org:") && key.len() == 16, "{key}");
    assert_eq!(e["requests"]["limit"], 100);
    assert_eq!(e["requests"]["expired"], false);
    let reset = e["requests"]["reset_ms"].as_u64().unwrap();
    assert!(reset > 300_000 && reset <= 360_000, "{reset}");
    assert_eq!(e["tokens"]["limit"], 30000);
    assert_eq!(e["tokens"]["remaining"], 29000);

    // Partial (tokens without a reset) and nonsense (a remaining that is no number, a
    // remaining above the limit): nothing of either unit changes.
    for (i, ratelimit) in [
        "limit-tokens=1,remaining-tokens=1",
        "limit-requests=100,remaining-requests=abc,reset-requests=1s,limit-tokens=5,remaining-tokens=9,reset-tokens=1s",
        "limit-requests=100,remaining-requests=5,reset-requests=-1s,limit-tokens=5,remaining-tokens=1,reset-tokens=forever",
    ]
    .iter()
    .enumerate()
    {
        let id = format!("quota-nonsense-{i}");
        let r = gw
            .chat(&[("x-emu-ratelimit", ratelimit), ("x-request-id", &id)])
            .await;
        assert_eq!(r.status, 200);
        // A response is learned from before ezgate sends its head on: nothing to wait for.
    }
    let e = wait_entry(&gw, "gpt-4o", 99.into()).await;
    assert_eq!(e["tokens"]["remaining"], 29000);
    assert_eq!(e["tokens"]["limit"], 30000);

    // A stream's response head.
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                (
                    "x-emu-ratelimit",
                    "limit-requests=100,remaining-requests=90,reset-requests=1m",
                ),
            ],
            STREAM_BODY,
        )
        .await;
    assert_eq!(r.status, 200);
    let e = wait_entry(&gw, "gpt-4o", 90.into()).await;
    assert_eq!(e["tokens"]["remaining"], 29000, "tokens kept: {e}");

    // An error response, normalized by ezgate, teaches too.
    let r = gw
        .chat(&[
            ("x-emu-status", "503"),
            (
                "x-emu-ratelimit",
                "limit-requests=100,remaining-requests=80,reset-requests=1m",
            ),
        ])
        .await;
    assert_eq!(r.status, 503);
    wait_entry(&gw, "gpt-4o", 80.into()).await;
    gw.wait_metric(REMAINING_REQ, |v| v == 80.0).await;

    // A reset that passes: the remaining is no longer trusted.
    let r = gw
        .chat(&[(
            "x-emu-ratelimit",
            "limit-requests=100,remaining-requests=0,reset-requests=1ms",
        )])
        .await;
    assert_eq!(r.status, 200);
    let e = wait_entry(&gw, "gpt-4o", Value::Null).await;
    assert_eq!(e["requests"]["expired"], true);
    assert_eq!(e["requests"]["limit"], 100);
    assert_eq!(e["requests"]["reset_ms"], 0);
    let m = gw.metrics().await;
    assert!(!m.contains(REMAINING_REQ), "{m}");
    assert_eq!(crate::harness::metric_value(&m, LIMIT_REQ), 100.0);
    assert_eq!(crate::harness::metric_value(&m, REMAINING_TOK), 29000.0);
}

#[tokio::test]
async fn a_websocket_handshake_is_learned() {
    let emu = Emulator::start().await;
    let gw = managed(&emu, "").await;
    let mut req = format!("ws://{}/v1/realtime?model=gpt-4o-realtime-preview", gw.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        HeaderName::from_static("x-emu-ratelimit"),
        HeaderValue::from_static("limit-requests=10,remaining-requests=7,reset-requests=20ms0s"),
    );
    // Nonsense reset above: the requests part is not read; below, a good one.
    let mut good = req.clone();
    good.headers_mut().insert(
        HeaderName::from_static("x-emu-ratelimit"),
        HeaderValue::from_static("limit-requests=10,remaining-requests=7,reset-requests=6m0s"),
    );
    for req in [req, good] {
        let tcp = TcpStream::connect(gw.addr).await.unwrap();
        let (ws, resp) = tokio::time::timeout(DEADLINE, client_async(req, tcp))
            .await
            .expect("the handshake is answered")
            .unwrap();
        assert_eq!(resp.status(), 101);
        drop(ws);
    }
    // A model ezgate does not name in its metrics is shown by its fingerprint.
    let e = wait_entry(&gw, &fingerprint_of("gpt-4o-realtime-preview"), 7.into()).await;
    assert_eq!(e["requests"]["limit"], 10);
    assert_eq!(e["tokens"], Value::Null);
    // The nonsense handshake taught nothing: one entry.
    assert_eq!(learned(&gw).await.len(), 1);
}

#[tokio::test]
async fn passthrough_keys_are_kept_apart_by_fingerprint() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    for (key, remaining) in [("sk-quota-alpha", 60), ("sk-quota-beta", 20)] {
        let ratelimit =
            format!("limit-requests=100,remaining-requests={remaining},reset-requests=1m");
        let auth = format!("Bearer {key}");
        let r = gw
            .chat(&[("authorization", &auth), ("x-emu-ratelimit", &ratelimit)])
            .await;
        assert_eq!(r.status, 200);
    }
    // No model named (a GET of the model list): learned under `*`.
    let r = gw
        .get_with(
            "/v1/models",
            &[
                ("authorization", "Bearer sk-quota-alpha"),
                (
                    "x-emu-ratelimit",
                    "limit-requests=100,remaining-requests=55,reset-requests=1m",
                ),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    wait_entry(&gw, "*", 55.into()).await;
    wait_entry(&gw, "gpt-4o", 20.into()).await;
    let all = learned(&gw).await;
    let (_, text) = gw.status().await;
    let mut keys: Vec<(String, String, u64)> = all
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_owned(),
                e["model"].as_str().unwrap().to_owned(),
                e["requests"]["remaining"].as_u64().unwrap(),
            )
        })
        .collect();
    keys.sort();
    let (a, b) = (
        fingerprint_of("sk-quota-alpha"),
        fingerprint_of("sk-quota-beta"),
    );
    let mut want = vec![
        (a.clone(), "*".to_owned(), 55),
        (a, "gpt-4o".to_owned(), 60),
        (b, "gpt-4o".to_owned(), 20),
    ];
    want.sort();
    assert_eq!(keys, want);
    let m = gw.metrics().await;
    for text in [&text, &m] {
        assert!(!text.contains("sk-quota"), "{text}");
    }
    // Of two keys of one model, the metrics show the one nearest its limit.
    assert_eq!(crate::harness::metric_value(&m, REMAINING_REQ), 20.0);
    // `*` is counted as `other`.
    assert_eq!(
        crate::harness::metric_value(
            &m,
            "ezgate_upstream_quota_remaining{model=\"other\",unit=\"requests\"}"
        ),
        55.0
    );
}

#[tokio::test]
async fn mode_off_learns_nothing() {
    let emu = Emulator::start().await;
    let gw = managed(&emu, "\n[upstream.quota]\nmode = \"off\"\n").await;
    let r = gw
        .chat(&[("x-emu-ratelimit", FULL), ("x-request-id", "quota-off")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("99"));
    let (status, _) = gw.status().await;
    assert_eq!(status["upstream_quota"], Value::Null);
    assert!(!gw.metrics().await.contains("ezgate_upstream_quota_limit{"));
}

#[tokio::test]
async fn a_reload_keeps_what_was_learned_unless_the_quota_section_changed() {
    let emu = Emulator::start().await;
    let config = "[upstream.quota]\nheadroom = \"5%\"\n";
    let gw = Gateway::start(&emu.url(), config).await;
    let r = gw
        .chat(&[
            ("authorization", "Bearer sk-quota-reload"),
            ("x-emu-ratelimit", FULL),
        ])
        .await;
    assert_eq!(r.status, 200);
    wait_entry(&gw, "gpt-4o", 99.into()).await;
    // Another section changes: the learned quota stays.
    std::fs::write(
        &gw.config_path,
        format!(
            "{config}\n[[limits]]\nname = \"roomy\"\nkey = \"global\"\nrequests = \"1000/min\"\n"
        ),
    )
    .unwrap();
    gw.signal("HUP");
    gw.wait_logs("config reloaded", 1).await;
    wait_entry(&gw, "gpt-4o", 99.into()).await;
    // `[upstream.quota]` changes: learning starts over.
    std::fs::write(&gw.config_path, "[upstream.quota]\nheadroom = \"10%\"\n").unwrap();
    gw.signal("HUP");
    gw.wait_logs("config reloaded", 2).await;
    assert_eq!(learned(&gw).await, Vec::<Value>::new());
    // An impossible section is refused by name; the running config keeps serving.
    std::fs::write(
        &gw.config_path,
        "[upstream.quota]\nmode = \"enforce\"\nheadroom = \"80%\"\n",
    )
    .unwrap();
    gw.signal("HUP");
    let line = gw.wait_log("config reload refused").await;
    assert!(line.contains("upstream.quota"), "{line}");
}

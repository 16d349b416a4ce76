//! Cost per request, end to end (docs/budgets.md, "Prices and cost"): every usage the
//! emulator reports — JSON, a stream whose usage ezgate asked for and hid, the Responses
//! API, embeddings, a realtime session — is priced exactly, cached prompt tokens at the
//! cached price; `ezgate_cost_total`, the access log and `/status` agree. And
//! `check-config` refuses a bad price table.

use serde_json::json;

use crate::harness::*;
use crate::websocket::{close_of, emit, open, respond};

const KEY: &str = "sk-search-team-key";

/// Prices in micro-units per 1M tokens, as the config below writes them.
const GPT_4O: (u64, u64, u64) = (2_500_000, 1_250_000, 10_000_000);
const EMBEDDING: (u64, u64, u64) = (20_000, 20_000, 0);
const REALTIME: (u64, u64, u64) = (4_000_000, 400_000, 16_000_000);

fn config() -> String {
    format!(
        r#"[[clients]]
name = "search-app"
key_sha256 = "{}"
team = "search"

[prices]
currency = "USD"
models = [
  {{ model = "gpt-4o*", input = 2.50, cached_input = 1.25, output = 10.00 }},
  {{ model = "text-embedding-3-small", input = 0.02 }},
  {{ model = "gpt-realtime", input = 4.00, cached_input = 0.40, output = 16.00, audio_input = 32.00, audio_output = 64.00 }},
]
"#,
        sha256_hex(KEY)
    )
}

/// The exact cost in nano-units, computed here independently: tokens × micro-units per
/// million, rounded half up to the nano-unit.
fn nanos(
    (input, cached_price, output): (u64, u64, u64),
    prompt: u64,
    cached: u64,
    completion: u64,
) -> u64 {
    let picos = u128::from(prompt - cached) * u128::from(input)
        + u128::from(cached) * u128::from(cached_price)
        + u128::from(completion) * u128::from(output);
    u64::try_from((picos + 500) / 1000).unwrap()
}

/// A nano-unit amount as the float the metric and the log show.
fn shown(nanos: u64) -> f64 {
    format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
        .parse()
        .unwrap()
}

fn headers<'a>(rid: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![
        ("content-type", "application/json"),
        ("authorization", "Bearer sk-search-team-key"),
        ("x-request-id", rid),
    ];
    h.extend_from_slice(extra);
    h
}

/// The access log's cost of a request, checked to carry `cached` cached tokens.
async fn logged_cost(gw: &Gateway, rid: &str, cached: u64) -> f64 {
    let line = gw.access_log(rid).await;
    if cached > 0 {
        assert_eq!(line["cached_tokens"], cached, "{line}");
    } else {
        assert!(line.get("cached_tokens").is_none(), "{line}");
    }
    line["cost"]
        .as_f64()
        .unwrap_or_else(|| panic!("no cost in {line}"))
}

fn cost_metric(model: &str) -> String {
    format!("ezgate_cost_total{{client=\"search-app\",model=\"{model}\"}}")
}

#[tokio::test]
async fn json_chat_with_cached_tokens_costs_the_cached_price() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), &config()).await;
    let h = headers(
        "chat-cached",
        &[
            ("x-emu-cached-tokens", "4"),
            ("x-emu-completion-tokens", "20"),
        ],
    );
    let r = gw.post("/v1/chat/completions", &h, CHAT_BODY).await;
    assert_eq!(r.status, 200);
    let usage = r.json()["usage"].clone();
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"], 4,
        "{usage}"
    );
    assert_eq!(usage["completion_tokens"], 20);
    // 7 prompt tokens, 4 of them cached, 20 completion tokens at gpt-4o's prices:
    // 3 × 2.5e-6 + 4 × 1.25e-6 + 20 × 1e-5 = 0.0002125.
    assert_eq!(prompt, 7);
    let want = nanos(GPT_4O, prompt, 4, 20);
    assert_eq!(want, 212_500);
    assert_eq!(logged_cost(&gw, "chat-cached", 4).await, shown(want));
    let metric = gw.wait_metric(&cost_metric("gpt-4o"), |v| v > 0.0).await;
    assert_eq!(metric, 0.000_212_5);
    // The same request without cached tokens costs more: all 7 at the input price.
    let h = headers("chat-plain", &[("x-emu-completion-tokens", "20")]);
    assert_eq!(
        gw.post("/v1/chat/completions", &h, CHAT_BODY).await.status,
        200
    );
    let plain = nanos(GPT_4O, 7, 0, 20);
    assert_eq!(logged_cost(&gw, "chat-plain", 0).await, shown(plain));
    let total = gw
        .wait_metric(&cost_metric("gpt-4o"), |v| v > 0.000_212_5)
        .await;
    assert_eq!(total, shown(want + plain));
}

#[tokio::test]
async fn a_stream_is_priced_from_the_usage_ezgate_asked_for_and_hid() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), &config()).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Stream a few words back to the gateway tests."}]}"#;
    let h = headers(
        "stream-hidden",
        &[("x-emu-cached-tokens", "8"), ("x-emu-stream-events", "9")],
    );
    let r = gw.post("/v1/chat/completions", &h, body).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(
        !text.contains("\"usage\""),
        "the client did not ask for usage:\n{text}"
    );
    let e = emu.entry("stream-hidden").await.unwrap();
    let prompt = e["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(e["usage"]["completion_tokens"], 9);
    let want = nanos(GPT_4O, prompt, 8.min(prompt), 9);
    assert_eq!(
        logged_cost(&gw, "stream-hidden", 8.min(prompt)).await,
        shown(want)
    );
    assert_eq!(
        gw.wait_metric(&cost_metric("gpt-4o-mini"), |v| v > 0.0)
            .await,
        shown(want)
    );
}

#[tokio::test]
async fn responses_api_and_embeddings_are_priced() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), &config()).await;
    // The Responses API, not streamed and streamed (usage in `response.completed`).
    let mut expected = 0;
    for (rid, stream) in [("responses-json", false), ("responses-sse", true)] {
        let body = json!({"model": "gpt-4o", "stream": stream, "input": "Explain the cost of one request to the gateway tests."}).to_string();
        let h = headers(
            rid,
            &[
                ("x-emu-cached-tokens", "5"),
                ("x-emu-completion-tokens", "11"),
            ],
        );
        let r = gw.post("/v1/responses", &h, body).await;
        assert_eq!(r.status, 200);
        let e = emu.entry(rid).await.unwrap();
        let prompt = e["usage"]["prompt_tokens"].as_u64().unwrap();
        let completion = e["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(prompt >= 5, "{e}");
        let want = nanos(GPT_4O, prompt, 5, completion);
        assert_eq!(logged_cost(&gw, rid, 5).await, shown(want), "{rid}");
        expected += want;
    }
    assert_eq!(
        gw.wait_metric(&cost_metric("gpt-4o"), |v| v >= shown(expected))
            .await,
        shown(expected)
    );
    // Embeddings: prompt tokens only, at 0.02 per 1M.
    let body = r#"{"model":"text-embedding-3-small","input":["the first of two inputs","and the second one, a little longer"]}"#;
    let r = gw
        .post("/v1/embeddings", &headers("embed", &[]), body)
        .await;
    assert_eq!(r.status, 200);
    let prompt = r.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    let want = nanos(EMBEDDING, prompt, 0, 0);
    assert_eq!(want, prompt * 20);
    assert_eq!(logged_cost(&gw, "embed", 0).await, shown(want));
    assert_eq!(
        gw.wait_metric(&cost_metric("text-embedding-3-small"), |v| v > 0.0)
            .await,
        shown(want)
    );
}

#[tokio::test]
async fn a_realtime_session_is_priced_from_its_response_done_events() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), &config()).await;
    let h = [
        ("authorization", "Bearer sk-search-team-key"),
        ("x-request-id", "realtime-cost"),
        ("x-emu-cached-tokens", "6"),
        ("x-emu-stream-events", "5"),
    ];
    let mut ws = open(&gw, "/v1/realtime?model=gpt-realtime", &h).await;
    for _ in 0..2 {
        let (_, done) = respond(&mut ws).await;
        let usage = &done["response"]["usage"];
        assert_eq!(usage["input_tokens"], 10);
        assert_eq!(usage["input_token_details"]["cached_tokens"], 6, "{usage}");
        assert_eq!(usage["output_tokens"], 5);
    }
    emit(
        &mut ws,
        json!({"type": "emu.close", "code": 1000, "reason": "done"}),
    )
    .await;
    assert_eq!(close_of(&mut ws).await.0, 1000);
    // Two responses of 10 input tokens (6 cached) and 5 output tokens:
    // 2 × (4 × 4e-6 + 6 × 0.4e-6 + 5 × 16e-6) = 0.0001968.
    let want = nanos(REALTIME, 20, 12, 10);
    assert_eq!(want, 196_800);
    assert_eq!(logged_cost(&gw, "realtime-cost", 12).await, shown(want));
    assert_eq!(
        gw.wait_metric(&cost_metric("gpt-realtime"), |v| v > 0.0)
            .await,
        0.000_196_8
    );
}

#[tokio::test]
async fn realtime_audio_tokens_cost_the_audio_prices() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), &config()).await;
    let h = [
        ("authorization", "Bearer sk-search-team-key"),
        ("x-request-id", "realtime-audio"),
        ("x-emu-cached-tokens", "6"),
        ("x-emu-audio-tokens", "4,3"),
        ("x-emu-stream-events", "5"),
    ];
    let mut ws = open(&gw, "/v1/realtime?model=gpt-realtime", &h).await;
    for _ in 0..2 {
        let (_, done) = respond(&mut ws).await;
        let usage = &done["response"]["usage"];
        assert_eq!(usage["input_token_details"]["audio_tokens"], 4, "{usage}");
        assert_eq!(usage["output_token_details"]["audio_tokens"], 3, "{usage}");
    }
    emit(
        &mut ws,
        json!({"type": "emu.close", "code": 1000, "reason": "done"}),
    )
    .await;
    assert_eq!(close_of(&mut ws).await.0, 1000);
    // Each response: 10 input tokens, 6 cached and 4 audio (no text left); 5 output
    // tokens, 3 audio and 2 text. In pico-units:
    // 6 × 400,000 + 4 × 32,000,000 + 2 × 16,000,000 + 3 × 64,000,000 = 354,400,000.
    let want = 2 * 354_400_000 / 1000;
    assert_eq!(logged_cost(&gw, "realtime-audio", 12).await, shown(want));
    assert_eq!(
        gw.wait_metric(&cost_metric("gpt-realtime"), |v| v > 0.0)
            .await,
        0.000_708_8
    );
}

#[tokio::test]
async fn the_metric_the_log_and_the_team_total_agree() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), &config()).await;
    let mut logged = 0.0;
    let mut exact = 0u64;
    for i in 0..12u64 {
        let rid = format!("sum-{i}");
        let cached = (i % 4).to_string();
        let completion = (i * 37 + 1).to_string();
        let h = headers(
            &rid,
            &[
                ("x-emu-cached-tokens", &cached),
                ("x-emu-completion-tokens", &completion),
            ],
        );
        let r = gw.post("/v1/chat/completions", &h, CHAT_BODY).await;
        assert_eq!(r.status, 200);
        let u = r.json()["usage"].clone();
        let (p, c) = (
            u["prompt_tokens"].as_u64().unwrap(),
            u["completion_tokens"].as_u64().unwrap(),
        );
        exact += nanos(GPT_4O, p, (i % 4).min(p), c);
        logged += logged_cost(&gw, &rid, (i % 4).min(p)).await;
    }
    // A request from no configured client: `other`, in no team.
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-request-id", "anon"),
            ],
            CHAT_BODY,
        )
        .await;
    assert_eq!(r.status, 200);
    let other = logged_cost(&gw, "anon", 0).await;
    let metrics = gw.settled_metrics().await;
    let metric = metric_value(&metrics, &cost_metric("gpt-4o"));
    assert_eq!(metric, shown(exact), "exact to the nano-unit");
    assert!(
        (metric - logged).abs() < 0.005,
        "to the cent: {metric} vs {logged}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "ezgate_cost_total{client=\"other\",model=\"gpt-4o\"}"
        ),
        other
    );
    let (status, _) = gw.status().await;
    let costs = &status["costs"];
    assert_eq!(costs["currency"], "USD");
    assert_eq!(costs["teams"], json!({"search": shown(exact)}), "{costs}");
    assert_eq!(costs["clients"]["search-app"], shown(exact));
    assert_eq!(costs["clients"]["other"], other);
}

#[test]
fn check_config_refuses_a_bad_price_table() {
    let dir = scratch_dir();
    let path = dir.join("ezgate.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(bin("ezgate"))
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (currency, right) in [("usd", "USD"), ("US$", "USD"), ("EURO", "EUR")] {
        let (code, _, err) = check(&format!(
            "[prices]\ncurrency = \"{currency}\"\nmodels = [{{ model = \"gpt-4o\", input = 1 }}]\n"
        ));
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("prices.currency"), "{err}");
        assert!(err.contains(&format!("write \"{right}\"")), "{err}");
    }
    let (code, _, err) =
        check("[prices]\ncurrency = \"USD\"\nmodels = [{ model = \"gpt-4o\", input = -2.5 }]\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("prices.models[0].input") && err.contains("negative"),
        "{err}"
    );
    let (code, _, err) = check(
        "[prices]\ncurrency = \"USD\"\nmodels = [\n  { model = \"gpt-4o*\", input = 2.5 },\n  { model = \"gpt-4o-mini\", input = 0.15 },\n]\n",
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("prices.models[1].model: \"gpt-4o-mini\" and prices.models[0].model \"gpt-4o*\" both match"),
        "{err}"
    );
    let (code, _, err) = check(
        "[[clients]]\nname = \"a\"\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\nteam = \" \"\n",
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("clients[0].team: must not be empty"), "{err}");
    // A good table is printed with every default written out.
    let (code, out, err) = check(
        "[prices]\ncurrency = \"EUR\"\nmodels = [{ model = \"gpt-4o*\", input = 2.5, output = 10 }]\ndefault = { input = 5, cached_input = 2.5, output = 15 }\n\n[[clients]]\nname = \"a\"\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\nteam = \"core\"\n",
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("team = \"core\""), "{out}");
    assert!(
        out.contains("[prices]\ncurrency = \"EUR\"\nmodels = [\n  { model = \"gpt-4o*\", input = 2.5, cached_input = 2.5, output = 10 },\n]\ndefault = { input = 5, cached_input = 2.5, output = 15 }\n"),
        "{out}"
    );
}

#[tokio::test]
async fn without_prices_and_for_an_unpriced_model_there_is_no_cost() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let r = gw
        .post(
            "/v1/chat/completions",
            &headers("no-prices", &[]),
            CHAT_BODY,
        )
        .await;
    assert_eq!(r.status, 200);
    let line = gw.access_log("no-prices").await;
    assert!(line["prompt_tokens"].as_u64().is_some(), "{line}");
    assert!(line.get("cost").is_none(), "{line}");
    assert!(!gw.settled_metrics().await.contains("ezgate_cost_total"));
    assert_eq!(gw.status().await.0["costs"], serde_json::Value::Null);
    // With prices, a model no entry matches and no default: unpriced, not refused.
    let gw = Gateway::start(&emu.url(), &config()).await;
    let body = r#"{"model":"o3-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let r = gw
        .post("/v1/chat/completions", &headers("unpriced", &[]), body)
        .await;
    assert_eq!(r.status, 200);
    let line = gw.access_log("unpriced").await;
    assert!(line.get("cost").is_none(), "{line}");
    assert!(!gw.settled_metrics().await.contains("ezgate_cost_total{"));
    assert_eq!(gw.status().await.0["costs"]["clients"], json!({}));
}

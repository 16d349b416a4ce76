//! Budgets in money, end to end (docs/budgets.md): the real ezgate against the emulator's
//! exact usages. What a budget counts is checked to the nano-unit against prices computed
//! here; what it refuses is checked as a client sees it (429 `budget_exceeded` before the
//! upstream is called); what it keeps is checked across refusals, errors, cut streams,
//! restarts, a period's end and reloads.
//!
//! * `mod.rs` — the helpers, the arithmetic, the reservation.
//! * `refunds.rs` — what costs nothing, what a cut stream costs, covering budgets, scopes and
//!   keys, unpriced models, shadow, warnings, a realtime session.
//! * `state.rs` — the state file (SIGTERM, SIGKILL, corrupt, unwritable), `check-config`,
//!   a period's rollover on the injectable clock, reloads.

mod refunds;
mod state;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

/// Client keys: two clients with a team each, and one with none.
pub const SEARCH: &str = "sk-search-team-key";
pub const ADS: &str = "sk-ads-team-key";
pub const LONE: &str = "sk-lone-client-key";

/// gpt-4o's prices in micro-units per 1M tokens (input, cached input, output).
pub const GPT_4O: (u64, u64, u64) = (2_500_000, 1_250_000, 10_000_000);
/// gpt-realtime's text prices; its audio output (64.00) is its dearest output price.
pub const REALTIME: (u64, u64, u64) = (4_000_000, 400_000, 16_000_000);

/// The emulator, and ezgate in front of it with [`config`]'s clients and prices and `rest`.
pub async fn gateway(rest: &str) -> (Emulator, Gateway) {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), &config(None, rest)).await;
    (emu, gw)
}

/// Clients, prices, an optional `server.state_dir`, then `rest` (`[[budgets]]`, …).
pub fn config(state_dir: Option<&Path>, rest: &str) -> String {
    let server = state_dir.map_or_else(String::new, |d| {
        format!("[server]\nstate_dir = \"{}\"\n\n", d.display())
    });
    format!(
        r#"{server}[[clients]]
name = "search-app"
key_sha256 = "{}"
team = "search"

[[clients]]
name = "ads-app"
key_sha256 = "{}"
team = "ads"

[[clients]]
name = "lone-app"
key_sha256 = "{}"

[prices]
currency = "USD"
models = [
  {{ model = "gpt-4o*", input = 2.50, cached_input = 1.25, output = 10.00 }},
  {{ model = "text-embedding-3-small", input = 0.02 }},
  {{ model = "gpt-realtime", input = 4.00, cached_input = 0.40, output = 16.00, audio_input = 32.00, audio_output = 64.00 }},
]

{rest}"#,
        sha256_hex(SEARCH),
        sha256_hex(ADS),
        sha256_hex(LONE),
    )
}

/// One `[[budgets]]` entry; `extra` adds lines (`warn_at`, `mode`, `match`, …).
pub fn budget(name: &str, key: &str, amount: &str, period: &str, extra: &str) -> String {
    format!(
        "[[budgets]]\nname = \"{name}\"\nkey = \"{key}\"\namount = {amount}\nperiod = \"{period}\"\ntimezone = \"UTC\"\n{extra}\n"
    )
}

/// The exact cost in nano-units, computed here: tokens × micro-units per million, rounded
/// half up to the nano-unit.
pub fn nanos(
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

/// A nano-unit amount as written in the config and shown by `/status` and the metrics.
pub fn decimal(nanos: u64) -> String {
    format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
}

pub fn shown(nanos: u64) -> f64 {
    decimal(nanos).parse().unwrap()
}

/// ezgate's estimate of a request's prompt, as its token policies and budgets make it.
pub fn prompt_estimate(body: &str) -> u64 {
    ezgate::limits::tokens::inspect(body.as_bytes()).prompt_tokens
}

/// The most a gpt-4o `body` asking for `max_tokens` may cost: its prompt estimate at the
/// input price, `max_tokens` at the output price.
pub fn max_cost(body: &str, max_tokens: u64) -> u64 {
    nanos(GPT_4O, prompt_estimate(body), 0, max_tokens)
}

/// A gpt-4o chat body, with `max_tokens` when given.
pub fn chat(max_tokens: Option<u64>, stream: bool) -> String {
    let mut v = json!({
        "model": "gpt-4o",
        "stream": stream,
        "messages": [{"role": "user", "content": "Count what this request costs, to the cent."}],
    });
    if let Some(m) = max_tokens {
        v["max_tokens"] = json!(m);
    }
    v.to_string()
}

pub fn headers<'a>(
    key: &'a str,
    rid: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(String, String)> {
    let mut h = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("authorization".to_owned(), format!("Bearer {key}")),
        ("x-request-id".to_owned(), rid.to_owned()),
    ];
    h.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    h
}

/// POSTs `body` to the chat route as the client of `key`.
pub async fn post(gw: &Gateway, key: &str, rid: &str, extra: &[(&str, &str)], body: &str) -> Resp {
    post_to(gw, "/v1/chat/completions", key, rid, extra, body).await
}

pub async fn post_to(
    gw: &Gateway,
    path: &str,
    key: &str,
    rid: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> Resp {
    let h = headers(key, rid, extra);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    gw.post(path, &h, body.to_owned()).await
}

/// The usage the emulator reported for a request: (prompt, completion).
pub async fn usage(emu: &Emulator, rid: &str) -> (u64, u64) {
    let e = emu
        .entry(rid)
        .await
        .unwrap_or_else(|| panic!("the emulator saw {rid}"));
    (
        e["usage"]["prompt_tokens"].as_u64().unwrap(),
        e["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

/// `/status`'s entry of budget `name`, once no request is in flight (every hold settled).
pub async fn view(gw: &Gateway, name: &str) -> Value {
    gw.settled_metrics().await;
    view_now(gw, name).await
}

/// `/status`'s entry of budget `name` now, requests in flight or not.
pub async fn view_now(gw: &Gateway, name: &str) -> Value {
    let (status, _) = gw.status().await;
    status["budgets"]["list"]
        .as_array()
        .unwrap_or_else(|| panic!("/status lists budgets: {status}"))
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("/status lists budget {name}: {status}"))
        .clone()
}

/// The `top` account `key` of budget `name` (spent, reserved, used, warned); `None` when the
/// budget has no account of that key this period.
pub async fn account(gw: &Gateway, name: &str, key: &str) -> Option<Value> {
    view(gw, name).await["top"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .cloned()
}

/// What account `key` of budget `name` spent (0 when it has none), after checking that
/// nothing is still reserved in it.
pub async fn spent(gw: &Gateway, name: &str, key: &str) -> f64 {
    match account(gw, name, key).await {
        Some(a) => {
            assert_eq!(a["reserved"], 0.0, "no request holds {name}/{key}: {a}");
            a["spent"].as_f64().unwrap()
        }
        None => 0.0,
    }
}

/// Seconds from now to the next midnight UTC: when a UTC daily budget's period ends.
pub fn to_utc_midnight() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    86_400 - now % 86_400
}

/// Checks a `budget_exceeded` refusal as a client reads it, naming budget `name`; returns its
/// message.
pub fn assert_exceeded(r: &Resp, name: &str) -> String {
    assert_eq!(r.status, 429, "{:?}", String::from_utf8_lossy(&r.body));
    let e = r.error();
    assert_eq!(e["code"], "budget_exceeded", "{e}");
    assert_eq!(e["source"], "gateway", "{e}");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let message = e["message"].as_str().unwrap().to_owned();
    assert!(message.contains(&format!("Budget '{name}'")), "{message}");
    message
}

#[tokio::test]
async fn a_team_budget_adds_up_the_priced_usages_to_the_nano_unit() {
    let rest = budget("team-monthly", "team", "500", "month", "");
    let (emu, gw) = gateway(&rest).await;
    let mut want = 0;
    // JSON chats with cached tokens.
    for i in 0..5u64 {
        let rid = format!("json-{i}");
        let (cached, completion) = (i.to_string(), (i * 31 + 2).to_string());
        let extra = [
            ("x-emu-cached-tokens", cached.as_str()),
            ("x-emu-completion-tokens", completion.as_str()),
        ];
        let r = post(&gw, SEARCH, &rid, &extra, &chat(Some(500), false)).await;
        assert_eq!(r.status, 200);
        let (p, c) = usage(&emu, &rid).await;
        want += nanos(GPT_4O, p, i.min(p), c);
    }
    // A stream whose usage ezgate asked for and hid from the client.
    let extra = [("x-emu-cached-tokens", "3"), ("x-emu-stream-events", "9")];
    let r = post(&gw, SEARCH, "stream", &extra, &chat(None, true)).await;
    assert_eq!(r.status, 200);
    assert!(!String::from_utf8_lossy(&r.body).contains("\"usage\""));
    let (p, c) = usage(&emu, "stream").await;
    assert_eq!(c, 9);
    want += nanos(GPT_4O, p, 3, 9);
    // The Responses API.
    let body = json!({"model": "gpt-4o-mini", "input": "What did the team spend?"}).to_string();
    let extra = [("x-emu-completion-tokens", "40")];
    let r = post_to(&gw, "/v1/responses", SEARCH, "responses", &extra, &body).await;
    assert_eq!(r.status, 200);
    let (p, c) = usage(&emu, "responses").await;
    want += nanos(GPT_4O, p, 0, c);
    // Another team's request is its own account.
    let r = post(&gw, ADS, "ads", &[], &chat(None, false)).await;
    assert_eq!(r.status, 200);
    let (p, c) = usage(&emu, "ads").await;
    let ads = nanos(GPT_4O, p, 0, c);

    let v = view(&gw, "team-monthly").await;
    let (status, _) = gw.status().await;
    assert_eq!(status["budgets"]["currency"], "USD");
    assert_eq!(
        (
            &v["key"],
            &v["mode"],
            &v["store"],
            &v["period"],
            &v["amount"]
        ),
        (
            &json!("team"),
            &json!("enforce"),
            &json!("local"),
            &json!("month"),
            &json!(500.0)
        ),
        "{v}"
    );
    assert_eq!(v["accounts"], 2, "{v}");
    let search = &v["top"][0];
    assert_eq!(search["key"], "search", "the biggest spender first: {v}");
    assert_eq!(search["spent"], shown(want), "exact to the nano-unit: {v}");
    assert_eq!(search["reserved"], 0.0);
    assert_eq!(search["used"], want as f64 / 500e9);
    assert_eq!(v["top"][1]["spent"], shown(ads), "{v}");
    // The period: this calendar month in UTC.
    let start = v["period_start"].as_str().unwrap();
    assert!(start.ends_with("-01T00:00:00Z"), "{v}");
    assert!(
        v["period_end"].as_str().unwrap().ends_with("-01T00:00:00Z"),
        "{v}"
    );
    // The metrics agree with /status, and with the cost counter.
    let metrics = gw.settled_metrics().await;
    let series = |m: &str, key: &str| {
        metric_value(
            &metrics,
            &format!("{m}{{budget=\"team-monthly\",key=\"{key}\"}}"),
        )
    };
    assert_eq!(
        series("ezgate_budget_spent", "search"),
        shown(want),
        "{metrics}"
    );
    assert_eq!(series("ezgate_budget_spent", "ads"), shown(ads));
    assert_eq!(series("ezgate_budget_limit", "search"), 500.0);
    assert_eq!(series("ezgate_budget_limit", "ads"), 500.0);
    let costs = metric_value(
        &metrics,
        "ezgate_cost_total{client=\"search-app\",model=\"gpt-4o\"}",
    ) + metric_value(
        &metrics,
        "ezgate_cost_total{client=\"search-app\",model=\"gpt-4o-mini\"}",
    );
    assert!((costs - shown(want)).abs() < 1e-12, "{costs} vs {want}");
    assert_eq!(status["costs"]["teams"]["search"], shown(want));
}

#[tokio::test]
async fn a_request_that_does_not_fit_what_in_flight_requests_hold_is_refused_before_the_upstream() {
    let emu = Emulator::start().await;
    // Room for exactly one request of max_tokens 100.
    let first = chat(Some(100), true);
    let amount = max_cost(&first, 100);
    let rest = budget("team-daily", "team", &decimal(amount), "day", "");
    let gw = Gateway::start(&emu.url(), &config(None, &rest)).await;
    // The first streams slowly: three events a second apart; it holds the whole amount.
    let held = {
        let h = headers(
            SEARCH,
            "held",
            &[
                ("x-emu-stream-events", "3"),
                ("x-emu-stream-interval-ms", "1000"),
            ],
        );
        let url = gw.url("/v1/chat/completions");
        tokio::spawn(async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            send(&http1(), http::Method::POST, &url, &h, first.into()).await
        })
    };
    emu.wait_state("held", "in_progress", DEADLINE).await;
    let v = view_now(&gw, "team-daily").await;
    assert_eq!(
        v["top"][0]["reserved"],
        shown(amount),
        "the first holds it all: {v}"
    );
    assert_eq!(v["top"][0]["spent"], 0.0, "{v}");
    // A second, however small, does not fit what the first holds.
    let small = chat(Some(10), false);
    let r = post(&gw, SEARCH, "refused", &[], &small).await;
    let message = assert_exceeded(&r, "team-daily");
    assert!(
        message.contains("lower max_tokens (this request asks for up to 10 completion tokens)"),
        "{message}"
    );
    assert!(
        message.contains(&format!("may cost up to {}", shown(max_cost(&small, 10)))),
        "{message}"
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    let midnight = to_utc_midnight();
    assert!(
        retry.abs_diff(midnight) <= 1,
        "Retry-After {retry}, midnight in {midnight}"
    );
    assert_eq!(
        r.error()["retry_after_ms"].as_u64().unwrap().div_ceil(1000),
        retry
    );
    assert!(
        emu.entry("refused").await.is_none(),
        "the upstream never saw it"
    );
    assert_eq!(emu.entry("held").await.unwrap()["state"], "in_progress");
    // Once the first settles for its 3 completion tokens, the rest of its hold comes back.
    let done = held.await.unwrap();
    assert_eq!(done.status, 200);
    let (p, c) = usage(&emu, "held").await;
    assert_eq!(c, 3);
    let cost = nanos(GPT_4O, p, 0, 3);
    assert!(cost < amount);
    assert_eq!(spent(&gw, "team-daily", "search").await, shown(cost));
    let r = post(&gw, SEARCH, "fits", &[], &small).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        gw.wait_metric(
            "ezgate_gateway_errors_total{code=\"budget_exceeded\"}",
            |v| v >= 1.0
        )
        .await,
        1.0
    );
    // Without max_tokens, ezgate reserves 1,000 completion tokens, and says so.
    let r = post(&gw, SEARCH, "uncapped", &[], &chat(None, false)).await;
    let message = assert_exceeded(&r, "team-daily");
    assert!(
        message.contains("set max_tokens (without it ezgate reserves 1000"),
        "{message}"
    );
    assert!(emu.entry("uncapped").await.is_none());
}

/// Waits (polling `/status`) until `pred` holds of budget `name`'s entry, and returns it.
pub async fn wait_view(
    gw: &Gateway,
    name: &str,
    within: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let start = std::time::Instant::now();
    loop {
        let (status, _) = gw.status().await;
        let v = status["budgets"]["list"]
            .as_array()
            .and_then(|l| l.iter().find(|b| b["name"] == name).cloned())
            .unwrap_or(Value::Null);
        if pred(&v) {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "budget {name} never as awaited: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn n_choices_reserve_max_tokens_for_each_choice() {
    let emu = Emulator::start().await;
    let one = chat(Some(100), false);
    let amount = max_cost(&one, 100);
    let rest = budget("team-monthly", "team", &decimal(amount), "month", "");
    let gw = Gateway::start(&emu.url(), &config(None, &rest)).await;
    // Two choices of up to 100 tokens each: 200 completion tokens may be generated.
    let mut two: Value = serde_json::from_str(&one).unwrap();
    two["n"] = json!(2);
    let r = post(&gw, SEARCH, "two", &[], &two.to_string()).await;
    let message = assert_exceeded(&r, "team-monthly");
    assert!(
        message.contains("asks for up to 200 completion tokens"),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "may cost up to {}",
            shown(max_cost(&two.to_string(), 200))
        )),
        "{message}"
    );
    assert!(emu.entry("two").await.is_none());
    // One choice fits exactly.
    assert_eq!(post(&gw, SEARCH, "one", &[], &one).await.status, 200);
}

//! What a budget charges and whom: nothing for an upstream error or another policy's
//! refusal, what a cut stream streamed, every covering budget or none, each budget's routes,
//! models and keys, unpriced models, shadow mode, warnings, a realtime session.

use bytes::Bytes;
use http::Method;
use serde_json::json;

use super::*;
use crate::websocket::{close_of, emit, open, respond};

/// The prompt tokens the emulator reports for `body` on the chat route (asked directly).
async fn emulated_prompt(emu: &Emulator, body: &str) -> u64 {
    let url = format!("{}/v1/chat/completions", emu.url());
    let r = send(
        &http1(),
        Method::POST,
        &url,
        &[("content-type", "application/json")],
        Bytes::from(body.to_owned()),
    )
    .await;
    r.json()["usage"]["prompt_tokens"].as_u64().unwrap()
}

#[tokio::test]
async fn upstream_errors_and_other_policies_refusals_cost_nothing() {
    let rest = format!(
        "{}[[limits]]\nname = \"one-a-minute\"\nkey = \"client\"\nrequests = \"1/min\"\nmatch = {{ models = [\"gpt-4o-mini\"] }}\n",
        budget("team-monthly", "team", "1", "month", "")
    );
    let (emu, gw) = gateway(&rest).await;
    let body = chat(Some(50), false);
    // The upstream's 500 and 429: reserved, then given back whole.
    for (rid, status) in [("e500", "500"), ("e429", "429"), ("e503", "503")] {
        let r = post(&gw, SEARCH, rid, &[("x-emu-status", status)], &body).await;
        assert_eq!(r.status.as_str(), status);
        assert_eq!(r.error()["source"], "upstream");
    }
    // A reset before any byte of the response.
    let r = post(&gw, SEARCH, "reset", &[("x-emu-reset", "headers")], &body).await;
    assert_eq!(r.status, 502);
    assert_eq!(spent(&gw, "team-monthly", "search").await, 0.0);
    // A [[limits]] refusal: the second request of the minute never reaches the budget.
    let mini = body.replace("gpt-4o", "gpt-4o-mini");
    assert_eq!(post(&gw, SEARCH, "mini-1", &[], &mini).await.status, 200);
    let (p, c) = usage(&emu, "mini-1").await;
    let one = nanos(GPT_4O, p, 0, c);
    assert_eq!(spent(&gw, "team-monthly", "search").await, shown(one));
    let r = post(&gw, SEARCH, "mini-2", &[], &mini).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error()["code"], "rate_limited");
    assert_eq!(spent(&gw, "team-monthly", "search").await, shown(one));

    // The upstream-quota pacer refuses after the budget admitted: its hold is given back.
    let emu = Emulator::start().await;
    emu.set_quota(json!({"requests": {"limit": 2, "per": "1m"}}))
        .await;
    let rest = format!(
        "{}[upstream.quota]\nmode = \"enforce\"\nmax_wait = {{ interactive = \"1ms\" }}\n",
        budget("team-monthly", "team", "1", "month", "")
    );
    let gw = Gateway::start(&emu.url(), &config(None, &rest)).await;
    assert_eq!(post(&gw, SEARCH, "taught", &[], &body).await.status, 200);
    let (p, c) = usage(&emu, "taught").await;
    let one = nanos(GPT_4O, p, 0, c);
    let r = post(&gw, SEARCH, "paced", &[], &body).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error()["code"], "upstream_quota_exhausted");
    assert!(emu.entry("paced").await.is_none());
    assert_eq!(spent(&gw, "team-monthly", "search").await, shown(one));
}

#[tokio::test]
async fn a_stream_cut_by_the_upstream_costs_what_it_streamed() {
    let rest = budget("team-monthly", "team", "1", "month", "");
    let (_emu, gw) = gateway(&rest).await;
    let body = chat(Some(200), true);
    let extra = [("x-emu-stream-events", "10"), ("x-emu-cut-after", "3")];
    let r = post(&gw, SEARCH, "cut", &extra, &body).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(text.contains("upstream_stream_interrupted"), "{text}");
    // No usage came: the prompt is charged at its estimate, the completion at what streamed:
    // 3 content events carrying "tok0 tok1 tok2 ", 12 letters and spaces (0.21 each) and
    // 3 digits (0.68 each) = 4.56, so 5 tokens, more than the 3 events.
    let streamed = ezgate::limits::estimate::text_tokens(b"tok0 tok1 tok2 ");
    assert_eq!(streamed, 5);
    assert!(text.contains("tok2 ") && !text.contains("tok3 "), "{text}");
    let want = nanos(GPT_4O, prompt_estimate(&body), 0, streamed);
    assert_eq!(spent(&gw, "team-monthly", "search").await, shown(want));
    assert!(want < max_cost(&body, 200));
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_pays_what_streamed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = budget("team-monthly", "team", "1", "month", "");
    let (_emu, gw) = gateway(&rest).await;
    let body = chat(Some(300), true);
    // The upstream streams three pieces and then nothing; the client reads them and leaves.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nauthorization: Bearer {SEARCH}\r\nx-request-id: left\r\nx-emu-stream-events: 10\r\nx-emu-stall-after: 3\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while !String::from_utf8_lossy(&seen).contains("tok2 ") {
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "the stream ended early: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("three pieces arrive");
    drop(s);
    assert_eq!(gw.access_log("left").await["status"], 499);
    // The prompt at its estimate, the completion at what streamed ("tok0 tok1 tok2 ": 5).
    let want = nanos(GPT_4O, prompt_estimate(&body), 0, 5);
    assert_eq!(spent(&gw, "team-monthly", "search").await, shown(want));
}

#[tokio::test]
async fn concurrent_requests_never_hold_more_than_the_amount() {
    let emu = Emulator::start().await;
    let body = chat(Some(100), true);
    // Room for three requests' maximum cost; eight arrive together and each streams for
    // seconds, so no hold is settled while the others are admitted.
    let amount = 3 * max_cost(&body, 100);
    let rest = budget("team-monthly", "team", &decimal(amount), "month", "");
    let gw = Gateway::start(&emu.url(), &config(None, &rest)).await;
    let url = gw.url("/v1/chat/completions");
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let h = headers(
                SEARCH,
                "",
                &[
                    ("x-emu-stream-events", "3"),
                    ("x-emu-stream-interval-ms", "1000"),
                ],
            );
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move {
                let rid = format!("burst-{i}");
                let mut h: Vec<(&str, &str)> =
                    h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                h.retain(|(k, _)| *k != "x-request-id");
                h.push(("x-request-id", &rid));
                let r = send(&http1(), Method::POST, &url, &h, body.into()).await;
                (rid, r)
            })
        })
        .collect();
    let mut admitted = Vec::new();
    for t in tasks {
        let (rid, r) = t.await.unwrap();
        match r.status.as_u16() {
            200 => admitted.push(rid),
            _ => {
                assert_exceeded(&r, "team-monthly");
                assert!(
                    emu.entry(&rid).await.is_none(),
                    "{rid} reached the upstream"
                );
            }
        }
    }
    assert_eq!(
        admitted.len(),
        3,
        "exactly what the amount holds: {admitted:?}"
    );
    let mut want = 0;
    for rid in &admitted {
        let (p, c) = usage(&emu, rid).await;
        want += nanos(GPT_4O, p, 0, c);
    }
    assert_eq!(spent(&gw, "team-monthly", "search").await, shown(want));
    assert_eq!(emu.log().await.len(), 3);
}

#[tokio::test]
async fn every_covering_budget_must_admit_and_a_refusal_gives_back_the_others_holds() {
    let rest = format!(
        "{}{}",
        budget("team-monthly", "team", "1", "month", ""),
        budget(
            "mini-global",
            "global",
            "0.000001",
            "month",
            "match = { models = [\"gpt-4o-mini\"] }"
        )
    );
    let (emu, gw) = gateway(&rest).await;
    // A model the global budget does not cover: the team budget alone admits and charges.
    let r = post(&gw, SEARCH, "4o", &[], &chat(Some(50), false)).await;
    assert_eq!(r.status, 200);
    let (p, c) = usage(&emu, "4o").await;
    let cost = nanos(GPT_4O, p, 0, c);
    assert_eq!(spent(&gw, "team-monthly", "search").await, shown(cost));
    // The team budget reserves first, then the global one refuses: the team's hold is
    // given back, its spend unchanged.
    let mini = chat(Some(50), false).replace("gpt-4o", "gpt-4o-mini");
    let r = post(&gw, SEARCH, "mini", &[], &mini).await;
    let message = assert_exceeded(&r, "mini-global");
    assert!(
        message.contains("has 0.000001 USD left of 0.000001 USD"),
        "{message}"
    );
    assert!(emu.entry("mini").await.is_none());
    assert_eq!(spent(&gw, "team-monthly", "search").await, shown(cost));
    let v = view(&gw, "mini-global").await;
    assert_eq!(v["accounts"], 0, "{v}");
    let metrics = gw.settled_metrics().await;
    let global = "{budget=\"mini-global\",key=\"global\"}";
    assert_eq!(
        metric_value(&metrics, &format!("ezgate_budget_spent{global}")),
        0.0
    );
    assert_eq!(
        metric_value(&metrics, &format!("ezgate_budget_limit{global}")),
        0.000_001,
        "{metrics}"
    );
}

#[tokio::test]
async fn budgets_cover_their_routes_models_and_keys_and_show_only_fingerprints() {
    let rest = [
        budget(
            "embeddings",
            "client",
            "0.000000001",
            "month",
            "match = { routes = [\"/v1/embeddings\"] }",
        ),
        budget(
            "per-user",
            "header:x-user",
            "1",
            "month",
            "match = { models = [\"gpt-4o\"] }",
        ),
        budget(
            "per-key",
            "api_key",
            "1",
            "month",
            "match = { models = [\"gpt-4o\"] }",
        ),
        budget(
            "mini-team",
            "team",
            "0.000000001",
            "month",
            "match = { models = [\"gpt-4o-mini\"] }",
        ),
    ]
    .concat();
    let (emu, gw) = gateway(&rest).await;
    // Routes: embeddings are refused, chat on another model is not covered.
    let embed = r#"{"model":"text-embedding-3-small","input":"a few words"}"#;
    let r = post_to(&gw, "/v1/embeddings", SEARCH, "embed", &[], embed).await;
    let message = assert_exceeded(&r, "embeddings");
    assert!(message.contains("To fit, send less input"), "{message}");
    assert!(!message.contains("max_tokens"), "{message}");
    let mini = chat(Some(10), false).replace("gpt-4o", "gpt-4o-mini");
    // Teams: the caller with no team is not covered by a team budget; one with a team is.
    let r = post(&gw, LONE, "lone", &[], &mini).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_exceeded(&post(&gw, ADS, "ads-mini", &[], &mini).await, "mini-team");
    // Keys: a header's value and a client's key are shown as fingerprints only.
    let user = "alice@example.com";
    let r = post(
        &gw,
        SEARCH,
        "by-alice",
        &[("x-user", user)],
        &chat(Some(10), false),
    )
    .await;
    assert_eq!(r.status, 200);
    let (p, c) = usage(&emu, "by-alice").await;
    let cost = nanos(GPT_4O, p, 0, c);
    let r = post(&gw, LONE, "no-header", &[], &chat(Some(10), false)).await;
    assert_eq!(r.status, 200);
    let (p, c) = usage(&emu, "no-header").await;
    let other = nanos(GPT_4O, p, 0, c);
    let alice = account(&gw, "per-user", &fingerprint_of(user))
        .await
        .unwrap();
    assert_eq!(alice["spent"], shown(cost), "{alice}");
    assert_eq!(spent(&gw, "per-user", "none").await, shown(other));
    assert_eq!(
        spent(&gw, "per-key", &fingerprint_of(SEARCH)).await,
        shown(cost)
    );
    assert_eq!(
        spent(&gw, "per-key", &fingerprint_of(LONE)).await,
        shown(other)
    );
    let (_, text) = gw.status().await;
    let metrics = gw.settled_metrics().await;
    for secret in [user, SEARCH, LONE] {
        assert!(!text.contains(secret), "{secret} in /status: {text}");
        assert!(!metrics.contains(secret), "{secret} in /metrics");
    }
    // Keyed by header or API key: one series, the busiest account, under no key name.
    let busiest = shown(cost.max(other));
    assert_eq!(
        metric_value(&metrics, "ezgate_budget_spent{budget=\"per-key\",key=\"\"}"),
        busiest,
        "{metrics}"
    );
    // The budgets that refused hold no account for what they refused.
    assert_eq!(view(&gw, "embeddings").await["accounts"], 0);
    assert_eq!(view(&gw, "mini-team").await["accounts"], 0);
}

#[tokio::test]
async fn an_unpriced_model_under_a_budget_is_refused_naming_model_and_budget() {
    let emu = Emulator::start().await;
    // A shadow budget first: the refusal names the enforcing one.
    let rest = format!(
        "{}{}",
        budget("trial", "team", "100", "month", "mode = \"shadow\""),
        budget("team-monthly", "team", "100", "month", "")
    );
    let gw = Gateway::start(&emu.url(), &config(None, &rest)).await;
    let body = r#"{"model":"o3-mini","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(&gw, SEARCH, "unpriced", &[], body).await;
    assert_eq!(r.status, 403);
    let e = r.error();
    assert_eq!(e["code"], "model_not_allowed", "{e}");
    assert_eq!(e["param"], "model", "{e}");
    assert_eq!(e["source"], "gateway", "{e}");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("o3-mini") && message.contains("team-monthly"),
        "{message}"
    );
    assert!(emu.entry("unpriced").await.is_none());
    // Outside every budget (a client with no team), the same model passes, unpriced.
    let r = post(&gw, LONE, "outside", &[], body).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(view(&gw, "team-monthly").await["accounts"], 0);
}

#[tokio::test]
async fn a_shadow_budget_never_refuses_and_counts_what_it_would_have_refused() {
    let rest = budget(
        "shadow-team",
        "team",
        "0.0001",
        "month",
        "mode = \"shadow\"",
    );
    let (emu, gw) = gateway(&rest).await;
    let mut want = 0;
    for rid in ["s1", "s2", "s3"] {
        let r = post(
            &gw,
            SEARCH,
            rid,
            &[("x-emu-completion-tokens", "30")],
            &chat(None, false),
        )
        .await;
        assert_eq!(r.status, 200);
        let (p, c) = usage(&emu, rid).await;
        want += nanos(GPT_4O, p, 0, c);
    }
    // A model with no price: an enforcing budget refuses it, a shadow one lets it pass.
    let unpriced = r#"{"model":"o3-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(&gw, SEARCH, "unpriced", &[], unpriced).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    gw.wait_logs("budget in shadow mode would have refused this request", 4)
        .await;
    let line = gw
        .wait_log("budget in shadow mode would have refused")
        .await;
    assert!(line.contains("shadow-team"), "{line}");
    let named = gw.logs.all().into_iter().any(|l| {
        l.contains("shadow mode would have refused")
            && l.contains("o3-mini")
            && l.contains("shadow-team")
    });
    assert!(
        named,
        "the unpriced model's line names it:\n{}",
        gw.logs.text()
    );
    let v = view(&gw, "shadow-team").await;
    assert_eq!(v["mode"], "shadow");
    assert_eq!(v["would_refuse"], 4, "{v}");
    assert_eq!(
        v["top"][0]["spent"],
        shown(want),
        "shadow still counts: {v}"
    );
    assert!(v["top"][0]["used"].as_f64().unwrap() > 1.0, "{v}");
}

#[tokio::test]
async fn warn_at_shares_are_logged_once_each_and_shown() {
    let emu = Emulator::start().await;
    let body = chat(Some(20), false);
    let cost = nanos(GPT_4O, emulated_prompt(&emu, &body).await, 0, 20);
    // Four requests of `cost` spend 4/4.5 of the amount: the third crosses 0.5, the fourth 0.8.
    let amount = cost * 9 / 2;
    let rest = budget(
        "team-warn",
        "team",
        &decimal(amount),
        "month",
        "warn_at = [0.5, 0.8]",
    );
    let gw = Gateway::start(&emu.url(), &config(None, &rest)).await;
    let needle = "budget warning: spend crossed a warn_at share";
    let extra = [("x-emu-completion-tokens", "20")];
    for (i, crossed) in [(1, 0), (2, 0), (3, 1), (4, 2)] {
        let rid = format!("w{i}");
        assert_eq!(post(&gw, SEARCH, &rid, &extra, &body).await.status, 200);
        gw.access_log(&rid).await;
        assert_eq!(
            gw.logs.text().matches(needle).count(),
            crossed,
            "after {rid}"
        );
        let warned = account(&gw, "team-warn", "search").await.unwrap()["warned"].clone();
        assert_eq!(
            warned,
            [json!(null), json!(0.5), json!(0.8)][crossed],
            "after {rid}"
        );
    }
    let lines: Vec<String> = gw
        .logs
        .all()
        .into_iter()
        .filter(|l| l.contains(needle))
        .collect();
    assert!(
        lines[0].contains("team-warn") && lines[0].contains("0.5"),
        "{lines:?}"
    );
    assert!(
        lines[1].contains("search") && lines[1].contains("0.8"),
        "{lines:?}"
    );
    // A smaller request that fits crosses nothing again.
    let extra = [("x-emu-completion-tokens", "2")];
    assert_eq!(
        post(&gw, SEARCH, "w5", &extra, &chat(Some(2), false))
            .await
            .status,
        200
    );
    gw.access_log("w5").await;
    assert_eq!(gw.logs.text().matches(needle).count(), 2);
}

#[tokio::test]
async fn a_realtime_session_under_a_budget_is_settled_at_its_usage() {
    let rest = budget("team-monthly", "team", "1", "month", "");
    let (_emu, gw) = gateway(&rest).await;
    let h = [
        ("authorization", "Bearer sk-search-team-key"),
        ("x-request-id", "realtime-budget"),
        ("x-emu-cached-tokens", "6"),
        ("x-emu-stream-events", "5"),
    ];
    let mut ws = open(&gw, "/v1/realtime?model=gpt-realtime", &h).await;
    // While the session is open, its hold is in the budget.
    let v = view_now(&gw, "team-monthly").await;
    assert!(v["top"][0]["reserved"].as_f64().unwrap() > 0.0, "{v}");
    for _ in 0..2 {
        respond(&mut ws).await;
    }
    emit(
        &mut ws,
        json!({"type": "emu.close", "code": 1000, "reason": "done"}),
    )
    .await;
    assert_eq!(close_of(&mut ws).await.0, 1000);
    // Two responses of 10 input tokens (6 cached) and 5 output tokens (cost.rs's sum).
    let want = nanos(REALTIME, 20, 12, 10);
    assert_eq!(want, 196_800);
    assert_eq!(spent(&gw, "team-monthly", "search").await, shown(want));
}

#[tokio::test]
async fn a_realtime_session_that_does_not_fit_is_refused_at_the_handshake() {
    let emu = Emulator::start().await;
    // A session reserves 1,000 output tokens at gpt-realtime's dearest output price (audio,
    // 64.00 per 1M): 0.064, more than the budget.
    let rest = budget("team-monthly", "team", "0.05", "month", "");
    let gw = Gateway::start(&emu.url(), &config(None, &rest)).await;
    let h = [
        ("authorization", "Bearer sk-search-team-key"),
        ("x-request-id", "realtime-refused"),
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let r = gw.get_with("/v1/realtime?model=gpt-realtime", &h).await;
    let message = assert_exceeded(&r, "team-monthly");
    assert!(message.contains("may cost up to 0.064 USD"), "{message}");
    assert!(
        message.contains("a realtime session reserves 1000 output tokens"),
        "{message}"
    );
    assert!(!message.contains("max_tokens"), "{message}");
    assert!(emu.entry("realtime-refused").await.is_none());
}

/// A request the upstream may spend its whole allowance on without ezgate learning what it
/// spent is charged its reservation: its client left after it was sent, the upstream's
/// answer did not come within `upstream.response_timeout`, or a non-streamed success
/// carried no usage. A caller can bring about the first two at will, with a large
/// `max_tokens`, so charging only the prompt would let a budget be spent without limit.
#[tokio::test]
async fn a_request_sent_and_then_left_or_timed_out_is_charged_its_reservation() {
    let rest = format!(
        "[upstream]\nresponse_timeout = \"1s\"\n\n{}",
        budget("team-monthly", "team", "100", "month", "")
    );
    let (_emu, gw) = gateway(&rest).await;
    let body = chat(Some(4000), false);
    let reservation = max_cost(&body, 4000);
    // The upstream answers after 3 s: 504 at 1 s, charged the reservation.
    let r = post(
        &gw,
        SEARCH,
        "slow",
        &[("x-emu-header-delay-ms", "3000")],
        &body,
    )
    .await;
    assert_eq!(r.status, 504);
    assert_eq!(
        spent(&gw, "team-monthly", "search").await,
        shown(reservation)
    );
    // The client leaves 300 ms after sending, before the answer's headers.
    let left = tokio::time::timeout(
        Duration::from_millis(300),
        post(
            &gw,
            SEARCH,
            "left",
            &[("x-emu-header-delay-ms", "800")],
            &body,
        ),
    )
    .await;
    assert!(left.is_err(), "the client left before the answer");
    wait_view(&gw, "team-monthly", DEADLINE, |v| {
        v["top"][0]["spent"].as_f64() == Some(shown(2 * reservation))
    })
    .await;
    // A request refused before it was sent costs nothing, as before: an upstream error too.
    let r = post(&gw, SEARCH, "e500", &[("x-emu-status", "500")], &body).await;
    assert_eq!(r.status, 500);
    assert_eq!(
        spent(&gw, "team-monthly", "search").await,
        shown(2 * reservation)
    );
}

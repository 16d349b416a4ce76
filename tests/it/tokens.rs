//! Token accounting end to end: which requests a token policy charges, what each outcome is
//! charged in the end (docs/rate-limits.md, "What a request is charged"), streams metered for
//! every request and delivered exactly as the client asked for them, and the accuracy of a
//! token policy over a few hundred mixed requests.

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// A token budget that refills by 0.06 tokens a second: still, for the length of a test.
const PER_DAY: &str = "[[limits]]\nname = \"tpd\"\nkey = \"global\"\ntokens = \"5000/day\"\n";
const PROMPT: &str = "Summarize the quarterly report in three sentences.";

fn chat_body(stream: bool, max_tokens: Option<u64>) -> String {
    let max = max_tokens.map_or(String::new(), |n| format!(",\"max_tokens\":{n}"));
    format!(
        r#"{{"model":"gpt-4o","stream":{stream}{max},"messages":[{{"role":"user","content":"{PROMPT}"}}]}}"#
    )
}

const JSON: (&str, &str) = ("content-type", "application/json");

async fn post(gw: &Gateway, path: &str, rid: &str, extra: &[(&str, &str)], body: &str) -> Resp {
    let mut h = vec![JSON, ("x-request-id", rid)];
    h.extend_from_slice(extra);
    gw.post(path, &h, body.to_owned()).await
}

/// What the access log says the request was charged in the end.
async fn charged(gw: &Gateway, rid: &str) -> u64 {
    let line = gw.access_log(rid).await;
    line["charged_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no charged_tokens in {line}"))
}

/// The tokens the emulator counted for a request: (prompt, completion).
async fn emulated(emu: &Emulator, rid: &str) -> (u64, u64) {
    let e = emu
        .entry(rid)
        .await
        .unwrap_or_else(|| panic!("the emulator never saw {rid}"));
    let u = &e["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap_or_else(|| panic!("{e}")),
        u["completion_tokens"].as_u64().unwrap(),
    )
}

/// The bucket's balance, read from the `RateLimit` header of a request that costs nothing
/// in the end (the upstream refuses it: refunded). Its own estimate is 2 tokens. Returns
/// once the probe is refunded (its access line is written after its settlement): the client
/// can read the whole answer before ezgate ends the exchange, and a probe still reserved
/// would lower the next one's balance.
async fn balance(gw: &Gateway) -> u64 {
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let rid = format!("balance-probe-{n:06}");
    let body = r#"{"model":"gpt-4o","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = gw
        .post(
            "/v1/chat/completions",
            &[JSON, ("x-emu-status", "400"), ("x-request-id", &rid)],
            body,
        )
        .await;
    assert_eq!(r.status, 400);
    gw.access_log(&rid).await;
    let header = r.header("ratelimit").expect("the probe is covered");
    let remaining: u64 = header
        .split(";r=")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{header}"));
    remaining + 2
}

/// Reads the response head and the first event of a stream, then leaves; returns the status.
async fn read_a_little_then_leave(gw: &Gateway, rid: &str, extra: &str, body: &str) -> u16 {
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-request-id: {rid}\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got);
        if text.contains("data: ")
            || (text.contains("\r\n\r\n") && !text.starts_with("HTTP/1.1 200"))
        {
            break;
        }
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got[9..12]).parse().unwrap()
}

#[tokio::test]
async fn token_policies_charge_only_requests_that_spend_tokens() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[[limits]]\nname = \"tpm\"\nkey = \"global\"\ntokens = \"2000/min\"\n",
    )
    .await;
    // Each would cost the 1,000 default tokens if it were charged.
    for i in 0..10 {
        let rid = format!("models-{i}");
        let r = gw.get_with("/v1/models", &[("x-request-id", &rid)]).await;
        assert_eq!(r.status, 200, "model listing {i} is never charged");
        assert!(gw.access_log(&rid).await.get("charged_tokens").is_none());
    }
    let r = post(
        &gw,
        "/v1/chat/completions",
        "chat",
        &[],
        &chat_body(false, None),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(charged(&gw, "chat").await > 0);
}

/// Every row of the table in docs/rate-limits.md, against one policy.
async fn each_outcome_is_charged(gw: &Gateway, emu: &Emulator) {
    let start = balance(gw).await;
    let mut spent = 0;

    // Usage reported: exactly what the upstream reported.
    let r = post(
        gw,
        "/v1/chat/completions",
        "json",
        &[("x-emu-completion-tokens", "7")],
        &chat_body(false, Some(500)),
    )
    .await;
    assert_eq!(r.status, 200);
    let (p, c) = emulated(emu, "json").await;
    assert_eq!(charged(gw, "json").await, p + c);
    spent += p + c;

    let r = post(
        gw,
        "/v1/chat/completions",
        "sse",
        &[("x-emu-stream-events", "5")],
        &chat_body(true, Some(500)),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        !String::from_utf8_lossy(&r.body).contains("usage"),
        "the client did not ask"
    );
    assert_eq!(charged(gw, "sse").await, emulated(emu, "sse").await.0 + 5);
    spent += charged(gw, "sse").await;

    let responses =
        format!(r#"{{"model":"gpt-4o","stream":true,"max_output_tokens":500,"input":"{PROMPT}"}}"#);
    let r = post(gw, "/v1/responses", "responses-sse", &[], &responses).await;
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("response.completed"));
    let (p, c) = emulated(emu, "responses-sse").await;
    assert_eq!(charged(gw, "responses-sse").await, p + c);
    spent += p + c;

    let responses = format!(r#"{{"model":"gpt-4o","max_output_tokens":500,"input":"{PROMPT}"}}"#);
    let r = post(gw, "/v1/responses", "responses-json", &[], &responses).await;
    assert_eq!(r.status, 200);
    let (p, c) = emulated(emu, "responses-json").await;
    assert_eq!(charged(gw, "responses-json").await, p + c);
    spent += p + c;

    let embeddings = format!(r#"{{"model":"text-embedding-3-small","input":"{PROMPT}"}}"#);
    let r = post(gw, "/v1/embeddings", "embeddings", &[], &embeddings).await;
    assert_eq!(r.status, 200);
    let (p, _) = emulated(emu, "embeddings").await;
    assert_eq!(charged(gw, "embeddings").await, p);
    spent += p;

    // An upstream error status, or a failure before any response body: fully refunded.
    for (rid, fault) in [
        ("status-500", ("x-emu-status", "500")),
        ("status-429", ("x-emu-status", "429")),
        ("reset", ("x-emu-reset", "headers")),
        ("slow", ("x-emu-header-delay-ms", "3000")),
        ("malformed", ("x-emu-malformed", "1")),
    ] {
        let r = post(
            gw,
            "/v1/chat/completions",
            rid,
            &[fault],
            &chat_body(false, Some(500)),
        )
        .await;
        assert!(r.status.as_u16() >= 400, "{rid}: {}", r.status);
        assert_eq!(charged(gw, rid).await, 0, "{rid} spent nothing");
    }

    // Cut by the upstream, silent past the idle timeout, or left by the client: the prompt
    // estimate and what streamed, never the whole max_tokens.
    for (rid, fault) in [
        ("cut", ("x-emu-cut-after", "3")),
        ("stalled", ("x-emu-stall-after", "3")),
    ] {
        let r = post(
            gw,
            "/v1/chat/completions",
            rid,
            &[fault, ("x-emu-stream-events", "20")],
            &chat_body(true, Some(1000)),
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(
            String::from_utf8_lossy(&r.body).contains("\"error\""),
            "{rid} ends with an error event"
        );
        let (p, c) = emulated(emu, rid).await;
        assert_eq!(c, 3);
        let got = charged(gw, rid).await;
        assert!(
            got > c && got <= p * 2 + c,
            "{rid}: charged {got}, emulated {p} + {c}"
        );
        spent += got;
    }
    let status = read_a_little_then_leave(
        gw,
        "left",
        "x-emu-stream-events: 1000\r\nx-emu-stream-interval-ms: 50\r\n",
        &chat_body(true, Some(1000)),
    )
    .await;
    assert_eq!(status, 200);
    emu.wait_state("left", "cancelled", DEADLINE).await;
    let got = charged(gw, "left").await;
    let (p, c) = emulated(emu, "left").await;
    assert!(
        got >= 2 && got <= p * 2 + c + 1,
        "left: charged {got}, emulated {p} + {c}"
    );
    spent += got;

    // The charges reached the bucket: nothing else was taken. A shared store settles just
    // after the response (the correction is a command to Redis): wait for it to land.
    let waited = std::time::Instant::now();
    loop {
        let taken = start - balance(gw).await;
        if taken.abs_diff(spent) <= 2 {
            break;
        }
        assert!(
            waited.elapsed() < DEADLINE,
            "the bucket lost {taken}, the charges add up to {spent}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn each_outcome_is_charged_what_it_spent() {
    let emu = Emulator::start().await;
    let config = format!(
        "[upstream]\nresponse_timeout = \"500ms\"\nstream_idle_timeout = \"500ms\"\n\n{PER_DAY}"
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    each_outcome_is_charged(&gw, &emu).await;
}

#[tokio::test]
async fn shared_token_policies_settle_the_same_way() {
    let redis = crate::redis_servers::Redis::start().await;
    let emu = Emulator::start().await;
    let config = format!(
        "[upstream]\nresponse_timeout = \"500ms\"\nstream_idle_timeout = \"500ms\"\n\n[redis]\nurl = \"redis://127.0.0.1:{}\"\n\n{PER_DAY}store = \"redis\"\n",
        redis.port
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    each_outcome_is_charged(&gw, &emu).await;
    assert_eq!(
        gw.metric("ezgate_ratelimit_store_fallbacks_total{policy=\"tpd\"}")
            .await,
        0.0
    );
}

/// A client that accepts gzip cannot hide a response's usage: a model route asks the
/// upstream for an uncompressed answer, and an answer compressed anyway (its usage unread)
/// is charged no less than its reservation.
#[tokio::test]
async fn compressed_answers_cannot_hide_their_usage() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), PER_DAY).await;
    let asks = [
        ("accept-encoding", "gzip, br"),
        ("x-emu-completion-tokens", "300"),
    ];
    let r = post(
        &gw,
        "/v1/chat/completions",
        "gz-asked",
        &asks,
        &chat_body(false, Some(400)),
    )
    .await;
    assert_eq!(r.status, 200);
    let e = emu.entry("gz-asked").await.unwrap();
    assert_eq!(logged_header(&e, "accept-encoding"), Some("identity"));
    let (p, c) = emulated(&emu, "gz-asked").await;
    assert_eq!(charged(&gw, "gz-asked").await, p + c);
    // The upstream compresses though asked not to.
    let forced = [
        ("accept-encoding", "gzip"),
        ("x-emu-encoding", "gzip"),
        ("x-emu-completion-tokens", "300"),
    ];
    let r = post(
        &gw,
        "/v1/chat/completions",
        "gz-forced",
        &forced,
        &chat_body(false, Some(400)),
    )
    .await;
    assert_eq!(r.status, 200);
    let spent = charged(&gw, "gz-forced").await;
    assert!(
        spent > 400,
        "charged {spent}: at least max_tokens and the prompt"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_costs_nothing() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let gw = Gateway::start(&url, PER_DAY).await;
    let r = post(
        &gw,
        "/v1/chat/completions",
        "dead",
        &[],
        &chat_body(false, Some(500)),
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(charged(&gw, "dead").await, 0);
}

#[tokio::test]
async fn a_request_refused_by_another_policy_takes_no_tokens() {
    let emu = Emulator::start().await;
    let config = format!(
        "{PER_DAY}\n[[limits]]\nname = \"one-embedding\"\nkey = \"global\"\nrequests = \"1/day\"\nmatch = {{ routes = [\"/v1/embeddings\"] }}\n"
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    let start = balance(&gw).await;
    let embeddings = format!(r#"{{"model":"text-embedding-3-small","input":"{PROMPT}"}}"#);
    let r = post(&gw, "/v1/embeddings", "e1", &[], &embeddings).await;
    assert_eq!(r.status, 200);
    let first = charged(&gw, "e1").await;
    for i in 0..5 {
        let r = post(
            &gw,
            "/v1/embeddings",
            &format!("e-refused-{i}"),
            &[],
            &embeddings,
        )
        .await;
        assert_eq!(r.status, 429);
        assert_eq!(r.error()["code"], "rate_limited");
    }
    assert!(start - balance(&gw).await <= first + 1);
}

/// The emulator's stream for `body`, asked directly, with a fixed id so that two answers
/// can be compared byte for byte.
async fn direct(emu: &Emulator, path: &str, body: &str, id: &str) -> Bytes {
    let r = send(
        &http1(),
        Method::POST,
        &format!("{}{path}", emu.url()),
        &[JSON, ("x-emu-id", id), ("x-emu-stream-events", "6")],
        Bytes::from(body.to_owned()),
    )
    .await;
    assert_eq!(r.status, 200);
    r.body
}

#[tokio::test]
async fn streams_reach_the_client_byte_for_byte_as_it_asked_for_them() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let with_usage = format!(
        r#"{{"model":"gpt-4o","stream":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"{PROMPT}"}}]}}"#
    );
    let completions = format!(r#"{{"model":"gpt-4o","stream":true,"prompt":"{PROMPT}"}}"#);
    for (path, body, rid) in [
        ("/v1/chat/completions", chat_body(true, None), "plain"),
        ("/v1/chat/completions", with_usage.clone(), "asked"),
        ("/v1/completions", completions, "text"),
    ] {
        let want = direct(&emu, path, &body, rid).await;
        let got = post(
            &gw,
            path,
            rid,
            &[("x-emu-id", rid), ("x-emu-stream-events", "6")],
            &body,
        )
        .await;
        assert_eq!(got.status, 200);
        assert_eq!(
            String::from_utf8_lossy(&got.body),
            String::from_utf8_lossy(&want),
            "{rid}: the client gets the upstream's stream for its own request"
        );
        // Metered all the same, whether the client asked for usage or not.
        let line = gw.access_log(rid).await;
        assert_eq!(line["model"], "gpt-4o", "{line}");
        assert_eq!(line["completion_tokens"], 6, "{line}");
        assert!(line["prompt_tokens"].as_u64().unwrap() > 0, "{line}");
    }
    assert!(
        String::from_utf8_lossy(&direct(&emu, "/v1/chat/completions", &with_usage, "x").await)
            .contains("\"choices\":[],\"usage\":{")
    );
    assert_eq!(
        gw.wait_metric(
            "ezgate_tokens_total{client=\"anonymous\",kind=\"completion\",model=\"gpt-4o\"}",
            |v| v >= 18.0
        )
        .await,
        18.0,
        "three streams of 6 tokens"
    );

    // Turned off: nothing is asked, nothing is metered for streams that did not ask.
    let off = Gateway::start(&emu.url(), "[upstream]\nstream_usage = false\n").await;
    let body = chat_body(true, None);
    let want = direct(&emu, "/v1/chat/completions", &body, "off").await;
    let got = post(
        &off,
        "/v1/chat/completions",
        "off",
        &[("x-emu-id", "off"), ("x-emu-stream-events", "6")],
        &body,
    )
    .await;
    assert_eq!(got.body, want);
    assert!(off
        .access_log("off")
        .await
        .get("completion_tokens")
        .is_none());
}

/// The official openai Python SDK, streaming through ezgate.
#[tokio::test]
async fn the_openai_sdk_streams_through_ezgate() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[[limits]]\nname = \"tpm\"\nkey = \"global\"\ntokens = \"100000/min\"\n",
    )
    .await;
    let v = run_python("sdk_stream.py", &gw.url("/v1")).await;
    assert_eq!(v["plain_text"], "tok0 tok1 tok2 tok3 tok4 ");
    assert_eq!(v["plain_chunks"], 5, "no chunk the client did not ask for");
    assert_eq!(
        v["asked_last_choices"], 0,
        "asked: the usage chunk comes last"
    );
    assert_eq!(v["asked_completion_tokens"], 5);
    assert_eq!(v["responses_output_tokens"], 5);
}

#[tokio::test]
async fn tokens_are_counted_per_client() {
    let emu = Emulator::start().await;
    let digest = sha256_hex("key-a");
    let config = format!(
        "[upstream]\napi_key = \"${{ORG_KEY}}\"\n\n[[clients]]\nname = \"team-a\"\nkey_sha256 = \"{digest}\"\n"
    );
    let gw = Gateway::start_env(&emu.url(), &config, &[("ORG_KEY", "sk-org")]).await;
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                JSON,
                ("authorization", "Bearer key-a"),
                ("x-emu-stream-events", "4"),
            ],
            chat_body(true, None),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = gw
        .post(
            "/v1/chat/completions",
            &[JSON, ("authorization", "Bearer nobody")],
            chat_body(false, None),
        )
        .await;
    assert_eq!(r.status, 401);
    let m = gw.settled_metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "ezgate_tokens_total{client=\"team-a\",kind=\"completion\",model=\"gpt-4o\"}"
        ),
        4.0
    );
    assert!(
        !m.contains("key-a") && !m.contains("fp:"),
        "never a key or a fingerprint"
    );
}

/// A few hundred mixed requests through a policy of N tokens per hour: the tokens admitted,
/// as the emulator counted them, come within ±5 % of N, and no failure was charged.
#[tokio::test]
async fn a_token_policy_admits_its_rate_and_charges_no_failure() {
    const N: u64 = 6000;
    let emu = Emulator::start().await;
    let config = format!(
        "[log]\naccess_log = true\n\n[[limits]]\nname = \"tph\"\nkey = \"global\"\ntokens = \"{N}/h\"\n"
    );
    let gw = std::sync::Arc::new(Gateway::start(&emu.url(), &config).await);
    let mut failures = Vec::new();
    let mut admitted_ids = Vec::new();
    for round in 0..40 {
        let mut tasks = Vec::new();
        for k in 0..8 {
            let i = round * 8 + k;
            let rid = format!("mix-{i}");
            let gw = std::sync::Arc::clone(&gw);
            let kind = i % 8;
            if kind == 7 {
                failures.push(rid.clone());
            }
            tasks.push(tokio::spawn(async move {
                let status = match kind {
                    // Aborted by the client after the first event.
                    6 => {
                        read_a_little_then_leave(
                            &gw,
                            &rid,
                            "x-emu-stream-events: 1000\r\nx-emu-stream-interval-ms: 20\r\n",
                            &chat_body(true, Some(40)),
                        )
                        .await
                    }
                    7 => post(
                        &gw,
                        "/v1/chat/completions",
                        &rid,
                        &[("x-emu-status", "500")],
                        &chat_body(false, Some(40)),
                    )
                    .await
                    .status
                    .as_u16(),
                    k if k % 2 == 0 => post(
                        &gw,
                        "/v1/chat/completions",
                        &rid,
                        &[("x-emu-completion-tokens", "30")],
                        &chat_body(false, Some(40)),
                    )
                    .await
                    .status
                    .as_u16(),
                    _ => post(
                        &gw,
                        "/v1/chat/completions",
                        &rid,
                        &[("x-emu-stream-events", "25")],
                        &chat_body(true, Some(40)),
                    )
                    .await
                    .status
                    .as_u16(),
                };
                (rid, status)
            }));
        }
        for t in tasks {
            let (rid, status) = t.await.unwrap();
            if status == 200 {
                admitted_ids.push(rid);
            }
        }
    }
    // Every admitted request has ended upstream.
    for rid in &admitted_ids {
        let state = emu.entry(rid).await.map(|e| e["state"].clone());
        if state == Some(Value::from("in_progress")) {
            emu.wait_state(rid, "cancelled", DEADLINE).await;
        }
    }
    let mut total = 0;
    for e in emu.log().await {
        let Some(u) = e.get("usage").filter(|u| !u.is_null()) else {
            continue;
        };
        total += u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap();
    }
    assert!(
        admitted_ids.len() > 100 && admitted_ids.len() < 300,
        "{} admitted: the budget ran out",
        admitted_ids.len()
    );
    let ratio = total as f64 / N as f64;
    eprintln!(
        "accuracy: {} admitted, {total} tokens, ratio {ratio:.4}",
        admitted_ids.len()
    );
    assert!(
        (0.95..=1.05).contains(&ratio),
        "the upstream generated {total} tokens for a budget of {N} ({ratio:.3})"
    );
    for rid in &failures {
        let line = gw.access_log(rid).await;
        if line["status"] == 500 {
            assert_eq!(line["charged_tokens"], 0, "{line}");
        }
    }
}

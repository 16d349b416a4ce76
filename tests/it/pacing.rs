//! `upstream.quota.mode = "enforce"` end to end: the real ezgate paces real concurrent
//! clients on the quota it learns from the emulator's `x-ratelimit-*` headers (quota mode,
//! `PUT /__emu/quota`), and the emulator's own counters (`GET /__emu/quota`: `admitted`,
//! `limited`, `admitted_tokens`) judge what reached it.
//!
//! Windows are short (seconds) so each test takes a few seconds; the load tests run one at a
//! time ([`SERIAL`]) so none measures another's load on a small machine.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::harness::*;

const ORG_KEY: &str = "sk-org-pacing-secret";

/// 31 characters: the emulator counts `P` = 7 prompt tokens for it.
const PROMPT: &str = "Say hello to the gateway tests.";
const PROMPT_TOKENS: u64 = 7;

/// One load test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy)]
struct Client {
    name: &'static str,
    key: &'static str,
    priority: &'static str,
}

const APP: Client = Client {
    name: "app",
    key: "sk-client-app",
    priority: "interactive",
};
const ETL: Client = Client {
    name: "etl",
    key: "sk-client-etl",
    priority: "batch",
};
const SMALL: Client = Client {
    name: "small",
    key: "sk-client-small",
    priority: "batch",
};
const BIG: Client = Client {
    name: "big",
    key: "sk-client-big",
    priority: "batch",
};

/// Managed mode (one upstream key, so one quota for every client): `upstream` lines go in
/// `[upstream]`, `quota` lines in `[upstream.quota]`.
fn config(mode: &str, quota: &str, clients: &[Client], upstream: &str) -> String {
    let mut c = format!(
        "[upstream]\napi_key = \"${{ORG_KEY}}\"\n{upstream}\n\n[upstream.quota]\nmode = \"{mode}\"\n{quota}\n"
    );
    for cl in clients {
        c += &format!(
            "\n[[clients]]\nname = \"{}\"\nkey_sha256 = \"{}\"\npriority = \"{}\"\n",
            cl.name,
            sha256_hex(cl.key),
            cl.priority
        );
    }
    c
}

async fn start(emu: &Emulator, config: &str) -> Gateway {
    Gateway::start_env(&emu.url(), config, &[("ORG_KEY", ORG_KEY)]).await
}

async fn emulator(quota: Value) -> Emulator {
    let emu = Emulator::start().await;
    emu.set_quota(quota).await;
    emu
}

fn chat_body(max_tokens: u64) -> String {
    format!(
        r#"{{"model":"gpt-4o","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{PROMPT}"}}]}}"#
    )
}

/// One request through the gateway as `client`.
async fn chat_as(gw: &Gateway, client: Client, max_tokens: u64) -> Resp {
    let auth = format!("Bearer {}", client.key);
    gw.post(
        "/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        chat_body(max_tokens),
    )
    .await
}

/// One request straight to the emulator with the organization's key: quota spent behind
/// ezgate's back.
async fn chat_direct(emu: &Emulator) -> Resp {
    let auth = format!("Bearer {ORG_KEY}");
    send(
        &http1(),
        Method::POST,
        &format!("{}/v1/chat/completions", emu.url()),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        Bytes::from(chat_body(16)),
    )
    .await
}

/// The first answer teaches ezgate the quota (nothing learned: forwarded unpaced).
async fn teach(gw: &Gateway, client: Client) {
    let r = chat_as(gw, client, 16).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
}

fn n(q: &Value, counter: &str) -> f64 {
    q[counter]
        .as_u64()
        .unwrap_or_else(|| panic!("{counter} in {q}")) as f64
}

/// `limited / (admitted + limited)` of the emulator: the share of forwarded requests the
/// upstream refused.
fn limited_share(q: &Value) -> f64 {
    let (a, l) = (n(q, "admitted"), n(q, "limited"));
    if a + l == 0.0 {
        0.0
    } else {
        l / (a + l)
    }
}

/// What one client request got.
#[derive(Debug)]
struct Shot {
    status: u16,
    /// The error's `code`, for an error.
    code: Option<String>,
    /// Client-side, from sending to the whole answer (the emulator answers at once, so this
    /// bounds the request's wait in ezgate's queue from above).
    latency: Duration,
}

/// An open-loop load: `rps` requests per second for `secs`, each in its own task, so many
/// are in flight at once.
#[derive(Clone, Copy)]
struct Load {
    client: Client,
    rps: f64,
    secs: f64,
    max_tokens: u64,
}

fn spawn_load(gw: &Gateway, load: Load, t0: Instant) -> JoinHandle<Vec<Shot>> {
    let url = gw.url("/v1/chat/completions");
    let auth = format!("Bearer {}", load.client.key);
    let body = Bytes::from(chat_body(load.max_tokens));
    tokio::spawn(async move {
        let client = http1();
        let count = (load.rps * load.secs).round() as u32;
        let every = Duration::from_secs_f64(1.0 / load.rps);
        let mut tasks = Vec::new();
        for i in 0..count {
            // The schedule of an open-loop load, not a synchronization.
            tokio::time::sleep_until((t0 + every * i).into()).await;
            let (client, url, auth, body) =
                (client.clone(), url.clone(), auth.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let r = send(
                    &client,
                    Method::POST,
                    &url,
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    body,
                )
                .await;
                let code = serde_json::from_slice::<Value>(&r.body)
                    .ok()
                    .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
                Shot {
                    status: r.status.as_u16(),
                    code,
                    latency: sent.elapsed(),
                }
            }));
        }
        let mut shots = Vec::with_capacity(tasks.len());
        for t in tasks {
            shots.push(t.await.unwrap());
        }
        shots
    })
}

fn ok(shots: &[Shot]) -> usize {
    shots.iter().filter(|s| s.status == 200).count()
}

fn with_code(shots: &[Shot], code: &str) -> usize {
    shots
        .iter()
        .filter(|s| s.code.as_deref() == Some(code))
        .count()
}

/// The emulator's counters at `at` after `t0`, with the instant they were read.
async fn sample_at(emu: &Emulator, t0: Instant, at: Duration) -> (f64, Value) {
    // The timeline of a rate measurement, not a synchronization.
    tokio::time::sleep_until((t0 + at).into()).await;
    let t = t0.elapsed().as_secs_f64();
    (t, emu.quota().await)
}

/// The admitted rate (per second) of `counter` between two samples.
fn rate(a: &(f64, Value), b: &(f64, Value), counter: &str) -> f64 {
    (n(&b.1, counter) - n(&a.1, counter)) / (b.0 - a.0)
}

/// One client offering about twice the quota for 6 s.
struct Run {
    shots: Vec<Shot>,
    /// The emulator's counters after the first window (2 s) and at the end of the offer.
    steady: [(f64, Value); 2],
    end: Value,
}

async fn run_twice_the_quota(
    quota: Value,
    mode: &str,
    upstream: &str,
    rps: f64,
    max_tokens: u64,
) -> Run {
    let emu = emulator(quota).await;
    let gw = start(&emu, &config(mode, "", &[APP], upstream)).await;
    teach(&gw, APP).await;
    let t0 = Instant::now();
    let load = spawn_load(
        &gw,
        Load {
            client: APP,
            rps,
            secs: 6.0,
            max_tokens,
        },
        t0,
    );
    let first = sample_at(&emu, t0, Duration::from_secs(2)).await;
    let last = sample_at(&emu, t0, Duration::from_secs(6)).await;
    let shots = load.await.unwrap();
    let end = emu.quota().await;
    Run {
        shots,
        steady: [first, last],
        end,
    }
}

#[tokio::test]
async fn pacing_keeps_upstream_429s_under_2_percent_and_uses_the_quota() {
    let _serial = SERIAL.lock().await;

    // Requests bind: 30 per 2 s is 15/s; offered 30/s.
    let requests = json!({"requests": {"limit": 30, "per": "2s"}});
    let run = run_twice_the_quota(requests.clone(), "enforce", "", 30.0, 16).await;
    let share = limited_share(&run.end);
    // Used share of the quota in the steady state (after the first window, the bucket's
    // initial fill spent): (admitted(6 s) − admitted(2 s)) / (6 s − 2 s) / (limit / per).
    let used = rate(&run.steady[0], &run.steady[1], "admitted") / (30.0 / 2.0);
    eprintln!(
        "requests bind: upstream 429 share {share:.3}, steady use {used:.3}, client 200s {}/{}, quota_exhausted {}, end {}",
        ok(&run.shots),
        run.shots.len(),
        with_code(&run.shots, "upstream_quota_exhausted"),
        run.end
    );
    assert!(
        share < 0.02,
        "upstream 429s: {share:.3} of forwarded: {}",
        run.end
    );
    assert!(used >= 0.85, "steady state used {used:.3} of the quota");
    // What the clients got: answers or ezgate's own 429, nothing cut or failed.
    let odd: Vec<&Shot> = run
        .shots
        .iter()
        .filter(|s| s.status != 200 && s.code.as_deref() != Some("upstream_quota_exhausted"))
        .collect();
    assert!(odd.len() <= 2, "{odd:?}");

    // Tokens bind: 6000 per 2 s is 3000/s; a request costs 7 + 200 = 207 tokens, about
    // 14.5/s carried, 30/s offered (about 6200 tokens/s); the requests quota is far away.
    let tokens =
        json!({"requests": {"limit": 1000, "per": "2s"}, "tokens": {"limit": 6000, "per": "2s"}});
    let run = run_twice_the_quota(tokens, "enforce", "", 30.0, 200).await;
    let share = limited_share(&run.end);
    // (admitted_tokens(6 s) − admitted_tokens(2 s)) / 4 s / (6000 / 2 s).
    let used = rate(&run.steady[0], &run.steady[1], "admitted_tokens") / (6000.0 / 2.0);
    eprintln!(
        "tokens bind: upstream 429 share {share:.3}, steady use {used:.3}, client 200s {}/{}, end {}",
        ok(&run.shots),
        run.shots.len(),
        run.end
    );
    assert!(
        share < 0.02,
        "upstream 429s: {share:.3} of forwarded: {}",
        run.end
    );
    assert!(
        used >= 0.85,
        "steady state used {used:.3} of the token quota"
    );

    // Control: the same load without pacing (and without the 1 s hold an upstream 429's
    // Retry-After would start, which hides the upstream's 429s behind ezgate's own) meets
    // many upstream 429s.
    let run = run_twice_the_quota(requests, "off", "max_retry_after = \"1ms\"", 30.0, 16).await;
    let share = limited_share(&run.end);
    eprintln!(
        "control (off): upstream 429 share {share:.3}, end {}",
        run.end
    );
    assert!(
        share > 0.2 && n(&run.end, "limited") >= 20.0,
        "without pacing the upstream refuses many: {}",
        run.end
    );
}

#[tokio::test]
async fn the_upstream_changing_its_quota_is_followed_within_seconds() {
    let _serial = SERIAL.lock().await;
    // 10/s at first; 20/s from 3 s; 5/s from 7 s. Offered: 30/s for 11 s.
    let emu = emulator(json!({"requests": {"limit": 20, "per": "2s"}})).await;
    let gw = start(&emu, &config("enforce", "", &[APP], "")).await;
    teach(&gw, APP).await;
    let t0 = Instant::now();
    let load = spawn_load(
        &gw,
        Load {
            client: APP,
            rps: 30.0,
            secs: 11.0,
            max_tokens: 16,
        },
        t0,
    );
    let s = |at: f64| sample_at(&emu, t0, Duration::from_secs_f64(at));
    let before = [s(1.0).await, s(3.0).await];
    emu.set_quota(json!({"requests": {"limit": 40, "per": "2s"}}))
        .await;
    let raised = [s(5.0).await, s(7.0).await];
    emu.set_quota(json!({"requests": {"limit": 10, "per": "2s"}}))
        .await;
    let lowered = [s(8.5).await, s(11.0).await];
    let shots = load.await.unwrap();
    let end = emu.quota().await;

    let r_before = rate(&before[0], &before[1], "admitted");
    let r_raised = rate(&raised[0], &raised[1], "admitted");
    let r_lowered = rate(&lowered[0], &lowered[1], "admitted");
    // Upstream 429s from 1.5 s after the lowering to the end of the run.
    let late_429 = n(&end, "limited") - n(&lowered[0].1, "limited");
    let late_forwarded = late_429 + n(&end, "admitted") - n(&lowered[0].1, "admitted");
    eprintln!(
        "quota change: rate at 10/s {r_before:.2}, at 20/s (2-4 s after the raise) {r_raised:.2}, at 5/s (1.5-4 s after the lowering) {r_lowered:.2}; late upstream 429s {late_429} of {late_forwarded}; client 200s {}/{}; end {end}",
        ok(&shots),
        shots.len()
    );
    // Raised to 20/s: ezgate follows within 2 s and forwards well above the old 10/s.
    assert!(r_raised >= 16.0, "after the raise: {r_raised:.2}/s");
    assert!(r_before <= 12.0, "before the raise: {r_before:.2}/s");
    // Lowered to 5/s: what ezgate forwards from 1.5 s later is (nearly) all admitted.
    assert!(
        late_429 <= (late_forwarded * 0.05).max(1.0),
        "after the lowering: {late_429} upstream 429s of {late_forwarded}"
    );
    assert!(
        (3.5..=6.5).contains(&r_lowered),
        "after the lowering: {r_lowered:.2}/s"
    );
}

/// The 95th percentile.
fn p95(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[((v.len() as f64 * 0.95).ceil() as usize).clamp(1, v.len()) - 1]
}

#[tokio::test]
async fn interactive_is_served_beside_a_batch_flood() {
    let _serial = SERIAL.lock().await;
    // 15/s: interactive offers 6/s (40%), batch 30/s (200%) for 6 s.
    let emu = emulator(json!({"requests": {"limit": 30, "per": "2s"}})).await;
    let gw = start(
        &emu,
        &config("enforce", "max_wait = { batch = \"2s\" }", &[APP, ETL], ""),
    )
    .await;
    teach(&gw, APP).await;
    let t0 = Instant::now();
    let load = |client, rps| {
        spawn_load(
            &gw,
            Load {
                client,
                rps,
                secs: 6.0,
                max_tokens: 16,
            },
            t0,
        )
    };
    let (app, etl) = (load(APP, 6.0), load(ETL, 30.0));
    let (app, etl) = (app.await.unwrap(), etl.await.unwrap());
    let end = emu.quota().await;
    let app_ok = ok(&app) as f64 / app.len() as f64;
    let app_p95 = p95(app.iter().map(|s| s.latency).collect());
    eprintln!(
        "interactive: {}/{} ok, p95 {app_p95:?}; batch: {}/{} ok, {} quota_exhausted; upstream 429 share {:.3}; end {end}",
        ok(&app),
        app.len(),
        ok(&etl),
        etl.len(),
        with_code(&etl, "upstream_quota_exhausted"),
        limited_share(&end)
    );
    assert!(app_ok >= 0.95, "interactive served: {app_ok:.3}");
    assert!(
        app_p95 < Duration::from_secs(1),
        "interactive p95 {app_p95:?}"
    );
    // Batch takes what is left (about 9/s of 15/s): served, and refused beyond.
    assert!(ok(&etl) >= 24, "batch served: {}", ok(&etl));
    assert!(with_code(&etl, "upstream_quota_exhausted") > 0);
    assert!(limited_share(&end) < 0.02, "{end}");
}

#[tokio::test]
async fn two_batch_clients_share_fairly_in_tokens() {
    let _serial = SERIAL.lock().await;
    // Tokens bind: 4000 per 2 s is 2000/s. Small requests cost 7 + 93 = 100 tokens, big ones
    // 7 + 393 = 400; each client offers 3000 tokens/s (150%): 30/s small, 7.5/s big.
    let emu = emulator(json!({
        "requests": {"limit": 1000, "per": "2s"},
        "tokens": {"limit": 4000, "per": "2s"}
    }))
    .await;
    let gw = start(
        &emu,
        &config(
            "enforce",
            "max_wait = { batch = \"3s\" }",
            &[SMALL, BIG],
            "",
        ),
    )
    .await;
    teach(&gw, SMALL).await;
    let t0 = Instant::now();
    let load = |client, rps, max_tokens| {
        spawn_load(
            &gw,
            Load {
                client,
                rps,
                secs: 6.0,
                max_tokens,
            },
            t0,
        )
    };
    let (small, big) = (load(SMALL, 30.0, 93), load(BIG, 7.5, 393));
    let (small, big) = (small.await.unwrap(), big.await.unwrap());
    let end = emu.quota().await;
    // The tokens each got, as the emulator charges them.
    let small_tokens = ok(&small) as f64 * (PROMPT_TOKENS + 93) as f64;
    let big_tokens = ok(&big) as f64 * (PROMPT_TOKENS + 393) as f64;
    let share = small_tokens / (small_tokens + big_tokens);
    // Refused at once (the estimate at admission) or after waiting max_wait.
    let refused = |shots: &[Shot]| {
        let r: Vec<&Shot> = shots.iter().filter(|s| s.status == 429).collect();
        let at_once = r
            .iter()
            .filter(|s| s.latency < Duration::from_secs(1))
            .count();
        (at_once, r.len() - at_once)
    };
    eprintln!(
        "fairness: refused (at once, after waiting): small {:?}, big {:?}",
        refused(&small),
        refused(&big)
    );
    eprintln!(
        "fairness: small {}/{} ok ({small_tokens} tokens), big {}/{} ok ({big_tokens} tokens): small's share {share:.3}; upstream 429 share {:.3}; end {end}",
        ok(&small),
        small.len(),
        ok(&big),
        big.len(),
        limited_share(&end)
    );
    assert!(
        (0.35..=0.65).contains(&share),
        "small's share of the tokens: {share:.3}"
    );
    assert!(limited_share(&end) < 0.02, "{end}");
}

#[tokio::test]
async fn past_max_wait_the_answer_is_429_upstream_quota_exhausted() {
    let emu = emulator(json!({
        "requests": {"limit": 3, "per": "10s"},
        "tokens": {"limit": 1000, "per": "10s"}
    }))
    .await;
    let gw = start(
        &emu,
        &config(
            "enforce",
            "max_wait = { interactive = \"1ms\" }",
            &[APP],
            "",
        ),
    )
    .await;
    teach(&gw, APP).await;
    // Eight at once: the picture carries one more (3 × 15% stays unspent), the rest would
    // wait seconds, past 1 ms.
    let shots: Vec<Resp> = futures_join(8, || chat_as(&gw, APP, 16)).await;
    let refused: Vec<&Resp> = shots.iter().filter(|r| r.status == 429).collect();
    assert!(refused.len() >= 6, "{shots:?}");
    for r in &refused {
        let e = r.error();
        assert_eq!(e["code"], "upstream_quota_exhausted", "{e}");
        assert_eq!(e["source"], "gateway");
        assert!(e["message"].as_str().unwrap().contains("gpt-4o"), "{e}");
        let ms = e["retry_after_ms"].as_u64().expect("retry_after_ms");
        assert!(ms > 0, "{e}");
        assert_eq!(r.header("retry-after-ms"), Some(ms.to_string().as_str()));
        assert_eq!(
            r.header("retry-after"),
            Some(ms.div_ceil(1000).to_string().as_str())
        );
        assert_eq!(r.header("x-should-retry"), None);
    }
    let before = emu.quota().await;
    assert_eq!(n(&before, "limited"), 0.0, "{before}");

    // Alone more than the tokens quota lets an interactive request spend: no retry helps.
    let r = chat_as(&gw, APP, 5000).await;
    let e = r.error();
    assert_eq!(e["code"], "upstream_quota_exhausted", "{e}");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(r.header("retry-after"), None);
    assert_eq!(r.header("retry-after-ms"), None);
    let after = emu.quota().await;
    assert_eq!(
        (n(&after, "admitted"), n(&after, "limited")),
        (n(&before, "admitted"), n(&before, "limited")),
        "the upstream never saw it"
    );
}

/// `k` concurrent calls of `f`, all in flight at once.
async fn futures_join<F, Fut>(k: usize, f: F) -> Vec<Resp>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Resp>,
{
    futures_util::future::join_all((0..k).map(|_| f())).await
}

/// Sends a chat request as `client` on a connection of its own; the answer is read with
/// [`answer`], or the connection dropped (the client leaves).
async fn open(gw: &Gateway, client: Client, request_id: &str) -> TcpStream {
    let body = chat_body(16);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\nconnection: close\r\nx-request-id: {request_id}\r\ncontent-length: {}\r\n\r\n{body}",
        client.key,
        body.len()
    );
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// The status and JSON body of the answer on `s` (read until the connection closes).
async fn answer(mut s: TcpStream) -> (u16, Value) {
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("the answer comes")
        .expect("the connection is closed cleanly, not cut");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP answer: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    (status, json)
}

const QUEUED: &str = "ezgate_queued_requests{priority=\"interactive\"}";

#[tokio::test]
async fn a_waiting_request_at_sigterm_gets_shutting_down_and_one_that_leaves_costs_nothing() {
    // 2 per 2 min: after the first request 1 remains and 15% of 2 stays unspent, so the
    // next waits about 18 s, the ones after it longer (all within max_wait).
    let emu = emulator(json!({"requests": {"limit": 2, "per": "2m"}})).await;
    let mut gw = start(
        &emu,
        &config(
            "enforce",
            "max_wait = { interactive = \"10m\" }",
            &[APP],
            "",
        ),
    )
    .await;
    teach(&gw, APP).await;
    let leaver = open(&gw, APP, "pacing-leaver").await;
    gw.wait_metric(QUEUED, |v| v == 1.0).await;
    let waiting = [
        open(&gw, APP, "pacing-wait-1").await,
        open(&gw, APP, "pacing-wait-2").await,
    ];
    gw.wait_metric(QUEUED, |v| v == 3.0).await;

    // The first in line leaves: its place is free at once, and nothing was forwarded.
    drop(leaver);
    gw.wait_metric(QUEUED, |v| v == 2.0).await;
    let log = gw.access_log("pacing-leaver").await;
    assert_eq!(log["status"], 499, "{log}");
    assert_eq!(n(&emu.quota().await, "admitted"), 1.0);

    gw.signal("TERM");
    for s in waiting {
        let (status, body) = answer(s).await;
        assert_eq!(status, 503, "{body}");
        crate::schema::assert_valid(&body);
        assert_eq!(body["error"]["code"], "shutting_down", "{body}");
    }
    assert_eq!(gw.exit_code().await, Some(0));
    let q = emu.quota().await;
    assert_eq!((n(&q, "admitted"), n(&q, "limited")), (1.0, 0.0), "{q}");
}

#[tokio::test]
async fn an_upstream_429_is_learned_not_a_cooldown_in_enforce() {
    for mode in ["enforce", "observe"] {
        // 10 per 4 s: 2.5/s.
        let emu = emulator(json!({"requests": {"limit": 10, "per": "4s"}})).await;
        let gw = start(
            &emu,
            &config(mode, "max_wait = { interactive = \"5s\" }", &[APP], ""),
        )
        .await;
        teach(&gw, APP).await;
        // The rest of the quota spent behind ezgate's back: its picture still shows 9.
        for _ in 0..12 {
            chat_direct(&emu).await;
        }
        let first = chat_as(&gw, APP, 16).await;
        assert_eq!(first.status, 429, "{mode}: {:?}", first.body);
        assert_eq!(first.error()["source"], "upstream");
        let limited = n(&emu.quota().await, "limited");

        let ids = ["pacing-behind-0", "pacing-behind-1", "pacing-behind-2"];
        let behind = futures_util::future::join_all(ids.map(|id| {
            let auth = format!("Bearer {}", APP.key);
            let gw = &gw;
            async move {
                gw.post(
                    "/v1/chat/completions",
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                        ("x-request-id", id),
                    ],
                    chat_body(16),
                )
                .await
            }
        }))
        .await;
        let codes: Vec<(u16, Option<String>)> = behind
            .iter()
            .map(|r| {
                let code =
                    (r.status != 200).then(|| r.error()["code"].as_str().unwrap().to_owned());
                (r.status.as_u16(), code)
            })
            .collect();
        eprintln!("{mode}: after an upstream 429: {codes:?}");
        if mode == "enforce" {
            // Learned: the requests behind it wait for the quota and succeed.
            assert!(codes.iter().all(|(s, _)| *s == 200), "{codes:?}");
            assert_eq!(
                n(&emu.quota().await, "limited"),
                limited,
                "no more upstream 429s"
            );
            // They waited: the access log says how long, and the metrics count it (the
            // quota was empty, so the first waits about 1 s, the others longer).
            for id in ids {
                let log = gw.access_log(id).await;
                assert!(log["queue_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{log}");
            }
            let waited = gw
                .metric("ezgate_queue_wait_seconds_sum{priority=\"interactive\"}")
                .await;
            assert!(waited >= 1.0, "{waited}");
        } else {
            // Control: without pacing, the upstream's Retry-After holds the key.
            assert!(
                codes
                    .iter()
                    .any(|(_, c)| c.as_deref() == Some("upstream_rate_limited")),
                "{codes:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_reload_with_the_same_quota_section_keeps_the_picture() {
    // 2 per 2 min, one spent through ezgate (its picture: 1 left), one behind its back (the
    // upstream: none left). A kept picture makes the next request wait; a lost one would
    // forward it into the upstream's 429.
    let emu = emulator(json!({"requests": {"limit": 2, "per": "2m"}})).await;
    let quota = "max_wait = { interactive = \"10m\" }";
    let gw = start(&emu, &config("enforce", quota, &[APP], "")).await;
    teach(&gw, APP).await;
    assert_eq!(chat_direct(&emu).await.status, 200);
    std::fs::write(
        &gw.config_path,
        config("enforce", quota, &[APP], "")
            + "\n[[limits]]\nname = \"roomy\"\nkey = \"global\"\nrequests = \"1000/min\"\n",
    )
    .unwrap();
    gw.signal("HUP");
    gw.wait_logs("config reloaded", 1).await;
    let s = open(&gw, APP, "pacing-after-reload").await;
    gw.wait_metric(QUEUED, |v| v == 1.0).await;
    let q = emu.quota().await;
    assert_eq!((n(&q, "admitted"), n(&q, "limited")), (2.0, 0.0), "{q}");
    drop(s);
    gw.wait_metric(QUEUED, |v| v == 0.0).await;
    let q = emu.quota().await;
    assert_eq!((n(&q, "admitted"), n(&q, "limited")), (2.0, 0.0), "{q}");
}

/// A realtime WebSocket handshake through `gw`: its status (101, or the refusal's).
async fn handshake(gw: &Gateway) -> (u16, Option<Value>) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let req = format!("ws://{}/v1/realtime?model=gpt-realtime", gw.addr)
        .into_client_request()
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let answer = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(req, tcp))
        .await
        .expect("the handshake is answered");
    match answer {
        Ok((_ws, resp)) => (resp.status().as_u16(), None),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            resp.body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok()),
        ),
        Err(e) => panic!("handshake: {e}"),
    }
}

#[tokio::test]
async fn realtime_handshakes_are_paced_too() {
    let emu = Emulator::start().await;
    // 3 sessions a minute: one every 20 s.
    emu.set_quota(serde_json::json!({"requests": {"limit": 3, "per": "1m"}}))
        .await;
    let gw = Gateway::start_env(
        &emu.url(),
        "[upstream]\napi_key = \"${ORG_KEY}\"\n[upstream.quota]\nmode = \"enforce\"\n",
        &[("ORG_KEY", "sk-org-realtime")],
    )
    .await;
    // The first teaches (2 left), the second takes one (1 left); the third would leave
    // less than interactive's 15% and would wait about 9 s, past its 2 s: refused at once.
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(handshake(&gw).await);
    }
    let statuses: Vec<u16> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [101, 101, 429, 429], "{got:?}");
    let body = got[2].1.as_ref().expect("a JSON refusal");
    assert_eq!(body["error"]["code"], "upstream_quota_exhausted", "{body}");
    // The upstream saw the two sessions it could carry, and refused none.
    let q = emu.quota().await;
    assert_eq!(
        (q["admitted"].as_u64(), q["limited"].as_u64()),
        (Some(2), Some(0)),
        "{q}"
    );
}

//! Unit tests of quota mode: instants are passed, never slept for.

use super::*;

fn limit(limit: u64, per_ms: u64) -> Limit {
    Limit {
        limit,
        per: Duration::from_millis(per_ms),
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn go_duration_writes_as_go_does_rounded_up_to_the_millisecond() {
    let cases = [
        (Duration::ZERO, "0s"),
        (Duration::from_nanos(1), "1ms"),
        (ms(20), "20ms"),
        (ms(999), "999ms"),
        (ms(1000), "1s"),
        (ms(1500), "1.5s"),
        (ms(1234), "1.234s"),
        (Duration::from_micros(59_998_001), "59.999s"),
        (ms(60_000), "1m0s"),
        (ms(360_000), "6m0s"),
        (ms(3_723_500), "1h2m3.5s"),
        (ms(3_600_000), "1h0m0s"),
        (ms(3_660_050), "1h1m0.05s"),
    ];
    for (d, want) in cases {
        assert_eq!(go_duration(d), want, "{d:?}");
    }
}

#[test]
fn durations_parse_go_style_and_refuse_nonsense() {
    assert_eq!(parse_duration("20ms").unwrap(), ms(20));
    assert_eq!(parse_duration("2s").unwrap(), ms(2000));
    assert_eq!(parse_duration("1.5s").unwrap(), ms(1500));
    assert_eq!(parse_duration("1m").unwrap(), ms(60_000));
    assert_eq!(parse_duration("6m0s").unwrap(), ms(360_000));
    assert_eq!(parse_duration("1h2m3.5s").unwrap(), ms(3_723_500));
    for bad in ["", "0s", "1", "s", "1d", "-1s", "1.2.3s", "1 s", "1sm"] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
    for d in [ms(20), ms(1500), ms(360_000), ms(3_723_500)] {
        assert_eq!(parse_duration(&go_duration(d)).unwrap(), d);
    }
}

#[test]
fn cli_spec_sets_either_part() {
    let both = Config::from_cli("requests=60/1m,tokens=40000/1m").unwrap();
    assert_eq!(both.requests, Some(limit(60, 60_000)));
    assert_eq!(both.tokens, Some(limit(40_000, 60_000)));
    let one = Config::from_cli("tokens=20/2s").unwrap();
    assert_eq!(one.requests, None);
    assert_eq!(one.tokens, Some(limit(20, 2000)));
    for bad in [
        "",
        "requests=60",
        "requests=0/1m",
        "requests=60/1m,requests=1/1s",
        "bytes=1/1s",
        "requests=x/1m",
        "requests=1/1d",
    ] {
        assert!(Config::from_cli(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn json_config_takes_null_or_absent_as_unlimited() {
    let c = Config::from_json(
        br#"{"requests": {"limit": 60, "per": "1m"}, "tokens": {"limit": 40000, "per": "1m"}}"#,
    )
    .unwrap();
    assert_eq!(c.requests, Some(limit(60, 60_000)));
    assert_eq!(c.tokens, Some(limit(40_000, 60_000)));
    let c =
        Config::from_json(br#"{"requests": null, "tokens": {"limit": 5, "per": "20ms"}}"#).unwrap();
    assert_eq!(c.requests, None);
    assert_eq!(c.tokens, Some(limit(5, 20)));
    assert_eq!(Config::from_json(b"{}").unwrap(), Config::default());
    for bad in [
        &b"not json"[..],
        br#"{"requests": {"limit": 0, "per": "1m"}}"#,
        br#"{"requests": {"limit": 1, "per": "soon"}}"#,
        br#"{"requests": {"limit": -1, "per": "1s"}}"#,
        br#"{"request": {"limit": 1, "per": "1s"}}"#,
        br#"{"tokens": {"limit": 1}}"#,
    ] {
        assert!(
            Config::from_json(bad).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn bucket_refills_continuously_up_to_its_limit() {
    let l = limit(20, 2000); // 10 per second
    let t0 = Instant::now();
    let b = Bucket::full(&l, t0);
    assert_eq!(b.remaining(&l, t0), 20);
    assert_eq!(b.reset(&l, t0), Duration::ZERO);
    let b = b.take(&l, 20, t0);
    assert_eq!(b.remaining(&l, t0), 0);
    assert_eq!(b.reset(&l, t0), ms(2000));
    assert_eq!(b.remaining(&l, t0 + ms(100)), 1);
    assert_eq!(b.remaining(&l, t0 + ms(99)), 0);
    assert_eq!(b.remaining(&l, t0 + ms(1500)), 15);
    assert_eq!(b.reset(&l, t0 + ms(1500)), ms(500));
    assert_eq!(b.remaining(&l, t0 + ms(60_000)), 20);
    assert_eq!(b.reset(&l, t0 + ms(60_000)), Duration::ZERO);
}

#[test]
fn bucket_short_waits_for_the_cost_and_an_oversized_cost_for_full() {
    let l = limit(60, 60_000); // 1 per second
    let t0 = Instant::now();
    let b = Bucket::full(&l, t0).take(&l, 58, t0);
    assert!(b.can_carry(&l, 2, t0));
    assert!(!b.can_carry(&l, 3, t0));
    assert_eq!(b.wait(&l, 3, t0), ms(1000));
    assert_eq!(b.wait(&l, 2, t0), Duration::ZERO);
    assert!(b.can_carry(&l, 3, t0 + ms(1000)));
    assert_eq!(b.wait(&l, 61, t0), ms(58_000));
}

#[test]
fn a_limit_change_keeps_the_level_capped_and_refills_at_the_new_rate() {
    let old = limit(100, 100_000); // 1 per second
    let t0 = Instant::now();
    let b = Bucket::full(&old, t0).take(&old, 90, t0); // level 10
    let lower = limit(5, 1000); // 5 per second
    let b2 = b.rebased(&old, &lower, t0 + ms(2000)); // 12 at the old rate, capped at 5
    assert_eq!(b2.remaining(&lower, t0 + ms(2000)), 5);
    let higher = limit(1000, 1000); // 1000 per second
    let b3 = b.rebased(&old, &higher, t0 + ms(2000));
    assert_eq!(b3.remaining(&higher, t0 + ms(2000)), 12);
    assert_eq!(b3.remaining(&higher, t0 + ms(2010)), 22);
}

fn config(requests: Option<Limit>, tokens: Option<Limit>) -> Config {
    Config { requests, tokens }
}

#[test]
fn decide_takes_from_both_buckets_only_when_both_can_carry() {
    let c = config(Some(limit(3, 3000)), Some(limit(100, 1000)));
    let t0 = Instant::now();
    let mut pair = Pair::default();
    let Decision::Admitted(r) = decide(&c, &mut pair, 40, t0) else {
        panic!("admitted expected")
    };
    let req = r.requests.unwrap();
    assert_eq!((req.limit, req.remaining, req.reset), (3, 2, ms(1000)));
    let tok = r.tokens.unwrap();
    assert_eq!((tok.limit, tok.remaining, tok.reset), (100, 60, ms(400)));
    assert!(matches!(
        decide(&c, &mut pair, 40, t0),
        Decision::Admitted(_)
    ));
    // 20 tokens left: the third is short on tokens and takes nothing.
    let Decision::Limited(r, short) = decide(&c, &mut pair, 40, t0) else {
        panic!("limited expected")
    };
    assert_eq!(short.unit, Unit::Tokens);
    assert_eq!((short.limit, short.used, short.requested), (100, 80, 40));
    assert_eq!(short.wait, ms(200));
    assert_eq!(r.requests.unwrap().remaining, 1);
    assert_eq!(r.tokens.unwrap().remaining, 20);
    assert_eq!(
        (pair.admitted, pair.limited, pair.admitted_tokens),
        (2, 1, 80)
    );
    // A token cost above the limit never passes, even with full buckets.
    let mut fresh = Pair::default();
    let Decision::Limited(_, short) = decide(&c, &mut fresh, 101, t0) else {
        panic!("limited expected")
    };
    assert_eq!((short.unit, short.wait), (Unit::Tokens, Duration::ZERO));
}

#[test]
fn decide_names_requests_when_they_are_short_and_skips_unlimited_units() {
    let c = config(Some(limit(1, 2000)), None);
    let t0 = Instant::now();
    let mut pair = Pair::default();
    let Decision::Admitted(r) = decide(&c, &mut pair, 1_000_000, t0) else {
        panic!("admitted expected")
    };
    assert_eq!(r.tokens, None);
    let Decision::Limited(_, short) = decide(&c, &mut pair, 1, t0 + ms(500)) else {
        panic!("limited expected")
    };
    assert_eq!(short.unit, Unit::Requests);
    assert_eq!(short.wait, ms(1500));
    assert!(matches!(
        decide(&c, &mut pair, 1, t0 + ms(2000)),
        Decision::Admitted(_)
    ));
}

#[test]
fn the_429_reads_as_openai_writes_it() {
    let report = Report {
        requests: Some(Snapshot {
            limit: 60,
            remaining: 59,
            reset: ms(1000),
        }),
        tokens: Some(Snapshot {
            limit: 1000,
            remaining: 10,
            reset: ms(59_400),
        }),
    };
    let short = Short {
        unit: Unit::Tokens,
        limit: 1000,
        used: 990,
        requested: 30,
        wait: ms(1234),
    };
    let response = too_many("gpt-4o", &report, &short);
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = response.headers();
    assert_eq!(h["retry-after"], "2");
    assert_eq!(h["x-ratelimit-limit-requests"], "60");
    assert_eq!(h["x-ratelimit-remaining-requests"], "59");
    assert_eq!(h["x-ratelimit-reset-requests"], "1s");
    assert_eq!(h["x-ratelimit-limit-tokens"], "1000");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "10");
    assert_eq!(h["x-ratelimit-reset-tokens"], "59.4s");
    let Payload::Bytes(body) = response.into_body() else {
        panic!("a complete body expected")
    };
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body,
        json!({"error": {
            "message": "Rate limit reached for gpt-4o in organization org-emu on tokens per min (TPM): Limit 1000, Used 990, Requested 30. Please try again in 1.234s.",
            "type": "tokens", "param": null, "code": "rate_limit_exceeded"}})
    );
}

#[test]
fn quota_counts_pairs_changes_limits_and_resets() {
    let quota = Quota::default();
    let t0 = Instant::now();
    assert_eq!(quota.decide("k", "m", 1, t0), None);
    quota.set(Some(config(Some(limit(2, 1000)), None)), t0);
    assert!(matches!(
        quota.decide("k", "m", 5, t0),
        Some(Decision::Admitted(_))
    ));
    assert!(matches!(
        quota.decide("k", "m", 5, t0),
        Some(Decision::Admitted(_))
    ));
    assert!(matches!(
        quota.decide("k", "m", 5, t0),
        Some(Decision::Limited(..))
    ));
    assert!(matches!(
        quota.decide("k2", "m", 5, t0),
        Some(Decision::Admitted(_))
    ));
    let json: Value = serde_json::from_str(&quota.to_json(t0)).unwrap();
    assert_eq!(json["quota"]["requests"], json!({"limit": 2, "per": "1s"}));
    assert_eq!(json["quota"]["tokens"], Value::Null);
    assert_eq!(
        (json["admitted"].clone(), json["limited"].clone()),
        (json!(3), json!(1))
    );
    assert_eq!(json["admitted_tokens"], 15);
    let first = &json["pairs"][0];
    assert_eq!(first["key"], fingerprint("k"));
    assert_eq!(first["key"].as_str().unwrap().len(), 12);
    assert_eq!(first["model"], "m");
    assert_eq!(first["requests_remaining"], 0);
    assert_eq!(first["tokens_remaining"], Value::Null);
    assert_eq!(
        (first["admitted"].clone(), first["limited"].clone()),
        (json!(2), json!(1))
    );
    // A new token limit: the requests bucket keeps its level, tokens start full.
    quota.set(Some(config(Some(limit(2, 1000)), Some(limit(9, 1000)))), t0);
    let Some(Decision::Limited(r, _)) = quota.decide("k", "m", 1, t0) else {
        panic!("limited expected")
    };
    assert_eq!(r.tokens.unwrap().remaining, 9);
    quota.reset();
    let json: Value = serde_json::from_str(&quota.to_json(t0)).unwrap();
    assert_eq!(json["admitted"], 0);
    assert_eq!(json["pairs"], json!([]));
    assert!(json["quota"]["tokens"].is_object());
    assert!(matches!(
        quota.decide("k", "m", 1, t0),
        Some(Decision::Admitted(_))
    ));
    quota.set(None, t0);
    assert!(!quota.is_on());
    assert_eq!(quota.decide("k", "m", 1, t0), None);
}

#[test]
fn the_oldest_touched_pair_is_dropped_beyond_the_bound() {
    let quota = Quota::default();
    let t0 = Instant::now();
    quota.set(Some(config(Some(limit(5, 1000)), None)), t0);
    for i in 0..MAX_PAIRS {
        quota.decide(&format!("k{i}"), "m", 0, t0);
    }
    quota.decide("k0", "m", 0, t0); // k0 touched again: k1 is the oldest now
    quota.decide("new", "m", 0, t0);
    let json: Value = serde_json::from_str(&quota.to_json(t0)).unwrap();
    let keys: Vec<&str> = json["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), MAX_PAIRS);
    assert!(!keys.contains(&fingerprint("k1").as_str()));
    assert_eq!(keys[MAX_PAIRS - 2], fingerprint("k0"));
    assert_eq!(keys[MAX_PAIRS - 1], fingerprint("new"));
    assert_eq!(json["admitted"], MAX_PAIRS as u64 + 2);
}

/// One HTTP/1.1 request on a fresh connection: status, headers (lowercase names), body.
async fn send(
    addr: std::net::SocketAddr,
    head: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, HashMap<String, String>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!("{head} HTTP/1.1\r\nhost: emu\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

#[tokio::test]
async fn the_running_emulator_charges_reports_limits_and_is_driven_by_its_control_api() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = std::sync::Arc::new(crate::service::State::default());
    let server = tokio::spawn(crate::conn::serve(
        listener,
        None,
        state,
        std::future::pending(),
    ));
    let quota = r#"{"requests": {"limit": 2, "per": "1h"}, "tokens": {"limit": 100, "per": "1h"}}"#;
    let (status, _, body) = send(addr, "PUT /__emu/quota", &[], quota).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = send(addr, "PUT /__emu/quota", &[], r#"{"requests": 2}"#).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("emulator_bad_quota"), "{body}");

    let key = [("authorization", "Bearer sk-one")];
    // P = 8 characters / 4 = 2, M = max_tokens = 10.
    let chat = |max: u64| {
        format!(
            r#"{{"model":"gpt-4o-mini","messages":[{{"content":"abcdefgh"}}],"max_tokens":{max}}}"#
        )
    };
    let (status, h, body) = send(addr, "POST /v1/chat/completions", &key, &chat(10)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert_eq!(h["x-ratelimit-reset-requests"], "30m0s");
    assert_eq!(h["x-ratelimit-limit-tokens"], "100");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "88");
    assert_eq!(h["x-ratelimit-reset-tokens"], "7m12s");

    let (_, h, _) = send(addr, "GET /v1/models", &key, "").await;
    assert!(!h.keys().any(|n| n.starts_with("x-ratelimit")), "{h:?}");

    // 97 tokens > 88 left: refused, nothing taken.
    let (status, h, body) = send(addr, "POST /v1/chat/completions", &key, &chat(95)).await;
    assert_eq!(status, 429, "{body}");
    let retry: u64 = h["retry-after"].parse().unwrap();
    assert!((323..=324).contains(&retry), "{retry}");
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "88");
    let error: Value = serde_json::from_str(&body).unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    let want = "Rate limit reached for gpt-4o-mini in organization org-emu on tokens per min \
                (TPM): Limit 100, Used 12, Requested 97. Please try again in 5m2";
    assert!(message.starts_with(want), "{message}");
    assert_eq!(error["error"]["type"], "tokens");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");

    // Another key has buckets of its own; x-emu-ratelimit still overrides.
    let other = [
        ("authorization", "Bearer sk-two"),
        ("x-emu-ratelimit", "remaining-requests=42"),
    ];
    let (status, h, _) = send(addr, "POST /v1/chat/completions", &other, &chat(10)).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-ratelimit-remaining-requests"], "42");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "88");

    let (_, _, body) = send(addr, "GET /__emu/quota", &[], "").await;
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["admitted"], 2);
    assert_eq!(json["limited"], 1);
    assert_eq!(json["admitted_tokens"], 24);
    assert_eq!(
        json["quota"]["tokens"],
        json!({"limit": 100, "per": "1h0m0s"})
    );
    assert_eq!(json["pairs"][0]["key"], fingerprint("sk-one"));
    assert_eq!(json["pairs"][0]["model"], "gpt-4o-mini");
    assert_eq!(json["pairs"][0]["tokens_remaining"], 88);
    assert_eq!(json["pairs"][0]["limited"], 1);
    assert!(!body.contains("sk-one"), "{body}");

    let (status, _, _) = send(addr, "DELETE /__emu/quota", &[], "").await;
    assert_eq!(status, 200);
    let (status, h, _) = send(addr, "POST /v1/chat/completions", &key, &chat(95)).await;
    assert_eq!(status, 200);
    assert!(!h.keys().any(|n| n.starts_with("x-ratelimit")), "{h:?}");
    server.abort();
}

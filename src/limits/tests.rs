use std::sync::Arc;
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use http::HeaderMap;

use super::*;
use crate::config::{Dur, LimitConfig, Mode, OnLimit, Rate};
use crate::errors::GatewayError;

fn policy(name: &str, key: &str) -> LimitConfig {
    LimitConfig::new(name, key)
}

fn rate(s: &str) -> Option<Rate> {
    Some(Rate::try_from(s.to_owned()).unwrap())
}

fn limits(configs: &[LimitConfig]) -> (Limits<FakeRelativeClock>, FakeRelativeClock) {
    let clock = FakeRelativeClock::default();
    (Limits::with_clock(configs, clock.clone()), clock)
}

struct Req {
    fingerprint: Arc<str>,
    headers: HeaderMap,
    model: Option<&'static str>,
    prompt: u64,
    max: Option<u64>,
    route: Route,
    post: bool,
}

impl Req {
    fn new(fp: &str) -> Req {
        Req {
            fingerprint: Arc::from(fp),
            headers: HeaderMap::new(),
            model: Some("gpt-4o"),
            prompt: 10,
            max: Some(90),
            route: Route::ChatCompletions,
            post: true,
        }
    }
    fn lr(&self) -> LimitRequest<'_> {
        LimitRequest {
            client: None,
            fingerprint: Some(&self.fingerprint),
            route: self.route,
            model: self.model,
            prompt_tokens: self.prompt,
            max_tokens: self.max,
            post: self.post,
            ip: "127.0.0.1".parse().unwrap(),
            headers: &self.headers,
            managed: false,
        }
    }
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn burst_then_one_per_interval() {
    let mut p = policy("p", "api_key");
    p.requests = rate("6/min");
    p.burst = Some(3);
    let (l, clock) = limits(&[p]);
    let r = Req::new("a");
    block(async {
        for _ in 0..3 {
            assert!(l.check(&r.lr()).await.result.is_ok());
        }
        let Err(GatewayError::RateLimited { retry_after, .. }) = l.check(&r.lr()).await.result
        else {
            panic!("fourth request must be refused")
        };
        assert_eq!(retry_after, Duration::from_secs(10));
        clock.advance(Duration::from_secs(9));
        assert!(l.check(&r.lr()).await.result.is_err());
        clock.advance(Duration::from_secs(1));
        assert!(
            l.check(&r.lr()).await.result.is_ok(),
            "a retry at Retry-After succeeds"
        );
        assert!(l.check(&r.lr()).await.result.is_err());
        // Another key has its own budget.
        assert!(l.check(&Req::new("b").lr()).await.result.is_ok());
    });
}

#[test]
fn admitted_responses_carry_ratelimit_headers() {
    let mut p = policy("per-key", "api_key");
    p.requests = rate("10/s");
    let (l, _) = limits(&[p]);
    let r = Req::new("a");
    let a = block(l.check(&r.lr())).result.unwrap();
    let h: std::collections::HashMap<_, _> = a
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect();
    assert_eq!(h["ratelimit-policy"], "\"per-key\";q=10;w=1");
    assert_eq!(h["ratelimit"], "\"per-key\";r=9;t=1");
}

#[test]
fn concurrent_tasks_never_exceed_the_quota() {
    let mut p = policy("g", "global");
    p.requests = rate("100/h");
    p.burst = Some(100);
    let (l, _) = limits(&[p]);
    let l = Arc::new(l);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let admitted = rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..50 {
            let l = Arc::clone(&l);
            tasks.push(tokio::spawn(async move {
                let r = Req::new(&format!("k{t}"));
                let mut ok = 0;
                for _ in 0..20 {
                    if l.check(&r.lr()).await.result.is_ok() {
                        ok += 1;
                    }
                }
                ok
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    });
    assert_eq!(admitted, 100);
}

#[test]
fn concurrency_slots_are_released_when_the_permit_drops() {
    let mut p = policy("c", "api_key");
    p.concurrency = Some(2);
    let (l, _) = limits(&[p]);
    let r = Req::new("a");
    block(async {
        let a = l.check(&r.lr()).await.result.unwrap();
        let b = l.check(&r.lr()).await.result.unwrap();
        assert!(matches!(
            l.check(&r.lr()).await.result,
            Err(GatewayError::ConcurrencyLimited { .. })
        ));
        drop(a);
        let c = l.check(&r.lr()).await.result.unwrap();
        drop((b, c));
    });
    assert_eq!(
        l.inner.policies[0].concurrency.as_ref().unwrap().len(),
        0,
        "no key left behind"
    );
}

#[test]
fn a_refusal_takes_nothing_from_other_policies() {
    let mut conc = policy("conc", "api_key");
    conc.concurrency = Some(1);
    let mut reqs = policy("reqs", "api_key");
    reqs.requests = rate("2/min");
    let (l, _) = limits(&[reqs, conc]);
    let r = Req::new("a");
    block(async {
        let held = l.check(&r.lr()).await.result.unwrap();
        for _ in 0..5 {
            assert!(matches!(
                l.check(&r.lr()).await.result,
                Err(GatewayError::ConcurrencyLimited { .. })
            ));
        }
        drop(held);
        // The five concurrency refusals spent no request cells: one of two remains.
        assert!(l.check(&r.lr()).await.result.is_ok());
    });
}

#[test]
fn tokens_are_reserved_then_settled() {
    let mut p = policy("tpm", "api_key");
    p.tokens = rate("1000/min");
    let (l, clock) = limits(&[p]);
    let mut r = Req::new("a");
    r.prompt = 100;
    r.max = Some(400);
    block(async {
        let a = l.check(&r.lr()).await.result.unwrap();
        let b = l.check(&r.lr()).await.result.unwrap();
        let Err(GatewayError::TokenRateLimited { retry_after, .. }) = l.check(&r.lr()).await.result
        else {
            panic!("1000 tokens are reserved; a third 500-token request must wait")
        };
        assert_eq!(retry_after, Duration::from_secs(30));
        // The first request really used 100 tokens: 400 come back.
        a.permit.settle(80 + 20);
        assert!(
            l.check(&r.lr()).await.result.is_err(),
            "400 back is not enough for 500"
        );
        r.max = Some(300);
        let c = l.check(&r.lr()).await.result.unwrap();
        // A permit dropped unsettled (the request failed before the upstream) refunds all.
        drop(b);
        drop(c);
        r.max = Some(800);
        let d = l
            .check(&r.lr())
            .await
            .result
            .expect("900 of 1,000 are back");
        d.permit.settle(900);
        clock.advance(Duration::from_secs(60));
        assert!(l.check(&r.lr()).await.result.is_ok());
    });
}

#[test]
fn a_session_is_charged_as_it_reports_usage() {
    let mut p = policy("tpm", "api_key");
    p.tokens = rate("1000/min");
    let (l, _) = limits(&[p]);
    let mut session = Req::new("a");
    session.route = Route::Realtime;
    session.prompt = 0;
    session.max = None;
    session.post = true;
    let mut probe = Req::new("a");
    probe.prompt = 1;
    block(async {
        // The handshake reserves default_tokens (1,000): nothing is left.
        let mut s = l.check(&session.lr()).await.result.unwrap();
        assert!(s.permit.reserves_tokens());
        assert!(l.check(&probe.lr()).await.result.is_err());
        // The first usage report settles the reservation at 300: 700 back.
        s.permit.charge(300);
        probe.max = Some(699);
        drop(l.check(&probe.lr()).await.result.expect("700 are back"));
        // The next reports add what came since: 300 more, then nothing new.
        s.permit.charge(600);
        s.permit.charge(600);
        probe.max = Some(400);
        assert!(
            l.check(&probe.lr()).await.result.is_err(),
            "only 400 are left"
        );
        probe.max = Some(399);
        drop(l.check(&probe.lr()).await.result.expect("400 are left"));
        // Settling at the session's total charges only what no report counted: 50.
        s.permit.settle(650);
        probe.max = Some(349);
        drop(l.check(&probe.lr()).await.result.expect("350 are left"));
        probe.max = Some(350);
        assert!(l.check(&probe.lr()).await.result.is_err(), "not 351");
    });
}

#[test]
fn token_policies_charge_only_requests_that_spend_tokens() {
    let mut p = policy("tpm", "global");
    p.tokens = rate("2000/min");
    let (l, _) = limits(&[p]);
    let mut models = Req::new("a");
    models.route = Route::Models;
    models.post = false;
    let mut get_chat = Req::new("a");
    get_chat.post = false;
    block(async {
        for _ in 0..10 {
            let a = l
                .check(&models.lr())
                .await
                .result
                .expect("a model listing is never charged");
            assert!(!a.permit.reserves_tokens());
            assert!(!l
                .check(&get_chat.lr())
                .await
                .result
                .unwrap()
                .permit
                .reserves_tokens());
        }
        // The chat route is: 1,900 of 2,000 after a 100-token estimate.
        let a = l.check(&Req::new("a").lr()).await.result.unwrap();
        assert!(a.permit.reserves_tokens());
        assert!(
            format!("{:?}", a.headers).contains("r=1900"),
            "{:?}",
            a.headers
        );
    });
    // A policy that names a route charges it, model route or not.
    let mut p = policy("images", "global");
    p.tokens = rate("2000/min");
    p.matches.routes = vec!["/v1/images/generations".into()];
    let (l, _) = limits(&[p]);
    let mut images = Req::new("a");
    images.route = Route::ImagesGenerations;
    images.max = None;
    block(async {
        let a = l.check(&images.lr()).await.result.unwrap();
        assert!(
            a.permit.reserves_tokens(),
            "10 prompt + 1,000 default_tokens"
        );
        assert!(
            format!("{:?}", a.headers).contains("r=990"),
            "{:?}",
            a.headers
        );
    });
}

#[test]
fn a_token_refusal_says_what_was_estimated_and_what_is_left() {
    let mut p = policy("tpm", "global");
    p.tokens = rate("2000/min");
    let (l, _) = limits(&[p]);
    let mut r = Req::new("a");
    r.prompt = 50;
    r.max = Some(1751);
    block(async {
        let _held = l.check(&r.lr()).await.result.unwrap();
        r.max = Some(1000);
        let Err(e) = l.check(&r.lr()).await.result else {
            panic!("199 left, 1,050 wanted")
        };
        let GatewayError::TokenRateLimited { remaining, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(*remaining, 199);
        assert!(
            e.to_string().contains(
                "2,000 tokens per minute, 199 left; this request is estimated at 1,050 tokens (50 prompt + 1,000 max_tokens; set max_tokens to lower the estimate)"
            ),
            "{e}"
        );
        let (_, headers, _) = crate::errors::render(&e, "r");
        assert_eq!(headers["x-ratelimit-remaining-tokens"], "199");
        assert!(headers["ratelimit"].to_str().unwrap().contains("r=199"));
        r.max = None;
        let Err(e) = l.check(&r.lr()).await.result else {
            panic!("still 199 left")
        };
        let e = e.to_string();
        assert!(
            e.contains(
                "1,050 tokens (50 prompt + 1,000 default_tokens, as the request sets no max_tokens"
            ),
            "{e}"
        );
    });
}

#[test]
fn shadow_mode_counts_but_admits() {
    let mut p = policy("s", "global");
    p.requests = rate("1/h");
    p.mode = Mode::Shadow;
    let (l, _) = limits(&[p]);
    let r = Req::new("a");
    let mut verdicts = Vec::new();
    block(async {
        for _ in 0..5 {
            let checked = l.check(&r.lr()).await;
            assert!(checked.result.is_ok());
            verdicts.extend(checked.verdicts);
        }
    });
    let shadow = verdicts
        .iter()
        .filter(|v| **v == (0, Verdict::ShadowLimited))
        .count();
    assert_eq!(shadow, 4, "{verdicts:?}");
}

#[test]
fn wait_mode_holds_then_admits_or_refuses() {
    let mut p = policy("w", "global");
    p.requests = rate("20/s");
    p.burst = Some(1);
    p.on_limit = OnLimit::Wait;
    p.max_wait = Some(Dur(Duration::from_secs(2)));
    // Real clock: the wait is real sleeping, and short.
    let l = Limits::with_clock(&[p.clone()], governor::clock::DefaultClock::default());
    let r = Req::new("a");
    let mut verdicts = Vec::new();
    block(async {
        assert!(l.check(&r.lr()).await.result.is_ok());
        let held = l.check(&r.lr()).await;
        assert!(held.result.is_ok(), "held ~50ms, then admitted");
        verdicts = held.verdicts;
    });
    assert_eq!(verdicts, [(0, Verdict::Waited)]);
    p.max_wait = Some(Dur(Duration::from_millis(1)));
    let l = Limits::with_clock(&[p], governor::clock::DefaultClock::default());
    block(async {
        assert!(l.check(&r.lr()).await.result.is_ok());
        assert!(matches!(
            l.check(&r.lr()).await.result,
            Err(GatewayError::RateLimited { .. })
        ));
    });
}

#[test]
fn matches_restrict_policies() {
    let mut p = policy("m", "global");
    p.requests = rate("1/h");
    p.matches.models = vec!["gpt-4o*".into()];
    let (l, _) = limits(&[p]);
    let mut r = Req::new("a");
    block(async {
        assert!(l.check(&r.lr()).await.result.is_ok());
        assert!(l.check(&r.lr()).await.result.is_err());
        r.model = Some("text-embedding-3-small");
        assert!(
            l.check(&r.lr()).await.result.is_ok(),
            "a model outside the match is not limited"
        );
    });
}

#[test]
fn upstream_cooldown_answers_locally_until_retry_after() {
    let (l, clock) = limits(&[]);
    let r = Req::new("a");
    block(async {
        l.check(&r.lr()).await.result.unwrap();
        l.upstream_limited(
            &cooldown_key(Some(&r.fingerprint), r.model, false),
            Duration::from_secs(3),
        );
        let Err(GatewayError::UpstreamRateLimited { retry_after }) = l.check(&r.lr()).await.result
        else {
            panic!("must be held back")
        };
        assert_eq!(retry_after, Duration::from_secs(3));
        assert!(
            l.check(&Req::new("other").lr()).await.result.is_ok(),
            "other keys are not held"
        );
        clock.advance(Duration::from_secs(3));
        assert!(l.check(&r.lr()).await.result.is_ok());
    });
}

#[test]
fn keys_are_capped_and_evicted() {
    let mut p = policy("cap", "api_key");
    p.requests = rate("10/s");
    p.max_keys = Some(100);
    let (l, clock) = limits(&[p]);
    block(async {
        for i in 0..10_000 {
            let _ = l.check(&Req::new(&format!("k{i}")).lr()).await;
        }
    });
    let store = &l.inner.policies[0].requests.as_ref().unwrap().1;
    assert_eq!(store.len(), 101, "100 keys plus the shared overflow key");
    clock.advance(Duration::from_secs(2));
    l.maintain();
    assert_eq!(store.len(), 0, "idle keys are evicted");
}

#[test]
fn steady_token_traffic_stays_within_ten_percent_of_the_rate() {
    // 60,000 tokens/min; clients ask for 2,000-token caps but really use 300–700 tokens.
    let mut p = policy("tpm", "global");
    p.tokens = rate("60000/min");
    let (l, clock) = limits(&[p]);
    let mut r = Req::new("a");
    r.prompt = 100;
    r.max = Some(1900);
    let mut used_total = 0u64;
    let mut i = 0u64;
    block(async {
        // Two simulated minutes, a request attempt every 10 ms.
        for _ in 0..12_000 {
            clock.advance(Duration::from_millis(10));
            if let Ok(a) = l.check(&r.lr()).await.result {
                let used = 300 + (i * 37) % 400;
                i += 1;
                used_total += used;
                a.permit.settle(used);
            }
        }
    });
    // The bucket starts full (one minute's worth), so two minutes admit about three minutes' rate.
    let expected = 60_000.0 * 3.0;
    let ratio = used_total as f64 / expected;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "admitted {used_total} tokens, {ratio:.3} of the rate"
    );
}

/// The admission future is moved into every request's state: keep the shared-store (Redis)
/// futures out of it.
#[test]
fn a_local_check_is_a_small_future() {
    let (l, _) = limits(&[policy("p", "api_key")]);
    let r = Req::new("a");
    let lr = r.lr();
    let f = l.check(&lr);
    assert!(
        std::mem::size_of_val(&f) < 1024,
        "{} bytes",
        std::mem::size_of_val(&f)
    );
}

#[test]
fn ip_keys_are_the_usual_text() {
    for ip in [
        "0.0.0.0",
        "10.0.0.1",
        "127.0.0.1",
        "192.168.100.255",
        "::1",
        "2001:db8::7",
    ] {
        let parsed: std::net::IpAddr = ip.parse().unwrap();
        assert_eq!(&*super::policy::ip_key(parsed), ip);
        // The same peer again: the same key, not a new one.
        assert!(Arc::ptr_eq(
            &super::policy::ip_key(parsed),
            &super::policy::ip_key(parsed)
        ));
    }
}

#[test]
fn text_keys() {
    // The per-thread memory never answers for another text.
    for model in ["gpt-4o", "gpt-4o-mini", "gpt-4o", "", "gpt-4o"] {
        assert_eq!(&*super::policy::text_key(model), model);
    }
}

/// The admin view's snapshot follows what the checks spent, busiest key first, and is
/// replenished by time like the checks are.
#[test]
fn snapshots_show_the_busiest_keys_and_their_use() {
    let mut p = policy("p", "api_key");
    p.requests = rate("10/min");
    p.tokens = rate("1000/min");
    let (l, clock) = limits(&[p]);
    let (busy, calm) = (Req::new("fp:busy"), Req::new("fp:calm"));
    // Admissions held: their token reservations are not settled yet.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(block(l.check(&busy.lr())).result.unwrap());
    }
    held.push(block(l.check(&calm.lr())).result.unwrap());
    let snap = l.snapshot(5);
    let s = &snap[0];
    assert_eq!((&*s.name, s.keys), ("p", 2));
    let keys: Vec<&str> = s.busiest.iter().map(|k| &*k.key).collect();
    assert_eq!(keys, ["fp:busy", "fp:calm"]);
    let top = &s.busiest[0];
    assert_eq!(top.requests.map(|r| r.0), Some(6), "10 - 4 requests");
    assert_eq!(top.requests.map(|r| r.1), Some(Duration::from_secs(24)));
    // 4 × (10 prompt + 90 max_tokens) of 1000 tokens: 40% of the bucket.
    assert_eq!(top.tokens.map(|t| t.0), Some(600));
    assert!((top.used - 0.4).abs() < 1e-9, "{}", top.used);
    assert!((s.utilization - 0.4).abs() < 1e-9);
    assert_eq!(l.utilization().len(), 1);
    assert!((l.utilization()[0] - 0.4).abs() < 1e-9);
    assert_eq!(l.snapshot(1)[0].busiest.len(), 1);
    clock.advance(Duration::from_secs(60));
    assert_eq!(l.utilization(), vec![0.0]);
    drop(held);
}

/// Cooldowns are listed while they run and lifted by model, or all at once.
#[test]
fn cooldowns_are_listed_and_cleared() {
    let (l, clock) = limits(&[]);
    l.upstream_limited(
        &cooldown_key(Some("fp:a"), Some("gpt-4o"), false),
        Duration::from_secs(30),
    );
    l.upstream_limited(
        &cooldown_key(Some("fp:b"), Some("gpt-4o"), false),
        Duration::from_secs(10),
    );
    l.upstream_limited(
        &cooldown_key(None, Some("o3"), true),
        Duration::from_secs(20),
    );
    assert_eq!(l.active_cooldowns(), 3);
    let listed = l.cooldowns();
    assert_eq!(
        listed
            .iter()
            .map(|c| (
                c.credential.as_str(),
                c.model.as_str(),
                c.remaining.as_secs()
            ))
            .collect::<Vec<_>>(),
        [
            ("fp:a", "gpt-4o", 30),
            ("org", "o3", 20),
            ("fp:b", "gpt-4o", 10)
        ]
    );
    assert_eq!(l.clear_cooldowns(Some("gpt-4o")), 2);
    assert_eq!(l.active_cooldowns(), 1);
    let r = Req::new("fp:a");
    assert!(block(l.check(&r.lr())).result.is_ok(), "lifted at once");
    clock.advance(Duration::from_secs(25));
    assert_eq!(l.active_cooldowns(), 0, "expired ones are not counted");
    assert_eq!(
        l.clear_cooldowns(None),
        0,
        "an expired one is removed, not counted"
    );
    assert!(l.cooldowns().is_empty());
}

//! The pacer on tokio's paused clock: waits end exactly when the picture refills.

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntGauge};

use super::*;
use crate::config::{QuotaConfig, QuotaMode};
use crate::quota::Part;

fn metrics() -> PaceMetrics {
    let gauge = |i: usize| IntGauge::new(format!("q{i}"), "q").unwrap();
    let hist = |i: usize| Histogram::with_opts(HistogramOpts::new(format!("w{i}"), "w")).unwrap();
    PaceMetrics {
        queued: [gauge(0), gauge(1), gauge(2)],
        wait: [hist(0), hist(1), hist(2)],
    }
}

fn pacer() -> Arc<Pacer> {
    let config = QuotaConfig {
        mode: QuotaMode::Enforce,
        ..QuotaConfig::default()
    };
    Pacer::new(config, 100, metrics(), None)
}

/// `admit` without the time waited.
trait AdmitPlain {
    async fn admit_(&self, ask: Ask<'_>, drain: &CancellationToken)
        -> Result<Ticket, GatewayError>;
}

impl AdmitPlain for Arc<Pacer> {
    async fn admit_(
        &self,
        ask: Ask<'_>,
        drain: &CancellationToken,
    ) -> Result<Ticket, GatewayError> {
        self.admit(ask, drain)
            .await
            .map(|(t, _)| t)
            .map_err(|(e, _)| e)
    }
}

fn now() -> Instant {
    Clock::now().into_std()
}

/// 100 requests per 10 s (10/s), `remaining` of them left; tokens unknown.
fn learn_requests(p: &Arc<Pacer>, remaining: u64) {
    let part = Part {
        limit: 100,
        remaining,
        reset: Duration::from_millis((100 - remaining) * 100),
    };
    let reading = Reading {
        requests: Some(part),
        tokens: None,
    };
    p.learn("org", "m", &reading, Marks::default(), now());
}

fn ask<'a>(flow: &'a Arc<str>, priority: Priority) -> Ask<'a> {
    Ask {
        key: "org",
        model: "m",
        flow,
        priority,
        cost: Cost {
            requests: 1,
            tokens: 10,
        },
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_learned_passes_and_a_learned_picture_is_taken_from() {
    let p = pacer();
    let flow: Arc<str> = Arc::from("a");
    let drain = CancellationToken::new();
    let t = p
        .admit_(ask(&flow, Priority::Interactive), &drain)
        .await
        .unwrap();
    assert_eq!(t.marks(), Marks::default());
    learn_requests(&p, 50);
    let mut t = p
        .admit_(ask(&flow, Priority::Interactive), &drain)
        .await
        .unwrap();
    assert_eq!(t.marks().requests, Some(1));
    assert_eq!(t.marks().tokens, None);
    t.forwarded();
    drop(t);
    // A ticket never forwarded gives its take back: the level, not the running total
    // (which only grows, so a correction errs low).
    let t = p
        .admit_(ask(&flow, Priority::Interactive), &drain)
        .await
        .unwrap();
    assert_eq!(t.marks().requests, Some(2));
    let level = |p: &Arc<Pacer>| {
        p.lock()
            .picture_mut("org", "m")
            .and_then(|pic| pic.requests)
            .map(|g| g.level(now()))
            .unwrap()
    };
    let before = level(&p);
    drop(t);
    assert!((level(&p) - before - 1.0).abs() < 1e-6);
    let t = p
        .admit_(ask(&flow, Priority::Interactive), &drain)
        .await
        .unwrap();
    assert_eq!(t.marks().requests, Some(3));
}

#[tokio::test(start_paused = true)]
async fn a_request_waits_until_the_picture_refills() {
    let p = pacer();
    let flow: Arc<str> = Arc::from("a");
    let drain = CancellationToken::new();
    // 15 left: interactive keeps 15% (headroom 5 + critical reserve 10) unspent.
    learn_requests(&p, 15);
    let start = Clock::now();
    let t = p
        .admit_(ask(&flow, Priority::Interactive), &drain)
        .await
        .unwrap();
    let waited = start.elapsed();
    assert!(t.marks().requests.is_some());
    // One request at 10/s: 100 ms.
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_millis(120),
        "{waited:?}"
    );
    assert_eq!(p.counts().1, [0, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn past_max_wait_the_refusal_says_when_the_quota_will_carry_it() {
    let p = pacer();
    let flow: Arc<str> = Arc::from("a");
    let drain = CancellationToken::new();
    // Empty: 15 needed at 10/s is 1.6 s, within interactive's 2 s...
    learn_requests(&p, 0);
    // ...but 30 requests wait ahead of the last: it would take 4.6 s.
    let mut waiting = Vec::new();
    for _ in 0..30 {
        let p = Arc::clone(&p);
        let flow = Arc::clone(&flow);
        let drain = drain.clone();
        waiting.push(tokio::spawn(async move {
            p.admit_(ask(&flow, Priority::Interactive), &drain)
                .await
                .map(|mut t| t.forwarded())
        }));
    }
    tokio::task::yield_now().await;
    let err = p
        .admit_(ask(&flow, Priority::Interactive), &drain)
        .await
        .err()
        .unwrap();
    let GatewayError::UpstreamQuotaExhausted {
        retry_after: Some(wait),
        message,
    } = &err
    else {
        panic!("{err:?}");
    };
    assert!(*wait > Duration::from_secs(2), "{wait:?}");
    assert!(message.contains("max_wait.interactive"), "{message}");
    // The waiting ones: served within 2 s, or refused with an honest wait.
    let mut served = 0;
    for w in waiting {
        match w.await.unwrap() {
            Ok(()) => served += 1,
            Err(GatewayError::UpstreamQuotaExhausted { retry_after, .. }) => {
                assert!(retry_after.is_some());
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    // 2 s of refill at 10/s after the first 1.5 s: about 5.
    assert!((4..=6).contains(&served), "{served}");
    assert_eq!(p.counts().1, [0, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn higher_priorities_go_first_and_batch_keeps_the_reserve() {
    let p = pacer();
    let drain = CancellationToken::new();
    learn_requests(&p, 0);
    let (b, i) = (Arc::<str>::from("b"), Arc::<str>::from("i"));
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (flow, prio) in [
        (&b, Priority::Batch),
        (&b, Priority::Batch),
        (&i, Priority::Interactive),
        (&i, Priority::Interactive),
    ] {
        let (p, flow, drain, order) = (
            Arc::clone(&p),
            Arc::clone(flow),
            drain.clone(),
            Arc::clone(&order),
        );
        tasks.push(tokio::spawn(async move {
            let mut t = p.admit_(ask(&flow, prio), &drain).await.unwrap();
            t.forwarded();
            order.lock().unwrap().push(prio);
        }));
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order,
        [
            Priority::Interactive,
            Priority::Interactive,
            Priority::Batch,
            Priority::Batch
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_frees_its_place_and_the_drain_ends_a_wait() {
    let p = pacer();
    let flow: Arc<str> = Arc::from("a");
    let drain = CancellationToken::new();
    learn_requests(&p, 0);
    let waiting = {
        let (p, flow, drain) = (Arc::clone(&p), Arc::clone(&flow), drain.clone());
        tokio::spawn(async move { p.admit_(ask(&flow, Priority::Batch), &drain).await.is_ok() })
    };
    tokio::task::yield_now().await;
    assert_eq!(p.counts().1, [0, 0, 1]);
    waiting.abort();
    let _ = waiting.await;
    assert_eq!(p.counts().1, [0, 0, 0]);
    assert_eq!(p.metrics.queued[2].get(), 0);
    // The drain: a waiting request gets shutting_down.
    let waiting = {
        let (p, flow, drain) = (Arc::clone(&p), Arc::clone(&flow), drain.clone());
        tokio::spawn(async move { p.admit_(ask(&flow, Priority::Batch), &drain).await })
    };
    tokio::task::yield_now().await;
    drain.cancel();
    let got = waiting.await.unwrap();
    assert!(
        matches!(got, Err(GatewayError::ShuttingDown)),
        "{:?}",
        got.err()
    );
    assert_eq!(p.counts().1, [0, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_request_larger_than_the_quota_is_refused_at_once_for_good() {
    let p = pacer();
    let flow: Arc<str> = Arc::from("a");
    let drain = CancellationToken::new();
    learn_requests(&p, 100);
    let mut big = ask(&flow, Priority::Batch);
    big.cost.requests = 70;
    let err = p.admit_(big, &drain).await.err().unwrap();
    assert!(
        matches!(
            err,
            GatewayError::UpstreamQuotaExhausted {
                retry_after: None,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.retryable());
}

#[tokio::test(start_paused = true)]
async fn a_response_corrects_the_picture_and_wakes_the_queue() {
    let p = pacer();
    let flow: Arc<str> = Arc::from("a");
    let drain = CancellationToken::new();
    learn_requests(&p, 0);
    let waiting = {
        let (p, flow, drain) = (Arc::clone(&p), Arc::clone(&flow), drain.clone());
        tokio::spawn(async move {
            let start = Clock::now();
            p.admit_(ask(&flow, Priority::Interactive), &drain)
                .await
                .map(|mut t| {
                    t.forwarded();
                    start.elapsed()
                })
        })
    };
    tokio::task::yield_now().await;
    // The answer to a request forwarded earlier (nothing was taken since): the upstream
    // raised the quota to 1000, all of it left.
    let reading = Reading {
        requests: Some(Part {
            limit: 1000,
            remaining: 1000,
            reset: Duration::ZERO,
        }),
        tokens: None,
    };
    let marks = Marks {
        requests: Some(0),
        tokens: None,
        shared: false,
    };
    p.learn("org", "m", &reading, marks, now());
    let waited = waiting.await.unwrap().unwrap();
    assert!(waited < Duration::from_millis(10), "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_the_lowered_quota_can_never_carry_is_refused_not_left_blocking() {
    let p = pacer();
    let drain = CancellationToken::new();
    // 60 left at 10/s: 50 more above the 15% floor in half a second.
    learn_requests(&p, 60);
    let (big, small) = (Arc::<str>::from("big"), Arc::<str>::from("small"));
    let waiting = {
        let (p, big, drain) = (Arc::clone(&p), Arc::clone(&big), drain.clone());
        tokio::spawn(async move {
            let mut a = ask(&big, Priority::Interactive);
            a.cost.requests = 50;
            p.admit_(a, &drain).await.map(|mut t| t.forwarded())
        })
    };
    tokio::task::yield_now().await;
    assert_eq!(p.counts().1, [0, 1, 0]);
    // The upstream lowers the limit to 20: 50 requests at once can never pass again.
    let reading = Reading {
        requests: Some(Part {
            limit: 20,
            remaining: 20,
            reset: Duration::ZERO,
        }),
        tokens: None,
    };
    p.learn("org", "m", &reading, Marks::default(), now());
    let got = waiting.await.unwrap();
    assert!(
        matches!(
            got,
            Err(GatewayError::UpstreamQuotaExhausted {
                retry_after: None,
                ..
            })
        ),
        "{got:?}"
    );
    assert_eq!(p.counts().1, [0, 0, 0]);
    // What waited behind it is not held up.
    let t = p.admit_(ask(&small, Priority::Interactive), &drain).await;
    assert!(t.is_ok());
}

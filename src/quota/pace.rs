//! `mode = "enforce"`: requests paced on the learned quota, by priority and fairly.
//!
//! [`Pacer::admit`] is the request path's call. Per upstream key and model the pacer keeps a
//! picture ([`Gauge`] per unit) and the requests waiting for it ([`FairQueue`]). A request
//! the picture carries, with nobody of its priority or above waiting, takes its cost at
//! once and goes; any other waits in the queue, and one task (`dispatch_forever`) hands the
//! picture out as it refills: highest priority first, the least start tag within one.
//! A wait ends in a grant, in 429 `upstream_quota_exhausted` past `max_wait`, in
//! `shutting_down` when the drain begins, or when the client leaves (its place is given up
//! at once). A granted request holds a [`Ticket`]; a ticket dropped before its request was
//! forwarded gives its cost back. [`Pacer::learn`] corrects the picture with each response.
//!
//! Everything sits behind one mutex: a request takes it once to be admitted and once to be
//! learned from, for well under a microsecond each (docs/performance.md).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::time::Instant as Clock;

use prometheus::{Histogram, IntGauge};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::fair::Slot;
use super::gauge::Gauge;
use super::picture::{too_large, Cost, Grant, Inner, Marks, Waiter};
use super::shared::SharedPictures;
use super::ticket::{Place, Ticket};
use super::{Map, Reading};
use crate::config::{Priority, QuotaConfig};
use crate::errors::GatewayError;

/// One request asking to be paced.
pub struct Ask<'a> {
    /// The upstream key id (`org:…` or a fingerprint).
    pub key: &'a str,
    pub model: &'a str,
    /// Its client (the fairness flow).
    pub flow: &'a Arc<str>,
    pub priority: Priority,
    pub cost: Cost,
}

/// `ezgate_queued_requests` and `ezgate_queue_wait_seconds`, by [`Priority::ALL`] position.
pub struct PaceMetrics {
    pub queued: [IntGauge; 3],
    pub wait: [Histogram; 3],
}

/// How a wait ended.
enum End {
    Granted(Option<Grant>),
    Waited,
    Drain,
}

pub struct Pacer {
    inner: Mutex<Inner>,
    pub(super) wake: Arc<Notify>,
    pub(super) metrics: PaceMetrics,
    /// `store = "redis"`: the fleet's pictures (`fleet.rs`).
    pub(super) shared: Option<SharedPictures>,
}

/// What one look at the picture decided for a request.
pub(super) enum Step {
    /// With the picture's key and model when it took from one.
    Go(Marks, Option<(Arc<str>, Arc<str>)>),
    Refuse(GatewayError),
    Wait(u64, oneshot::Receiver<Grant>, Duration),
    /// `store = "redis"`: ask the fleet's picture.
    AskShared,
}

impl Pacer {
    /// A pacer with `config`; at most `queue_cap` requests wait per priority; `shared`: the
    /// fleet's pictures (`store = "redis"`). Starts its dispatcher on the current runtime
    /// (none in unit tests: [`Pacer::dispatch`] by hand).
    pub fn new(
        config: QuotaConfig,
        queue_cap: usize,
        metrics: PaceMetrics,
        shared: Option<SharedPictures>,
    ) -> Arc<Pacer> {
        let pacer = Arc::new(Pacer {
            inner: Mutex::new(Inner {
                pictures: Map::default(),
                pairs: 0,
                busy: Vec::new(),
                next_id: 0,
                queued: [0; 3],
                config,
                queue_cap: queue_cap.max(1),
            }),
            wake: Arc::new(Notify::new()),
            metrics,
            shared,
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(dispatch_forever(
                Arc::downgrade(&pacer),
                Arc::clone(&pacer.wake),
            ));
        }
        pacer
    }

    /// A reload that keeps enforcing on the same store: new settings, the same pictures
    /// and queues.
    pub fn configure(&self, config: QuotaConfig, queue_cap: usize) {
        let mut inner = self.lock();
        inner.config = config;
        inner.queue_cap = queue_cap.max(1);
        drop(inner);
        self.wake.notify_one();
    }

    /// Whether a reload to `store` (with the shared store `redis`) keeps this pacer.
    pub fn same_store(&self, redis: Option<&Arc<crate::limits::shared::RedisStore>>) -> bool {
        match (&self.shared, redis) {
            (None, None) => true,
            (Some(s), Some(r)) => s.same_store(r),
            _ => false,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a request now, or when the picture carries it; refuses it past its
    /// priority's `max_wait`, or with `shutting_down` when `drain` is cancelled. Either way
    /// with how long it waited.
    pub async fn admit(
        self: &Arc<Self>,
        ask: Ask<'_>,
        drain: &CancellationToken,
    ) -> Result<(Ticket, Duration), (GatewayError, Duration)> {
        let now = Clock::now().into_std();
        let mut step = self.step(&ask, now, None);
        if let Step::AskShared = step {
            // Boxed, as the wait below: the request's own future stays small.
            step = Box::pin(self.ask_shared(&ask, now)).await;
        }
        match step {
            Step::Go(marks, pair) => {
                self.metrics.wait[ask.priority.index()].observe(0.0);
                Ok((self.ticket(&ask, marks, pair), Duration::ZERO))
            }
            Step::Refuse(e) => Err((e, Duration::ZERO)),
            Step::Wait(id, rx, max_wait) => {
                let waited = Box::pin(self.wait(ask, id, rx, max_wait, drain)).await;
                let took = Clock::now().into_std().saturating_duration_since(now);
                match waited {
                    Ok(ticket) => Ok((ticket, took)),
                    Err(e) => Err((e, took)),
                }
            }
            Step::AskShared => Err((
                GatewayError::Internal("quota: asked twice".into()),
                Duration::ZERO,
            )),
        }
    }

    /// Waits in the queue for a grant, `max_wait` or the drain.
    async fn wait(
        self: &Arc<Self>,
        ask: Ask<'_>,
        id: u64,
        rx: oneshot::Receiver<Grant>,
        max_wait: Duration,
        drain: &CancellationToken,
    ) -> Result<Ticket, GatewayError> {
        let p = ask.priority;
        let now = Clock::now().into_std();
        self.metrics.queued[p.index()].inc();
        self.wake.notify_one();
        let mut place = Place {
            pacer: self,
            key: ask.key,
            model: ask.model,
            id,
            priority: p,
            cost: ask.cost,
            rx: Some(rx),
            since: now,
        };
        let end = tokio::select! {
            granted = place.granted() => End::Granted(granted),
            () = tokio::time::sleep(max_wait) => End::Waited,
            () = drain.cancelled() => End::Drain,
        };
        let grant = match end {
            // `None`: the pacer let go of its queue (it cannot while it lives).
            End::Granted(grant) => grant.unwrap_or(Grant::Take(Marks::default())),
            End::Waited => place.give_up(|wait| {
                exhausted(
                    ask.model,
                    &format!(
                        "this {} request waited {:.1}s (upstream.quota.max_wait.{}) and the quota still cannot carry it",
                        p.as_str(),
                        max_wait.as_secs_f64(),
                        p.as_str()
                    ),
                    wait,
                )
            })?,
            End::Drain => place.give_up(|_| GatewayError::ShuttingDown)?,
        };
        match grant {
            Grant::Take(marks) => Ok(self.ticket(&ask, marks, None)),
            Grant::Refuse(message) => Err(GatewayError::UpstreamQuotaExhausted {
                message,
                retry_after: None,
            }),
        }
    }

    /// One look at the picture: go, refuse, wait, or (`store = "redis"`) ask Redis first.
    /// `shared_wait`: Redis just said the fleet's picture carries the request only after
    /// that long.
    pub(super) fn step(&self, ask: &Ask<'_>, now: Instant, shared_wait: Option<Duration>) -> Step {
        let p = ask.priority;
        let mut inner = self.lock();
        let floor = inner.config.floor(p);
        let max_wait = inner.config.max_wait(p);
        let cap = inner.queue_cap;
        let queued = inner.queued[p.index()];
        let shared = self.shared.is_some();
        let Some(pic) = inner.picture_mut(ask.key, ask.model) else {
            // Nothing learned yet (here, or in Redis): the first answer teaches.
            return if shared && shared_wait.is_none() {
                Step::AskShared
            } else {
                Step::Go(Marks::default(), None)
            };
        };
        pic.touched = Some(now);
        let ahead = pic.waiting.waiting_at_or_above(p);
        if shared_wait.is_none() && ahead == 0 && pic.asks_shared(shared, now) {
            return Step::AskShared;
        }
        if let Some(message) = too_large(pic, ask.cost, floor, p) {
            return Step::Refuse(GatewayError::UpstreamQuotaExhausted {
                message,
                retry_after: None,
            });
        }
        let local = !pic.asks_shared(shared, now);
        if local && ahead == 0 && pic.carries(ask.cost, floor, now) {
            return Step::Go(pic.take(ask.cost, now), pic.pair.clone());
        }
        let wait = pic
            .estimate(p, Slot::New(ask.flow), ask.cost, floor, now)
            .max(shared_wait.unwrap_or_default());
        if wait > max_wait || queued >= cap {
            // A full queue: at least a second, never an invitation to come straight back.
            let wait = if queued >= cap {
                wait.max(Duration::from_secs(1))
            } else {
                wait
            };
            let why = if queued >= cap {
                format!("{cap} {} requests already wait for it", p.as_str())
            } else {
                format!(
                    "it would carry this request in about {:.1}s, past the {:.1}s a {} request waits (upstream.quota.max_wait.{})",
                    wait.as_secs_f64(),
                    max_wait.as_secs_f64(),
                    p.as_str(),
                    p.as_str()
                )
            };
            return Step::Refuse(exhausted(ask.model, &why, wait));
        }
        if let Some(w) = shared_wait {
            // The head waits for Redis's own estimate before asking it again.
            if ahead == 0 {
                pic.retry_at = Some(now + w);
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let (tx, rx) = oneshot::channel();
        let Some(pic) = inner.picture_mut(ask.key, ask.model) else {
            return Step::Refuse(GatewayError::Internal("quota picture vanished".into()));
        };
        pic.waiting.push(
            id,
            ask.flow,
            p,
            ask.cost.weight(),
            Waiter {
                id,
                cost: ask.cost,
                grant: tx,
            },
        );
        inner.queued[p.index()] += 1;
        let pair = (Arc::<str>::from(ask.key), Arc::<str>::from(ask.model));
        if !inner.busy.contains(&pair) {
            inner.busy.push(pair);
        }
        Step::Wait(id, rx, max_wait)
    }

    fn ticket(
        self: &Arc<Self>,
        ask: &Ask<'_>,
        marks: Marks,
        pair: Option<(Arc<str>, Arc<str>)>,
    ) -> Ticket {
        // What took nothing needs no names; else the picture's, or (after a wait) new ones.
        let pair = match pair {
            _ if marks == Marks::default() => None,
            Some(pair) => Some(pair),
            None => Some((Arc::from(ask.key), Arc::from(ask.model))),
        };
        Ticket {
            pacer: Arc::clone(self),
            pair,
            cost: ask.cost,
            marks,
            forwarded: false,
        }
    }

    /// Takes what a response told of `key`'s quota for `model`; `marks` are its request's
    /// (from its [`Ticket`]), or none when it took nothing. With `store = "redis"` the
    /// fleet's picture learns it, off the request's path.
    pub fn learn(
        self: &Arc<Self>,
        key: &str,
        model: &str,
        reading: &Reading,
        marks: Marks,
        now: Instant,
    ) {
        if reading.is_empty() {
            return;
        }
        if self.shared.is_some() {
            self.learn_shared(key, model, *reading, marks, now);
            return;
        }
        self.learn_local(key, model, reading, marks, now);
    }

    /// Corrects this gateway's picture (a mark taken from Redis does not count here).
    pub(super) fn learn_local(
        &self,
        key: &str,
        model: &str,
        reading: &Reading,
        marks: Marks,
        now: Instant,
    ) {
        let local = |m: Option<u64>| m.filter(|_| !marks.shared);
        let mut inner = self.lock();
        let Some(pic) = inner.picture_or_insert(key, model) else {
            return;
        };
        pic.touched = Some(now);
        for (gauge, part, mark) in [
            (&mut pic.requests, reading.requests, local(marks.requests)),
            (&mut pic.tokens, reading.tokens, local(marks.tokens)),
        ] {
            let Some(part) = part else { continue };
            match gauge {
                Some(g) => g.correct(part, mark, now),
                None => *gauge = Some(Gauge::learned(part, now)),
            }
        }
        let waiting = !pic.waiting.is_empty();
        drop(inner);
        if waiting {
            self.wake.notify_one();
        }
    }

    /// An upstream 429 without readable headers but with a `Retry-After`: the picture stays
    /// empty until then. `false` when nothing is learned of the pair (the caller then holds
    /// the key back as it does without pacing).
    pub fn hold_empty(
        self: &Arc<Self>,
        key: &str,
        model: &str,
        wait: Duration,
        now: Instant,
    ) -> bool {
        let mut inner = self.lock();
        let Some(pic) = inner.picture_mut(key, model) else {
            return false;
        };
        for g in [&mut pic.requests, &mut pic.tokens].into_iter().flatten() {
            g.hold_empty(now + wait, now);
        }
        drop(inner);
        if self.shared.is_some() {
            self.hold_shared(key, model, wait);
        }
        true
    }

    /// Gives back what a request took and never forwarded: to Redis, or to this picture.
    pub(super) fn give_back(self: &Arc<Self>, key: &str, model: &str, cost: Cost, marks: Marks) {
        if marks.shared {
            self.give_shared(key, model, cost, marks);
            return;
        }
        let mut inner = self.lock();
        let Some(pic) = inner.picture_mut(key, model) else {
            return;
        };
        pic.give_back(cost, marks, Clock::now().into_std());
        let waiting = !pic.waiting.is_empty();
        drop(inner);
        if waiting {
            self.wake.notify_one();
        }
    }

    /// Hands the pictures out to the requests waiting for them, as far as they carry; the
    /// next instant one may carry more, and the heads to ask Redis for (`store = "redis"`).
    pub(super) fn dispatch(&self, now: Instant) -> (Option<Instant>, Vec<Candidate>) {
        let mut inner = self.lock();
        let mut next: Option<Instant> = None;
        let mut candidates = Vec::new();
        let busy = std::mem::take(&mut inner.busy);
        let mut still = Vec::with_capacity(busy.len());
        let config = inner.config.clone();
        let shared = self.shared.is_some();
        let mut granted = [0usize; 3];
        let mut soonest = |at: Instant| next = Some(next.map_or(at, |n: Instant| n.min(at)));
        for (key, model) in busy {
            let Some(pic) = inner.picture_mut(&key, &model) else {
                continue;
            };
            while let Some((p, head)) = pic.waiting.peek() {
                let floor = config.floor(p);
                let (cost, id) = (head.cost, head.id);
                if let Some(why) = too_large(pic, cost, floor, p) {
                    // The limit fell (or the floor rose) under it: it would block its
                    // priority, and every one below, until its max_wait.
                    if let Some(waiter) = pic.waiting.pop() {
                        granted[p.index()] += 1;
                        let _ = waiter.grant.send(Grant::Refuse(why));
                    }
                    continue;
                }
                if pic.asks_shared(shared, now) {
                    match pic.retry_at {
                        Some(at) if at > now => soonest(at),
                        _ if pic.carries(cost, floor, now) => {
                            // Asked once at a time: the next look waits for the answer.
                            pic.retry_at = Some(now + ASKING);
                            candidates.push(Candidate {
                                key: Arc::clone(&key),
                                model: Arc::clone(&model),
                                id,
                                priority: p,
                                cost,
                                floor,
                            });
                        }
                        _ => {
                            let wait = pic.estimate_one(cost, floor, now);
                            soonest(now + wait.max(Duration::from_millis(1)));
                        }
                    }
                    break;
                }
                if !pic.carries(cost, floor, now) {
                    let wait = pic.estimate_one(cost, floor, now);
                    soonest(now + wait.max(Duration::from_millis(1)));
                    break;
                }
                let Some(waiter) = pic.waiting.pop() else {
                    break;
                };
                granted[p.index()] += 1;
                let marks = pic.take(cost, now);
                if waiter.grant.send(Grant::Take(marks)).is_err() {
                    // Its request left at this very moment: nothing was forwarded.
                    pic.give_back(cost, marks, now);
                }
            }
            if !pic.waiting.is_empty() {
                still.push((key, model));
            }
        }
        inner.busy = still;
        for p in Priority::ALL {
            let i = p.index();
            inner.queued[i] = inner.queued[i].saturating_sub(granted[i]);
        }
        (next, candidates)
    }

    /// Pairs with a picture, and requests waiting per priority (for `/status`).
    pub fn counts(&self) -> (usize, [usize; 3]) {
        let inner = self.lock();
        (inner.pairs, inner.queued)
    }
}

/// How long a head waits for Redis's answer before it is asked again.
const ASKING: Duration = Duration::from_secs(5);

/// The head of a queue whose picture lives in Redis, to ask it for.
pub(super) struct Candidate {
    pub key: Arc<str>,
    pub model: Arc<str>,
    pub id: u64,
    pub priority: Priority,
    pub cost: Cost,
    pub floor: f64,
}

impl Drop for Pacer {
    fn drop(&mut self) {
        // The dispatcher wakes, finds the pacer gone, and ends.
        self.wake.notify_one();
    }
}

fn exhausted(model: &str, why: &str, wait: Duration) -> GatewayError {
    GatewayError::UpstreamQuotaExhausted {
        message: format!(
            "The upstream's quota for model '{model}' is spent: {why}. Retry in {:.1}s.",
            wait.as_secs_f64()
        ),
        retry_after: Some(wait),
    }
}

/// Hands pictures out as they refill, until the pacer is dropped.
async fn dispatch_forever(pacer: Weak<Pacer>, wake: Arc<Notify>) {
    loop {
        let Some(p) = pacer.upgrade() else { return };
        let (next, candidates) = p.dispatch(Clock::now().into_std());
        if !candidates.is_empty() {
            for c in candidates {
                p.grant_shared(c).await;
            }
            continue;
        }
        drop(p);
        match next {
            Some(at) => {
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep_until(Clock::from_std(at)) => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

#[cfg(test)]
#[path = "pace_tests.rs"]
mod tests;

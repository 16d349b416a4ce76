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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::time::Instant as Clock;

use prometheus::{Histogram, IntGauge};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::gauge::Gauge;
use super::picture::{too_large, Cost, Inner, Marks, Waiter};
use super::ticket::{Place, Ticket};
use super::Reading;
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
    Granted(Option<Marks>),
    Waited,
    Drain,
}

pub struct Pacer {
    inner: Mutex<Inner>,
    pub(super) wake: Arc<Notify>,
    pub(super) metrics: PaceMetrics,
}

impl Pacer {
    /// A pacer with `config`; at most `queue_cap` requests wait per priority. Starts its
    /// dispatcher on the current runtime (none in unit tests: [`Pacer::dispatch`] by hand).
    pub fn new(config: QuotaConfig, queue_cap: usize, metrics: PaceMetrics) -> Arc<Pacer> {
        let pacer = Arc::new(Pacer {
            inner: Mutex::new(Inner {
                pictures: HashMap::new(),
                pairs: 0,
                busy: Vec::new(),
                next_id: 0,
                queued: [0; 3],
                config,
                queue_cap: queue_cap.max(1),
            }),
            wake: Arc::new(Notify::new()),
            metrics,
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(dispatch_forever(
                Arc::downgrade(&pacer),
                Arc::clone(&pacer.wake),
            ));
        }
        pacer
    }

    /// A reload that keeps enforcing: new settings, the same pictures and queues.
    pub fn configure(&self, config: QuotaConfig, queue_cap: usize) {
        let mut inner = self.lock();
        inner.config = config;
        inner.queue_cap = queue_cap.max(1);
        drop(inner);
        self.wake.notify_one();
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a request now, or when the picture carries it; refuses it past its
    /// priority's `max_wait`, or with `shutting_down` when `drain` is cancelled.
    pub async fn admit(
        self: &Arc<Self>,
        ask: Ask<'_>,
        drain: &CancellationToken,
    ) -> Result<Ticket, GatewayError> {
        let now = Clock::now().into_std();
        let p = ask.priority;
        let (id, rx, max_wait) = {
            let mut inner = self.lock();
            let floor = inner.config.floor(p);
            let max_wait = inner.config.max_wait(p);
            let cap = inner.queue_cap;
            let queued = inner.queued[p.index()];
            let Some(pic) = inner.picture_mut(ask.key, ask.model) else {
                // Nothing learned yet: the first answer teaches.
                drop(inner);
                self.metrics.wait[p.index()].observe(0.0);
                return Ok(self.ticket(&ask, Marks::default()));
            };
            pic.touched = Some(now);
            if let Some(message) = too_large(pic, ask.cost, floor, p) {
                return Err(GatewayError::UpstreamQuotaExhausted {
                    message,
                    retry_after: None,
                });
            }
            if pic.waiting.waiting_at_or_above(p) == 0 && pic.carries(ask.cost, floor, now) {
                let marks = pic.take(ask.cost, now);
                drop(inner);
                self.metrics.wait[p.index()].observe(0.0);
                return Ok(self.ticket(&ask, marks));
            }
            let wait = pic.estimate(p, None, ask.cost, floor, now);
            if wait > max_wait || queued >= cap {
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
                return Err(exhausted(ask.model, &why, wait));
            }
            let id = inner.next_id;
            inner.next_id += 1;
            let (tx, rx) = oneshot::channel();
            let Some(pic) = inner.picture_mut(ask.key, ask.model) else {
                return Err(GatewayError::Internal("quota picture vanished".into()));
            };
            pic.waiting.push(
                id,
                ask.flow,
                p,
                ask.cost.weight(),
                Waiter {
                    cost: ask.cost,
                    grant: tx,
                },
            );
            inner.queued[p.index()] += 1;
            let pair = (Arc::<str>::from(ask.key), Arc::<str>::from(ask.model));
            if !inner.busy.contains(&pair) {
                inner.busy.push(pair);
            }
            (id, rx, max_wait)
        };
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
        let marks = match end {
            // `None`: the pacer let go of its queue (it cannot while it lives).
            End::Granted(marks) => marks.unwrap_or_default(),
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
        Ok(self.ticket(&ask, marks))
    }

    fn ticket(self: &Arc<Self>, ask: &Ask<'_>, marks: Marks) -> Ticket {
        Ticket {
            pacer: Arc::clone(self),
            key: Arc::from(ask.key),
            model: Arc::from(ask.model),
            cost: ask.cost,
            marks,
            forwarded: false,
        }
    }

    /// Takes what a response told of `key`'s quota for `model`; `marks` are its request's
    /// (from its [`Ticket`]), or none when it took nothing.
    pub fn learn(&self, key: &str, model: &str, reading: &Reading, marks: Marks, now: Instant) {
        if reading.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let pic = inner.picture_or_insert(key, model);
        pic.touched = Some(now);
        for (gauge, part, mark) in [
            (&mut pic.requests, reading.requests, marks.requests),
            (&mut pic.tokens, reading.tokens, marks.tokens),
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
    pub fn hold_empty(&self, key: &str, model: &str, wait: Duration, now: Instant) -> bool {
        let mut inner = self.lock();
        let Some(pic) = inner.picture_mut(key, model) else {
            return false;
        };
        for g in [&mut pic.requests, &mut pic.tokens].into_iter().flatten() {
            g.hold_empty(now + wait, now);
        }
        true
    }

    /// Hands the pictures out to the requests waiting for them, as far as they carry; the
    /// next instant one may carry more.
    pub fn dispatch(&self, now: Instant) -> Option<Instant> {
        let mut inner = self.lock();
        let mut next: Option<Instant> = None;
        let busy = std::mem::take(&mut inner.busy);
        let mut still = Vec::with_capacity(busy.len());
        let config = inner.config.clone();
        let mut granted = [0usize; 3];
        for (key, model) in busy {
            let Some(pic) = inner.picture_mut(&key, &model) else {
                continue;
            };
            while let Some((p, head)) = pic.waiting.peek() {
                let floor = config.floor(p);
                let cost = head.cost;
                if !pic.carries(cost, floor, now) {
                    let wait = pic.estimate_one(cost, floor, now);
                    let at = now + wait.max(Duration::from_millis(1));
                    next = Some(next.map_or(at, |n| n.min(at)));
                    break;
                }
                let Some(waiter) = pic.waiting.pop() else {
                    break;
                };
                granted[p.index()] += 1;
                let marks = pic.take(cost, now);
                if waiter.grant.send(marks).is_err() {
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
            inner.queued[p.index()] -= granted[p.index()];
        }
        next
    }

    /// Pairs with a picture, and requests waiting per priority (for `/status`).
    pub fn counts(&self) -> (usize, [usize; 3]) {
        let inner = self.lock();
        (inner.pairs, inner.queued)
    }
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
        let next = match pacer.upgrade() {
            Some(p) => p.dispatch(Clock::now().into_std()),
            None => return,
        };
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

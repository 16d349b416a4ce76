//! The pacer with `store = "redis"`: admission asks the fleet's picture in Redis (one round
//! trip), the dispatcher asks it for the head of each queue when the mirror says it may
//! carry it, and every response, give-back and hold reaches Redis off the request's path.
//! When Redis does not answer, the picture falls back to this gateway's share of the last
//! mirror (one of [`SharedPictures::share`] gateways, from the fleet heartbeat), never the
//! whole of it, and asks Redis again a second later.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::Instant as Clock;

use super::pace::{Ask, Candidate, Pacer, Step};
use super::picture::{Cost, Grant, Marks};
use super::shared::Took;
use super::{Part, Reading};

impl Pacer {
    /// Admission with `store = "redis"`: the fleet's picture decides; without an answer,
    /// this gateway's share of the last one.
    pub(super) async fn ask_shared(&self, ask: &Ask<'_>, now: Instant) -> Step {
        let Some(shared) = &self.shared else {
            return Step::Go(Marks::default(), None);
        };
        let floor = self.lock().config.floor(ask.priority);
        match shared.take(ask.key, ask.model, ask.cost, floor).await {
            Ok(Took::Unknown) => Step::Go(Marks::default(), None),
            Ok(Took::Taken(marks, mirror)) => {
                let mut inner = self.lock();
                let pair = inner.picture_or_insert(ask.key, ask.model).and_then(|pic| {
                    pic.mirror(mirror, now);
                    pic.pair.clone()
                });
                Step::Go(marks, pair)
            }
            Ok(Took::Short(wait, mirror)) => {
                if let Some(pic) = self.lock().picture_or_insert(ask.key, ask.model) {
                    pic.mirror(mirror, now);
                }
                self.step(ask, now, Some(wait))
            }
            Err(_) => {
                let share = shared.share();
                match self.lock().picture_mut(ask.key, ask.model) {
                    Some(pic) => pic.fall_back(share, now),
                    None => return Step::Go(Marks::default(), None),
                }
                self.step(ask, now, Some(Duration::ZERO))
            }
        }
    }

    /// Asks Redis for the head of a queue; grants it when the fleet's picture carries it.
    pub(super) async fn grant_shared(self: &Arc<Self>, c: Candidate) {
        let Some(shared) = &self.shared else { return };
        let reply = shared.take(&c.key, &c.model, c.cost, c.floor).await;
        let now = Clock::now().into_std();
        let share = shared.share();
        let mut inner = self.lock();
        let Some(pic) = inner.picture_mut(&c.key, &c.model) else {
            drop(inner);
            if let Ok(Took::Taken(marks, _)) = reply {
                self.give_shared(&c.key, &c.model, c.cost, marks);
            }
            return;
        };
        pic.retry_at = None;
        let marks = match reply {
            Ok(Took::Unknown) => Marks::default(),
            Ok(Took::Taken(marks, mirror)) => {
                pic.mirror(mirror, now);
                marks
            }
            Ok(Took::Short(wait, mirror)) => {
                pic.mirror(mirror, now);
                pic.retry_at = Some(now + wait.max(Duration::from_millis(1)));
                return;
            }
            Err(_) => {
                pic.fall_back(share, now);
                return;
            }
        };
        // Sent under the lock: a waiter that gives up meanwhile finds the grant in its
        // channel, never an empty one.
        let left = match pic.waiting.remove(c.id, c.priority) {
            Some(w) => {
                let i = c.priority.index();
                inner.queued[i] = inner.queued[i].saturating_sub(1);
                w.grant.send(Grant::Take(marks)).err().map(|_| marks)
            }
            None => Some(marks),
        };
        drop(inner);
        // A head that left meanwhile (or this very moment) gives its take back.
        if let Some(marks) = left {
            self.give_back(&c.key, &c.model, c.cost, marks);
        }
    }

    /// A response's reading into the fleet's picture; without Redis, into this gateway's
    /// share of it.
    pub(super) fn learn_shared(
        self: &Arc<Self>,
        key: &str,
        model: &str,
        reading: Reading,
        marks: Marks,
    ) {
        let pacer = Arc::clone(self);
        let (key, model) = (key.to_owned(), model.to_owned());
        tokio::spawn(async move {
            let Some(shared) = &pacer.shared else { return };
            let answer = shared.learn(&key, &model, &reading, marks).await;
            let now = Clock::now().into_std();
            match answer {
                Ok(mirror) => {
                    let mut inner = pacer.lock();
                    let Some(pic) = inner.picture_or_insert(&key, &model) else {
                        return;
                    };
                    pic.mirror(mirror, now);
                    let waiting = !pic.waiting.is_empty();
                    drop(inner);
                    if waiting {
                        pacer.wake.notify_one();
                    }
                }
                Err(_) => {
                    let share = shared.share();
                    if let Some(pic) = pacer.lock().picture_mut(&key, &model) {
                        pic.fall_back(share, now);
                    }
                    let f = 1.0 / f64::from(share.max(1));
                    let mine = Reading {
                        requests: reading.requests.map(|p| scaled(p, f)),
                        tokens: reading.tokens.map(|p| scaled(p, f)),
                    };
                    pacer.learn_local(&key, &model, &mine, marks, now);
                }
            }
        });
    }

    /// Gives a shared take back in Redis (off the request's path).
    pub(super) fn give_shared(self: &Arc<Self>, key: &str, model: &str, cost: Cost, marks: Marks) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let pacer = Arc::clone(self);
        let (key, model) = (key.to_owned(), model.to_owned());
        tokio::spawn(async move {
            if let Some(shared) = &pacer.shared {
                // Lost when Redis is away: the fleet's picture then errs low, never high.
                let _ = shared.give(&key, &model, cost, marks).await;
            }
        });
    }

    /// Holds the fleet's picture empty (off the request's path).
    pub(super) fn hold_shared(self: &Arc<Self>, key: &str, model: &str, wait: Duration) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let pacer = Arc::clone(self);
        let (key, model) = (key.to_owned(), model.to_owned());
        tokio::spawn(async move {
            if let Some(shared) = &pacer.shared {
                let _ = shared.hold(&key, &model, wait).await;
            }
        });
    }
}

/// This gateway's share of what a response said of the fleet's quota.
fn scaled(p: Part, f: f64) -> Part {
    Part {
        limit: ((p.limit as f64 * f).floor() as u64).max(1),
        remaining: (p.remaining as f64 * f).floor() as u64,
        reset: p.reset,
    }
}

//! The pacer with `store = "redis"`: admission asks the fleet's picture in Redis (one round
//! trip), the dispatcher asks it for the head of each queue when the mirror says it may
//! carry it. Each answer's correction waits in its picture (`pending`) and rides on the
//! next take; give-backs and holds reach Redis off the request's path.
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
        let (floor, pending) = {
            let mut inner = self.lock();
            let floor = inner.config.floor(ask.priority);
            let pending = inner
                .picture_mut(ask.key, ask.model)
                .and_then(|pic| pic.pending.take());
            (floor, pending)
        };
        let reply = shared
            .take(ask.key, ask.model, ask.cost, floor, pending.as_ref())
            .await;
        match reply {
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
                if let Some((reading, marks)) = pending {
                    self.learn_share(ask.key, ask.model, &reading, marks, share, now);
                }
                self.step(ask, now, Some(Duration::ZERO))
            }
        }
    }

    /// Asks Redis for the head of a queue; grants it when the fleet's picture carries it.
    pub(super) async fn grant_shared(self: &Arc<Self>, c: Candidate) {
        let Some(shared) = &self.shared else { return };
        let pending = self
            .lock()
            .picture_mut(&c.key, &c.model)
            .and_then(|pic| pic.pending.take());
        let reply = shared
            .take(&c.key, &c.model, c.cost, c.floor, pending.as_ref())
            .await;
        let now = Clock::now().into_std();
        let share = shared.share();
        if reply.is_err() {
            if let Some((reading, marks)) = pending {
                self.learn_share(&c.key, &c.model, &reading, marks, share, now);
            }
        }
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

    /// A response's reading for the fleet's picture: kept in this picture until its next
    /// take carries it to Redis (the freshest per unit); while Redis is away, learned into
    /// this gateway's share.
    pub(super) fn learn_shared(
        self: &Arc<Self>,
        key: &str,
        model: &str,
        reading: Reading,
        marks: Marks,
        now: Instant,
    ) {
        let share = self.shared.as_ref().map_or(1, |s| s.share());
        let mut inner = self.lock();
        let Some(pic) = inner.picture_or_insert(key, model) else {
            return;
        };
        if pic.fallback.is_some() {
            drop(inner);
            self.learn_share(key, model, &reading, marks, share, now);
            return;
        }
        pic.pending = Some(merge(pic.pending.take(), (reading, marks)));
        // The head of a queue asks Redis again now: the answer may have raised the picture.
        pic.retry_at = None;
        let waiting = !pic.waiting.is_empty();
        drop(inner);
        if waiting {
            self.wake.notify_one();
        }
    }

    /// A reading of the fleet's quota, learned into this gateway's share of it.
    fn learn_share(
        &self,
        key: &str,
        model: &str,
        reading: &Reading,
        marks: Marks,
        share: u32,
        now: Instant,
    ) {
        let f = 1.0 / f64::from(share.max(1));
        let mine = Reading {
            requests: reading.requests.map(|p| scaled(p, f)),
            tokens: reading.tokens.map(|p| scaled(p, f)),
        };
        self.learn_local(key, model, &mine, marks, now);
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

/// Two answers' readings as one: per unit the one whose request took later from the fleet's
/// picture (the freshest correction), else the newer.
fn merge(old: Option<(Reading, Marks)>, new: (Reading, Marks)) -> (Reading, Marks) {
    let Some((or, om)) = old else { return new };
    let (nr, nm) = new;
    if om.shared != nm.shared {
        return (nr, nm);
    }
    let pick =
        |o: Option<Part>, omark: Option<u64>, n: Option<Part>, nmark: Option<u64>| match (o, n) {
            (Some(_), None) => (o, omark),
            (Some(_), Some(_)) if omark > nmark => (o, omark),
            _ => (n, nmark),
        };
    let (requests, rmark) = pick(or.requests, om.requests, nr.requests, nm.requests);
    let (tokens, tmark) = pick(or.tokens, om.tokens, nr.tokens, nm.tokens);
    (
        Reading { requests, tokens },
        Marks {
            requests: rmark,
            tokens: tmark,
            shared: nm.shared,
        },
    )
}

/// This gateway's share of what a response said of the fleet's quota.
fn scaled(p: Part, f: f64) -> Part {
    Part {
        limit: ((p.limit as f64 * f).floor() as u64).max(1),
        remaining: (p.remaining as f64 * f).floor() as u64,
        reset: p.reset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(remaining: u64) -> Option<Part> {
        Some(Part {
            limit: 100,
            remaining,
            reset: Duration::from_secs(1),
        })
    }

    fn marks(requests: Option<u64>, tokens: Option<u64>) -> Marks {
        Marks {
            requests,
            tokens,
            shared: true,
        }
    }

    #[test]
    fn pending_corrections_keep_the_freshest_per_unit() {
        let older = (
            Reading {
                requests: part(10),
                tokens: part(50),
            },
            marks(Some(7), Some(700)),
        );
        // An answer that arrived later but took earlier, and says nothing of tokens.
        let late = (
            Reading {
                requests: part(30),
                tokens: None,
            },
            marks(Some(5), None),
        );
        let (r, m) = merge(Some(older), late);
        assert_eq!(r.requests, part(10));
        assert_eq!(m.requests, Some(7));
        assert_eq!(r.tokens, part(50));
        assert_eq!(m.tokens, Some(700));
        // A fresher one replaces it.
        let fresh = (
            Reading {
                requests: part(3),
                tokens: part(2),
            },
            marks(Some(9), Some(900)),
        );
        let (r, m) = merge(Some((r, m)), fresh);
        assert_eq!((r.requests, r.tokens), (part(3), part(2)));
        assert_eq!((m.requests, m.tokens), (Some(9), Some(900)));
    }
}

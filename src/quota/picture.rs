//! One key and model's picture of the upstream's quota (a [`Gauge`] per unit) with the
//! requests waiting for it, and the table of all pictures: what the pacer holds behind its
//! one mutex.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::fair::{FairQueue, Slot};
use super::gauge::Gauge;
use super::shared::Mirror;
use super::{Map, Reading, MAX_ENTRIES};
use crate::config::{Priority, QuotaConfig};

/// What a request costs the upstream's quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    pub requests: u64,
    /// Its estimated tokens as the upstream counts them: the prompt and `max_tokens`.
    pub tokens: u64,
}

impl Cost {
    /// What fairness weighs: tokens (at least one per request).
    pub(super) fn weight(&self) -> u64 {
        self.tokens.max(1)
    }
}

/// The running totals right after a request's take, per unit (`None`: nothing taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Marks {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
    /// Taken from the fleet's picture in Redis (else from this gateway's).
    pub shared: bool,
}

/// While Redis is away, how often a picture asks it again.
const FALLBACK_RETRY: Duration = Duration::from_secs(1);

pub(super) struct Waiter {
    pub(super) id: u64,
    pub(super) cost: Cost,
    pub(super) grant: oneshot::Sender<Grant>,
}

/// How a wait ends when the pacer ends it.
#[derive(Debug)]
pub(super) enum Grant {
    /// The picture carried it: what it took.
    Take(Marks),
    /// The picture no longer can (the limit fell, or a reload raised the floor): why.
    Refuse(String),
}

#[derive(Default)]
pub(super) struct Picture {
    pub(super) requests: Option<Gauge>,
    pub(super) tokens: Option<Gauge>,
    pub(super) waiting: FairQueue<Waiter>,
    pub(super) touched: Option<Instant>,
    /// `store = "redis"` while Redis is away: the gauges are this gateway's share of the
    /// last picture, paced on locally, and Redis is asked again from this instant.
    pub(super) fallback: Option<Instant>,
    /// `store = "redis"`: Redis said the head of the queue waits until then (or a take for
    /// it is under way: far away).
    pub(super) retry_at: Option<Instant>,
    /// `store = "redis"`: the latest answers' correction, carried by the next take.
    pub(super) pending: Option<(Reading, Marks)>,
    /// Its key and model, shared with the tickets taken from it (no allocation per request).
    pub(super) pair: Option<(Arc<str>, Arc<str>)>,
}

pub(super) struct Inner {
    pub(super) pictures: Map<Arc<str>, Map<Arc<str>, Picture>>,
    pub(super) pairs: usize,
    /// Pictures with requests waiting: what the dispatcher walks.
    pub(super) busy: Vec<(Arc<str>, Arc<str>)>,
    pub(super) next_id: u64,
    pub(super) queued: [usize; 3],
    pub(super) config: QuotaConfig,
    /// The most requests one priority may keep waiting.
    pub(super) queue_cap: usize,
}

/// Why the picture can never carry `cost` for priority `p`, if it cannot.
pub(super) fn too_large(pic: &Picture, cost: Cost, floor: f64, p: Priority) -> Option<String> {
    for (unit, gauge, need) in [
        ("requests", &pic.requests, cost.requests),
        ("tokens", &pic.tokens, cost.tokens),
    ] {
        let Some(g) = gauge else { continue };
        if !g.could_carry(need, floor) {
            return Some(format!(
                "This request is estimated at {need} {unit}, more than the upstream's quota of {} {unit} lets a {} request spend at once ({:.0}% of it stays unspent: upstream.quota.headroom and reserve). Lower max_tokens or shorten the prompt.",
                g.limit,
                p.as_str(),
                floor * 100.0
            ));
        }
    }
    None
}

impl Picture {
    /// Whether Redis is asked (`store = "redis"` and not falling back just now).
    pub(super) fn asks_shared(&self, shared: bool, now: Instant) -> bool {
        shared && self.fallback.is_none_or(|at| now >= at)
    }

    /// Takes the fleet's picture as Redis replied it.
    pub(super) fn mirror(&mut self, m: Mirror, now: Instant) {
        self.requests = m.requests.map(|u| Gauge::mirrored(u, now));
        self.tokens = m.tokens.map(|u| Gauge::mirrored(u, now));
        self.fallback = None;
    }

    /// Redis did not answer: from now on (until it does) this gateway paces on its share
    /// of the last picture, one of `share` gateways.
    pub(super) fn fall_back(&mut self, share: u32, now: Instant) {
        if self.fallback.is_none() {
            let f = 1.0 / f64::from(share.max(1));
            for (g, _) in self.units() {
                g.scale(f, now);
            }
        }
        self.fallback = Some(now + FALLBACK_RETRY);
        self.retry_at = None;
    }

    pub(super) fn units(&mut self) -> impl Iterator<Item = (&mut Gauge, fn(&Cost) -> u64)> {
        let requests: fn(&Cost) -> u64 = |c| c.requests;
        let tokens: fn(&Cost) -> u64 = |c| c.tokens;
        [
            self.requests.as_mut().map(|g| (g, requests)),
            self.tokens.as_mut().map(|g| (g, tokens)),
        ]
        .into_iter()
        .flatten()
    }

    pub(super) fn carries(&self, cost: Cost, floor: f64, now: Instant) -> bool {
        self.requests
            .as_ref()
            .is_none_or(|g| g.carries(cost.requests, floor, now))
            && self
                .tokens
                .as_ref()
                .is_none_or(|g| g.carries(cost.tokens, floor, now))
    }

    pub(super) fn take(&mut self, cost: Cost, now: Instant) -> Marks {
        Marks {
            requests: self.requests.as_mut().map(|g| g.take(cost.requests, now)),
            tokens: self.tokens.as_mut().map(|g| g.take(cost.tokens, now)),
            shared: false,
        }
    }

    pub(super) fn give_back(&mut self, cost: Cost, marks: Marks, now: Instant) {
        if marks.requests.is_some() {
            if let Some(g) = &mut self.requests {
                g.give_back(cost.requests, now);
            }
        }
        if marks.tokens.is_some() {
            if let Some(g) = &mut self.tokens {
                g.give_back(cost.tokens, now);
            }
        }
    }

    /// How long until the picture carries `cost` above `floor`.
    pub(super) fn estimate_one(&mut self, cost: Cost, floor: f64, now: Instant) -> Duration {
        self.units()
            .filter_map(|(g, of)| g.wait_for(of(&cost), floor, now))
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// How long until the picture carries `cost` after what waits ahead of it (the
    /// priorities above `p`, and what goes before `at` in the fair order of `p`): the honest
    /// `Retry-After`.
    pub(super) fn estimate(
        &mut self,
        p: Priority,
        at: Slot<'_>,
        cost: Cost,
        floor: f64,
        now: Instant,
    ) -> Duration {
        let ahead = self
            .waiting
            .ahead(p, at)
            .fold(Cost::default(), |sum, w| Cost {
                requests: sum.requests + w.cost.requests,
                tokens: sum.tokens + w.cost.tokens,
            });
        let total = Cost {
            requests: ahead.requests + cost.requests,
            tokens: ahead.tokens + cost.tokens,
        };
        self.estimate_one(total, floor, now)
    }
}

impl Inner {
    pub(super) fn picture_mut(&mut self, key: &str, model: &str) -> Option<&mut Picture> {
        self.pictures.get_mut(key)?.get_mut(model)
    }

    /// The picture of a pair, made when there is none (`None` only if the table cannot
    /// hold it, which eviction prevents). A known pair is found without allocating.
    pub(super) fn picture_or_insert(&mut self, key: &str, model: &str) -> Option<&mut Picture> {
        let known = self
            .pictures
            .get(key)
            .is_some_and(|models| models.contains_key(model));
        if !known {
            if self.pairs >= MAX_ENTRIES {
                self.evict_oldest_idle();
            }
            self.pairs += 1;
            let (key, model) = (Arc::<str>::from(key), Arc::<str>::from(model));
            let pic = Picture {
                pair: Some((Arc::clone(&key), Arc::clone(&model))),
                ..Picture::default()
            };
            self.pictures.entry(key).or_default().insert(model, pic);
        }
        self.picture_mut(key, model)
    }

    /// Removes the picture touched longest ago that nobody waits for.
    pub(super) fn evict_oldest_idle(&mut self) {
        let oldest = self
            .pictures
            .iter()
            .flat_map(|(key, models)| models.iter().map(move |(model, pic)| (key, model, pic)))
            .filter(|(_, _, pic)| pic.waiting.is_empty())
            .min_by_key(|(_, _, pic)| pic.touched)
            .map(|(key, model, _)| (Arc::clone(key), Arc::clone(model)));
        let Some((key, model)) = oldest else { return };
        if let Some(models) = self.pictures.get_mut(&key) {
            if models.remove(&model).is_some() {
                self.pairs -= 1;
            }
            if models.is_empty() {
                self.pictures.remove(&key);
            }
        }
    }
}

/// Takes waiter `id` out of its queue; `false` when it is not there (granted).
pub(super) fn remove(inner: &mut Inner, key: &str, model: &str, id: u64, p: Priority) -> bool {
    let removed = inner
        .picture_mut(key, model)
        .and_then(|pic| pic.waiting.remove(id, p))
        .is_some();
    if removed {
        inner.queued[p.index()] = inner.queued[p.index()].saturating_sub(1);
    }
    removed
}

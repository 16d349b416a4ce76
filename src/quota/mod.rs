//! The upstream's own quota, learned from the `x-ratelimit-*` headers of its responses
//! (`[upstream.quota]`, docs/rate-limits.md "The upstream's quota (learned)").
//!
//! [`Reading::from_headers`] reads one response; [`Learned::learn`] keeps, per upstream key
//! and model, the latest whole reading of each unit (requests, tokens) with the instant it
//! resets; [`Learned::snapshot`] hands a copy to `/status` and the metrics. Time is passed
//! in (`now`), never read here, so the table is tested without a clock and whatever paces on
//! it later (a picture refilled between responses) shares the same instants.
//!
//! Keys are fingerprints (`org` in managed mode, `fp:…` in passthrough), never a key.
//! Models come from requests, so the table is bounded: past [`MAX_ENTRIES`], the entry
//! learned longest ago makes room.

mod duration;
mod fair;
mod fleet;
mod gauge;
pub mod pace;
mod picture;
mod reading;
pub mod shared;
mod ticket;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub use duration::{parse_go_duration, MAX_RESET};
pub use pace::{Ask, PaceMetrics, Pacer};
pub use picture::{Cost, Marks};
pub use reading::{Part, Reading};
pub use shared::SharedPictures;
pub use ticket::Ticket;

/// The most (key, model) pairs kept.
pub const MAX_ENTRIES: usize = 4096;

/// The model of a request that named none.
pub const ANY_MODEL: &str = "*";

/// What one unit's headers said, and when it stops being true.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub limit: u64,
    pub remaining: u64,
    /// When the upstream said the unit is whole again.
    pub reset_at: Instant,
    pub learned_at: Instant,
}

impl Known {
    fn new(part: Part, now: Instant) -> Known {
        Known {
            limit: part.limit,
            remaining: part.remaining,
            reset_at: now + part.reset,
            learned_at: now,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    requests: Option<Known>,
    tokens: Option<Known>,
    /// The last reading that changed anything: the eviction order.
    touched: Option<Instant>,
}

/// One unit of one (key, model) at the snapshot's instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitView {
    pub limit: u64,
    /// `None` once the reset has passed: the upstream refilled the unit by an amount ezgate
    /// has not seen, so the last `remaining` is no longer trusted (and no guess replaces it).
    pub remaining: Option<u64>,
    /// Until the reset; zero once passed.
    pub reset_in: Duration,
    /// Since the reading.
    pub age: Duration,
    pub expired: bool,
}

impl UnitView {
    fn of(k: &Known, now: Instant) -> UnitView {
        let expired = now >= k.reset_at;
        UnitView {
            limit: k.limit,
            remaining: (!expired).then_some(k.remaining),
            reset_in: k.reset_at.saturating_duration_since(now),
            age: now.saturating_duration_since(k.learned_at),
            expired,
        }
    }
}

/// One (key, model) at the snapshot's instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryView {
    /// `org…` or a key fingerprint.
    pub key: Arc<str>,
    pub model: Arc<str>,
    pub requests: Option<UnitView>,
    pub tokens: Option<UnitView>,
}

/// The hash maps of the quota's tables: looked up on every response, with keys and models
/// that are bounded in number ([`MAX_ENTRIES`]); foldhash, seeded per process.
pub(crate) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Per upstream key id, per model. Nested so a known pair is found by `&str` without
/// allocating (every response of a busy key and model finds its entry).
type Table = Map<Arc<str>, Map<Arc<str>, Entry>>;
/// Per (model, unit): (limit, remaining).
type Tightest = HashMap<(Arc<str>, &'static str), (u64, Option<u64>)>;

#[derive(Default)]
struct Inner {
    table: Table,
    /// (key, model) pairs in `table`.
    pairs: usize,
}

/// The learned quota table; shared (cheaply cloned) by the states a reload keeps it across.
#[derive(Clone, Default)]
pub struct Learned {
    inner: Arc<Mutex<Inner>>,
    max_entries: usize,
}

impl Learned {
    pub fn new() -> Learned {
        Learned::with_capacity(MAX_ENTRIES)
    }

    /// A table that keeps at most `max_entries` (key, model) pairs (at least one).
    pub fn with_capacity(max_entries: usize) -> Learned {
        Learned {
            inner: Arc::default(),
            max_entries: max_entries.max(1),
        }
    }

    /// Takes what a response told of `key`'s quota for `model`. A unit the reading lacks
    /// keeps what was learned of it before.
    pub fn learn(&self, key: &str, model: &str, reading: &Reading, now: Instant) {
        if reading.is_empty() {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = inner.table.get_mut(key).and_then(|m| m.get_mut(model)) {
            entry.update(reading, now);
            return;
        }
        if inner.pairs >= self.max_entries {
            inner.evict_oldest();
        }
        inner.pairs += 1;
        let mut entry = Entry::default();
        entry.update(reading, now);
        inner
            .table
            .entry(Arc::from(key))
            .or_default()
            .insert(Arc::from(model), entry);
    }
}

impl Entry {
    /// Takes the units a reading has; the others stay as they were.
    fn update(&mut self, reading: &Reading, now: Instant) {
        let entry = self;
        if let Some(p) = reading.requests {
            entry.requests = Some(Known::new(p, now));
        }
        if let Some(p) = reading.tokens {
            entry.tokens = Some(Known::new(p, now));
        }
        entry.touched = Some(now);
    }
}

impl Learned {
    /// Every (key, model) as of `now`, sorted by key then model.
    pub fn snapshot(&self, now: Instant) -> Vec<EntryView> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<EntryView> = inner
            .table
            .iter()
            .flat_map(|(key, models)| {
                models.iter().map(move |(model, e)| EntryView {
                    key: Arc::clone(key),
                    model: Arc::clone(model),
                    requests: e.requests.as_ref().map(|k| UnitView::of(k, now)),
                    tokens: e.tokens.as_ref().map(|k| UnitView::of(k, now)),
                })
            })
            .collect();
        drop(inner);
        out.sort_by(|a, b| (&a.key, &a.model).cmp(&(&b.key, &b.model)));
        out
    }

    /// How many (key, model) pairs are kept.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pairs
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Removes the pair learned longest ago (a scan: only when the table is full).
    fn evict_oldest(&mut self) {
        let oldest = self
            .table
            .iter()
            .flat_map(|(key, models)| models.iter().map(move |(model, e)| (e.touched, key, model)))
            .min_by_key(|(touched, _, _)| *touched)
            .map(|(_, key, model)| (Arc::clone(key), Arc::clone(model)));
        let Some((key, model)) = oldest else { return };
        if let Some(models) = self.table.get_mut(&key) {
            if models.remove(&model).is_some() {
                self.pairs -= 1;
            }
            if models.is_empty() {
                self.table.remove(&key);
            }
        }
    }
}

/// The key id of the organization's key (managed mode): one key, so one id.
pub const ORG_KEY: &str = "org";

/// Per model and unit, what the metrics show: of the keys that learned one model, the one
/// with the least remaining share (the key nearest its 429 is what an operator must see);
/// an expired unit counts its limit and no remaining.
pub fn tightest(entries: &[EntryView]) -> Vec<(Arc<str>, &'static str, u64, Option<u64>)> {
    let mut best = Tightest::new();
    for e in entries {
        for (unit, view) in [("requests", e.requests), ("tokens", e.tokens)] {
            let Some(v) = view else { continue };
            let slot = best
                .entry((Arc::clone(&e.model), unit))
                .or_insert((v.limit, v.remaining));
            if share(v.limit, v.remaining) < share(slot.0, slot.1) {
                *slot = (v.limit, v.remaining);
            }
        }
    }
    let mut out: Vec<_> = best
        .into_iter()
        .map(|((model, unit), (limit, remaining))| (model, unit, limit, remaining))
        .collect();
    out.sort();
    out
}

/// The remaining share, unknown counting as whole.
fn share(limit: u64, remaining: Option<u64>) -> f64 {
    match (remaining, limit) {
        (None, _) | (_, 0) => 1.0,
        (Some(r), l) => r as f64 / l as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(limit: u64, remaining: u64, reset_ms: u64) -> Option<Part> {
        Some(Part {
            limit,
            remaining,
            reset: Duration::from_millis(reset_ms),
        })
    }

    #[test]
    fn learns_and_keeps_what_a_reading_lacks() {
        let t = Learned::new();
        let now = Instant::now();
        t.learn(
            "org",
            "gpt-4o",
            &Reading {
                requests: part(100, 99, 60_000),
                tokens: part(30_000, 29_000, 1_000),
            },
            now,
        );
        // A later response with only the requests part: tokens stay as learned.
        let later = now + Duration::from_millis(10);
        t.learn(
            "org",
            "gpt-4o",
            &Reading {
                requests: part(100, 98, 59_990),
                tokens: None,
            },
            later,
        );
        let s = t.snapshot(later);
        assert_eq!(s.len(), 1);
        let r = s[0].requests.unwrap();
        assert_eq!((r.limit, r.remaining, r.expired), (100, Some(98), false));
        let tk = s[0].tokens.unwrap();
        assert_eq!((tk.limit, tk.remaining), (30_000, Some(29_000)));
        assert_eq!(tk.age, Duration::from_millis(10));
        assert_eq!(tk.reset_in, Duration::from_millis(990));
        // An empty reading changes nothing, not even the order.
        t.learn("org", "gpt-4o", &Reading::default(), later);
        assert_eq!(t.snapshot(later), s);
    }

    #[test]
    fn never_trusted_beyond_its_reset() {
        let t = Learned::new();
        let now = Instant::now();
        let reading = Reading {
            requests: part(100, 3, 1_000),
            tokens: part(500, 10, 5_000),
        };
        t.learn("org", "*", &reading, now);
        let s = t.snapshot(now + Duration::from_secs(1));
        let r = s[0].requests.unwrap();
        assert!(r.expired);
        assert_eq!(r.remaining, None);
        assert_eq!(r.limit, 100);
        assert_eq!(r.reset_in, Duration::ZERO);
        assert_eq!(s[0].tokens.unwrap().remaining, Some(10));
    }

    #[test]
    fn keys_and_models_are_kept_apart_and_bounded() {
        let t = Learned::with_capacity(2);
        let now = Instant::now();
        let r = Reading {
            requests: part(10, 5, 1_000),
            tokens: None,
        };
        t.learn("fp:aaaaaaaaaaaa", "m", &r, now);
        t.learn("fp:bbbbbbbbbbbb", "m", &r, now + Duration::from_millis(1));
        t.learn("fp:aaaaaaaaaaaa", "m", &r, now + Duration::from_millis(2));
        // Full: the pair learned longest ago (b) makes room.
        t.learn("fp:cccccccccccc", "m", &r, now + Duration::from_millis(3));
        let keys: Vec<_> = t
            .snapshot(now)
            .into_iter()
            .map(|e| e.key.to_string())
            .collect();
        assert_eq!(keys, ["fp:aaaaaaaaaaaa", "fp:cccccccccccc"]);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn eviction_takes_one_model_of_a_key_and_keeps_the_others() {
        let t = Learned::with_capacity(3);
        let now = Instant::now();
        let r = Reading {
            requests: None,
            tokens: part(1000, 10, 1_000),
        };
        for (i, model) in ["a", "b", "c", "d"].into_iter().enumerate() {
            t.learn("org", model, &r, now + Duration::from_millis(i as u64));
        }
        let models: Vec<_> = t
            .snapshot(now)
            .into_iter()
            .map(|e| e.model.to_string())
            .collect();
        assert_eq!(models, ["b", "c", "d"]);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn the_metrics_show_the_tightest_key_of_a_model() {
        let t = Learned::new();
        let now = Instant::now();
        let learn = |key: &str, remaining| {
            t.learn(
                key,
                "m",
                &Reading {
                    requests: part(100, remaining, 60_000),
                    tokens: None,
                },
                now,
            );
        };
        learn("fp:a", 50);
        learn("fp:b", 7);
        learn("fp:c", 90);
        let m = tightest(&t.snapshot(now));
        assert_eq!(m, [(Arc::from("m"), "requests", 100, Some(7))]);
    }
}

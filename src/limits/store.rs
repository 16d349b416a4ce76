//! Keyed limiter state with a hard cap on tracked keys, on an injected clock.
//!
//! * [`RequestStore`]: governor's GCRA over [`CappedStore`], our own bounded keyed store.
//! * [`TokenStore`]: a token bucket per key that allows settling after the fact.
//! * [`ConcurrencyStore`]: in-flight counters per key.
//!
//! At the cap, a new key shares one overflow entry with every other new key, so it is still
//! limited (more strictly, never less).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, Reference};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};

use crate::config::Rate;

/// The key every new key shares once a policy tracks `max_keys` keys.
pub const OVERFLOW_KEY: &str = "\u{0}overflow";

/// The entry of `key`, created when missing and counted in `count`; once `max` keys are
/// tracked, new keys share the [`OVERFLOW_KEY`] entry (stricter, never looser).
fn capped_entry<'a, V>(
    map: &'a DashMap<Arc<str>, V>,
    count: &AtomicUsize,
    max: usize,
    key: &Arc<str>,
    new: impl FnOnce() -> V,
) -> dashmap::mapref::one::RefMut<'a, Arc<str>, V> {
    if let Some(entry) = map.get_mut(key) {
        return entry;
    }
    let key = if count.load(Ordering::Relaxed) >= max {
        Arc::from(OVERFLOW_KEY)
    } else {
        Arc::clone(key)
    };
    map.entry(key).or_insert_with(|| {
        count.fetch_add(1, Ordering::Relaxed);
        new()
    })
}
const EMPTY: u64 = u64::MAX;

/// A DashMap of GCRA states that never holds more than `max` keys (plus the overflow key).
pub struct CappedStore {
    /// Shared with the [`RequestStore`] that reads it for the admin view.
    map: Arc<DashMap<Arc<str>, AtomicU64>>,
    count: AtomicUsize,
    max: usize,
}

impl CappedStore {
    fn new(max: usize) -> Self {
        CappedStore {
            map: Arc::new(DashMap::new()),
            count: AtomicUsize::new(0),
            max,
        }
    }
}

impl StateStore for CappedStore {
    type Key = Arc<str>;

    fn measure_and_replace<T, F, E>(&self, key: &Arc<str>, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let entry = match self.map.get(key) {
            Some(e) => e,
            None => {
                let key = if self.count.load(Ordering::Relaxed) >= self.max {
                    Arc::from(OVERFLOW_KEY)
                } else {
                    Arc::clone(key)
                };
                self.map
                    .entry(key)
                    .or_insert_with(|| {
                        self.count.fetch_add(1, Ordering::Relaxed);
                        AtomicU64::new(EMPTY)
                    })
                    .downgrade()
            }
        };
        let mut prev = entry.load(Ordering::Acquire);
        loop {
            let decoded = (prev != EMPTY).then(|| Nanos::from(prev));
            let (result, next) = f(decoded)?;
            match entry.compare_exchange_weak(
                prev,
                next.as_u64(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(result),
                Err(actual) => prev = actual,
            }
        }
    }
}

impl ShrinkableKeyedStateStore<Arc<str>> for CappedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let below = drop_below.as_u64();
        self.map.retain(|_, v| {
            let tat = v.load(Ordering::Relaxed);
            let keep = tat != EMPTY && tat >= below;
            if !keep {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }

    fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Requests per unit with a burst, GCRA (governor).
pub struct RequestStore<C: Clock> {
    limiter: RateLimiter<Arc<str>, CappedStore, C, StateInformationMiddleware>,
    /// The limiter's states (theoretical arrival times, nanos since `start`), for [`RequestStore::usage`].
    states: Arc<DashMap<Arc<str>, AtomicU64>>,
    /// When the limiter started counting (its nanos are since then).
    start: C::Instant,
    clock: C,
    pub burst: u32,
    pub interval: Duration,
}

impl<C: Clock + Clone> RequestStore<C> {
    pub fn new(rate: Rate, burst: u32, max_keys: usize, clock: C) -> Option<Self> {
        let burst_nz = std::num::NonZeroU32::new(burst)?;
        let quota = Quota::with_period(rate.interval())?.allow_burst(burst_nz);
        let store = CappedStore::new(max_keys);
        let states = Arc::clone(&store.map);
        // The limiter takes its start from the same clock now: its nanos count from here.
        let start = clock.now();
        let limiter: RateLimiter<Arc<str>, CappedStore, C, NoOpMiddleware<C::Instant>> =
            RateLimiter::new(quota, store, clock.clone());
        let limiter = limiter.with_middleware::<StateInformationMiddleware>();
        Some(RequestStore {
            limiter,
            states,
            start,
            clock,
            burst,
            interval: rate.interval(),
        })
    }

    /// Takes one cell for `key`: `Ok(remaining)` or `Err(wait until one is free)`.
    pub fn check(&self, key: &Arc<str>) -> Result<u32, Duration> {
        match self.limiter.check_key(key) {
            Ok(snapshot) => Ok(snapshot.remaining_burst_capacity()),
            Err(not_until) => Err(not_until.wait_time_from(self.clock.now())),
        }
    }

    /// One request of a replica's `share` of the limit: it takes `share` cells (at most the
    /// burst), so the key admits 1/`share` of the rate and of the burst, on the same state
    /// whatever the share was before. Remaining is in requests of that share.
    pub fn check_share(&self, key: &Arc<str>, share: u32) -> Result<u32, Duration> {
        let Some(n) = std::num::NonZeroU32::new(share.min(self.burst)).filter(|n| n.get() > 1)
        else {
            return self.check(key);
        };
        match self.limiter.check_key_n(key, n) {
            Ok(Ok(snapshot)) => Ok(snapshot.remaining_burst_capacity() / n.get()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.clock.now())),
            // Not reached: `n` is at most the burst.
            Err(_) => Err(self.interval * n.get()),
        }
    }

    pub fn evict_idle(&self) {
        self.limiter.retain_recent();
    }

    /// Calls `each` with every tracked key's use now: (key, used share of the burst 0–1,
    /// requests remaining, time until the burst is whole again). Walks the keys one shard
    /// lock at a time; for the admin view and the scrape, never a request.
    pub fn usage(&self, mut each: impl FnMut(&Arc<str>, f64, u64, Duration)) {
        let now = self.clock.now().duration_since(self.start).as_u64();
        let cell = u64::try_from(self.interval.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let burst = u64::from(self.burst.max(1));
        for entry in self.states.iter() {
            let tat = entry.value().load(Ordering::Relaxed);
            if tat == EMPTY {
                continue;
            }
            let ahead = tat.saturating_sub(now);
            let used = ahead.div_ceil(cell).min(burst);
            each(
                entry.key(),
                used as f64 / burst as f64,
                burst - used,
                Duration::from_nanos(ahead),
            );
        }
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A token bucket per key. The bucket may go into debt when a request used more tokens
/// than estimated, which delays that key's next requests: over time, admitted tokens follow
/// the configured rate.
pub struct TokenStore<C: Clock> {
    map: DashMap<Arc<str>, Bucket>,
    /// Entries in `map`: `DashMap::len` would lock every shard on every request.
    count: AtomicUsize,
    clock: C,
    start: C::Instant,
    /// Tokens per nanosecond.
    rate: f64,
    pub capacity: f64,
    max_keys: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    balance: f64,
    at: u64,
}

impl<C: Clock> TokenStore<C> {
    pub fn new(rate: Rate, max_keys: usize, clock: C) -> Self {
        let start = clock.now();
        TokenStore {
            map: DashMap::new(),
            count: AtomicUsize::new(0),
            clock,
            start,
            rate: f64::from(rate.count) / rate.per.as_nanos() as f64,
            capacity: f64::from(rate.count),
            max_keys,
        }
    }

    fn now(&self) -> u64 {
        self.clock.now().duration_since(self.start).as_u64()
    }

    fn refill(&self, b: &mut Bucket, now: u64) {
        let elapsed = now.saturating_sub(b.at) as f64;
        b.balance = (b.balance + elapsed * self.rate).min(self.capacity);
        b.at = now;
    }

    /// Reserves `tokens`: `Ok(remaining after the reservation)`, or `Err((wait until they
    /// are available, remaining now))`.
    pub fn reserve(&self, key: &Arc<str>, tokens: u64) -> Result<u64, (Duration, u64)> {
        let now = self.now();
        let mut b = capped_entry(&self.map, &self.count, self.max_keys, key, || Bucket {
            balance: self.capacity,
            at: now,
        });
        self.refill(&mut b, now);
        let want = (tokens as f64).min(self.capacity);
        if b.balance >= want {
            b.balance -= tokens as f64;
            Ok(b.balance.max(0.0) as u64)
        } else {
            let missing = want - b.balance;
            Err((
                Duration::from_nanos((missing / self.rate).ceil() as u64),
                b.balance.max(0.0) as u64,
            ))
        }
    }

    /// Corrects a reservation once the real usage is known (refund or extra charge).
    pub fn settle(&self, key: &Arc<str>, reserved: u64, used: u64) {
        if let Some(mut b) = self
            .map
            .get_mut(key)
            .or_else(|| self.map.get_mut(OVERFLOW_KEY))
        {
            b.balance += reserved as f64 - used as f64;
            b.balance = b.balance.min(self.capacity);
        }
    }

    /// Calls `each` with every tracked key's use now: (key, used share of the bucket 0–1,
    /// tokens remaining, time until the bucket is full again). For the admin view and the
    /// scrape, never a request.
    pub fn usage(&self, mut each: impl FnMut(&Arc<str>, f64, u64, Duration)) {
        let now = self.now();
        for entry in self.map.iter() {
            let mut b = *entry.value();
            self.refill(&mut b, now);
            let remaining = b.balance.max(0.0) as u64;
            let used = ((self.capacity - b.balance) / self.capacity.max(1.0)).clamp(0.0, 1.0);
            each(entry.key(), used, remaining, self.reset_after(remaining));
        }
    }

    /// Seconds until a key's bucket is full again.
    pub fn reset_after(&self, remaining: u64) -> Duration {
        let missing = (self.capacity - remaining as f64).max(0.0);
        Duration::from_nanos((missing / self.rate) as u64)
    }

    pub fn evict_idle(&self) {
        let now = self.now();
        self.map.retain(|_, b| {
            let elapsed = now.saturating_sub(b.at) as f64;
            let keep = b.balance + elapsed * self.rate < self.capacity;
            if !keep {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Requests in flight per key; a key with none in flight takes no memory.
pub struct ConcurrencyStore {
    map: DashMap<Arc<str>, u32>,
    /// Entries in `map` (see [`TokenStore`]'s).
    count: AtomicUsize,
    pub max: u32,
    max_keys: usize,
}

impl ConcurrencyStore {
    pub fn new(max: u32, max_keys: usize) -> Self {
        ConcurrencyStore {
            map: DashMap::new(),
            count: AtomicUsize::new(0),
            max,
            max_keys,
        }
    }

    /// Takes a slot, returning the key it was taken under (for the release).
    pub fn acquire(&self, key: &Arc<str>) -> Option<Arc<str>> {
        self.acquire_within(key, self.max)
    }

    /// [`ConcurrencyStore::acquire`] with at most `max` in flight (a replica's share).
    pub fn acquire_within(&self, key: &Arc<str>, max: u32) -> Option<Arc<str>> {
        let mut n = capped_entry(&self.map, &self.count, self.max_keys, key, || 0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Arc::clone(n.key()))
    }

    pub fn release(&self, key: &Arc<str>) {
        let removed = self.map.remove_if_mut(key, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
        if removed.is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Calls `each` with every key that has requests in flight, and how many.
    pub fn usage(&self, mut each: impl FnMut(&Arc<str>, u32)) {
        for entry in self.map.iter() {
            each(entry.key(), *entry.value());
        }
    }

    pub fn in_flight(&self, key: &str) -> u32 {
        self.map.get(key).map_or(0, |n| *n)
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// The key counts the caps rely on follow inserts, releases and evictions.
    #[test]
    fn key_counts_follow_the_maps() {
        let conc = ConcurrencyStore::new(1000, 10);
        let clock = governor::clock::FakeRelativeClock::default();
        let rate = Rate {
            count: 1000,
            per: Duration::from_secs(60),
        };
        let tokens = TokenStore::new(rate, 10, clock.clone());
        let mut held = Vec::new();
        for i in 0..100 {
            let k: Arc<str> = Arc::from(format!("k{i}"));
            held.push(conc.acquire(&k).unwrap());
            assert!(tokens.reserve(&k, 5).is_ok());
        }
        // Ten keys and the shared overflow key, in both stores.
        assert_eq!((conc.len(), conc.map.len()), (11, 11));
        assert_eq!((tokens.len(), tokens.map.len()), (11, 11));
        for k in &held {
            conc.release(k);
        }
        assert_eq!((conc.len(), conc.map.len()), (0, 0));
        clock.advance(Duration::from_secs(60));
        tokens.evict_idle();
        assert_eq!((tokens.len(), tokens.map.len()), (0, 0));
    }

    /// A replica's share of a request rate: 1/share of the burst, on state that a changed
    /// share keeps.
    #[test]
    fn a_share_of_the_rate_takes_share_cells() {
        let clock = governor::clock::FakeRelativeClock::default();
        let rate = Rate {
            count: 30,
            per: Duration::from_secs(3600),
        };
        let store = RequestStore::new(rate, 30, 10, clock.clone()).unwrap();
        let admitted = |key: &str, share: u32| {
            let k: Arc<str> = Arc::from(key);
            (0..40)
                .filter(|_| store.check_share(&k, share).is_ok())
                .count()
        };
        assert_eq!(admitted("a", 3), 10);
        assert_eq!(admitted("b", 2), 15);
        assert_eq!(admitted("c", 1), 30);
        // A share above the burst admits one request per burst's worth of time.
        assert_eq!(admitted("d", 100), 1);
        // Key a spent its whole bucket: a smaller share does not refill it.
        assert_eq!(admitted("a", 2), 0);
        let k: Arc<str> = Arc::from("e");
        assert_eq!(
            store.check_share(&k, 3),
            Ok(9),
            "remaining, in requests of the share"
        );
        // Refused: the wait is until `share` cells are free again (2 min each).
        assert_eq!(admitted("e", 3), 9);
        assert_eq!(
            store.check_share(&k, 3),
            Err(Duration::from_secs(360)),
            "three cells of two minutes"
        );
    }

    #[test]
    fn a_share_of_the_concurrency() {
        let conc = ConcurrencyStore::new(6, 10);
        let k: Arc<str> = Arc::from("k");
        assert!(conc.acquire_within(&k, 2).is_some());
        assert!(conc.acquire_within(&k, 2).is_some());
        assert!(conc.acquire_within(&k, 2).is_none());
        assert!(
            conc.acquire_within(&k, 3).is_some(),
            "a larger share has room"
        );
        assert_eq!(conc.in_flight("k"), 3);
    }
}

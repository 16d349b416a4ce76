//! One unit (requests or tokens) of one key and model's quota, as ezgate pictures it between
//! the upstream's responses: a bucket of `limit` that refills continuously at the learned
//! rate, drained by what ezgate forwards and corrected by each response's `remaining`.
//!
//! The correction: a response to request X says what remained when the upstream counted X;
//! what ezgate forwarded after X is not in it yet. So the picture becomes `remaining` minus
//! what was taken since X's own take ([`Gauge::taken`] is the running total, X's ticket holds
//! its value after X). No refill is credited for the time since the upstream counted X (ezgate
//! cannot know when that was): the picture errs low by the refill of one round trip, a
//! constant, never a rate.

use std::time::{Duration, Instant};

use super::shared::UnitMirror;
use super::Part;

/// Without a usable measurement of the refill rate: the whole limit per minute (the
/// window OpenAI-compatible quotas are stated in).
const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// A deficit smaller than this share of the limit (or one unit) says too little of the
/// rate: the last rate stays.
const MIN_DEFICIT_SHARE: f64 = 0.01;

/// Resets shorter than this are rounded too coarsely to measure a rate by.
const MIN_RESET: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gauge {
    pub limit: u64,
    /// What the picture holds at `at`; below zero when more was forwarded than remained.
    level: f64,
    /// Refill per second.
    rate: f64,
    at: Instant,
    /// Everything ever taken (a give-back does not lower it, so a correction never counts
    /// too little as forwarded since a mark: the picture errs low, never high): the mark a ticket
    /// keeps to correct the picture with its response.
    pub taken: u64,
    /// Held empty until then (an upstream 429 without readable headers).
    empty_until: Option<Instant>,
}

impl Gauge {
    /// The first picture of a unit, from one response.
    pub fn learned(part: Part, now: Instant) -> Gauge {
        Gauge {
            limit: part.limit,
            level: part.remaining as f64,
            rate: measured_rate(part).unwrap_or_else(|| default_rate(part.limit)),
            at: now,
            taken: 0,
            empty_until: None,
        }
    }

    /// The fleet's picture of a unit as Redis replied it (`store = "redis"`).
    pub fn mirrored(m: UnitMirror, now: Instant) -> Gauge {
        let limit = m.limit as f64;
        Gauge {
            limit: m.limit,
            level: if m.level.is_finite() {
                m.level.clamp(-limit, limit)
            } else {
                0.0
            },
            rate: if m.rate.is_finite() && m.rate > 0.0 {
                m.rate
            } else {
                default_rate(m.limit)
            },
            at: now,
            taken: 0,
            empty_until: (m.held > Duration::ZERO).then(|| now + m.held),
        }
    }

    /// Keeps `share` of the unit (this gateway's part of the fleet's picture).
    pub fn scale(&mut self, share: f64, now: Instant) {
        self.settle(now);
        self.limit = ((self.limit as f64 * share).floor() as u64).max(1);
        self.level *= share;
        self.rate *= share;
    }

    /// What the picture holds at `now` (refilled, capped at the limit).
    pub fn level(&self, now: Instant) -> f64 {
        if self.empty_until.is_some_and(|t| now < t) {
            return self.level.min(0.0);
        }
        let since = match self.empty_until {
            Some(t) if t > self.at => t,
            _ => self.at,
        };
        let refilled = self.level + self.rate * now.saturating_duration_since(since).as_secs_f64();
        refilled.min(self.limit as f64)
    }

    #[cfg(test)]
    pub fn rate(&self) -> f64 {
        self.rate
    }

    fn settle(&mut self, now: Instant) {
        self.level = self.level(now);
        self.at = now;
        if self.empty_until.is_some_and(|t| now >= t) {
            self.empty_until = None;
        }
    }

    /// Whether `cost` can be taken leaving at least `floor` (a share of the limit).
    pub fn carries(&self, cost: u64, floor: f64, now: Instant) -> bool {
        self.level(now) - cost as f64 >= floor * self.limit as f64
    }

    /// Whether `cost` can ever be taken leaving `floor`: not when it is more than the
    /// limit above the floor.
    pub fn could_carry(&self, cost: u64, floor: f64) -> bool {
        cost as f64 <= self.limit as f64 * (1.0 - floor)
    }

    /// Takes `cost`; returns the mark after it.
    pub fn take(&mut self, cost: u64, now: Instant) -> u64 {
        self.settle(now);
        self.level -= cost as f64;
        self.taken = self.taken.wrapping_add(cost);
        self.taken
    }

    /// Gives back what a request took and never forwarded.
    pub fn give_back(&mut self, cost: u64, now: Instant) {
        self.settle(now);
        self.level = (self.level + cost as f64).min(self.limit as f64);
    }

    /// How long until `need` above `floor` is there (zero when it is now), as if the bucket
    /// could hold it (a need beyond the limit counts the windows it spans); `None` when
    /// nothing refills.
    pub fn wait_for(&self, need: u64, floor: f64, now: Instant) -> Option<Duration> {
        let target = need as f64 + floor * self.limit as f64;
        let level = self.level(now);
        if level >= target {
            return Some(Duration::ZERO);
        }
        if self.rate <= 0.0 {
            return None;
        }
        // Held empty: nothing refills until the hold ends.
        let blocked = self
            .empty_until
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        let secs = (target - level) / self.rate;
        Some(blocked + Duration::from_secs_f64(secs.min(86_400.0)))
    }

    /// Takes what a response said. `mark` is the running total right after the request's
    /// own take (`None` when it took nothing from this picture): then the response may only
    /// lower the picture, as ezgate cannot tell what it already counts.
    pub fn correct(&mut self, part: Part, mark: Option<u64>, now: Instant) {
        self.settle(now);
        if let Some(rate) = measured_rate(part) {
            self.rate = rate;
        } else if part.limit != self.limit {
            self.rate = self.rate * part.limit as f64 / self.limit.max(1) as f64;
            if self.rate <= 0.0 {
                self.rate = default_rate(part.limit);
            }
        }
        self.limit = part.limit;
        let remaining = part.remaining as f64;
        self.level = match mark {
            // A mark from before the running total restarted (a picture rebuilt from Redis
            // or after eviction) says nothing: no more taken since than what it shows.
            Some(m) => remaining - self.taken.saturating_sub(m) as f64,
            None => self.level.min(remaining),
        }
        .clamp(-(self.limit as f64), self.limit as f64);
    }

    /// An upstream 429 that said nothing readable: empty until `until`.
    pub fn hold_empty(&mut self, until: Instant, now: Instant) {
        self.settle(now);
        self.level = self.level.min(0.0);
        self.empty_until = Some(self.empty_until.map_or(until, |t| t.max(until)));
    }
}

/// The refill rate a reading shows: its deficit made up over its reset.
fn measured_rate(p: Part) -> Option<f64> {
    let deficit = p.limit.saturating_sub(p.remaining) as f64;
    let enough = (p.limit as f64 * MIN_DEFICIT_SHARE).max(1.0);
    (deficit >= enough && p.reset >= MIN_RESET).then(|| deficit / p.reset.as_secs_f64())
}

fn default_rate(limit: u64) -> f64 {
    limit as f64 / DEFAULT_WINDOW.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(limit: u64, remaining: u64, reset_ms: u64) -> Part {
        Part {
            limit,
            remaining,
            reset: Duration::from_millis(reset_ms),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn refills_at_the_learned_rate_up_to_the_limit() {
        let t0 = Instant::now();
        // 60 of 100 spent, whole again in 6 s: 10 per second.
        let g = Gauge::learned(part(100, 40, 6_000), t0);
        assert!((g.rate() - 10.0).abs() < 1e-9);
        assert!((g.level(t0 + ms(1_000)) - 50.0).abs() < 1e-9);
        assert!((g.level(t0 + ms(60_000)) - 100.0).abs() < 1e-9);
        // Nothing spent says nothing of the rate: the limit per minute.
        let g = Gauge::learned(part(600, 600, 0), t0);
        assert!((g.rate() - 10.0).abs() < 1e-9);
    }

    #[test]
    fn takes_keep_the_floor_and_say_how_long_to_wait() {
        let t0 = Instant::now();
        let mut g = Gauge::learned(part(100, 40, 6_000), t0);
        assert!(g.carries(30, 0.05, t0));
        assert!(!g.carries(36, 0.05, t0));
        assert_eq!(g.take(30, t0), 30);
        // 10 left, 25 needed above a floor of 5: 2 s at 10/s.
        assert_eq!(g.wait_for(20, 0.05, t0), Some(ms(1_500)));
        assert!(g.carries(20, 0.05, t0 + ms(1_500)));
        // More than the limit above the floor: never carried, though time is finite.
        assert_eq!(g.wait_for(96, 0.05, t0), Some(ms(9_100)));
        assert!(!g.could_carry(96, 0.05));
        g.give_back(30, t0);
        assert_eq!(g.taken, 30, "a give-back never lowers the running total");
        assert!((g.level(t0) - 40.0).abs() < 1e-9);
    }

    #[test]
    fn a_response_corrects_by_what_was_forwarded_after_it() {
        let t0 = Instant::now();
        let mut g = Gauge::learned(part(100, 100, 0), t0);
        let x = g.take(10, t0);
        g.take(5, t0);
        g.take(5, t0);
        // The upstream counted X (and 30 from elsewhere): 60 left when it did.
        g.correct(part(100, 60, 4_000), Some(x), t0 + ms(5));
        // The two takes after X are not in it.
        assert!((g.level(t0 + ms(5)) - 50.0).abs() < 1e-9);
        assert!((g.rate() - 10.0).abs() < 1e-9);
        // A late answer to a request that took nothing only lowers the picture.
        g.correct(part(100, 90, 1_000), None, t0 + ms(5));
        assert!((g.level(t0 + ms(5)) - 50.0).abs() < 1e-9);
        g.correct(part(100, 20, 8_000), None, t0 + ms(5));
        assert!((g.level(t0 + ms(5)) - 20.0).abs() < 1e-9);
    }

    #[test]
    fn a_mark_from_before_a_rebuilt_picture_counts_nothing_taken_since() {
        let t0 = Instant::now();
        let mut g = Gauge::learned(part(100, 100, 0), t0);
        // The running total restarted (a picture rebuilt from Redis): a mark of 50 from the
        // old one is ahead of it; it must not wrap into an enormous debt.
        g.correct(part(100, 40, 6_000), Some(50), t0);
        assert!((g.level(t0) - 40.0).abs() < 1e-9, "{}", g.level(t0));
    }

    #[test]
    fn follows_a_changed_limit() {
        let t0 = Instant::now();
        let mut g = Gauge::learned(part(100, 50, 5_000), t0);
        let x = g.take(1, t0);
        // Raised to 1000 with nothing to measure by: the rate scales with the limit.
        g.correct(part(1000, 999, 0), Some(x), t0);
        assert_eq!(g.limit, 1000);
        assert!((g.rate() - 100.0).abs() < 1e-9);
        // Lowered: the picture never holds more than the limit.
        g.correct(part(10, 10, 0), Some(x), t0);
        assert!(g.level(t0) <= 10.0);
    }

    #[test]
    fn held_empty_until_a_429_passes() {
        let t0 = Instant::now();
        let mut g = Gauge::learned(part(100, 100, 0), t0);
        g.hold_empty(t0 + ms(2_000), t0);
        assert!(!g.carries(1, 0.0, t0 + ms(1_999)));
        assert_eq!(g.wait_for(10, 0.0, t0), Some(ms(2_000) + ms(6_000)));
        // Refills from the end of the hold.
        assert!((g.level(t0 + ms(3_000)) - 100.0 / 60.0).abs() < 1e-6);
    }
}

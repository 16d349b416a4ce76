//! One budget's accounts for the current period: per key, what was spent (settled) and what
//! requests in flight hold (reserved), in nano-units of the currency (billionths; integers,
//! so sums are exact and the same on every replica).
//!
//! A request is admitted when its maximum cost fits beside what is spent and reserved
//! ([`Ledger::reserve`]); when it ends, its reservation is replaced by what it actually cost
//! ([`Ledger::settle`]; an upstream error or a refusal by another policy settles at 0). A
//! budget is then never overshot by more than requests in flight spend beyond their
//! reservations (an estimate that was low). A new period starts every account at zero; a
//! reservation made in the previous one settles into nothing.

use std::collections::HashMap;
use std::sync::Arc;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::period::{window, Period, Window};

pub use crate::config::Amount;

/// The most keys one budget tracks in a period (keys come from requests: API keys, headers).
/// An account leaves the table when it holds nothing (no spend, no reservation), so only
/// keys that spent money this period fill it.
pub const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub spent: Amount,
    pub reserved: Amount,
    /// How many of the budget's `warn_at` shares `spent` has crossed.
    pub warned: u8,
}

/// What a request's admission holds until it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub key: Arc<str>,
    /// The period's id, shared with the ledger's window (no allocation per request).
    pub window: Arc<str>,
    pub amount: Amount,
}

/// Why a request does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Its maximum cost is more than what is left until `next_period`.
    Exceeded {
        left: Amount,
        next_period: Timestamp,
    },
    /// [`MAX_KEYS`] keys already have an account this period (until `next_period`).
    Full { next_period: Timestamp },
    /// A `store = "redis"` budget's Redis does not answer, the account was never seen
    /// before, and `redis.on_failure = "deny"`.
    Unshared { error: String },
}

/// A `warn_at` share that an account's spend crossed.
#[derive(Debug, Clone, PartialEq)]
pub struct Crossed {
    pub key: Arc<str>,
    pub share: f64,
    pub spent: Amount,
}

pub struct Ledger {
    amount: Amount,
    /// Shares of `amount`, ascending.
    warn_at: Vec<f64>,
    period: Period,
    tz: TimeZone,
    window: Window,
    accounts: HashMap<Arc<str>, Account>,
}

/// The accounts of one period, as written to the state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Saved {
    pub window: String,
    /// What the accounts are of (`team`, `client`, `api_key`, `header:<name>`, `global`):
    /// accounts of another key are not restored. Absent in files that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub accounts: Vec<(String, Amount)>,
}

impl Ledger {
    pub fn new(
        amount: Amount,
        mut warn_at: Vec<f64>,
        period: Period,
        tz: TimeZone,
        now: Timestamp,
    ) -> Result<Ledger, String> {
        warn_at.sort_by(f64::total_cmp);
        let window = window(period, &tz, now)?;
        Ok(Ledger {
            amount,
            warn_at,
            period,
            tz,
            window,
            accounts: HashMap::new(),
        })
    }

    /// The current period's window, rolled over to `now` first.
    pub fn window(&mut self, now: Timestamp) -> &Window {
        self.roll(now);
        &self.window
    }

    fn roll(&mut self, now: Timestamp) {
        if now < self.window.end {
            return;
        }
        if let Ok(w) = window(self.period, &self.tz, now) {
            self.window = w;
            self.accounts.clear();
        }
    }

    /// Admits `max_cost` for `key`, or says why not (the account is left as it was).
    pub fn reserve(
        &mut self,
        key: &Arc<str>,
        max_cost: Amount,
        now: Timestamp,
    ) -> Result<Reservation, Refusal> {
        self.hold(key, max_cost, now, false)
    }

    /// Holds `max_cost` for `key` whether or not it fits (a budget in shadow mode counts
    /// what it would have refused); says whether it would have been refused.
    pub fn force(
        &mut self,
        key: &Arc<str>,
        max_cost: Amount,
        now: Timestamp,
    ) -> (Reservation, Option<Refusal>) {
        let refusal = self.fits(key, max_cost, now).err();
        match self.hold(key, max_cost, now, true) {
            Ok(r) => (r, refusal),
            // Only a full table refuses a forced hold: nothing is held, and nothing settles.
            Err(full) => (
                Reservation {
                    key: Arc::clone(key),
                    window: Arc::from(""),
                    amount: 0,
                },
                Some(full),
            ),
        }
    }

    /// Whether `max_cost` fits `key`'s account now.
    fn fits(&mut self, key: &Arc<str>, max_cost: Amount, now: Timestamp) -> Result<(), Refusal> {
        self.roll(now);
        let a = self.accounts.get(key).copied().unwrap_or_default();
        let left = self
            .amount
            .saturating_sub(a.spent.saturating_add(a.reserved));
        if max_cost > left {
            return Err(Refusal::Exceeded {
                left,
                next_period: self.window.end,
            });
        }
        Ok(())
    }

    fn hold(
        &mut self,
        key: &Arc<str>,
        max_cost: Amount,
        now: Timestamp,
        anyway: bool,
    ) -> Result<Reservation, Refusal> {
        self.roll(now);
        if !self.accounts.contains_key(key) && self.accounts.len() >= MAX_KEYS {
            return Err(Refusal::Full {
                next_period: self.window.end,
            });
        }
        // A refusal leaves no account behind: refused requests with ever new keys (header
        // values) must not fill the budget's accounts and lock new keys out.
        let held = self
            .accounts
            .get(key)
            .map_or(0, |a| a.spent.saturating_add(a.reserved));
        let left = self.amount.saturating_sub(held);
        if max_cost > left && !anyway {
            return Err(Refusal::Exceeded {
                left,
                next_period: self.window.end,
            });
        }
        let a = self.accounts.entry(Arc::clone(key)).or_default();
        a.reserved = a.reserved.saturating_add(max_cost);
        Ok(Reservation {
            key: Arc::clone(key),
            window: Arc::clone(&self.window.id),
            amount: max_cost,
        })
    }

    /// A reload's new amount and warning shares; the period's spend stays.
    pub fn configure(&mut self, amount: Amount, mut warn_at: Vec<f64>) {
        warn_at.sort_by(f64::total_cmp);
        self.amount = amount;
        self.warn_at = warn_at;
        for a in self.accounts.values_mut() {
            a.warned = crossed(&self.warn_at, self.amount, a.spent);
        }
    }

    /// The amount each account may spend per period.
    pub fn amount(&self) -> Amount {
        self.amount
    }

    /// How many accounts the period has.
    pub fn len(&mut self, now: Timestamp) -> usize {
        self.roll(now);
        self.accounts.len()
    }

    /// Replaces a reservation by what the request cost; returns the `warn_at` shares its
    /// account crossed. A reservation of a period that has ended settles into nothing.
    pub fn settle(&mut self, r: Reservation, actual: Amount, now: Timestamp) -> Vec<Crossed> {
        self.roll(now);
        if r.window != self.window.id {
            return Vec::new();
        }
        let Some(a) = self.accounts.get_mut(&r.key) else {
            return Vec::new();
        };
        a.reserved = a.reserved.saturating_sub(r.amount);
        a.spent = a.spent.saturating_add(actual);
        if a.spent == 0 && a.reserved == 0 {
            // An account that holds nothing takes no room: only money spent fills the table.
            self.accounts.remove(&r.key);
            return Vec::new();
        }
        let mut crossed = Vec::new();
        while let Some(&share) = self.warn_at.get(usize::from(a.warned)) {
            if (a.spent as f64) < share * self.amount as f64 {
                break;
            }
            a.warned += 1;
            crossed.push(Crossed {
                key: Arc::clone(&r.key),
                share,
                spent: a.spent,
            });
        }
        crossed
    }

    /// What `key` spent and holds this period.
    pub fn account(&mut self, key: &str, now: Timestamp) -> Account {
        self.roll(now);
        self.accounts.get(key).copied().unwrap_or_default()
    }

    /// The accounts by spend, most first (at most `n`).
    pub fn top(&mut self, n: usize, now: Timestamp) -> Vec<(Arc<str>, Account)> {
        self.roll(now);
        let mut all: Vec<_> = self
            .accounts
            .iter()
            .map(|(k, a)| (Arc::clone(k), *a))
            .collect();
        all.sort_by(|a, b| b.1.spent.cmp(&a.1.spent).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// What to write down: the period and each account's spend (reservations are of
    /// requests in flight, which a restart ends).
    pub fn save(&mut self, now: Timestamp) -> Saved {
        self.roll(now);
        let mut accounts: Vec<_> = self
            .accounts
            .iter()
            .filter(|(_, a)| a.spent > 0)
            .map(|(k, a)| (k.to_string(), a.spent))
            .collect();
        accounts.sort();
        Saved {
            window: self.window.id.to_string(),
            key: None,
            accounts,
        }
    }

    /// Takes back what was written down, if it is of the current period (a previous
    /// period's spend is over and done with).
    pub fn restore(&mut self, saved: &Saved, now: Timestamp) {
        self.roll(now);
        if *saved.window != *self.window.id {
            return;
        }
        for (key, spent) in &saved.accounts {
            let a = self.accounts.entry(Arc::from(key.as_str())).or_default();
            a.spent = a.spent.max(*spent);
            a.warned = crossed(&self.warn_at, self.amount, a.spent);
        }
    }
}

/// How many of `warn_at` (ascending shares of `amount`) `spent` has reached.
fn crossed(warn_at: &[f64], amount: Amount, spent: Amount) -> u8 {
    let n = warn_at
        .iter()
        .take_while(|&&share| spent as f64 >= share * amount as f64)
        .count();
    u8::try_from(n).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOLLAR: Amount = 1_000_000_000;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn k(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn monthly(amount: Amount) -> Ledger {
        let utc = TimeZone::get("UTC").unwrap();
        Ledger::new(
            amount,
            vec![0.95, 0.8],
            Period::Month,
            utc,
            ts("2026-12-07T00:00:00Z"),
        )
        .unwrap()
    }

    #[test]
    fn reservations_hold_room_and_settlement_replaces_them() {
        let mut l = monthly(10 * DOLLAR);
        let now = ts("2026-12-07T06:00:00Z");
        let a = l.reserve(&k("search"), 6 * DOLLAR, now).unwrap();
        // 4 left while the first is in flight: a 5-dollar request does not fit.
        let e = l.reserve(&k("search"), 5 * DOLLAR, now).unwrap_err();
        assert_eq!(
            e,
            Refusal::Exceeded {
                left: 4 * DOLLAR,
                next_period: ts("2027-01-01T00:00:00Z")
            }
        );
        // Another key has its own account.
        assert!(l.reserve(&k("ads"), 10 * DOLLAR, now).is_ok());
        // The first cost 1.25: 8.75 left.
        let crossed = l.settle(a, 1_250_000_000, now);
        assert!(crossed.is_empty());
        let acct = l.account("search", now);
        assert_eq!((acct.spent, acct.reserved), (1_250_000_000, 0));
        assert!(l.reserve(&k("search"), 8_750_000_000, now).is_ok());
        assert!(l.reserve(&k("search"), 1, now).is_err());
    }

    #[test]
    fn a_refusal_or_an_error_costs_nothing_and_a_cut_stream_what_it_used() {
        let mut l = monthly(10 * DOLLAR);
        let now = ts("2026-12-07T06:00:00Z");
        let r = l.reserve(&k("k"), 3 * DOLLAR, now).unwrap();
        l.settle(r, 0, now);
        assert_eq!(l.account("k", now), Account::default());
        let r = l.reserve(&k("k"), 3 * DOLLAR, now).unwrap();
        l.settle(r, 400_000_000, now);
        assert_eq!(l.account("k", now).spent, 400_000_000);
    }

    #[test]
    fn refused_and_refunded_requests_leave_no_account_behind() {
        let mut l = monthly(DOLLAR);
        let now = ts("2026-12-07T06:00:00Z");
        for i in 0..1000 {
            assert!(l.reserve(&k(&format!("fp:{i}")), 2 * DOLLAR, now).is_err());
        }
        assert_eq!(l.len(now), 0);
        let r = l.reserve(&k("k"), DOLLAR / 2, now).unwrap();
        let held = l.reserve(&k("k"), DOLLAR / 4, now).unwrap();
        l.settle(r, 0, now);
        assert_eq!(l.len(now), 1, "a reservation still holds it");
        l.settle(held, 0, now);
        assert_eq!(l.len(now), 0);
        assert!(l.top(10, now).is_empty());
    }

    #[test]
    fn warnings_cross_once_each_in_order() {
        let mut l = monthly(10 * DOLLAR);
        let now = ts("2026-12-07T06:00:00Z");
        let r = l.reserve(&k("k"), 10 * DOLLAR, now).unwrap();
        let crossed = l.settle(r, 9_600_000_000, now);
        let shares: Vec<f64> = crossed.iter().map(|c| c.share).collect();
        assert_eq!(shares, [0.8, 0.95]);
        let r = l.reserve(&k("k"), 100_000_000, now).unwrap();
        assert!(l.settle(r, 100_000_000, now).is_empty());
    }

    #[test]
    fn a_new_period_starts_at_zero_and_old_reservations_settle_into_nothing() {
        let mut l = monthly(10 * DOLLAR);
        let dec = ts("2026-12-31T23:59:00Z");
        let r = l.reserve(&k("k"), 10 * DOLLAR, dec).unwrap();
        let jan = ts("2027-01-01T00:00:01Z");
        assert_eq!(&*l.window(jan).id, "2027-01");
        assert!(l.settle(r, 10 * DOLLAR, jan).is_empty());
        assert_eq!(l.account("k", jan), Account::default());
        assert!(l.reserve(&k("k"), 10 * DOLLAR, jan).is_ok());
    }

    #[test]
    fn saved_spend_comes_back_in_its_period_only() {
        let mut l = monthly(10 * DOLLAR);
        let now = ts("2026-12-07T06:00:00Z");
        let r = l.reserve(&k("k"), 9 * DOLLAR, now).unwrap();
        l.settle(r, 8_500_000_000, now);
        let saved = l.save(now);
        assert_eq!(saved.window, "2026-12");
        assert_eq!(saved.accounts, [("k".to_owned(), 8_500_000_000)]);
        let mut again = monthly(10 * DOLLAR);
        again.restore(&saved, now);
        assert_eq!(again.account("k", now).spent, 8_500_000_000);
        // Warnings already crossed are not raised again after a restart.
        let r = again.reserve(&k("k"), DOLLAR, now).unwrap();
        let crossed = again.settle(r, 100_000_000, now);
        assert_eq!(
            crossed.iter().map(|c| c.share).collect::<Vec<_>>(),
            Vec::<f64>::new()
        );
        let mut next_month = monthly(10 * DOLLAR);
        next_month.restore(&saved, ts("2027-01-02T00:00:00Z"));
        assert_eq!(next_month.account("k", ts("2027-01-02T00:00:00Z")).spent, 0);
    }

    #[test]
    fn keys_are_bounded() {
        let mut l = monthly(10 * DOLLAR);
        let now = ts("2026-12-07T06:00:00Z");
        for i in 0..MAX_KEYS {
            l.reserve(&k(&format!("k{i}")), 1, now).unwrap();
        }
        assert!(matches!(
            l.reserve(&k("one-more"), 1, now),
            Err(Refusal::Full { .. })
        ));
        assert!(l.reserve(&k("k7"), 1, now).is_ok());
        // A key that ends up spending nothing makes room again.
        let r = l.reserve(&k("k8"), 1, now).unwrap();
        let r8 = Reservation {
            amount: 2,
            ..r.clone()
        };
        l.settle(r, 0, now);
        l.settle(r8, 0, now);
        assert!(l.reserve(&k("one-more"), 1, now).is_ok());
    }

    #[test]
    fn shadow_holds_anyway_and_says_what_it_would_have_refused() {
        let mut l = monthly(10 * DOLLAR);
        let now = ts("2026-12-07T06:00:00Z");
        let (r, refused) = l.force(&k("k"), 6 * DOLLAR, now);
        assert!(refused.is_none());
        let (r2, refused) = l.force(&k("k"), 6 * DOLLAR, now);
        assert!(matches!(refused, Some(Refusal::Exceeded { left, .. }) if left == 4 * DOLLAR));
        l.settle(r, 6 * DOLLAR, now);
        l.settle(r2, 6 * DOLLAR, now);
        assert_eq!(l.account(&k("k"), now).spent, 12 * DOLLAR);
    }

    #[test]
    fn a_new_amount_keeps_the_spend_and_recounts_the_warnings() {
        let mut l = monthly(10 * DOLLAR);
        let now = ts("2026-12-07T06:00:00Z");
        let r = l.reserve(&k("k"), 9 * DOLLAR, now).unwrap();
        assert_eq!(l.settle(r, 9 * DOLLAR, now).len(), 1);
        l.configure(20 * DOLLAR, vec![0.8]);
        assert_eq!(l.account(&k("k"), now).spent, 9 * DOLLAR);
        assert_eq!(l.account(&k("k"), now).warned, 0);
        let r = l.reserve(&k("k"), 8 * DOLLAR, now).unwrap();
        assert_eq!(l.settle(r, 8 * DOLLAR, now).len(), 1);
    }
}

//! Accepted HTTP/2 streams that their client reset, counted per client address across all
//! of that address's connections. A client that reconnects after each GOAWAY would
//! otherwise make ezgate start an upstream request for every stream it opens and cancels;
//! beyond [`MAX_ADDRESS_RESETS`] within [`ADDRESS_RESET_WINDOW`], the address's streams are
//! refused for [`ADDRESS_PENALTY`] without going upstream.
//!
//! The table is bounded ([`MAX_ADDRESSES`]): addresses whose window is over and that are not
//! penalized are swept out when it is full; while it is still full, a new address is not
//! counted (its connections keep their own limit). IPv6 addresses count by their /64
//! prefix, which one host is usually given whole; IPv4-mapped IPv6 addresses as IPv4.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Accepted streams one address may reset within [`ADDRESS_RESET_WINDOW`], over all its
/// connections, before its new streams are refused. Generous: many clients behind one NAT
/// address cancelling now and then stay far below it.
pub const MAX_ADDRESS_RESETS: u32 = 1_000;
pub const ADDRESS_RESET_WINDOW: Duration = Duration::from_secs(10);
/// How long a penalized address's streams are refused.
pub const ADDRESS_PENALTY: Duration = Duration::from_secs(60);
/// Addresses tracked at once.
pub const MAX_ADDRESSES: usize = 10_000;
/// A full table is swept at most this often (a sweep walks every entry).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What one more reset means for its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Below the limit (or the address is not tracked).
    Below,
    /// This reset crossed the limit: the address is penalized from now on (log it once).
    PenaltyStarts,
    /// The address was penalized already.
    Penalized,
}

/// The counts of every tracked address.
pub struct AddressResets {
    table: Mutex<Table>,
    /// Penalties started so far: a connection that saw this change looks up its address.
    penalties: AtomicU64,
    max_resets: u32,
    window: Duration,
    penalty: Duration,
    capacity: usize,
}

struct Table {
    entries: HashMap<IpAddr, Entry>,
    last_sweep: Option<Instant>,
}

struct Entry {
    window_start: Instant,
    resets: u32,
    penalized_until: Option<Instant>,
}

impl Entry {
    fn penalized(&self, now: Instant) -> bool {
        self.penalized_until.is_some_and(|t| now < t)
    }

    /// Worth keeping: its window still counts, or its penalty still runs.
    fn live(&self, now: Instant, window: Duration) -> bool {
        self.penalized(now) || now.saturating_duration_since(self.window_start) <= window
    }
}

impl Default for AddressResets {
    fn default() -> Self {
        AddressResets::new(
            MAX_ADDRESS_RESETS,
            ADDRESS_RESET_WINDOW,
            ADDRESS_PENALTY,
            MAX_ADDRESSES,
        )
    }
}

impl AddressResets {
    pub fn new(
        max_resets: u32,
        window: Duration,
        penalty: Duration,
        capacity: usize,
    ) -> AddressResets {
        AddressResets {
            table: Mutex::new(Table {
                entries: HashMap::new(),
                last_sweep: None,
            }),
            penalties: AtomicU64::new(0),
            max_resets,
            window,
            penalty,
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `ip`'s streams are refused at `now`.
    pub fn penalized(&self, ip: IpAddr, now: Instant) -> bool {
        self.lock()
            .entries
            .get(&address_key(ip))
            .is_some_and(|e| e.penalized(now))
    }

    /// Counts one accepted stream of `ip` that its client reset at `now`.
    pub fn reset(&self, ip: IpAddr, now: Instant) -> Counted {
        let key = address_key(ip);
        let mut table = self.lock();
        if !table.entries.contains_key(&key) && table.entries.len() >= self.capacity {
            let due = table
                .last_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY);
            if !due {
                return Counted::Below;
            }
            table.last_sweep = Some(now);
            let window = self.window;
            table.entries.retain(|_, e| e.live(now, window));
            if table.entries.len() >= self.capacity {
                return Counted::Below;
            }
        }
        let entry = table.entries.entry(key).or_insert(Entry {
            window_start: now,
            resets: 0,
            penalized_until: None,
        });
        if entry.penalized(now) {
            return Counted::Penalized;
        }
        if now.saturating_duration_since(entry.window_start) > self.window {
            entry.window_start = now;
            entry.resets = 0;
            entry.penalized_until = None;
        }
        entry.resets = entry.resets.saturating_add(1);
        if entry.resets > self.max_resets {
            entry.penalized_until = Some(now + self.penalty);
            // The count starts afresh once the penalty is over.
            entry.window_start = now + self.penalty;
            entry.resets = 0;
            self.penalties.fetch_add(1, Ordering::Relaxed);
            return Counted::PenaltyStarts;
        }
        Counted::Below
    }

    /// How many penalties started so far (one atomic load): a connection whose address may
    /// have been penalized since it last looked.
    pub fn penalties(&self) -> u64 {
        self.penalties.load(Ordering::Relaxed)
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.lock().entries.len()
    }
}

/// The key an address counts under: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !u128::from(u64::MAX);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_over_its_resets_is_penalized_once_then_forgiven() {
        let r = AddressResets::new(3, Duration::from_secs(10), Duration::from_secs(60), 100);
        let t0 = Instant::now();
        let a = ip("192.0.2.7");
        for _ in 0..3 {
            assert_eq!(r.reset(a, t0), Counted::Below);
        }
        assert!(!r.penalized(a, t0));
        assert_eq!(r.penalties(), 0);
        assert_eq!(r.reset(a, t0), Counted::PenaltyStarts);
        assert_eq!(r.penalties(), 1);
        assert!(r.penalized(a, t0 + Duration::from_secs(59)));
        assert_eq!(
            r.reset(a, t0 + Duration::from_secs(1)),
            Counted::Penalized,
            "logged once per penalty, not per stream"
        );
        // Another address is not affected.
        assert!(!r.penalized(ip("192.0.2.8"), t0));
        // Over: the count starts afresh.
        let later = t0 + Duration::from_secs(61);
        assert!(!r.penalized(a, later));
        for _ in 0..3 {
            assert_eq!(r.reset(a, later), Counted::Below);
        }
    }

    #[test]
    fn resets_spread_over_windows_never_penalize() {
        let r = AddressResets::new(3, Duration::from_secs(10), Duration::from_secs(60), 100);
        let t0 = Instant::now();
        let a = ip("192.0.2.7");
        for i in 0..30u64 {
            // Three per window: a client that cancels now and then.
            let at = t0 + Duration::from_secs(11 * (i / 3));
            assert_eq!(r.reset(a, at), Counted::Below, "reset {i}");
        }
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            address_key(ip("2001:db8:1:2:aaaa::1")),
            address_key(ip("2001:db8:1:2:ffff:1:2:3"))
        );
        assert_ne!(
            address_key(ip("2001:db8:1:2::1")),
            address_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(address_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        let r = AddressResets::new(1, Duration::from_secs(10), Duration::from_secs(60), 100);
        let t0 = Instant::now();
        assert_eq!(r.reset(ip("2001:db8::1"), t0), Counted::Below);
        assert_eq!(r.reset(ip("2001:db8::2"), t0), Counted::PenaltyStarts);
        assert!(r.penalized(ip("2001:db8::ffff"), t0));
    }

    #[test]
    fn the_table_stays_bounded_and_sweeps_what_is_over() {
        let r = AddressResets::new(5, Duration::from_secs(10), Duration::from_secs(60), 4);
        let t0 = Instant::now();
        for i in 0..10u8 {
            r.reset(IpAddr::from([10, 0, 0, i]), t0);
        }
        assert_eq!(
            r.tracked(),
            4,
            "new addresses beyond the cap are not tracked"
        );
        // Their windows are over: a new address sweeps them out and is counted.
        let later = t0 + Duration::from_secs(11);
        r.reset(ip("10.0.1.1"), later);
        assert_eq!(r.tracked(), 1);
        // A penalized address survives sweeps.
        let p = ip("10.0.2.2");
        for _ in 0..6 {
            r.reset(p, later);
        }
        assert!(r.penalized(p, later));
        for i in 0..3u8 {
            r.reset(IpAddr::from([10, 0, 3, i]), later);
        }
        let much_later = later + Duration::from_secs(30);
        r.reset(ip("10.0.4.4"), much_later);
        assert!(r.penalized(p, much_later));
    }
}

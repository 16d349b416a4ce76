//! What an admitted request holds until it ends: concurrency slots and token reservations,
//! settled once with what the request spent.

use std::sync::Arc;

use governor::clock::Clock;
use http::header::{HeaderName, HeaderValue};

use super::shared::{SharedSlot, SharedTokens};
use super::store::{ConcurrencyStore, TokenStore};
use super::Verdicts;

/// Settles a token reservation; type-erased over the clock.
pub(super) trait Settle: Send + Sync {
    fn settle(&self, key: &Arc<str>, reserved: u64, used: u64);
}

impl<C: Clock + Send + Sync> Settle for TokenStore<C>
where
    C::Instant: Send + Sync,
{
    fn settle(&self, key: &Arc<str>, reserved: u64, used: u64) {
        TokenStore::settle(self, key, reserved, used);
    }
}

/// A concurrency slot held by a request.
pub(super) enum Slot {
    Local(Arc<ConcurrencyStore>, Arc<str>),
    /// Released by its own `Drop`.
    Shared(#[allow(dead_code, reason = "held for its Drop")] SharedSlot),
}

/// Tokens reserved for a request, settled when it ends.
pub(super) enum Reservation {
    /// The store, the key, the tokens reserved, and the share they were reserved for (the
    /// local fallback of a shared policy charges each token that many times; else 1).
    Local(Arc<dyn Settle>, Arc<str>, u64, u64),
    Shared(Arc<SharedTokens>, u64),
}

impl Reservation {
    /// The tokens reserved and not settled yet.
    fn reserved(&self) -> u64 {
        match self {
            Reservation::Local(_, _, reserved, _) | Reservation::Shared(_, reserved) => *reserved,
        }
    }

    fn settle(self, used: u64) {
        match self {
            Reservation::Local(store, key, reserved, share) => store.settle(
                &key,
                reserved.saturating_mul(share),
                used.saturating_mul(share),
            ),
            Reservation::Shared(tokens, reserved) => tokens.settle(reserved, used),
        }
    }

    /// Settles at `used` and stays open with nothing reserved: what comes later is charged
    /// on top.
    fn settle_part(&mut self, used: u64) {
        match self {
            Reservation::Local(store, key, reserved, share) => {
                store.settle(
                    key,
                    reserved.saturating_mul(*share),
                    used.saturating_mul(*share),
                );
                *reserved = 0;
            }
            Reservation::Shared(tokens, reserved) => {
                tokens.settle(*reserved, used);
                *reserved = 0;
            }
        }
    }
}

/// What an admitted request holds until it ends: concurrency slots and token reservations.
/// Token reservations are settled once, with [`Permit::settle`]; a permit dropped without
/// it (a refused request, a request that failed before reaching the upstream) gives every
/// token back.
#[derive(Default)]
pub struct Permit {
    pub(super) held: Vec<Held>,
    /// Tokens charged already by [`Permit::charge`] (a WebSocket session's usage reports).
    charged: u64,
}

/// One part of a permit (one allocation for all of a request's parts).
pub(super) enum Held {
    Slot(Slot),
    /// `None` once settled.
    Tokens(Option<Reservation>),
}

impl Permit {
    /// Settles every token reservation at `used` tokens (what the request spent: reported,
    /// or estimated when no report came). Concurrency slots are released when the permit
    /// drops.
    pub fn settle(mut self, used: u64) {
        let rest = used.saturating_sub(self.charged);
        for h in &mut self.held {
            if let Held::Tokens(r) = h {
                if let Some(r) = r.take() {
                    r.settle(rest);
                }
            }
        }
    }

    /// Charges the token reservations with `spent`, what the request spent so far, while it
    /// goes on (a WebSocket session, after each usage report): the first charge settles the
    /// reservation, later ones add what came since. [`Permit::settle`] then charges only
    /// what no charge counted.
    pub fn charge(&mut self, spent: u64) {
        let more = spent.saturating_sub(self.charged);
        if more == 0 && self.charged > 0 {
            return;
        }
        self.charged = self.charged.max(spent);
        for h in &mut self.held {
            if let Held::Tokens(Some(r)) = h {
                r.settle_part(more);
            }
        }
    }

    /// The largest token reservation no charge has settled yet (0 once one did): what a
    /// request holds while nothing it spent is known.
    pub fn reserved(&self) -> u64 {
        self.held
            .iter()
            .filter_map(|h| match h {
                Held::Tokens(Some(r)) => Some(r.reserved()),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// True when the permit holds a token reservation.
    pub fn reserves_tokens(&self) -> bool {
        self.held.iter().any(|h| matches!(h, Held::Tokens(Some(_))))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        for h in &mut self.held {
            match h {
                Held::Slot(Slot::Local(store, key)) => store.release(key),
                Held::Slot(Slot::Shared(_)) => {}
                // Not settled: nothing was spent.
                Held::Tokens(r) => {
                    if let Some(r) = r.take() {
                        r.settle(0);
                    }
                }
            }
        }
    }
}

/// The result of an admission: the permit, and the `RateLimit` headers of the tightest
/// policy for the response.
#[derive(Default)]
pub struct Admission {
    pub permit: Permit,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// The result of [`super::Limits::check`]: the admission or the refusal, and what each
/// policy decided (for the metrics, which the caller keeps).
pub struct Checked {
    pub result: Result<Admission, crate::errors::GatewayError>,
    pub verdicts: Verdicts,
}

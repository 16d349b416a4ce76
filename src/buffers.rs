//! The memory ceiling of buffered request bodies (`server.max_buffered_bytes`): one atomic
//! count of the bytes that all the bodies ezgate reads whole hold together. A body takes
//! bytes before it grows ([`Charge::take`]) and gives them all back when it is freed (its
//! [`Charge`] drops with the body sent upstream). No lock: one `fetch_add` per growth.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The bytes held by buffered request bodies, shared by every request.
#[derive(Debug, Default)]
pub struct Buffers {
    held: Arc<AtomicU64>,
}

impl Buffers {
    /// A charge of no bytes yet, for one body.
    pub fn charge(&self) -> Charge {
        Charge {
            held: Arc::clone(&self.held),
            bytes: 0,
        }
    }

    /// Bytes held right now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// What one body holds of the budget; given back when it drops.
#[derive(Debug)]
pub struct Charge {
    held: Arc<AtomicU64>,
    bytes: u64,
}

impl Charge {
    /// Takes `n` more bytes, unless that would put all bodies together over `max`.
    pub fn take(&mut self, n: u64, max: u64) -> bool {
        let before = self.held.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > max {
            self.held.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        self.bytes += n;
        true
    }

    /// Bytes this body holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.held.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_share_the_ceiling_and_give_back_when_dropped() {
        let buffers = Buffers::default();
        let mut a = buffers.charge();
        let mut b = buffers.charge();
        assert!(a.take(60, 100));
        assert!(!b.take(41, 100), "61 + 41 is over the ceiling");
        assert_eq!(buffers.held(), 60, "a refused take holds nothing");
        assert!(b.take(40, 100));
        assert_eq!(buffers.held(), 100);
        assert_eq!((a.bytes(), b.bytes()), (60, 40));
        drop(b);
        assert_eq!(buffers.held(), 60);
        assert!(a.take(40, 100));
        drop(a);
        assert_eq!(buffers.held(), 0);
    }
}

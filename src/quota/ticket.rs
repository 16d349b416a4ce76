//! What a paced request holds: its place in a queue while it waits ([`Place`], given up
//! when the client leaves), then its [`Ticket`] (what it took, given back when it is never
//! forwarded).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::time::Instant as Clock;

use super::fair::Slot;
use super::pace::Pacer;
use super::picture::{remove, Cost, Grant, Marks};
use crate::config::Priority;
use crate::errors::GatewayError;

/// A request's place in a queue: given up when it is dropped (its client left).
pub(super) struct Place<'a> {
    pub(super) pacer: &'a Arc<Pacer>,
    pub(super) key: &'a str,
    pub(super) model: &'a str,
    pub(super) id: u64,
    pub(super) priority: Priority,
    pub(super) cost: Cost,
    pub(super) rx: Option<oneshot::Receiver<Grant>>,
    pub(super) since: Instant,
}

impl Place<'_> {
    pub(super) async fn granted(&mut self) -> Option<Grant> {
        let rx = self.rx.as_mut()?;
        let grant = rx.await.ok();
        self.rx = None;
        self.leave();
        grant
    }

    /// Leaves the queue with `refusal` (its argument: the honest wait from here); if the
    /// grant came first, it is taken instead.
    pub(super) fn give_up(
        &mut self,
        refusal: impl FnOnce(Duration) -> GatewayError,
    ) -> Result<Grant, GatewayError> {
        let now = Clock::now().into_std();
        let mut inner = self.pacer.lock();
        let floor = inner.config.floor(self.priority);
        let wait = inner
            .picture_mut(self.key, self.model)
            .map(|pic| pic.estimate(self.priority, Slot::Waiting(self.id), self.cost, floor, now));
        if remove(&mut inner, self.key, self.model, self.id, self.priority) {
            drop(inner);
            self.rx = None;
            self.leave();
            self.pacer.wake.notify_one();
            return Err(refusal(wait.unwrap_or(Duration::ZERO)));
        }
        drop(inner);
        // Granted meanwhile: the grant is in the channel (sent under the lock).
        let grant = self.rx.take().and_then(|mut rx| rx.try_recv().ok());
        self.leave();
        Ok(grant.unwrap_or(Grant::Take(Marks::default())))
    }

    fn leave(&self) {
        let i = self.priority.index();
        self.pacer.metrics.queued[i].dec();
        let waited = Clock::now()
            .into_std()
            .saturating_duration_since(self.since);
        self.pacer.metrics.wait[i].observe(waited.as_secs_f64());
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        // The client left while waiting: its place is given up at once, and a grant that
        // raced in is given back.
        let mut inner = self.pacer.lock();
        let removed = remove(&mut inner, self.key, self.model, self.id, self.priority);
        drop(inner);
        if !removed {
            if let Ok(Grant::Take(marks)) = rx.try_recv() {
                self.pacer.give_back(self.key, self.model, self.cost, marks);
            }
        }
        self.leave();
        self.pacer.wake.notify_one();
    }
}

/// What a forwarded (or about to be forwarded) request took from the picture.
pub struct Ticket {
    pub(super) pacer: Arc<Pacer>,
    /// The key and model it took from (`None` when it took nothing).
    pub(super) pair: Option<(Arc<str>, Arc<str>)>,
    pub(super) cost: Cost,
    pub(super) marks: Marks,
    pub(super) forwarded: bool,
}

impl Ticket {
    /// The request goes upstream now: what it took stays taken.
    pub fn forwarded(&mut self) {
        self.forwarded = true;
    }

    pub fn marks(&self) -> Marks {
        self.marks
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.forwarded {
            return;
        }
        // Refused by a later check, or the client left before it was sent.
        if let Some((key, model)) = &self.pair {
            self.pacer.give_back(key, model, self.cost, self.marks);
        }
    }
}

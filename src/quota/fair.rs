//! The requests waiting for one key and model's quota: by priority, strictly, and within a
//! priority fairly between clients, in the tokens they ask for (not in requests).
//!
//! Fairness is start-time fair queuing (Goyal et al., the discipline Kubernetes' API
//! Priority and Fairness builds on): each client is a flow; a request's start tag is the
//! later of the priority's virtual time and its flow's last finish tag, its finish tag the
//! start plus its cost; the request with the least start tag goes first, and the virtual
//! time becomes that tag. A client that sends large requests reaches its share with fewer
//! of them; a client that was idle starts at the present, with no credit saved up.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::config::Priority;

struct Queued<T> {
    id: u64,
    start: f64,
    item: T,
}

#[derive(Default)]
struct Flow<T> {
    queue: VecDeque<Queued<T>>,
    last_finish: f64,
}

struct Level<T> {
    flows: HashMap<Arc<str>, Flow<T>>,
    vtime: f64,
    len: usize,
}

impl<T> Default for Level<T> {
    fn default() -> Self {
        Level {
            flows: HashMap::new(),
            vtime: 0.0,
            len: 0,
        }
    }
}

/// Waiting items, each with a flow (its client), a priority and a cost.
pub struct FairQueue<T> {
    levels: [Level<T>; 3],
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue {
            levels: Default::default(),
        }
    }
}

impl<T> FairQueue<T> {
    pub fn len(&self) -> usize {
        self.levels.iter().map(|l| l.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Items waiting at `p` or above it.
    pub fn waiting_at_or_above(&self, p: Priority) -> usize {
        self.levels[..=p.index()].iter().map(|l| l.len).sum()
    }

    pub fn push(&mut self, id: u64, flow: &Arc<str>, p: Priority, cost: u64, item: T) {
        let level = &mut self.levels[p.index()];
        let vtime = level.vtime;
        let f = level.flows.entry(Arc::clone(flow)).or_insert_with(|| Flow {
            queue: VecDeque::new(),
            last_finish: vtime,
        });
        let start = f.last_finish.max(vtime);
        f.last_finish = start + cost.max(1) as f64;
        f.queue.push_back(Queued { id, start, item });
        level.len += 1;
    }

    /// The next item: of the highest priority that has one, the least start tag.
    pub fn peek(&self) -> Option<(Priority, &T)> {
        let (p, flow) = self.head()?;
        let level = &self.levels[p.index()];
        let q = level.flows.get(flow)?.queue.front()?;
        Some((p, &q.item))
    }

    fn head(&self) -> Option<(Priority, &Arc<str>)> {
        Priority::ALL.into_iter().find_map(|p| {
            let level = &self.levels[p.index()];
            level
                .flows
                .iter()
                .filter_map(|(name, f)| f.queue.front().map(|q| (q.start, q.id, name)))
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
                .map(|(_, _, name)| (p, name))
        })
    }

    /// Removes and returns the next item.
    pub fn pop(&mut self) -> Option<T> {
        let (p, flow) = self.head()?;
        let flow = Arc::clone(flow);
        let level = &mut self.levels[p.index()];
        let f = level.flows.get_mut(&flow)?;
        let q = f.queue.pop_front()?;
        level.vtime = level.vtime.max(q.start);
        level.len -= 1;
        level.forget_idle();
        Some(q.item)
    }

    /// Removes item `id` (it gave up waiting); `None` when it is not here.
    pub fn remove(&mut self, id: u64, p: Priority) -> Option<T> {
        let level = &mut self.levels[p.index()];
        let (name, at) = level.flows.iter().find_map(|(name, f)| {
            f.queue
                .iter()
                .position(|q| q.id == id)
                .map(|at| (Arc::clone(name), at))
        })?;
        let f = level.flows.get_mut(&name)?;
        let q = f.queue.remove(at)?;
        if f.queue.is_empty() {
            // Its place is given up: the flow does not keep the tag it would have reached.
            f.last_finish = q.start.min(f.last_finish);
        }
        level.len -= 1;
        level.forget_idle();
        Some(q.item)
    }

    /// Every item that goes before `at`: all of the priorities above `p`, and those of `p`
    /// with an earlier start tag (for a request not queued yet, the tag it would get).
    pub fn ahead(&self, p: Priority, at: Slot<'_>) -> impl Iterator<Item = &T> {
        let level = &self.levels[p.index()];
        // (tag, whether an equal tag goes first)
        let limit = match at {
            Slot::Waiting(id) => level
                .flows
                .values()
                .flat_map(|f| f.queue.iter())
                .find(|q| q.id == id)
                .map(|q| (q.start, false)),
            Slot::New(flow) => Some((
                level
                    .flows
                    .get(flow)
                    .map_or(level.vtime, |f| f.last_finish.max(level.vtime)),
                true,
            )),
        };
        self.levels[..=p.index()]
            .iter()
            .enumerate()
            .flat_map(move |(i, level)| {
                level
                    .flows
                    .values()
                    .flat_map(|f| f.queue.iter())
                    .filter(move |q| {
                        i < p.index()
                            || limit.is_none_or(|(s, equal)| q.start < s || (equal && q.start == s))
                    })
                    .map(|q| &q.item)
            })
    }
}

/// Where a request stands in a [`FairQueue`], for what goes before it.
#[derive(Debug, Clone, Copy)]
pub enum Slot<'a> {
    /// Queued, with this id.
    Waiting(u64),
    /// Not queued yet; of this flow.
    New(&'a str),
}

impl<T> Level<T> {
    /// Drops flows with nothing waiting and no tag ahead of the virtual time (they would
    /// start at the present anyway): the map holds only clients that matter.
    fn forget_idle(&mut self) {
        let vtime = self.vtime;
        self.flows
            .retain(|_, f| !f.queue.is_empty() || f.last_finish > vtime);
        if self.len == 0 {
            self.flows.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn higher_priority_goes_first() {
        let mut q = FairQueue::default();
        q.push(1, &flow("b"), Priority::Batch, 10, "batch");
        q.push(2, &flow("i"), Priority::Interactive, 10, "interactive");
        q.push(3, &flow("c"), Priority::Critical, 10, "critical");
        assert_eq!(q.waiting_at_or_above(Priority::Interactive), 2);
        assert_eq!(q.peek().map(|(p, _)| p), Some(Priority::Critical));
        assert_eq!(q.pop(), Some("critical"));
        assert_eq!(q.pop(), Some("interactive"));
        assert_eq!(q.pop(), Some("batch"));
        assert_eq!(q.pop(), None);
        assert!(q.is_empty());
    }

    #[test]
    fn fair_in_cost_not_in_count() {
        // Two clients keep more waiting than will be served: one asks 100 a request,
        // the other 10.
        let mut q = FairQueue::default();
        let (big, small) = (flow("big"), flow("small"));
        let mut id = 0;
        for _ in 0..50 {
            id += 1;
            q.push(id, &big, Priority::Batch, 100, ("big", 100));
        }
        for _ in 0..500 {
            id += 1;
            q.push(id, &small, Priority::Batch, 10, ("small", 10));
        }
        // Serve 2,000 units of cost.
        let (mut served_big, mut served_small, mut spent) = (0, 0, 0);
        while spent < 2_000 {
            let Some((who, cost)) = q.pop() else { break };
            spent += cost;
            if who == "big" {
                served_big += cost;
            } else {
                served_small += cost;
            }
        }
        // About half each, in cost.
        assert!(
            (served_big as i64 - served_small as i64).abs() <= 110,
            "{served_big} vs {served_small}"
        );
    }

    #[test]
    fn an_idle_client_saves_no_credit() {
        let mut q = FairQueue::default();
        let (a, b) = (flow("a"), flow("b"));
        for id in 0..10 {
            q.push(id, &a, Priority::Interactive, 10, "a");
        }
        for _ in 0..5 {
            q.pop();
        }
        // b arrives now: it shares from the present on, it does not take 5 in a row.
        for id in 10..20 {
            q.push(id, &b, Priority::Interactive, 10, "b");
        }
        let next: Vec<_> = (0..4).filter_map(|_| q.pop()).collect();
        assert_eq!(next.iter().filter(|w| **w == "b").count(), 2, "{next:?}");
    }

    #[test]
    fn removed_items_leave_and_ahead_counts_those_before() {
        let mut q = FairQueue::default();
        let a = flow("a");
        q.push(1, &a, Priority::Interactive, 10, 1);
        q.push(2, &a, Priority::Interactive, 10, 2);
        q.push(3, &a, Priority::Interactive, 10, 3);
        q.push(4, &flow("c"), Priority::Critical, 10, 4);
        q.push(5, &flow("b"), Priority::Batch, 10, 5);
        let ahead: Vec<_> = q
            .ahead(Priority::Interactive, Slot::Waiting(3))
            .copied()
            .collect();
        assert_eq!(ahead.len(), 3, "{ahead:?}");
        // A new request of another client would start at the present: only the critical
        // one and the first of a go before it.
        let ahead: Vec<_> = q
            .ahead(Priority::Interactive, Slot::New("b"))
            .copied()
            .collect();
        assert_eq!(ahead.len(), 2, "{ahead:?}");
        // One of client a goes after all of a's.
        assert_eq!(q.ahead(Priority::Interactive, Slot::New("a")).count(), 4);
        assert_eq!(q.remove(2, Priority::Interactive), Some(2));
        assert_eq!(q.remove(2, Priority::Interactive), None);
        assert_eq!(q.len(), 4);
        assert_eq!(q.ahead(Priority::Batch, Slot::New("x")).count(), 4);
    }
}

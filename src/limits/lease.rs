//! The concurrency slots this gateway holds in Redis, kept true through outages.
//!
//! A slot is a member `<instance>-<n>` of the policy key's sorted set, scored by its lease
//! expiry on the Redis server's clock. One task per gateway ([`keep`]) does two things, one
//! at a time, so a release is never overtaken by a renewal of the same slot:
//!
//! * **renewal** — every third of `redis.concurrency_lease`, one script call per key for all
//!   of this gateway's live slots under it (the calls of all keys sent at once over the
//!   multiplexed connection). The script adds members that are missing, so after Redis
//!   restarted empty or failed over to a replica that missed the last writes, the slots come
//!   back within one period: a key's slots equal its requests in flight.
//! * **release** — a slot released when its request ends (or whose acquire got no reply: the
//!   script may have run) is queued; the task sends the queue as one `ZREM` per key. A release
//!   that fails stays queued and is retried with a backoff ([`RETRY_MIN`]..[`RETRY_MAX`])
//!   until Redis answers — at once when a check gets an answer ([`Leases::answered`]);
//!   `ZREM` is idempotent. The queue holds at most
//!   [`MAX_PENDING_RELEASES`]: a release dropped beyond it is not renewed either, so its slot
//!   expires with its lease.
//!
//! Nothing here holds a request: acquiring inserts into a map, releasing pushes to a queue.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::future::join_all;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::link::{Failure, Link};
use super::shared::{explain, run_script, Health, Script};

/// Renews this gateway's slots under KEYS[1]: each id in ARGV[2..] is (re)added with an
/// expiry ARGV[1] ms ahead. Returns the number of ids.
pub(super) const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + lease, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], lease)
return #ARGV - 1
";

/// Releases waiting for Redis at most; beyond, a slot is left to its lease.
pub const MAX_PENDING_RELEASES: usize = 16_384;
/// First wait before retrying failed releases; doubled up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(2);
/// Releases sent in one go (one `ZREM` per key among them).
const BATCH: usize = 1024;
/// Ids renewed by one script call; keys renewed at once.
const IDS_PER_CALL: usize = 1000;
const KEYS_AT_ONCE: usize = 256;

/// The slots this gateway holds in Redis and the releases not yet confirmed.
pub(super) struct Leases {
    /// This gateway's instance id: the prefix of its slot ids.
    instance: String,
    /// Slot number → its Redis key, while its request runs.
    live: DashMap<u64, Arc<str>>,
    pending: Mutex<Pending>,
    wake: Notify,
    /// Releases failed and wait for a retry.
    retrying: AtomicBool,
    /// A check got an answer while releases wait: retry now.
    answered: Notify,
}

#[derive(Default)]
struct Pending {
    queue: VecDeque<(Arc<str>, u64)>,
    /// Releases given up because the queue was full, since the last report.
    dropped: u64,
}

impl Leases {
    pub(super) fn new(instance: String) -> Leases {
        Leases {
            instance,
            live: DashMap::new(),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            retrying: AtomicBool::new(false),
            answered: Notify::new(),
        }
    }

    /// The member of the sorted set that is slot `n`.
    pub(super) fn id(&self, n: u64) -> String {
        format!("{}-{n}", self.instance)
    }

    /// Slot `n` was taken under `key`: renewed until released.
    pub(super) fn hold(&self, key: &Arc<str>, n: u64) {
        self.live.insert(n, Arc::clone(key));
    }

    /// Slot `n` under `key` is to be removed from Redis (it may not be there: idempotent).
    pub(super) fn release(&self, key: &Arc<str>, n: u64) {
        self.live.remove(&n);
        {
            let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if p.queue.len() >= MAX_PENDING_RELEASES {
                p.dropped += 1;
                return;
            }
            p.queue.push_back((Arc::clone(key), n));
        }
        self.wake.notify_one();
    }

    /// A check got an answer from Redis: releases that wait are retried now rather than at
    /// the end of their backoff. One relaxed load when none wait.
    pub(super) fn answered(&self) {
        if self.retrying.load(Ordering::Relaxed) {
            self.answered.notify_one();
        }
    }

    /// Releases queued and not yet confirmed.
    pub(super) fn pending(&self) -> usize {
        self.lock().queue.len()
    }

    /// Slots held by requests that run.
    #[cfg(test)]
    fn live(&self) -> usize {
        self.live.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take_batch(&self) -> Vec<(Arc<str>, u64)> {
        let mut p = self.lock();
        let n = p.queue.len().min(BATCH);
        p.queue.drain(..n).collect()
    }

    /// Puts releases that failed back at the head of the queue (oldest first); the newest
    /// are given up if that overfills it.
    fn requeue(&self, failed: Vec<(Arc<str>, u64)>) {
        let mut p = self.lock();
        for item in failed.into_iter().rev() {
            p.queue.push_front(item);
        }
        let over = p.queue.len().saturating_sub(MAX_PENDING_RELEASES);
        if over > 0 {
            let keep = MAX_PENDING_RELEASES;
            p.queue.truncate(keep);
            p.dropped += over as u64;
        }
    }

    fn take_dropped(&self) -> u64 {
        std::mem::take(&mut self.lock().dropped)
    }
}

/// Groups slot numbers by key, keeping the first appearance order of keys.
fn by_key(items: impl IntoIterator<Item = (Arc<str>, u64)>) -> Vec<(Arc<str>, Vec<u64>)> {
    let mut index: HashMap<Arc<str>, usize> = HashMap::new();
    let mut groups: Vec<(Arc<str>, Vec<u64>)> = Vec::new();
    for (key, n) in items {
        match index.get(&key) {
            Some(&i) => groups[i].1.push(n),
            None => {
                index.insert(Arc::clone(&key), groups.len());
                groups.push((key, vec![n]));
            }
        }
    }
    groups
}

/// What [`flush`] achieved.
enum Flushed {
    /// The queue is empty.
    Done,
    /// Some releases failed and are queued again.
    Failed(String),
}

/// Sends queued releases until the queue is empty or a release fails.
async fn flush(leases: &Leases, link: &Link, timeout: Duration) -> Flushed {
    loop {
        let batch = leases.take_batch();
        if batch.is_empty() {
            return Flushed::Done;
        }
        let groups = by_key(batch);
        let replies = join_all(groups.iter().map(|(key, ns)| {
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(&**key);
            for &n in ns {
                cmd.arg(leases.id(n));
            }
            async move { link.query(&cmd, timeout).await }
        }))
        .await;
        let mut failed = Vec::new();
        let mut error = None;
        for ((key, ns), reply) in groups.into_iter().zip(replies) {
            if let Err(f) = reply {
                error.get_or_insert_with(|| explain(&f, timeout));
                failed.extend(ns.into_iter().map(|n| (Arc::clone(&key), n)));
            }
        }
        if let Some(error) = error {
            leases.requeue(failed);
            return Flushed::Failed(error);
        }
    }
}

/// Renews every live slot; failures wait for the next period (a lease outlives two). A wave
/// of calls that all failed ends the round: Redis is away, and the releases should not wait
/// for the other waves to time out too.
async fn renew(leases: &Leases, link: &Link, script: &Script, lease_ms: &str, timeout: Duration) {
    let live: Vec<(Arc<str>, u64)> = leases
        .live
        .iter()
        .map(|e| (Arc::clone(e.value()), *e.key()))
        .collect();
    let mut calls: Vec<(Arc<str>, Vec<String>)> = Vec::new();
    for (key, ns) in by_key(live) {
        for chunk in ns.chunks(IDS_PER_CALL) {
            let mut args = Vec::with_capacity(chunk.len() + 1);
            args.push(lease_ms.to_owned());
            args.extend(chunk.iter().map(|&n| leases.id(n)));
            calls.push((Arc::clone(&key), args));
        }
    }
    for wave in calls.chunks(KEYS_AT_ONCE) {
        let replies = join_all(
            wave.iter()
                .map(|(key, args)| run_script(link, script, key, args, timeout)),
        )
        .await;
        if replies.iter().all(Result::is_err) {
            return;
        }
    }
}

/// The task that renews this gateway's slots and sends their releases, until stopped; then
/// it tries the waiting releases once more.
pub(super) async fn keep(
    leases: Arc<Leases>,
    link: Arc<Link>,
    lease: Duration,
    timeout: Duration,
    on_health: Arc<super::shared::HealthSink>,
    stop: CancellationToken,
) {
    let script = Script::new(RENEW);
    let lease_ms = lease.as_millis().to_string();
    let every = lease / 3;
    let mut renew_at = Instant::now() + every;
    // While releases fail: when the last attempt failed, and the current backoff.
    let mut retry: Option<(Instant, Duration)> = None;
    loop {
        let releases = async {
            match retry {
                Some((failed, backoff)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(failed + backoff) => {}
                        // Redis answers a check: sooner, but never twice within RETRY_MIN
                        // (a cluster with one node away answers checks all the time).
                        _ = leases.answered.notified() => {
                            tokio::time::sleep_until(failed + RETRY_MIN).await;
                        }
                    }
                }
                None => leases.wake.notified().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(renew_at) => {
                renew(&leases, &link, &script, &lease_ms, timeout).await;
                renew_at = Instant::now() + every;
                continue;
            }
            _ = releases => {}
        }
        match flush(&leases, &link, timeout).await {
            Flushed::Done => {
                if retry.take().is_some() {
                    leases.retrying.store(false, Ordering::Relaxed);
                    on_health(Health::ReleasesDone {
                        dropped: leases.take_dropped(),
                    });
                }
            }
            Flushed::Failed(error) => {
                let backoff = match retry {
                    Some((_, b)) => (b * 2).min(RETRY_MAX),
                    None => {
                        leases.retrying.store(true, Ordering::Relaxed);
                        on_health(Health::ReleasesWaiting {
                            pending: leases.pending(),
                            error,
                        });
                        RETRY_MIN
                    }
                };
                retry = Some((Instant::now(), backoff));
            }
        }
    }
    let _ = flush(&leases, &link, timeout).await;
}

/// Whether a command that failed this way may still have run on the server (its reply was
/// lost): an acquire that failed so is followed by a release.
pub(super) fn may_have_run(f: &Failure) -> bool {
    match f {
        Failure::Timeout => true,
        Failure::Redis(e) => e.is_io_error() || e.is_connection_dropped(),
        Failure::NotConnected(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn releases_group_by_key_in_order() {
        let groups = by_key([(key("b"), 1), (key("a"), 2), (key("b"), 3)]);
        assert_eq!(groups, [(key("b"), vec![1, 3]), (key("a"), vec![2])]);
    }

    #[test]
    fn a_release_leaves_the_renewed_set() {
        let l = Leases::new("gw".into());
        l.hold(&key("k"), 7);
        l.hold(&key("k"), 8);
        assert_eq!(l.live(), 2);
        l.release(&key("k"), 7);
        assert_eq!(l.live(), 1);
        assert_eq!(l.pending(), 1);
        assert_eq!(l.id(7), "gw-7");
    }

    #[test]
    fn the_queue_is_bounded_and_failed_releases_go_first() {
        let l = Leases::new("gw".into());
        for n in 0..MAX_PENDING_RELEASES as u64 + 5 {
            l.release(&key("k"), n);
        }
        assert_eq!(l.pending(), MAX_PENDING_RELEASES);
        assert_eq!(l.take_dropped(), 5);
        let batch = l.take_batch();
        assert_eq!(batch.len(), BATCH);
        l.release(&key("k"), 1_000_000);
        l.requeue(batch);
        assert_eq!(l.pending(), MAX_PENDING_RELEASES);
        assert_eq!(l.take_dropped(), 1, "the newest is given up");
        assert_eq!(l.take_batch()[0].1, 0, "the oldest is retried first");
    }
}

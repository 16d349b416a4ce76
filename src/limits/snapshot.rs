//! What the policies and the upstream cooldowns hold right now, copied out as plain data for
//! the admin view (`GET /status`) and the scrape (`ezgate_ratelimit_utilization`,
//! `ezgate_upstream_cooldowns`). Each walk holds one map shard's lock at a time, long enough
//! to read its entries; nothing here runs on a request.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;

use super::policy::Policy;
use super::Limits;
use crate::config::{LimitKey, Mode};

/// One policy's state now.
#[derive(Debug, Clone)]
pub struct PolicySnapshot {
    pub name: Arc<str>,
    /// What it keys on.
    pub key: LimitKey,
    /// `store = "redis"`: the keys below are the local fallback's, not the shared counts.
    pub shared: bool,
    pub mode: Mode,
    /// Keys tracked (the largest count of its parts).
    pub keys: usize,
    /// The busiest key's used share, 0–1 (0 with no key tracked).
    pub utilization: f64,
    /// The busiest keys, busiest first, at most the `top` asked for.
    pub busiest: Vec<KeyUse>,
}

/// One key's use of a policy, by part. The key is as the policy built it: a client name, a
/// fingerprint, an IP, a header value or a model: the caller decides what may be shown.
#[derive(Debug, Clone)]
pub struct KeyUse {
    pub key: Arc<str>,
    /// The largest used share of its parts, 0–1.
    pub used: f64,
    /// Requests remaining in the burst, and the time until it is whole again.
    pub requests: Option<(u64, Duration)>,
    /// Tokens remaining in the bucket, and the time until it is full again.
    pub tokens: Option<(u64, Duration)>,
    /// Requests in flight, against `concurrency`.
    pub in_flight: Option<u32>,
}

/// An upstream 429 that holds requests back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cooldown {
    /// `org` (managed mode: the organization's key), a presented key's fingerprint, or
    /// `anonymous`.
    pub credential: String,
    /// The model the 429 was for, `*` when the request named none.
    pub model: String,
    pub remaining: Duration,
}

impl<C: Clock + Clone> Limits<C> {
    /// Every policy's state, with its `top` busiest keys.
    pub fn snapshot(&self, top: usize) -> Vec<PolicySnapshot> {
        self.inner
            .policies
            .iter()
            .map(|p| {
                let mut entries: HashMap<Arc<str>, KeyUse> = HashMap::new();
                let mut merge = |key: &Arc<str>, used: f64, set: &dyn Fn(&mut KeyUse)| {
                    let k = entries.entry(Arc::clone(key)).or_insert_with(|| KeyUse {
                        key: Arc::clone(key),
                        used: 0.0,
                        requests: None,
                        tokens: None,
                        in_flight: None,
                    });
                    k.used = k.used.max(used);
                    set(k);
                };
                if let Some((_, s)) = &p.requests {
                    s.usage(|key, used, remaining, reset| {
                        merge(key, used, &|k| k.requests = Some((remaining, reset)));
                    });
                }
                if let Some((_, s)) = &p.tokens {
                    s.usage(|key, used, remaining, reset| {
                        merge(key, used, &|k| k.tokens = Some((remaining, reset)));
                    });
                }
                if let Some(s) = &p.concurrency {
                    let max = f64::from(s.max.max(1));
                    s.usage(|key, n| {
                        merge(key, f64::from(n) / max, &|k| k.in_flight = Some(n));
                    });
                }
                let mut busiest: Vec<KeyUse> = entries.into_values().collect();
                busiest.sort_by(|a, b| b.used.total_cmp(&a.used).then(a.key.cmp(&b.key)));
                let utilization = busiest.first().map_or(0.0, |k| k.used);
                busiest.truncate(top);
                PolicySnapshot {
                    name: Arc::clone(&p.name),
                    key: p.key.clone(),
                    shared: p.shared.is_some(),
                    mode: p.mode,
                    keys: tracked(p),
                    utilization: utilization.clamp(0.0, 1.0),
                    busiest,
                }
            })
            .collect()
    }

    /// Each policy's busiest key's used share, 0–1, in [`Limits::policy_names`] order:
    /// [`Limits::snapshot`] without building the key list.
    pub fn utilization(&self) -> Vec<f64> {
        self.inner
            .policies
            .iter()
            .map(|p| {
                let mut max = 0.0f64;
                if let Some((_, s)) = &p.requests {
                    s.usage(|_, used, _, _| max = max.max(used));
                }
                if let Some((_, s)) = &p.tokens {
                    s.usage(|_, used, _, _| max = max.max(used));
                }
                if let Some(s) = &p.concurrency {
                    let cap = f64::from(s.max.max(1));
                    s.usage(|_, n| max = max.max(f64::from(n) / cap));
                }
                max.clamp(0.0, 1.0)
            })
            .collect()
    }

    /// The upstream cooldowns still running, longest first.
    pub fn cooldowns(&self) -> Vec<Cooldown> {
        let now = self.inner.now();
        let mut out: Vec<Cooldown> = self
            .inner
            .cooldowns
            .map
            .iter()
            .filter(|e| *e.value() > now)
            .map(|e| {
                let (credential, model) = split_cooldown_key(e.key());
                Cooldown {
                    credential: credential.to_owned(),
                    model: model.to_owned(),
                    remaining: Duration::from_nanos(*e.value() - now),
                }
            })
            .collect();
        out.sort_by_key(|c| std::cmp::Reverse(c.remaining));
        out
    }

    /// How many upstream cooldowns are running.
    pub fn active_cooldowns(&self) -> usize {
        let cool = &self.inner.cooldowns;
        if cool.count.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let now = self.inner.now();
        cool.map.iter().filter(|e| *e.value() > now).count()
    }

    /// Lifts the upstream cooldowns of `model` (every one with `None`); returns how many
    /// were running. Requests of those keys go upstream again at once.
    pub fn clear_cooldowns(&self, model: Option<&str>) -> usize {
        let now = self.inner.now();
        let cool = &self.inner.cooldowns;
        let mut lifted = 0;
        cool.map.retain(|key, until| {
            let hit = model.is_none_or(|m| split_cooldown_key(key).1 == m);
            if hit {
                if *until > now {
                    lifted += 1;
                }
                cool.count.fetch_sub(1, Ordering::Relaxed);
            }
            !hit
        });
        lifted
    }
}

/// `who|model` → (`who`, `model`); the credential part never holds a `|`.
fn split_cooldown_key(key: &str) -> (&str, &str) {
    key.split_once('|').unwrap_or((key, "*"))
}

fn tracked<C: Clock + Clone>(p: &Policy<C>) -> usize {
    let mut keys = 0;
    if let Some((_, s)) = &p.requests {
        keys = keys.max(s.len());
    }
    if let Some((_, s)) = &p.tokens {
        keys = keys.max(s.len());
    }
    if let Some(s) = &p.concurrency {
        keys = keys.max(s.len());
    }
    keys
}

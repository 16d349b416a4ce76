//! Rate limits: requests (GCRA on governor), tokens (estimated, then settled with the
//! reported usage) and concurrency, keyed per client, API key, IP, header, model or
//! globally, held in this process or shared in Redis; plus the cooldown after an upstream
//! 429. Decisions and permits are values: this module counts and logs nothing itself, the
//! request path does.
//!
//! * [`policy`] — one policy: what it covers, its key, a request's estimate, its headers
//! * [`check`] — [`Limits::check`]: the admission under every covering policy
//! * [`permit`] — what an admitted request holds, settled once when it ends
//! * [`store`] — local keyed state with a key cap; [`shared`] — the same in Redis, over the
//!   connection of `link` (standalone, Sentinel or Cluster); `lease` keeps the concurrency
//!   slots held in Redis renewed, and retries their releases until Redis answers
//! * `snapshot` — what the policies and cooldowns hold now, as plain data for the admin view
//! * [`tokens`], [`fields`], [`form`] — what a request body says of its model and size;
//!   [`estimate`] — its tokens, by character class
//! * [`scan`] — the one-pass JSON lexer that reads request bodies, and responses' usage

mod check;
pub mod estimate;
pub mod fields;
pub mod form;
mod lease;
mod link;
mod permit;
mod policy;
pub mod scan;
pub mod shared;
mod snapshot;
pub mod store;
pub mod tokens;

pub use permit::{Admission, Checked, Permit};
pub use snapshot::{Cooldown, KeyUse, PolicySnapshot};

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock, Reference};
use http::header::HeaderValue;
use http::HeaderMap;
use wildmatch::WildMatch;

use crate::config::{LimitConfig, LimitKey, Store};
use crate::route::Route;
use policy::{policy_header, Policy};
use shared::RedisStore;
use store::{ConcurrencyStore, RequestStore, TokenStore};

const MAX_COOLDOWN_KEYS: usize = 10_000;

/// What a policy decided for one request (a request may get two: a shadow refusal, then
/// its admission).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Limited,
    ShadowLimited,
    Waited,
    /// A shared policy's check was answered by the local fallback (or refused, with
    /// `on_failure = "deny"`): Redis did not answer in time.
    StoreFallback,
}

/// The verdicts of one check, by policy index (the order of [`Limits::policy_names`]).
pub type Verdicts = Vec<(usize, Verdict)>;

/// One request to be limited.
pub struct LimitRequest<'a> {
    /// The configured client's name, when one was identified.
    pub client: Option<&'a Arc<str>>,
    /// A short fingerprint of the presented key, never the key itself.
    pub fingerprint: Option<&'a Arc<str>>,
    pub route: Route,
    pub model: Option<&'a str>,
    pub prompt_tokens: u64,
    pub max_tokens: Option<u64>,
    /// A `POST`, or a WebSocket session: a request that can spend tokens (token policies
    /// charge nothing else).
    pub post: bool,
    pub ip: IpAddr,
    pub headers: &'a HeaderMap,
    /// Managed mode: every request reaches the upstream with the organization's key.
    pub managed: bool,
}

struct Inner<C: Clock> {
    policies: Vec<Arc<Policy<C>>>,
    /// Keys held back after an upstream 429, kept across reloads.
    cooldowns: Arc<Cooldowns>,
    clock: C,
    start: C::Instant,
    /// Routes (bits by [`Route::ALL`] position) where some policy needs the body's model
    /// or size.
    body_routes: u32,
    needs_usage: bool,
}

pub struct Limits<C: Clock = DefaultClock> {
    inner: Arc<Inner<C>>,
}

/// Keys an upstream 429 holds back, until when (clock nanos).
#[derive(Default)]
struct Cooldowns {
    map: DashMap<Arc<str>, u64>,
    /// Entries in `map`, read on every request without touching the map.
    count: AtomicUsize,
}

impl Limits<DefaultClock> {
    /// Builds the policies (already validated). Idle keys are evicted by [`Limits::maintain`],
    /// which the caller runs every few seconds.
    pub fn new(configs: &[LimitConfig], redis: Option<Arc<RedisStore>>) -> Limits {
        Limits::build(configs, redis, DefaultClock::default(), None)
    }

    /// The policies of a reloaded config, keeping the state of every policy that did not
    /// change (see [`Limits::build`]).
    pub fn reload(&self, configs: &[LimitConfig], redis: Option<Arc<RedisStore>>) -> Limits {
        Limits::build(configs, redis, self.inner.clock.clone(), Some(self))
    }
}

/// A handle that does not keep a [`Limits`] alive (for a maintenance task that must end
/// when a reload replaces the policies).
pub struct WeakLimits<C: Clock = DefaultClock>(Weak<Inner<C>>);

impl<C: Clock> WeakLimits<C> {
    pub fn upgrade(&self) -> Option<Limits<C>> {
        self.0.upgrade().map(|inner| Limits { inner })
    }
}

impl<C: Clock + Clone + Send + Sync + 'static> Limits<C>
where
    C::Instant: Send + Sync,
{
    pub fn with_clock(configs: &[LimitConfig], clock: C) -> Limits<C> {
        Self::build(configs, None, clock, None)
    }

    /// The policies of `configs`. A policy that `previous` has under the same name with the
    /// same settings (and the same shared store) keeps its state: its buckets, token
    /// balances, concurrency counts and known refusals; so do the upstream cooldowns. Any
    /// other policy starts fresh.
    fn build(
        configs: &[LimitConfig],
        redis: Option<Arc<RedisStore>>,
        clock: C,
        previous: Option<&Limits<C>>,
    ) -> Limits<C> {
        let policies: Vec<Arc<Policy<C>>> = configs
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let key = c.limit_key();
                let shared = if c.store == Store::Redis {
                    redis.clone()
                } else {
                    None
                };
                let kept = previous.and_then(|l| {
                    l.inner.policies.iter().find(|p| {
                        p.config == *c
                            && match (&p.shared, &shared) {
                                (None, None) => true,
                                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                                _ => false,
                            }
                    })
                });
                let config = c.clone();
                let full = (
                    c.requests.map(|r| (r, c.burst.unwrap_or(r.count))),
                    c.tokens,
                    c.concurrency,
                );
                // A shared policy's local stores hold the whole limit: while Redis is away,
                // each check charges this replica's share of it (`RedisStore::share`, which
                // follows the fleet's size), so a changed share keeps the state.
                let max_keys = c.effective_max_keys();
                let requests = match kept {
                    Some(p) => p.requests.clone(),
                    None => c.requests.and_then(|rate| {
                        let burst = c.burst.unwrap_or(rate.count);
                        RequestStore::new(rate, burst, max_keys, clock.clone())
                            .map(|s| (rate, Arc::new(s)))
                    }),
                };
                let tokens = match kept {
                    Some(p) => p.tokens.clone(),
                    None => c.tokens.map(|rate| {
                        (
                            rate,
                            Arc::new(TokenStore::new(rate, max_keys, clock.clone())),
                        )
                    }),
                };
                let concurrency = match kept {
                    Some(p) => p.concurrency.clone(),
                    None => c
                        .concurrency
                        .map(|n| Arc::new(ConcurrencyStore::new(n, max_keys))),
                };
                let denied =
                    kept.map_or_else(|| Arc::new(DashMap::new()), |p| Arc::clone(&p.denied));
                let mut policy = Policy {
                    index,
                    config,
                    name: Arc::from(c.name.as_str()),
                    key,
                    mode: c.mode,
                    on_limit: c.on_limit,
                    max_wait: c.max_wait.map_or(Duration::ZERO, |d| d.0),
                    routes: c
                        .matches
                        .routes
                        .iter()
                        .filter_map(|r| Route::from_template(r))
                        .collect(),
                    models: c.matches.models.iter().map(|m| WildMatch::new(m)).collect(),
                    clients: c.matches.clients.clone(),
                    requests,
                    tokens,
                    concurrency,
                    default_tokens: u64::from(c.effective_default_tokens()),
                    shared,
                    denied,
                    full,
                    policy_headers: [HeaderValue::from_static(""), HeaderValue::from_static("")],
                };
                policy.policy_headers = [
                    policy_header(&policy.remaining_requests(0)),
                    policy_header(&policy.remaining_tokens(0)),
                ];
                Arc::new(policy)
            })
            .collect();
        let needs_usage = policies.iter().any(|p| p.tokens.is_some());
        let mut body_routes = 0u32;
        for p in &policies {
            if p.tokens.is_some() || p.key == LimitKey::Model || !p.models.is_empty() {
                for (i, route) in Route::ALL.iter().enumerate() {
                    if p.routes.is_empty() || p.routes.contains(route) {
                        body_routes |= 1 << i;
                    }
                }
            }
        }
        // Kept state counts time from the previous policies' start.
        let (start, cooldowns) = match previous {
            Some(l) => (l.inner.start, Arc::clone(&l.inner.cooldowns)),
            None => (clock.now(), Arc::new(Cooldowns::default())),
        };
        Limits {
            inner: Arc::new(Inner {
                policies,
                cooldowns,
                clock,
                start,
                body_routes,
                needs_usage,
            }),
        }
    }

    /// True when some policy that may cover a request of `route` needs its model or token
    /// estimate.
    pub fn needs_body(&self, route: Route) -> bool {
        let i = Route::ALL.iter().position(|r| *r == route).unwrap_or(0);
        self.inner.body_routes & (1 << i) != 0
    }

    /// True when some policy settles tokens with the reported usage.
    pub fn needs_usage(&self) -> bool {
        self.inner.needs_usage
    }

    /// Evicts idle keys and expired cooldowns; returns how many keys each policy tracks
    /// (in [`Limits::policy_names`] order).
    pub fn maintain(&self) -> Vec<usize> {
        self.inner.maintain()
    }

    /// The policies' names, in config order: the order of [`Verdicts`] indices.
    pub fn policy_names(&self) -> impl Iterator<Item = &str> {
        self.inner.policies.iter().map(|p| &*p.name)
    }

    pub fn downgrade(&self) -> WeakLimits<C> {
        WeakLimits(Arc::downgrade(&self.inner))
    }

    /// Notes an upstream 429 with `Retry-After`: requests of this key are held until then.
    pub fn upstream_limited(&self, key: &Arc<str>, wait: Duration) {
        let inner = &self.inner;
        let cool = &inner.cooldowns;
        if wait.is_zero() || (cool.map.len() >= MAX_COOLDOWN_KEYS && !cool.map.contains_key(key)) {
            return;
        }
        let until = inner.now() + wait.as_nanos() as u64;
        if cool.map.insert(Arc::clone(key), until).is_none() {
            cool.count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The key an upstream 429 holds back: the upstream credential (the organization's key in
/// managed mode, else the presented key's fingerprint) and the model.
pub fn cooldown_key(fingerprint: Option<&str>, model: Option<&str>, managed: bool) -> Arc<str> {
    let who = if managed {
        "org"
    } else {
        fingerprint.unwrap_or("anonymous")
    };
    Arc::from(format!("{who}|{}", model.unwrap_or("*")))
}

impl<C: Clock> Inner<C> {
    fn now(&self) -> u64 {
        self.clock.now().duration_since(self.start).as_u64()
    }
}

impl<C: Clock + Clone> Inner<C> {
    fn maintain(&self) -> Vec<usize> {
        let now = self.now();
        self.cooldowns.map.retain(|_, until| *until > now);
        self.cooldowns
            .count
            .store(self.cooldowns.map.len(), Ordering::Relaxed);
        let mut counts = Vec::with_capacity(self.policies.len());
        for p in &self.policies {
            p.denied.retain(|_, until| *until > now);
            let mut keys = 0;
            if let Some((_, s)) = &p.requests {
                s.evict_idle();
                keys = keys.max(s.len());
            }
            if let Some((_, s)) = &p.tokens {
                s.evict_idle();
                keys = keys.max(s.len());
            }
            if let Some(s) = &p.concurrency {
                keys = keys.max(s.len());
            }
            counts.push(keys);
        }
        counts
    }
}

#[cfg(test)]
mod tests;

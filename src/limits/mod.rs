//! Local rate limits (CONTRACT §5): requests (GCRA on governor), tokens (estimated, then
//! settled with the reported usage) and concurrency, keyed per client, API key, IP, header,
//! model or globally; plus the cooldown after an upstream 429.
//!
//! [`Limits::check`] admits a request only if every policy that covers it does. Refundable
//! parts (concurrency, tokens) of all policies are taken first and given back if anything
//! refuses; request-rate cells are taken last (GCRA cells cannot be given back), so a request
//! refused on concurrency or tokens takes nothing from any request rate.

pub mod estimate;
pub mod redis;
pub mod scan;
pub mod shared;
pub mod store;
pub mod tokens;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock, Reference};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use crate::access_log::push_u64;
use crate::clients::{glob_match, Caller};
use crate::config::{ClientConfig, LimitConfig, Mode, OnLimit, Rate, Store};
use crate::errors::{GatewayError, Quota};
use crate::metrics::Metrics;
use crate::outcome::Usage;
use crate::route::Route;
use shared::{redis_key, RedisStore, Shared, SharedSlot, SharedTokens};
use store::{ConcurrencyStore, RequestStore, TokenStore};

/// Default cap on keys each policy tracks.
pub const DEFAULT_MAX_KEYS: usize = 100_000;
/// Completion tokens charged up front when a request sets no `max_tokens`.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 1000;
const MAX_COOLDOWN_KEYS: usize = 10_000;
const MAINTENANCE_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyKind {
    Client,
    ApiKey,
    Ip,
    Header(HeaderName),
    Model,
    Global,
}

impl KeyKind {
    fn parse(s: &str) -> Result<KeyKind, String> {
        Ok(match s {
            "client" => KeyKind::Client,
            "api_key" => KeyKind::ApiKey,
            "ip" => KeyKind::Ip,
            "model" => KeyKind::Model,
            "global" => KeyKind::Global,
            other => match other.strip_prefix("header:") {
                Some(h) => KeyKind::Header(HeaderName::from_bytes(h.trim().as_bytes()).map_err(|_| {
                    format!("\"{other}\" names an invalid header")
                })?),
                None => {
                    return Err(format!(
                        "\"{other}\" is not a key kind; use client, api_key, ip, header:<name>, model or global"
                    ))
                }
            },
        })
    }
}

/// A policy's verdict on one request; the index of its counter (`metrics::DECISIONS` order).
#[derive(Debug, Clone, Copy)]
enum Decision {
    Allowed = 0,
    Limited = 1,
    ShadowLimited = 2,
    Waited = 3,
}

/// One request to be limited.
pub struct LimitRequest<'a> {
    pub caller: &'a Caller,
    pub route: Route,
    pub model: Option<&'a str>,
    pub prompt_tokens: u64,
    pub max_tokens: Option<u64>,
    pub ip: IpAddr,
    pub headers: &'a HeaderMap,
    /// Managed mode: every request reaches the upstream with the organization's key.
    pub managed: bool,
}

struct Policy<C: Clock> {
    name: Arc<str>,
    key: KeyKind,
    mode: Mode,
    on_limit: OnLimit,
    max_wait: Duration,
    routes: Vec<Route>,
    models: Vec<String>,
    clients: Vec<String>,
    requests: Option<(Rate, RequestStore<C>)>,
    tokens: Option<(Rate, Arc<TokenStore<C>>)>,
    concurrency: Option<Arc<ConcurrencyStore>>,
    default_tokens: u64,
    /// `store = "redis"`: the shared store; the local stores above are then the fallback,
    /// sized to this replica's share.
    shared: Option<Arc<RedisStore>>,
    /// Shared keys known to be over their limit, until when (clock nanos): not asked again.
    denied: DashMap<Arc<str>, u64>,
    /// `ezgate_ratelimit_decisions_total` for this policy, by [`Decision`].
    decisions: [prometheus::IntCounter; 4],
    /// The configured (whole, not per-replica) rates and concurrency, for shared checks.
    full: (Option<(Rate, u32)>, Option<Rate>, Option<u32>),
    /// `RateLimit-Policy` values of the request and token parts, rendered once.
    policy_headers: [HeaderValue; 2],
}

impl<C: Clock> Policy<C> {
    fn covers(&self, r: &LimitRequest<'_>) -> bool {
        (self.routes.is_empty() || self.routes.contains(&r.route))
            && (self.models.is_empty()
                || r.model
                    .is_some_and(|m| self.models.iter().any(|p| glob_match(p, m))))
            && (self.clients.is_empty()
                || r.caller
                    .client
                    .as_ref()
                    .is_some_and(|c| self.clients.iter().any(|n| **n == *c.name)))
    }

    fn key(&self, r: &LimitRequest<'_>) -> Arc<str> {
        match &self.key {
            KeyKind::Client => r
                .caller
                .client
                .as_ref()
                .map(|c| Arc::clone(&c.name))
                .or_else(|| r.caller.key_fingerprint.clone())
                .unwrap_or_else(|| Arc::from("anonymous")),
            KeyKind::ApiKey => r
                .caller
                .key_fingerprint
                .clone()
                .unwrap_or_else(|| Arc::from("none")),
            KeyKind::Ip => ip_key(r.ip),
            KeyKind::Header(h) => match r.headers.get(h) {
                Some(v) => Arc::from(String::from_utf8_lossy(&v.as_bytes()[..v.len().min(128)])),
                None => Arc::from("none"),
            },
            KeyKind::Model => text_key(r.model.unwrap_or("none")),
            KeyKind::Global => text_key(""),
        }
    }

    fn remaining_requests(&self, remaining: u64) -> Remaining<'_> {
        let (rate, burst, interval) = match (self.full.0, &self.requests) {
            (Some((rate, burst)), Some((_, store))) if self.shared.is_some() => {
                (rate, burst, store.interval.max(rate.interval()))
            }
            (_, Some((rate, store))) => (*rate, store.burst, store.interval),
            _ => (
                Rate {
                    count: 1,
                    per: Duration::from_secs(1),
                },
                1,
                Duration::from_secs(1),
            ),
        };
        let used = u64::from(burst).saturating_sub(remaining);
        Remaining {
            name: &self.name,
            policy_header: &self.policy_headers[0],
            quota: u64::from(rate.count),
            window: rate.per.as_secs(),
            remaining,
            reset: interval * u32::try_from(used).unwrap_or(u32::MAX),
        }
    }

    fn remaining_tokens(&self, remaining: u64) -> Remaining<'_> {
        let rate = self
            .full
            .1
            .or(self.tokens.as_ref().map(|t| t.0))
            .unwrap_or(Rate {
                count: 1,
                per: Duration::from_secs(1),
            });
        let missing = u64::from(rate.count).saturating_sub(remaining);
        Remaining {
            name: &self.name,
            policy_header: &self.policy_headers[1],
            quota: u64::from(rate.count),
            window: rate.per.as_secs(),
            remaining,
            reset: rate.per.mul_f64(missing as f64 / f64::from(rate.count)),
        }
    }

    fn estimate(&self, r: &LimitRequest<'_>) -> u64 {
        let completion = if r.route == Route::Embeddings {
            0
        } else {
            r.max_tokens.unwrap_or(self.default_tokens)
        };
        r.prompt_tokens + completion
    }
}

/// Settles a token reservation; type-erased over the clock.
trait Settle: Send + Sync {
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
enum Slot {
    Local(Arc<ConcurrencyStore>, Arc<str>),
    /// Released by its own `Drop`.
    Shared(#[allow(dead_code, reason = "held for its Drop")] SharedSlot),
}

/// Tokens reserved for a request, settled when it ends.
enum Reservation {
    Local(Arc<dyn Settle>, Arc<str>, u64),
    Shared(Arc<SharedTokens>, u64),
}

impl Reservation {
    fn settle(self, used: u64) {
        match self {
            Reservation::Local(store, key, reserved) => store.settle(&key, reserved, used),
            Reservation::Shared(tokens, reserved) => tokens.settle(reserved, used),
        }
    }
}

/// What an admitted request holds until it ends: concurrency slots and token reservations.
/// A permit of a refused request gives everything back.
#[derive(Default)]
pub struct Permit {
    held: Vec<Held>,
    admitted: bool,
}

/// One part of a permit (one allocation for all of a request's parts).
enum Held {
    Slot(Slot),
    /// `None` once settled.
    Tokens(Option<Reservation>),
}

impl Permit {
    /// Settles token reservations with the usage the upstream reported; without a report
    /// the estimate stays charged. Concurrency slots are released when the permit drops.
    pub fn settle(mut self, usage: Option<Usage>) {
        if let Some(u) = usage {
            for h in &mut self.held {
                if let Held::Tokens(r) = h {
                    if let Some(r) = r.take() {
                        r.settle(u.prompt + u.completion);
                    }
                }
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        for h in &mut self.held {
            match h {
                Held::Slot(Slot::Local(store, key)) => store.release(key),
                Held::Slot(Slot::Shared(_)) => {}
                Held::Tokens(r) => {
                    if !self.admitted {
                        if let Some(r) = r.take() {
                            r.settle(0);
                        }
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

struct Inner<C: Clock> {
    policies: Vec<Arc<Policy<C>>>,
    cooldowns: DashMap<Arc<str>, u64>,
    /// Entries in `cooldowns`, read on every request without touching the map.
    cooling: AtomicUsize,
    clock: C,
    start: C::Instant,
    metrics: Arc<Metrics>,
    needs_body: bool,
    needs_usage: bool,
}

pub struct Limits<C: Clock = DefaultClock> {
    inner: Arc<Inner<C>>,
}

impl Limits<DefaultClock> {
    /// Builds the policies (already validated) and, inside a runtime, the eviction task.
    pub fn new(
        configs: &[LimitConfig],
        redis: Option<Arc<RedisStore>>,
        metrics: Arc<Metrics>,
    ) -> Limits {
        let limits = Limits::build(configs, redis, metrics, DefaultClock::default());
        if tokio::runtime::Handle::try_current().is_ok() {
            let weak = Arc::downgrade(&limits.inner);
            tokio::spawn(maintain_forever(weak));
        }
        limits
    }
}

async fn maintain_forever(weak: Weak<Inner<DefaultClock>>) {
    let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        inner.maintain();
    }
}

/// A refusal candidate from one policy part.
enum Refusal {
    Requests(Duration),
    Tokens(Duration),
    Concurrency,
}

/// One part's remaining quota, for the `RateLimit` headers of the tightest policy.
struct Remaining<'a> {
    name: &'a str,
    policy_header: &'a HeaderValue,
    quota: u64,
    window: u64,
    remaining: u64,
    reset: Duration,
}

impl<C: Clock + Clone + Send + Sync + 'static> Limits<C>
where
    C::Instant: Send + Sync,
{
    pub fn with_clock(configs: &[LimitConfig], metrics: Arc<Metrics>, clock: C) -> Limits<C> {
        Self::build(configs, None, metrics, clock)
    }

    fn build(
        configs: &[LimitConfig],
        redis: Option<Arc<RedisStore>>,
        metrics: Arc<Metrics>,
        clock: C,
    ) -> Limits<C> {
        let policies: Vec<Arc<Policy<C>>> = configs
            .iter()
            .filter_map(|c| {
                let key = KeyKind::parse(&c.key).ok()?;
                let shared = if c.store == Store::Redis {
                    redis.clone()
                } else {
                    None
                };
                let full = (
                    c.requests.map(|r| (r, c.burst.unwrap_or(r.count))),
                    c.tokens,
                    c.concurrency,
                );
                // The local stores enforce this replica's share while Redis is away.
                let share = shared.as_ref().map_or(1, |s| s.replicas);
                let part = |r: Rate| Rate {
                    count: (r.count / share).max(1),
                    ..r
                };
                let c = &LimitConfig {
                    requests: c.requests.map(part),
                    burst: c.burst.map(|b| (b / share).max(1)),
                    tokens: c.tokens.map(part),
                    concurrency: c.concurrency.map(|n| (n / share).max(1)),
                    ..c.clone()
                };
                let max_keys = c.max_keys.unwrap_or(DEFAULT_MAX_KEYS).max(1);
                let requests = c.requests.and_then(|rate| {
                    let burst = c.burst.unwrap_or(rate.count);
                    RequestStore::new(rate, burst, max_keys, clock.clone()).map(|s| (rate, s))
                });
                let mut policy = Policy {
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
                    models: c.matches.models.clone(),
                    clients: c.matches.clients.clone(),
                    requests,
                    tokens: c.tokens.map(|rate| {
                        (
                            rate,
                            Arc::new(TokenStore::new(rate, max_keys, clock.clone())),
                        )
                    }),
                    concurrency: c
                        .concurrency
                        .map(|n| Arc::new(ConcurrencyStore::new(n, max_keys))),
                    default_tokens: c
                        .default_tokens
                        .map_or(DEFAULT_COMPLETION_TOKENS, u64::from),
                    shared,
                    denied: DashMap::new(),
                    decisions: metrics.decision_counters(&c.name),
                    full,
                    policy_headers: [HeaderValue::from_static(""), HeaderValue::from_static("")],
                };
                policy.policy_headers = [
                    policy_header(&policy.remaining_requests(0)),
                    policy_header(&policy.remaining_tokens(0)),
                ];
                Some(Arc::new(policy))
            })
            .collect();
        let needs_usage = policies.iter().any(|p| p.tokens.is_some());
        let needs_body = needs_usage
            || policies
                .iter()
                .any(|p| p.key == KeyKind::Model || !p.models.is_empty());
        let start = clock.now();
        Limits {
            inner: Arc::new(Inner {
                policies,
                cooldowns: DashMap::new(),
                cooling: AtomicUsize::new(0),
                clock,
                start,
                metrics,
                needs_body,
                needs_usage,
            }),
        }
    }

    /// True when some policy needs the request's model or token estimate.
    pub fn needs_body(&self) -> bool {
        self.inner.needs_body
    }

    /// True when some policy settles tokens with the reported usage.
    pub fn needs_usage(&self) -> bool {
        self.inner.needs_usage
    }

    /// Evicts idle keys and expired cooldowns; updates the key gauges.
    pub fn maintain(&self) {
        self.inner.maintain();
    }

    /// Notes an upstream 429 with `Retry-After`: requests of this key are held until then.
    pub fn upstream_limited(&self, key: &Arc<str>, wait: Duration) {
        let inner = &self.inner;
        if wait.is_zero()
            || (inner.cooldowns.len() >= MAX_COOLDOWN_KEYS && !inner.cooldowns.contains_key(key))
        {
            return;
        }
        let until = inner.now() + wait.as_nanos() as u64;
        if inner.cooldowns.insert(Arc::clone(key), until).is_none() {
            inner.cooling.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Admits the request under every policy that covers it, or refuses it.
    pub async fn check(&self, r: &LimitRequest<'_>) -> Result<Admission, GatewayError> {
        let inner = &self.inner;
        // Most of the time nothing is cooling down: then no key is even built.
        if inner.cooling.load(Ordering::Relaxed) > 0 {
            let key = cooldown_key(r.caller, r.model, r.managed);
            if let Some(until) = inner.cooldowns.get(&key).map(|u| *u) {
                let now = inner.now();
                if until > now {
                    return Err(GatewayError::UpstreamRateLimited {
                        retry_after: Duration::from_nanos(until - now),
                    });
                }
                if inner.cooldowns.remove_if(&key, |_, u| *u <= now).is_some() {
                    inner.cooling.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        let mut admission = Admission::default();
        if inner.policies.is_empty() {
            return Ok(admission);
        }
        // Set when the first policy holds the request (`on_limit = "wait"`).
        let mut started = None;
        let mut tightest: Option<Remaining> = None;
        let mut covering: Vec<(&Policy<C>, Arc<str>, Decision)> = inner
            .policies
            .iter()
            .filter(|p| p.covers(r))
            .map(|p| (&**p, p.key(r), Decision::Allowed))
            .collect();

        // Refundable parts first: concurrency and tokens.
        for (p, key, decision) in &mut covering {
            let mut waited = false;
            if p.concurrency.is_some() {
                loop {
                    match self.take_slot(p, key).await? {
                        Some(slot) => {
                            admission.permit.held.push(Held::Slot(slot));
                            break;
                        }
                        None => match self
                            .hold_or_refuse(
                                p,
                                &mut started,
                                Duration::from_millis(5),
                                Refusal::Concurrency,
                            )
                            .await
                        {
                            Ok(true) => waited = true,
                            Ok(false) => break,
                            Err(e) => return self.refuse(p, e),
                        },
                    }
                }
            }
            if p.tokens.is_some() {
                let want = p.estimate(r);
                loop {
                    match self.take_tokens(p, key, want).await? {
                        Ok((reservation, remaining)) => {
                            admission.permit.held.push(Held::Tokens(Some(reservation)));
                            consider(&mut tightest, p.remaining_tokens(remaining));
                            break;
                        }
                        Err(wait) => match self
                            .hold_or_refuse(p, &mut started, wait, Refusal::Tokens(wait))
                            .await
                        {
                            Ok(true) => waited = true,
                            Ok(false) => break,
                            Err(e) => return self.refuse(p, e),
                        },
                    }
                }
            }
            if waited {
                *decision = Decision::Waited;
            }
        }

        // Request rates last: a cell taken cannot be given back.
        for (p, key, decision) in &mut covering {
            if p.requests.is_none() {
                continue;
            }
            loop {
                match self.take_request(p, key).await? {
                    Ok(remaining) => {
                        consider(&mut tightest, p.remaining_requests(remaining));
                        break;
                    }
                    Err(wait) => match self
                        .hold_or_refuse(p, &mut started, wait, Refusal::Requests(wait))
                        .await
                    {
                        Ok(true) => *decision = Decision::Waited,
                        Ok(false) => break,
                        Err(e) => return self.refuse(p, e),
                    },
                }
            }
        }
        admission.permit.admitted = true;
        for (p, _, decision) in covering {
            p.decisions[decision as usize].inc();
        }
        if let Some(t) = tightest {
            admission.headers = ratelimit_headers(&t);
        }
        Ok(admission)
    }

    /// The shared store failed: fall back to the local limiter, or refuse (fail closed).
    fn store_down(&self, p: &Policy<C>, store: &RedisStore) -> Result<(), GatewayError> {
        self.inner.metrics.ratelimit_fallback(&p.name);
        if store.fail_closed {
            return Err(GatewayError::Overloaded(format!(
                "the shared limit store of policy '{}' is unreachable and redis.on_failure = \"deny\"",
                p.name
            )));
        }
        Ok(())
    }

    /// A shared key known to be over its limit: the wait left, without asking Redis.
    fn known_denied(&self, p: &Policy<C>, key: &Arc<str>) -> Option<Duration> {
        let until = *p.denied.get(key)?;
        let now = self.inner.now();
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    fn remember_denied(&self, p: &Policy<C>, key: &Arc<str>, wait: Duration) {
        if p.denied.len() < MAX_COOLDOWN_KEYS {
            p.denied
                .insert(Arc::clone(key), self.inner.now() + wait.as_nanos() as u64);
        }
    }

    async fn take_slot(&self, p: &Policy<C>, key: &Arc<str>) -> Result<Option<Slot>, GatewayError> {
        let Some(local) = &p.concurrency else {
            return Ok(None);
        };
        if let (Some(store), Some(max)) = (&p.shared, p.full.2) {
            let rkey = redis_key(&p.name, key, "conc");
            // Boxed: a local check's future stays small (it is moved on every request).
            match Box::pin(store.acquire(&rkey, max)).await {
                Ok(Some(id)) => {
                    return Ok(Some(Slot::Shared(SharedSlot {
                        store: Arc::clone(store),
                        key: rkey,
                        id,
                    })))
                }
                Ok(None) => return Ok(None),
                Err(_) => self.store_down(p, store)?,
            }
        }
        Ok(local
            .acquire(key)
            .map(|k| Slot::Local(Arc::clone(local), k)))
    }

    async fn take_tokens(
        &self,
        p: &Policy<C>,
        key: &Arc<str>,
        want: u64,
    ) -> Result<Result<(Reservation, u64), Duration>, GatewayError> {
        let Some((_, local)) = &p.tokens else {
            return Ok(Err(Duration::ZERO));
        };
        if let (Some(store), Some(rate)) = (&p.shared, p.full.1) {
            if let Some(wait) = self.known_denied(p, key) {
                return Ok(Err(wait));
            }
            let rkey = redis_key(&p.name, key, "tokens");
            let interval = rate.per / rate.count;
            match Box::pin(store.take(&rkey, interval, u64::from(rate.count), want)).await {
                Ok(Shared::Allowed { remaining }) => {
                    let tokens = Arc::new(SharedTokens {
                        store: Arc::clone(store),
                        key: rkey,
                        interval,
                    });
                    return Ok(Ok((Reservation::Shared(tokens, want), remaining)));
                }
                Ok(Shared::Limited { wait }) => {
                    self.remember_denied(p, key, wait);
                    return Ok(Err(wait));
                }
                Err(_) => self.store_down(p, store)?,
            }
        }
        Ok(local.reserve(key, want).map(|remaining| {
            (
                Reservation::Local(Arc::clone(local) as Arc<dyn Settle>, Arc::clone(key), want),
                remaining,
            )
        }))
    }

    async fn take_request(
        &self,
        p: &Policy<C>,
        key: &Arc<str>,
    ) -> Result<Result<u64, Duration>, GatewayError> {
        let Some((_, local)) = &p.requests else {
            return Ok(Ok(0));
        };
        if let (Some(store), Some((rate, burst))) = (&p.shared, p.full.0) {
            if let Some(wait) = self.known_denied(p, key) {
                return Ok(Err(wait));
            }
            let rkey = redis_key(&p.name, key, "requests");
            match Box::pin(store.take(&rkey, rate.interval(), u64::from(burst), 1)).await {
                Ok(Shared::Allowed { remaining }) => return Ok(Ok(remaining)),
                Ok(Shared::Limited { wait }) => {
                    self.remember_denied(p, key, wait);
                    return Ok(Err(wait));
                }
                Err(_) => self.store_down(p, store)?,
            }
        }
        Ok(local.check(key).map(u64::from))
    }

    /// A policy part refused: in shadow mode count it and go on (`Ok(false)`); with
    /// `on_limit = "wait"` sleep if the wait fits in `max_wait` (`Ok(true)`); else refuse.
    async fn hold_or_refuse(
        &self,
        p: &Policy<C>,
        started: &mut Option<tokio::time::Instant>,
        wait: Duration,
        refusal: Refusal,
    ) -> Result<bool, GatewayError> {
        if p.mode == Mode::Shadow {
            p.decisions[Decision::ShadowLimited as usize].inc();
            return Ok(false);
        }
        if p.on_limit == OnLimit::Wait
            && started
                .get_or_insert_with(tokio::time::Instant::now)
                .elapsed()
                + wait
                <= p.max_wait
        {
            Box::pin(tokio::time::sleep(wait)).await;
            return Ok(true);
        }
        Err(refusal_error(p, refusal))
    }

    fn refuse(&self, p: &Policy<C>, e: GatewayError) -> Result<Admission, GatewayError> {
        p.decisions[Decision::Limited as usize].inc();
        Err(e)
    }
}

fn refusal_error<C: Clock>(p: &Policy<C>, refusal: Refusal) -> GatewayError {
    match refusal {
        Refusal::Requests(wait) => {
            let (rate, store) = match &p.requests {
                Some((rate, store)) => (*rate, store.burst),
                None => (
                    Rate {
                        count: 1,
                        per: Duration::from_secs(1),
                    },
                    1,
                ),
            };
            GatewayError::RateLimited {
                policy: Arc::clone(&p.name),
                limit: format!(
                    "{} requests per {} (burst {store})",
                    rate.count,
                    rate.unit_word()
                ),
                retry_after: wait,
                quota: Quota {
                    count: u64::from(rate.count),
                    window: rate.per.as_secs(),
                },
            }
        }
        Refusal::Tokens(wait) => {
            let rate = p.tokens.as_ref().map_or(
                Rate {
                    count: 1,
                    per: Duration::from_secs(1),
                },
                |t| t.0,
            );
            GatewayError::TokenRateLimited {
                policy: Arc::clone(&p.name),
                limit: format!("{} tokens per {}", rate.count, rate.unit_word()),
                retry_after: wait,
                quota: Quota {
                    count: u64::from(rate.count),
                    window: rate.per.as_secs(),
                },
            }
        }
        Refusal::Concurrency => GatewayError::ConcurrencyLimited {
            policy: Arc::clone(&p.name),
            limit: p.full.2.unwrap_or(0),
        },
    }
}

fn consider<'a>(tightest: &mut Option<Remaining<'a>>, candidate: Remaining<'a>) {
    let ratio = |r: &Remaining| r.remaining as f64 / r.quota.max(1) as f64;
    if tightest
        .as_ref()
        .is_none_or(|t| ratio(&candidate) < ratio(t))
    {
        *tightest = Some(candidate);
    }
}

/// `RateLimit-Policy: "name";q=<quota>;w=<window seconds>`; fixed per policy part.
fn policy_header(t: &Remaining<'_>) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{}\";q={};w={}", t.name, t.quota, t.window))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `RateLimit-Policy` and `RateLimit: "name";r=<remaining>;t=<seconds to reset>`.
fn ratelimit_headers(t: &Remaining<'_>) -> Vec<(HeaderName, HeaderValue)> {
    let mut now = Vec::with_capacity(t.name.len() + 48);
    let reset = t.reset.as_secs() + u64::from(t.reset.subsec_nanos() > 0);
    // `"name";r=R;t=T`, without the formatting machinery (this is on every admitted request).
    now.push(b'"');
    now.extend_from_slice(t.name.as_bytes());
    now.extend_from_slice(b"\";r=");
    push_u64(&mut now, t.remaining);
    now.extend_from_slice(b";t=");
    push_u64(&mut now, reset);
    let mut headers = Vec::with_capacity(2);
    if !t.policy_header.is_empty() {
        headers.push((
            HeaderName::from_static("ratelimit-policy"),
            t.policy_header.clone(),
        ));
    }
    if let Ok(v) = HeaderValue::try_from(now) {
        headers.push((HeaderName::from_static("ratelimit"), v));
    }
    headers
}

/// A text key (a model, or the one global key). Requests mostly name the same few models, so
/// each thread remembers the last key it built.
fn text_key(text: &str) -> Arc<str> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<Arc<str>>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some(key) if **key == *text => Arc::clone(key),
            _ => {
                let key: Arc<str> = Arc::from(text);
                *last = Some(Arc::clone(&key));
                key
            }
        }
    })
}

/// An IP address as a key. A sidecar hears from very few peers (often only 127.0.0.1), so
/// each thread remembers the last one and hands out the same key.
fn ip_key(ip: std::net::IpAddr) -> Arc<str> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(std::net::IpAddr, Arc<str>)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((seen, key)) if *seen == ip => Arc::clone(key),
            _ => {
                let key: Arc<str> = Arc::from(ip.to_string());
                *last = Some((ip, Arc::clone(&key)));
                key
            }
        }
    })
}

/// The key an upstream 429 holds back: the upstream credential (the organization's key in
/// managed mode, else the presented key's fingerprint) and the model.
pub fn cooldown_key(caller: &Caller, model: Option<&str>, managed: bool) -> Arc<str> {
    let who = if managed {
        "org"
    } else {
        caller.key_fingerprint.as_deref().unwrap_or("anonymous")
    };
    Arc::from(format!("{who}|{}", model.unwrap_or("*")))
}

impl<C: Clock> Inner<C> {
    fn now(&self) -> u64 {
        self.clock.now().duration_since(self.start).as_u64()
    }
}

impl<C: Clock + Clone> Inner<C> {
    fn maintain(&self) {
        let now = self.now();
        self.cooldowns.retain(|_, until| *until > now);
        self.cooling.store(self.cooldowns.len(), Ordering::Relaxed);
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
            self.metrics.ratelimit_keys(&p.name, keys);
        }
    }
}

/// Checks `[[limits]]`, naming the policy and the key of each problem.
pub fn validate(limits: &[LimitConfig], clients: &[ClientConfig], problems: &mut Vec<String>) {
    let mut names = HashSet::new();
    let client_names: HashSet<&str> = clients.iter().map(|c| c.name.as_str()).collect();
    for (i, l) in limits.iter().enumerate() {
        let at = format!("limits[{i}] (\"{}\")", l.name);
        if l.name.trim().is_empty() || l.name.contains(['"', '\\']) {
            problems.push(format!(
                "limits[{i}].name: must be a non-empty name without quotes"
            ));
        }
        if !names.insert(l.name.as_str()) {
            problems.push(format!(
                "{at}.name: duplicate policy name; each policy needs its own"
            ));
        }
        if let Err(e) = KeyKind::parse(&l.key) {
            problems.push(format!("{at}.key: {e}"));
        }
        if l.requests.is_none() && l.tokens.is_none() && l.concurrency.is_none() {
            problems.push(format!(
                "{at}: sets no limit; give requests, tokens or concurrency"
            ));
        }
        if l.burst == Some(0) {
            problems.push(format!("{at}.burst: must be at least 1"));
        }
        if l.burst.is_some() && l.requests.is_none() {
            problems.push(format!(
                "{at}.burst: only applies with requests = \"N/unit\""
            ));
        }
        if l.concurrency == Some(0) {
            problems.push(format!("{at}.concurrency: must be at least 1"));
        }
        if l.max_keys == Some(0) {
            problems.push(format!("{at}.max_keys: must be at least 1"));
        }
        if l.on_limit == OnLimit::Wait && l.max_wait.is_none() {
            problems.push(format!(
                "{at}.max_wait: on_limit = \"wait\" needs max_wait, e.g. \"2s\""
            ));
        }
        if l.on_limit == OnLimit::Reject && l.max_wait.is_some() {
            problems.push(format!(
                "{at}.max_wait: only applies with on_limit = \"wait\""
            ));
        }
        for (j, r) in l.matches.routes.iter().enumerate() {
            if Route::from_template(r).is_none() || r == "other" {
                let known: Vec<&str> = Route::ALL
                    .iter()
                    .map(|r| r.as_str())
                    .filter(|r| *r != "other")
                    .collect();
                problems.push(format!(
                    "{at}.match.routes[{j}]: \"{r}\" is not a known route; use one of {}",
                    known.join(", ")
                ));
            }
        }
        for (j, c) in l.matches.clients.iter().enumerate() {
            if !client_names.contains(c.as_str()) {
                problems.push(format!(
                    "{at}.match.clients[{j}]: client \"{c}\" is not defined in [[clients]]"
                ));
            }
        }
        if l.key == "client" && clients.is_empty() {
            // Allowed: without [[clients]] the key is the presented key's fingerprint.
        }
    }
}

#[cfg(test)]
mod tests;

//! The gateway's state: what a config reload replaces at once (upstream, clients, limits
//! and the counters of their policies), the drain, and the places a request holds while it
//! runs (its place under `server.max_inflight`, its place on its connection: [`conn`]).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http::header::HeaderValue;
use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;

use crate::budget::Budgets;
use crate::buffers::Buffers;
use crate::clients::Clients;
use crate::config::{QuotaMode, QuotaStore, Settings, Store, UpstreamConfig};
use crate::cost::Prices;
use crate::errors::redact::Redactor;
use crate::limits::shared::{Health, RedisStore, StoreMetrics};
use crate::limits::{Limits, Verdict, Verdicts};
use crate::metrics::Metrics;
use crate::quota::{Learned, PaceMetrics, Pacer, SharedPictures};
use crate::traces::{TraceCounters, Tracer};
use crate::upstream::Upstream;

mod conn;
pub mod resets;

pub use conn::{ConnSlot, ConnWatch, HeadClock, HeadWait, InService, StreamSlot};
use resets::AddressResets;

/// How often idle limit keys are evicted and the key gauges updated.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(10);

/// Everything a request needs that a config reload replaces at once.
pub struct State {
    pub settings: Settings,
    /// Shared with the state before a reload when `[upstream]` did not change but for the
    /// key ([`same_pool`]): its pooled connections stay.
    pub upstream: Arc<Upstream>,
    pub clients: Clients,
    pub limits: Limits,
    /// The shared limit store, kept (with its connections) when `[redis]` did not change.
    redis: Option<Arc<RedisStore>>,
    /// `Bearer <organization key>` in managed mode.
    pub api_key: Option<HeaderValue>,
    /// Finds the organization's key in text that came from the upstream (managed mode).
    pub redactor: Option<Arc<Redactor>>,
    /// The decision counters of each policy, in [`Limits::policy_names`] order.
    policy_counters: Vec<PolicyCounters>,
    /// Request spans (`[tracing]`), kept with its export queue when the table did not change.
    pub tracer: Arc<Tracer>,
    /// [`Settings::hash`]: which config serves (`/status`, `ezgate_config_info`).
    pub config_hash: Arc<str>,
    /// SHA-256 of `server.admin_token`: what a POST's bearer token is compared with.
    pub admin_token: Option<[u8; 32]>,
    /// The upstream's quota learned from its headers (`None` with `upstream.quota.mode =
    /// "off"`); kept across a reload that leaves `[upstream.quota]` unchanged.
    pub quota: Option<Learned>,
    /// `upstream.quota.mode = "enforce"`: the pictures and queues requests are paced by;
    /// kept (pictures, queues, waiting requests) by every reload that keeps enforcing.
    pub pacer: Option<Arc<Pacer>>,
    /// The id the organization's key is learned under (managed mode): `org:` and a short
    /// fingerprint of the key, so a new key starts a new picture.
    pub quota_org_key: Option<Arc<str>>,
    /// `[prices]`, compiled: what each request's usage cost.
    pub prices: Option<Arc<Prices>>,
    /// `[[budgets]]`: what requests may spend; a reload keeps the accounts of unchanged ones.
    pub budgets: Arc<Budgets>,
}

/// `ezgate_ratelimit_decisions_total` and `…_store_fallbacks_total` of one policy.
struct PolicyCounters {
    decisions: [IntCounter; 4],
    /// Shared policies only.
    fallbacks: Option<IntCounter>,
}

impl State {
    /// The state of `settings`. After a reload, `previous` is the state it replaces: what
    /// did not change is kept (the upstream pool, the Redis connections, the state of every
    /// unchanged policy).
    pub fn build(
        settings: Settings,
        metrics: &Arc<Metrics>,
        previous: Option<&State>,
    ) -> Result<State, String> {
        let cfg = &settings.config;
        let upstream = match previous {
            Some(p) if same_pool(&p.settings, &settings) => Arc::clone(&p.upstream),
            _ => Arc::new(Upstream::new(&settings)?),
        };
        let clients = Clients::new(&cfg.clients, settings.managed());
        let redis = match (&cfg.redis, previous) {
            (Some(r), Some(p)) if p.settings.config.redis.as_ref() == Some(r) => p.redis.clone(),
            (Some(r), _) => Some(Arc::new(RedisStore::new(r, Box::new(log_redis_health), {
                let (up, check_duration) = metrics.store_handles();
                StoreMetrics { up, check_duration }
            })?)),
            (None, _) => {
                metrics.store_removed();
                None
            }
        };
        let limits = match previous {
            Some(p) => p.limits.reload(&cfg.limits, redis.clone()),
            None => Limits::new(&cfg.limits, redis.clone()),
        };
        let policy_counters = limits
            .policy_names()
            .zip(&settings.config.limits)
            .map(|(name, cfg)| PolicyCounters {
                decisions: metrics.decision_counters(name),
                fallbacks: (cfg.store == Store::Redis).then(|| metrics.fallback_counter(name)),
            })
            .collect();
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(maintain_forever(limits.downgrade(), Arc::clone(metrics)));
        }
        let api_key = match &settings.config.upstream.api_key {
            Some(k) => {
                let mut v =
                    HeaderValue::from_str(&format!("Bearer {}", k.expose())).map_err(|_| {
                        "upstream.api_key: contains characters not allowed in a header".to_owned()
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let redactor = settings
            .config
            .upstream
            .api_key
            .as_ref()
            .and_then(|k| Redactor::new(k.expose()))
            .map(Arc::new);
        let tracer = match (&cfg.tracing, previous) {
            (Some(t), Some(p)) if p.settings.config.tracing.as_ref() == Some(t) => {
                Arc::clone(&p.tracer)
            }
            (Some(t), _) => {
                let (exported, queue_full, export_failed) = metrics.trace_counters();
                let counters = TraceCounters {
                    exported,
                    queue_full,
                    export_failed,
                };
                Arc::new(Tracer::new(t, counters)?)
            }
            (None, _) => Arc::new(Tracer::off()),
        };
        let config_hash = Arc::from(settings.hash());
        let admin_token = cfg
            .server
            .admin_token
            .as_ref()
            .map(|t| crate::clients::sha256(t.expose().as_bytes()));
        let quota = match (cfg.upstream.quota.mode, previous) {
            (QuotaMode::Off, _) => None,
            (_, Some(p)) if p.settings.config.upstream.quota == cfg.upstream.quota => {
                p.quota.clone()
            }
            _ => None,
        }
        .or_else(|| (cfg.upstream.quota.mode != QuotaMode::Off).then(Learned::new));
        let queue_cap = usize::try_from(cfg.server.max_inflight / 4).unwrap_or(usize::MAX);
        // `store = "redis"`: the fleet's picture, in the shared limits' Redis.
        let quota_redis = match cfg.upstream.quota.store {
            QuotaStore::Redis => redis.as_ref(),
            QuotaStore::Local => None,
        };
        let kept = previous
            .and_then(|p| p.pacer.as_ref())
            .filter(|p| p.same_store(quota_redis));
        let pacer = match (cfg.upstream.quota.mode, kept) {
            (QuotaMode::Enforce, Some(p)) => {
                p.configure(cfg.upstream.quota.clone(), queue_cap);
                Some(Arc::clone(p))
            }
            (QuotaMode::Enforce, None) => Some(Pacer::new(
                cfg.upstream.quota.clone(),
                queue_cap,
                {
                    let (queued, wait) = metrics.queue.handles();
                    PaceMetrics { queued, wait }
                },
                quota_redis.map(|r| SharedPictures::new(Arc::clone(r))),
            )),
            _ => None,
        };
        let quota_org_key = cfg.upstream.api_key.as_ref().map(|k| {
            let fp = crate::clients::fingerprint(&crate::clients::sha256(k.expose().as_bytes()));
            Arc::from(format!("org:{}", fp.trim_start_matches("fp:")))
        });
        let prices = cfg.prices.as_ref().map(|p| Arc::new(Prices::new(p)));
        let budgets = Arc::new(Budgets::new(
            &cfg.budgets,
            previous.map(|p| &*p.budgets),
            cfg.server.state_dir.as_deref(),
            redis.as_ref(),
            crate::budget::clock::now(),
        )?);
        Ok(State {
            prices,
            budgets,
            quota,
            pacer,
            quota_org_key,
            config_hash,
            admin_token,
            settings,
            upstream,
            clients,
            limits,
            redis,
            api_key,
            redactor,
            policy_counters,
            tracer,
        })
    }

    /// The live gateways sharing `[redis]`, by the fleet heartbeat (`None` without Redis or
    /// before the first heartbeat was answered).
    pub fn fleet(&self) -> Option<u32> {
        self.redis.as_ref().and_then(|r| r.fleet())
    }

    /// The shared store's state for the admin view: (mode, up, its last outage's error).
    pub fn store_health(&self) -> Option<(crate::config::RedisMode, bool, Option<String>)> {
        let redis = self.redis.as_ref()?;
        let mode = self.settings.config.redis.as_ref()?.mode;
        let (up, error) = redis.health();
        Some((mode, up, error))
    }

    /// Counts what the policies decided for one request.
    pub fn count_verdicts(&self, verdicts: &Verdicts) {
        for &(policy, verdict) in verdicts {
            let Some(c) = self.policy_counters.get(policy) else {
                continue;
            };
            match verdict {
                Verdict::Allowed => c.decisions[0].inc(),
                Verdict::Limited => c.decisions[1].inc(),
                Verdict::ShadowLimited => c.decisions[2].inc(),
                Verdict::Waited => c.decisions[3].inc(),
                Verdict::StoreFallback => {
                    if let Some(f) = &c.fallbacks {
                        f.inc();
                    }
                }
            }
        }
    }
}

/// The log lines of a Redis outage: one when it starts, one when it ends.
fn log_redis_health(health: Health) {
    match health {
        Health::Down { error, fail_closed } => {
            let then = if fail_closed {
                "refusing requests of shared policies"
            } else {
                "falling back to local limits"
            };
            tracing::error!(error = %error, "redis unavailable; {then} until it returns");
        }
        Health::Up => {
            tracing::info!("redis reachable again; shared limits are enforced in Redis again")
        }
        Health::ReleasesWaiting { pending, error } => tracing::warn!(
            error = %error,
            pending,
            "redis: concurrency slot releases failed; retrying them until Redis answers (a slot not released meanwhile expires after redis.concurrency_lease)"
        ),
        Health::ReleasesDone { dropped } => tracing::info!(
            dropped,
            "redis: the concurrency slot releases that waited are done (dropped ones expire after redis.concurrency_lease)"
        ),
    }
}

/// Evicts idle limit keys every few seconds and shows how many each policy tracks, until a
/// reload replaces the policies.
async fn maintain_forever(limits: crate::limits::WeakLimits, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(limits) = limits.upgrade() else {
            return;
        };
        let counts = limits.maintain();
        for (name, keys) in limits.policy_names().zip(counts) {
            metrics.ratelimit_keys(name, keys);
        }
    }
}

/// The gateway: current state (swapped on reload), metrics, drain flag, in-flight count.
pub struct Gateway {
    state: RwLock<Arc<State>>,
    pub metrics: Arc<Metrics>,
    draining: AtomicBool,
    inflight: Arc<AtomicU32>,
    /// Bytes held by the request bodies ezgate reads whole (`server.max_buffered_bytes`).
    pub buffers: Buffers,
    /// Cancelled when `server.shutdown_grace` is over: open streams end with an error event.
    cut: CancellationToken,
    /// Cancelled when the drain begins: requests waiting for the upstream's quota end.
    drain_started: CancellationToken,
    /// Open WebSocket sessions: they outlive their connection's task, and the drain waits
    /// for them too.
    sessions: Arc<tokio::sync::watch::Sender<usize>>,
    /// Accepted HTTP/2 streams reset by their client, per client address: kept across
    /// reloads and connections.
    pub resets: Arc<AddressResets>,
    /// The last time a config was applied or refused (startup counts as applied).
    last_reload: Mutex<ReloadRecord>,
}

/// One config load: at startup or on SIGHUP, applied or refused.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadRecord {
    /// RFC 3339, UTC.
    pub at: String,
    /// `startup` or `signal` (SIGHUP).
    pub trigger: &'static str,
    /// `applied` or `refused`.
    pub result: &'static str,
    /// Why it was refused: the config problems, which never hold a secret's value.
    pub error: Option<String>,
}

impl ReloadRecord {
    fn now(trigger: &'static str, error: Option<String>) -> ReloadRecord {
        ReloadRecord {
            at: crate::access_log::rfc3339(std::time::SystemTime::now()),
            trigger,
            result: if error.is_none() {
                "applied"
            } else {
                "refused"
            },
            error,
        }
    }
}

impl Gateway {
    pub fn new(state: State, metrics: Arc<Metrics>) -> Gateway {
        metrics.status.config(&state.config_hash);
        Gateway {
            last_reload: Mutex::new(ReloadRecord::now("startup", None)),
            state: RwLock::new(Arc::new(state)),
            metrics,
            draining: AtomicBool::new(false),
            inflight: Arc::new(AtomicU32::new(0)),
            buffers: Buffers::default(),
            cut: CancellationToken::new(),
            drain_started: CancellationToken::new(),
            sessions: Arc::new(tokio::sync::watch::Sender::new(0)),
            resets: Arc::new(AddressResets::default()),
        }
    }

    pub fn state(&self) -> Arc<State> {
        match self.state.read() {
            Ok(s) => Arc::clone(&s),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Applies a reloaded config to new requests; requests in flight keep the old one.
    pub fn replace(&self, state: State) {
        let new = Arc::new(state);
        match self.state.write() {
            Ok(mut s) => *s = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    /// Notes a SIGHUP reload: `Ok` when its state now serves (call after
    /// [`Gateway::replace`]), `Err` with why it was refused.
    pub fn reloaded(&self, result: Result<(), String>) {
        let error = result.err();
        self.metrics.status.reload(error.is_none());
        if error.is_none() {
            self.metrics.status.config(&self.state().config_hash);
        }
        let record = ReloadRecord::now("signal", error);
        match self.last_reload.lock() {
            Ok(mut r) => *r = record,
            Err(poisoned) => *poisoned.into_inner() = record,
        }
    }

    /// The last config load (a copy).
    pub fn last_reload(&self) -> ReloadRecord {
        match self.last_reload.lock() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.drain_started.cancel();
    }

    /// What a request waiting for the upstream's quota watches: the drain's start.
    pub fn drain_token(&self) -> &CancellationToken {
        &self.drain_started
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The drain's grace is over: every stream still open ends with `shutting_down`.
    pub fn cut_streams(&self) {
        self.cut.cancel();
    }

    /// What open streams watch for the end of the drain's grace.
    pub fn cut_token(&self) -> CancellationToken {
        self.cut.clone()
    }

    /// One of `max` places for a WebSocket session (from its handshake to its end), or
    /// `None` when all are taken. Sessions take no `max_inflight` place: open sessions
    /// never crowd out plain requests.
    pub fn take_session_place(&self, max: u32) -> Option<SessionPlace> {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let taken = self.sessions.send_if_modified(|n| {
            if *n >= max {
                return false;
            }
            *n += 1;
            true
        });
        taken.then(|| SessionPlace(Arc::clone(&self.sessions)))
    }

    /// Resolves once no WebSocket session is open.
    pub async fn sessions_ended(&self) {
        let mut open = self.sessions.subscribe();
        let _ = open.wait_for(|n| *n == 0).await;
    }

    /// One of `max` places for a request in flight, or `None` when all are taken.
    pub fn take_place(&self, max: u32) -> Option<InflightSlot> {
        if self.inflight.fetch_add(1, Ordering::Relaxed) >= max {
            self.inflight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(InflightSlot(Arc::clone(&self.inflight)))
    }
}

/// Counts one open WebSocket session until it drops.
pub struct SessionPlace(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for SessionPlace {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Holds one of `server.max_inflight` places until the response ends.
pub struct InflightSlot(Arc<AtomicU32>);

impl Drop for InflightSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a reload keeps the upstream's connections: everything in `[upstream]` shapes
/// them but the key (set on each request, so a rotated `upstream.api_key` keeps the warm
/// pool) and `forward_client_ip` (a request header).
fn same_pool(old: &Settings, new: &Settings) -> bool {
    let pool = |s: &Settings| UpstreamConfig {
        api_key: None,
        forward_client_ip: false,
        quota: crate::config::QuotaConfig::default(),
        ..s.config.upstream.clone()
    };
    old.upstream_uri == new.upstream_uri && pool(old) == pool(new)
}

//! Limits held in Redis, shared by every replica (`store = "redis"`): GCRA for requests and
//! tokens, leased slots for concurrency, each evaluated atomically by a Lua script on the Redis
//! server's clock in one round trip. On a timeout or outage, callers fall back to their local
//! limiter (or refuse, with `[redis] on_failure = "deny"`). Every gateway also announces
//! itself in Redis ([`HEARTBEAT_EVERY`]), so each knows how many share the limits
//! ([`RedisStore::fleet`]). Concurrency slots are leased, renewed while their requests run
//! and released until Redis confirms it ([`super::lease`]).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Cmd, Value};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::lease::{self, Leases};
use super::link::{Failure, Link};
use crate::config::RedisConfig;
use prometheus::{Histogram, IntGauge};

/// What the shared store reports, as the path hands it the handles: its health
/// (`ezgate_ratelimit_store_up`) and each check's round trip
/// (`ezgate_ratelimit_store_check_duration_seconds`).
#[derive(Clone)]
pub struct StoreMetrics {
    pub up: IntGauge,
    pub check_duration: Histogram,
}

/// GCRA for `cost` units. KEYS[1]: the theoretical arrival time (µs, server clock).
/// ARGV: µs per unit, burst (units), cost. Returns {allowed, wait_us, remaining}.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local limit = burst * interval
local need = math.min(cost, burst) * interval
if tat - now > limit - need then
  return {0, math.ceil((tat - now) - (limit - need)), math.max(0, math.floor((limit - (tat - now)) / interval))}
end
local new_tat = tat + cost * interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0, math.floor((limit - (new_tat - now)) / interval)}
";

/// Moves a GCRA key's arrival time by ARGV[1] µs (token settlement: refund or extra charge).
const ADJUST: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then return 0 end
local new_tat = tat + tonumber(ARGV[1])
if new_tat <= now then redis.call('DEL', KEYS[1]) return 0 end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return 1
";

/// Takes a concurrency slot: a member of a sorted set scored by its lease expiry, so slots of
/// a replica that died expire (the live ones are renewed, [`super::lease`]). ARGV: max, lease
/// ms, slot id. Returns 1 or 0.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
";

/// The fleet heartbeat: this gateway is a member of the sorted set until its score (an
/// expiry, ms on the server's clock); expired members are removed. ARGV: instance id, expiry
/// ms. Returns the number of live gateways.
const FLEET: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
";

/// The sorted set of live gateways (one hash slot in a cluster).
pub const FLEET_KEY: &str = "ezgate:{fleet}:members";
/// How often each gateway renews its membership and reads the count.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(3);
/// A gateway that stopped renewing is no longer counted after this long.
pub const FLEET_EXPIRY: Duration = Duration::from_secs(10);
/// An outage is over when checks have succeeded with no failure for this long: a partial
/// outage (one cluster node of several) is one outage, not a flap per request.
pub const RECOVERED_AFTER: Duration = Duration::from_secs(1);

pub struct Script {
    body: &'static str,
    sha: String,
}

impl Script {
    pub fn new(body: &'static str) -> Script {
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, body.as_bytes());
        let sha = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Script { body, sha }
    }

    /// `EVALSHA` (or, with `load`, `EVAL` with the body) on one key.
    fn cmd(&self, load: bool, key: &str, args: &[String]) -> Cmd {
        let mut cmd = if load {
            let mut c = redis::cmd("EVAL");
            c.arg(self.body);
            c
        } else {
            let mut c = redis::cmd("EVALSHA");
            c.arg(&self.sha);
            c
        };
        cmd.arg(1).arg(key);
        for a in args {
            cmd.arg(a.as_str());
        }
        cmd
    }
}

/// The outcome of one shared check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shared {
    Allowed {
        remaining: u64,
    },
    /// `remaining`: units left, fewer than the check needed.
    Limited {
        wait: Duration,
        remaining: u64,
    },
}

/// A change in Redis's health, told once when it happens (the caller logs it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Redis stopped answering; `fail_closed` says what shared policies do meanwhile.
    Down {
        error: String,
        fail_closed: bool,
    },
    Up,
    /// Releases of concurrency slots failed and are being retried (told once per outage).
    ReleasesWaiting {
        pending: usize,
        error: String,
    },
    /// The releases that waited are done; `dropped` were given up (the queue was full) and
    /// their slots expire with their lease.
    ReleasesDone {
        dropped: u64,
    },
}

/// Where health changes go.
pub type HealthSink = Box<dyn Fn(Health) + Send + Sync>;

/// Whether Redis answers, by every check and fleet heartbeat: tells an outage once when
/// it starts and once when it has ended, and keeps `ezgate_ratelimit_store_up`.
struct StoreHealth {
    on_health: Arc<HealthSink>,
    /// Where Redis is, for the outage's log line.
    describe: String,
    timeout: Duration,
    fail_closed: bool,
    /// [`UNKNOWN`] until the first answer or failure, then [`UP`] or [`DOWN`].
    state: AtomicU8,
    /// ms since `epoch` of the last failed check.
    last_failure: AtomicU64,
    /// What the last outage began with, for the admin view (set once per outage).
    last_error: std::sync::Mutex<Option<String>>,
    epoch: Instant,
    /// `ezgate_ratelimit_store_up`: 1 in [`UP`], else 0.
    up: IntGauge,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl StoreHealth {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Tells an outage once when it starts and once when it has ended (no failure for
    /// [`RECOVERED_AFTER`]).
    /// A check that is answered while Redis is up costs one atomic load.
    fn note(&self, failure: Option<&Failure>) {
        match failure {
            None => match self.state.load(Ordering::SeqCst) {
                UP => {}
                DOWN => {
                    let quiet = self
                        .now_ms()
                        .saturating_sub(self.last_failure.load(Ordering::SeqCst));
                    if u128::from(quiet) >= RECOVERED_AFTER.as_millis() && self.transition(DOWN, UP)
                    {
                        (self.on_health)(Health::Up);
                    }
                }
                _ => {
                    self.transition(UNKNOWN, UP);
                }
            },
            Some(f) => {
                self.last_failure.store(self.now_ms(), Ordering::SeqCst);
                if self.state.swap(DOWN, Ordering::SeqCst) != DOWN {
                    self.publish();
                    let error = format!("{}: {}", self.describe, explain(f, self.timeout));
                    if let Ok(mut last) = self.last_error.lock() {
                        *last = Some(error.clone());
                    }
                    (self.on_health)(Health::Down {
                        error,
                        fail_closed: self.fail_closed,
                    });
                }
            }
        }
    }

    /// Moves from `from` to `to`; false when another check moved first.
    fn transition(&self, from: u8, to: u8) -> bool {
        let moved = self
            .state
            .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if moved {
            self.publish();
        }
        moved
    }

    /// Sets the gauge from the state, again if the state moved meanwhile: of racing
    /// transitions, the last write is always that of the state that stays.
    fn publish(&self) {
        loop {
            let state = self.state.load(Ordering::SeqCst);
            self.up.set(i64::from(state == UP));
            if self.state.load(Ordering::SeqCst) == state {
                break;
            }
        }
    }
}

/// The connection to Redis and what every shared policy needs from it.
pub struct RedisStore {
    on_health: Arc<HealthSink>,
    health: Arc<StoreHealth>,
    /// `ezgate_ratelimit_store_check_duration_seconds`
    check_duration: Histogram,
    link: Arc<Link>,
    timeout: Duration,
    pub lease: Duration,
    /// `redis.replicas`: a fixed count that wins over [`RedisStore::fleet`].
    replicas: Option<u32>,
    pub fail_closed: bool,
    gcra: Script,
    adjust: Script,
    acquire: Script,
    next_slot: AtomicU64,
    leases: Arc<Leases>,
    instance: String,
    /// Live gateways counted by the last heartbeat; 0 until the first.
    fleet: Arc<AtomicU32>,
    _heartbeat: Option<DropGuard>,
    _leases: Option<DropGuard>,
}

impl RedisStore {
    /// Sets up the connection (made in the background) and, inside a tokio runtime, starts
    /// the fleet heartbeat. `metrics` are the store's health and check-duration handles.
    pub fn new(
        cfg: &RedisConfig,
        on_health: HealthSink,
        metrics: StoreMetrics,
    ) -> Result<RedisStore, String> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err("redis: the shared store needs the tokio runtime".into());
        }
        let link = Arc::new(Link::open(cfg)?);
        let instance = crate::headers::new_request_id();
        let on_health = Arc::new(on_health);
        let fail_closed = cfg.on_failure == crate::config::OnFailure::Deny;
        metrics.up.set(0);
        let health = Arc::new(StoreHealth {
            on_health: Arc::clone(&on_health),
            describe: link.describe.clone(),
            timeout: cfg.timeout.0,
            fail_closed,
            state: AtomicU8::new(UNKNOWN),
            last_failure: AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
            epoch: Instant::now(),
            up: metrics.up,
        });
        let mut store = RedisStore {
            on_health,
            health,
            check_duration: metrics.check_duration,
            link,
            timeout: cfg.timeout.0,
            lease: cfg.concurrency_lease.0,
            replicas: cfg.replicas,
            fail_closed,
            gcra: Script::new(GCRA),
            adjust: Script::new(ADJUST),
            acquire: Script::new(ACQUIRE),
            next_slot: AtomicU64::new(0),
            leases: Arc::new(Leases::new(instance.clone())),
            instance,
            fleet: Arc::new(AtomicU32::new(0)),
            _heartbeat: None,
            _leases: None,
        };
        let stop = CancellationToken::new();
        tokio::spawn(heartbeat(
            Arc::clone(&store.link),
            store.instance.clone(),
            Arc::clone(&store.fleet),
            Arc::clone(&store.health),
            store.timeout.max(Duration::from_secs(1)),
            stop.clone(),
        ));
        store._heartbeat = Some(stop.drop_guard());
        let stop = CancellationToken::new();
        tokio::spawn(lease::keep(
            Arc::clone(&store.leases),
            Arc::clone(&store.link),
            store.lease,
            store.timeout.max(Duration::from_secs(1)),
            Arc::clone(&store.on_health),
            stop.clone(),
        ));
        store._leases = Some(stop.drop_guard());
        Ok(store)
    }

    /// The number of live gateways sharing this Redis, from the last heartbeat (kept while
    /// Redis is away); `None` until the first heartbeat was answered.
    pub fn fleet(&self) -> Option<u32> {
        match self.fleet.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    /// Whether Redis answers (false from a failed check until it has answered for a while),
    /// and what its last outage began with (no password: the connection is described
    /// without it).
    pub fn health(&self) -> (bool, Option<String>) {
        let h = &self.health;
        let last = h.last_error.lock().ok().and_then(|l| l.clone());
        (h.state.load(Ordering::SeqCst) == UP, last)
    }

    /// How many gateways a limit is divided by for the local fallback: `redis.replicas` when
    /// set, else the live gateways ([`RedisStore::fleet`]), else 1.
    pub fn share(&self) -> u32 {
        match self.replicas {
            Some(n) => n.max(1),
            None => self.fleet().unwrap_or(1),
        }
    }

    /// Runs a script by SHA (sending its body with `EVAL` on `NOSCRIPT`, so it is loaded on
    /// whichever node owns the key), within the check timeout.
    pub async fn eval(&self, script: &Script, key: &str, args: &[String]) -> Result<Value, String> {
        self.eval_raw(script, key, args)
            .await
            .map_err(|f| explain(&f, self.timeout))
    }

    async fn eval_raw(
        &self,
        script: &Script,
        key: &str,
        args: &[String],
    ) -> Result<Value, Failure> {
        let start = Instant::now();
        let result = run_script(&self.link, script, key, args, self.timeout).await;
        self.check_duration.observe(start.elapsed().as_secs_f64());
        if result.is_ok() {
            self.leases.answered();
        }
        self.health.note(result.as_ref().err());
        result
    }

    /// GCRA on `key`: `cost` units at `interval` each, `burst` units at once.
    pub async fn take(
        &self,
        key: &str,
        interval: Duration,
        burst: u64,
        cost: u64,
    ) -> Result<Shared, String> {
        let us = interval.as_secs_f64() * 1e6;
        let reply = self
            .eval(
                &self.gcra,
                key,
                &[format!("{us:.3}"), burst.to_string(), cost.to_string()],
            )
            .await?;
        let Value::Array(items) = reply else {
            return Err("unexpected reply to the GCRA script".into());
        };
        let n = |i: usize| items.get(i).and_then(as_int).unwrap_or(0);
        Ok(if n(0) == 1 {
            Shared::Allowed {
                remaining: u64::try_from(n(2)).unwrap_or(0),
            }
        } else {
            Shared::Limited {
                wait: Duration::from_micros(u64::try_from(n(1)).unwrap_or(0)),
                remaining: u64::try_from(n(2)).unwrap_or(0),
            }
        })
    }

    /// Moves `key`'s arrival time by `delta_units` × `interval` (negative: refund).
    pub async fn adjust(
        &self,
        key: &str,
        interval: Duration,
        delta_units: i64,
    ) -> Result<(), String> {
        let us = interval.as_secs_f64() * 1e6 * delta_units as f64;
        self.eval(&self.adjust, key, &[format!("{us:.0}")])
            .await
            .map(|_| ())
    }

    /// Takes one of `max` leased slots under `key`; returns the slot's number, renewed until
    /// [`RedisStore::release`]. An acquire whose reply was lost (the script may have run) is
    /// released at once, so it cannot leak.
    pub async fn acquire(&self, key: &Arc<str>, max: u32) -> Result<Option<u64>, String> {
        let n = self.next_slot.fetch_add(1, Ordering::Relaxed);
        let lease_ms = self.lease.as_millis().to_string();
        let args = [max.to_string(), lease_ms, self.leases.id(n)];
        match self.eval_raw(&self.acquire, key, &args).await {
            Ok(reply) if as_int(&reply) == Some(1) => {
                self.leases.hold(key, n);
                Ok(Some(n))
            }
            Ok(_) => Ok(None),
            Err(f) => {
                if lease::may_have_run(&f) {
                    self.leases.release(key, n);
                }
                Err(explain(&f, self.timeout))
            }
        }
    }

    /// Gives slot `n` under `key` back: queued, sent by the lease task, retried until Redis
    /// answers.
    pub fn release(&self, key: &Arc<str>, n: u64) {
        self.leases.release(key, n);
    }
}

/// What a failed command tells an operator.
pub(super) fn explain(f: &Failure, timeout: Duration) -> String {
    match f {
        Failure::Timeout => format!("no answer within {timeout:?} (redis.timeout)"),
        Failure::Redis(e) => e.to_string(),
        Failure::NotConnected(why) => format!("not connected: {why}"),
    }
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

/// `EVALSHA`, then `EVAL` on `NOSCRIPT`, both within `timeout`.
pub(super) async fn run_script(
    link: &Link,
    script: &Script,
    key: &str,
    args: &[String],
    timeout: Duration,
) -> Result<Value, Failure> {
    let start = tokio::time::Instant::now();
    match link.query(&script.cmd(false, key, args), timeout).await {
        Err(f) if f.is_noscript() => {
            let left = timeout.saturating_sub(start.elapsed());
            link.query(&script.cmd(true, key, args), left).await
        }
        r => r,
    }
}

/// Renews this gateway's membership of the fleet every [`HEARTBEAT_EVERY`] and keeps the
/// count; leaves the fleet when stopped.
async fn heartbeat(
    link: Arc<Link>,
    instance: String,
    fleet: Arc<AtomicU32>,
    health: Arc<StoreHealth>,
    timeout: Duration,
    stop: CancellationToken,
) {
    let script = Script::new(FLEET);
    let expiry = FLEET_EXPIRY.as_millis().to_string();
    let args = [instance.clone(), expiry];
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        // A failed beat keeps the last count: the fallback needs it most while Redis is away.
        // Its answer (or none) is news of Redis's health too, with no traffic at all.
        let beat = run_script(&link, &script, FLEET_KEY, &args, timeout).await;
        health.note(beat.as_ref().err());
        if let Ok(v) = beat {
            if let Some(n) = as_int(&v).and_then(|n| u32::try_from(n).ok()) {
                fleet.store(n.max(1), Ordering::Relaxed);
            }
        }
    }
    let mut cmd = redis::cmd("ZREM");
    cmd.arg(FLEET_KEY).arg(&instance);
    let _ = link.query(&cmd, timeout).await;
}

/// Redis Cluster-safe key: everything of one policy key hashes to one slot.
pub fn redis_key(policy: &str, key: &str, part: &str) -> String {
    let clean: String = key
        .chars()
        .map(|c| if c == '{' || c == '}' { '_' } else { c })
        .collect();
    format!("ezgate:{{{policy}:{clean}}}:{part}")
}

/// Releases a shared concurrency slot when the request ends.
pub struct SharedSlot {
    pub store: Arc<RedisStore>,
    pub key: Arc<str>,
    /// The slot's number ([`RedisStore::acquire`]).
    pub n: u64,
}

impl Drop for SharedSlot {
    fn drop(&mut self) {
        self.store.release(&self.key, self.n);
    }
}

/// Settles a shared token reservation.
pub struct SharedTokens {
    pub store: Arc<RedisStore>,
    pub key: String,
    pub interval: Duration,
}

impl SharedTokens {
    pub fn settle(self: &Arc<Self>, reserved: u64, used: u64) {
        let delta =
            i64::try_from(used).unwrap_or(i64::MAX) - i64::try_from(reserved).unwrap_or(i64::MAX);
        if delta == 0 {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let this = Arc::clone(self);
            handle.spawn(async move {
                let _ = this.store.adjust(&this.key, this.interval, delta).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_cluster_safe() {
        assert_eq!(
            redis_key("per-client", "team{a}", "rate"),
            "ezgate:{per-client:team_a_}:rate"
        );
    }

    #[test]
    fn store_up_follows_outages_told_once() {
        let told = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&told);
        let health = StoreHealth {
            on_health: Arc::new(Box::new(move |h| sink.lock().unwrap().push(h))),
            describe: "redis://127.0.0.1:1".into(),
            timeout: Duration::from_millis(50),
            fail_closed: false,
            state: AtomicU8::new(UNKNOWN),
            last_failure: AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
            epoch: Instant::now().checked_sub(Duration::from_secs(10)).unwrap(),
            up: IntGauge::new("ezgate_ratelimit_store_up", "test").unwrap(),
        };
        health.up.set(0);
        health.note(None);
        assert_eq!(health.up.get(), 1, "the first answer");
        assert!(told.lock().unwrap().is_empty(), "startup is not a recovery");
        for _ in 0..3 {
            health.note(Some(&Failure::Timeout));
        }
        assert_eq!(health.up.get(), 0);
        health.note(None);
        assert_eq!(
            health.up.get(),
            0,
            "one answer right after a failure is no recovery"
        );
        // The last failure long ago (epoch is 10 s back): recovered.
        health.last_failure.store(0, Ordering::SeqCst);
        health.note(None);
        assert_eq!(health.up.get(), 1);
        let told = told.lock().unwrap();
        assert_eq!(told.len(), 2, "{told:?}");
        assert!(
            matches!(&told[0], Health::Down { error, fail_closed: false } if error.contains("redis.timeout"))
        );
        assert_eq!(told[1], Health::Up);
    }

    #[test]
    fn scripts_are_addressed_by_sha1() {
        assert_eq!(
            Script::new("return 1").sha,
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }
}

//! Limits held in Redis, shared by every replica (`store = "redis"`): GCRA for requests and
//! tokens, leased slots for concurrency, each evaluated atomically by a Lua script on the Redis
//! server's clock in one round trip. On a timeout or outage, callers fall back to their local
//! limiter (or refuse, with `[redis] on_failure = "deny"`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::redis::{Client, Reply};
use crate::config::RedisConfig;
use crate::config::RedisTarget;

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
/// a replica that died expire. ARGV: max, lease ms, slot id. Returns 1 or 0.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
";

struct Script {
    body: &'static str,
    sha: String,
}

impl Script {
    fn new(body: &'static str) -> Script {
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, body.as_bytes());
        let sha = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Script { body, sha }
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
}

/// Where health changes go.
pub type HealthSink = Box<dyn Fn(Health) + Send + Sync>;

/// The connection to Redis and what every shared policy needs from it.
pub struct RedisStore {
    on_health: HealthSink,
    client: Client,
    timeout: Duration,
    pub lease: Duration,
    pub replicas: u32,
    pub fail_closed: bool,
    down: AtomicBool,
    gcra: Script,
    adjust: Script,
    acquire: Script,
    next_slot: AtomicU64,
    instance: String,
}

impl RedisStore {
    pub fn new(cfg: &RedisConfig, on_health: HealthSink) -> Result<RedisStore, String> {
        let target = RedisTarget::parse(cfg.url.expose()).map_err(|e| format!("redis.url: {e}"))?;
        let tls = if target.tls {
            Some(
                crate::tls::client_tls(cfg.ca_file.as_deref())
                    .map_err(|e| format!("redis: {e}"))?,
            )
        } else {
            None
        };
        Ok(RedisStore {
            on_health,
            client: Client::new(target, tls, cfg.connect_timeout.0),
            timeout: cfg.timeout.0,
            lease: cfg.concurrency_lease.0,
            replicas: cfg.replicas.max(1),
            fail_closed: cfg.on_failure == crate::config::OnFailure::Deny,
            down: AtomicBool::new(false),
            gcra: Script::new(GCRA),
            adjust: Script::new(ADJUST),
            acquire: Script::new(ACQUIRE),
            next_slot: AtomicU64::new(0),
            instance: crate::headers::new_request_id(),
        })
    }

    /// Runs a script by SHA (loading it on `NOSCRIPT`), within the check timeout.
    async fn eval(&self, script: &Script, key: &str, args: &[String]) -> Result<Reply, String> {
        let call = async {
            let mut cmd: Vec<&[u8]> = vec![b"EVALSHA", script.sha.as_bytes(), b"1", key.as_bytes()];
            cmd.extend(args.iter().map(|a| a.as_bytes()));
            match self.client.call(&cmd).await? {
                Reply::Error(e) if e.starts_with("NOSCRIPT") => {
                    cmd[0] = b"EVAL";
                    cmd[1] = script.body.as_bytes();
                    self.client.call(&cmd).await
                }
                other => Ok(other),
            }
        };
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(Reply::Error(e))) => Err(format!("redis error: {e}")),
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer within {:?} (redis.timeout)",
                self.timeout
            )),
        };
        self.note(&result);
        result
    }

    /// Tells an outage once when it starts and once when it ends.
    fn note<T>(&self, result: &Result<T, String>) {
        match result {
            Ok(_) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    (self.on_health)(Health::Up);
                }
            }
            Err(e) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    (self.on_health)(Health::Down {
                        error: e.clone(),
                        fail_closed: self.fail_closed,
                    });
                }
            }
        }
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
        let Reply::Array(Some(items)) = reply else {
            return Err("unexpected reply to the GCRA script".into());
        };
        let n = |i: usize| items.get(i).and_then(Reply::as_int).unwrap_or(0);
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

    /// Takes one of `max` leased slots; returns the slot id.
    pub async fn acquire(&self, key: &str, max: u32) -> Result<Option<String>, String> {
        let id = format!(
            "{}-{}",
            self.instance,
            self.next_slot.fetch_add(1, Ordering::Relaxed)
        );
        let lease_ms = self.lease.as_millis().to_string();
        let reply = self
            .eval(&self.acquire, key, &[max.to_string(), lease_ms, id.clone()])
            .await?;
        Ok((reply.as_int() == Some(1)).then_some(id))
    }

    pub async fn release(&self, key: &str, id: &str) {
        let result = tokio::time::timeout(
            self.timeout,
            self.client.call(&[b"ZREM", key.as_bytes(), id.as_bytes()]),
        )
        .await;
        let _ = result;
    }
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
    pub key: String,
    pub id: String,
}

impl Drop for SharedSlot {
    fn drop(&mut self) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (store, key, id) = (
                Arc::clone(&self.store),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.id),
            );
            handle.spawn(async move { store.release(&key, &id).await });
        }
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
    fn scripts_are_addressed_by_sha1() {
        assert_eq!(
            Script::new("return 1").sha,
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }
}

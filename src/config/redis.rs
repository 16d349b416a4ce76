//! `[redis]`: where the shared policies keep their state (standalone, Cluster or Sentinel),
//! and how a gateway behaves while it is away.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::{Dur, Secret};
use super::{validate, RedisTarget};

/// `[redis]`: the store for `store = "redis"` policies, shared by every replica.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// How Redis is deployed: one server, a Redis Cluster, or primaries watched by Sentinel.
    #[serde(default)]
    pub mode: RedisMode,
    /// Standalone: `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS. Sentinel
    /// (optional): how to reach the master, `redis://[user:password@]<master_name>[/db]`.
    /// May be `${VAR}`.
    pub url: Option<Secret>,
    /// Cluster: seed nodes (any of the cluster's nodes); Sentinel: the sentinels. Each a
    /// `redis://` or `rediss://` URL, or `${VAR}`.
    #[serde(default)]
    pub nodes: Vec<Secret>,
    /// Sentinel: the name the sentinels know the master by.
    pub master_name: Option<String>,
    /// Longest wait for one limit check before falling back.
    #[serde(default = "default_redis_timeout")]
    pub timeout: Dur,
    #[serde(default = "default_redis_connect_timeout")]
    pub connect_timeout: Dur,
    /// How many ezgate replicas share the limits: the local fallback admits 1/replicas.
    /// Unset: the number of live gateways the fleet heartbeat counts in Redis.
    pub replicas: Option<u32>,
    /// `local` (fall back to a per-replica limiter) or `deny` (refuse while Redis is away).
    #[serde(default)]
    pub on_failure: OnFailure,
    /// A concurrency slot's lease in Redis, renewed every third of it while its request
    /// runs: the slots of a replica that died, or whose release was lost, expire after this.
    #[serde(default = "default_lease")]
    pub concurrency_lease: Dur,
    pub ca_file: Option<PathBuf>,
}

/// `[redis] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One server (or a managed endpoint that looks like one): `url`.
    #[default]
    Standalone,
    /// Redis Cluster: `nodes` are seeds; the slot map is read from them.
    Cluster,
    /// Sentinel: `nodes` are the sentinels, `master_name` the master they watch.
    Sentinel,
}

impl fmt::Display for RedisMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
            RedisMode::Sentinel => "sentinel",
        })
    }
}

/// Where a `[redis]` section points, its URLs parsed (after `${VAR}` resolution).
#[derive(Debug, Clone)]
pub enum RedisShape {
    Standalone(RedisTarget),
    Cluster(Vec<RedisTarget>),
    Sentinel {
        sentinels: Vec<RedisTarget>,
        master_name: String,
        /// Credentials, database and TLS for the master (host = `master_name`).
        master: Option<RedisTarget>,
    },
}

impl RedisConfig {
    /// The deployment shape, or every problem with `mode`, `url`, `nodes` and
    /// `master_name`, each naming its key.
    pub fn shape(&self) -> Result<RedisShape, Vec<String>> {
        validate::redis_shape(self)
    }
}

fn default_redis_timeout() -> Dur {
    Dur(Duration::from_millis(50))
}
fn default_redis_connect_timeout() -> Dur {
    Dur(Duration::from_millis(500))
}
fn default_lease() -> Dur {
    Dur(Duration::from_secs(10))
}
/// The shortest `redis.concurrency_lease`: renewed every third of it, within at most 1 s
/// per attempt, it outlives two failed renewals.
pub const MIN_LEASE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    #[default]
    Local,
    Deny,
}

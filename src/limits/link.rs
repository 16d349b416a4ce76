//! The connection to Redis in each deployment shape, through the `redis` crate:
//!
//! * **standalone** — one multiplexed connection: commands sent while others wait for their
//!   replies share writes (pipelining);
//! * **sentinel** — the same, to the master the sentinels name, found again after a failover;
//! * **cluster** — the crate's cluster connection: one multiplexed connection per node, the
//!   slot map read from the seeds, `MOVED`/`ASK` followed, the map refreshed when it changes.
//!
//! A standalone or sentinel connection is kept by a background task: it connects, hands the
//! connection to every check, and when a check finds it broken (a connection error, a
//! `READONLY` master that was demoted, or no reply at all for [`DEAD_AFTER`]) connects again,
//! backing off from [`RETRY_MIN`] to [`RETRY_MAX`] while Redis stays away. Meanwhile checks
//! fail at once instead of waiting, so an outage costs requests no time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind,
    IntoConnectionInfo, RedisConnectionInfo, RedisError, ServerErrorKind, TlsCertificates, TlsMode,
    Value,
};
use tokio::sync::{watch, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{RedisConfig, RedisShape, RedisTarget};

/// First wait before connecting again after a failed attempt; doubled up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_millis(500);
/// A connection that answered nothing for this long (or `redis.timeout`, if longer) while
/// checks waited is replaced.
pub const DEAD_AFTER: Duration = Duration::from_secs(1);

/// Why a command got no reply.
#[derive(Debug)]
pub enum Failure {
    /// Redis answered with an error, or the connection failed.
    Redis(RedisError),
    /// No reply within the check's timeout.
    Timeout,
    /// Not sent: there is no connection (Redis is away; the next attempt is due soon).
    NotConnected(String),
}

impl Failure {
    pub fn is_noscript(&self) -> bool {
        matches!(self, Failure::Redis(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
    }
}

/// One connection to Redis, whatever its deployment shape.
pub struct Link {
    kind: Kind,
    /// What the connection is to, for messages (no password).
    pub describe: String,
}

enum Kind {
    Cluster(ClusterConnection),
    Single(Follower),
}

impl Link {
    /// Sets the connection up without waiting for it: it connects in the background, so a
    /// Redis that is away at startup delays nothing. Needs the tokio runtime.
    pub fn open(cfg: &RedisConfig) -> Result<Link, String> {
        let shape = cfg.shape().map_err(|p| p.join("; "))?;
        let certs = match &cfg.ca_file {
            Some(path) => {
                // Read here for a clear message; the crate parses the PEM again.
                crate::tls::read_certs(path).map_err(|e| format!("redis.ca_file: {e}"))?;
                let pem = std::fs::read(path)
                    .map_err(|e| format!("redis.ca_file: {}: {e}", path.display()))?;
                Some(TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                })
            }
            None => None,
        };
        let dead_after = DEAD_AFTER.max(cfg.timeout.0);
        // Checks bound their own wait, and a connection silent for `dead_after` is replaced
        // (`Follower::query`): no second timer per command.
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout.0))
            .set_response_timeout(None);
        let fail = |e: RedisError| format!("redis: {e}");
        match shape {
            RedisShape::Standalone(t) => {
                let info = connection_info(&t).map_err(fail)?;
                let client = match (&certs, t.tls) {
                    (Some(c), true) => Client::build_with_tls(info, c.clone()),
                    _ => Client::open(info),
                }
                .map_err(fail)?;
                Ok(Link {
                    kind: Kind::Single(Follower::start(
                        Connector::Standalone(client),
                        connection,
                        dead_after,
                    )),
                    describe: t.to_string(),
                })
            }
            RedisShape::Sentinel {
                sentinels,
                master_name,
                master,
            } => {
                let describe = format!(
                    "master \"{master_name}\" of the sentinels {}",
                    sentinels
                        .iter()
                        .map(|s| format!("{}:{}", s.host, s.port))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let client = sentinel_client(&sentinels, &master_name, master.as_ref(), &certs)
                    .map_err(fail)?;
                Ok(Link {
                    kind: Kind::Single(Follower::start(
                        Connector::Sentinel(client),
                        connection,
                        dead_after,
                    )),
                    describe,
                })
            }
            RedisShape::Cluster(nodes) => {
                let describe = format!(
                    "the cluster of {}",
                    nodes
                        .iter()
                        .map(|n| format!("{}:{}", n.host, n.port))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let infos = nodes
                    .iter()
                    .map(connection_info)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(fail)?;
                let mut b = ClusterClientBuilder::new(infos)
                    .connection_timeout(cfg.connect_timeout.0)
                    .response_timeout(dead_after)
                    // A check waits at most `timeout`: retries beyond it only pile up.
                    .retries(3)
                    .min_retry_wait(5)
                    .max_retry_wait(100)
                    .retry_wait_formula(10, 2);
                if let Some(n) = nodes.iter().find(|n| n.password.is_some()) {
                    if let Some(u) = &n.username {
                        b = b.username(u);
                    }
                    if let Some(p) = &n.password {
                        b = b.password(p);
                    }
                }
                if nodes.first().is_some_and(|n| n.tls) {
                    b = b.tls(TlsMode::Secure);
                    if let Some(c) = &certs {
                        b = b.certs(c.clone());
                    }
                }
                let client = b.build().map_err(fail)?;
                let conn = client.get_pending_async_connection_with_config(
                    redis::cluster::ClusterConfig::new()
                        .set_connection_timeout(cfg.connect_timeout.0)
                        .set_response_timeout(dead_after),
                );
                Ok(Link {
                    kind: Kind::Cluster(conn),
                    describe,
                })
            }
        }
    }

    /// Sends one command and waits at most `timeout` for its reply.
    pub async fn query(&self, cmd: &Cmd, timeout: Duration) -> Result<Value, Failure> {
        match &self.kind {
            Kind::Cluster(conn) => {
                let mut conn = conn.clone();
                match tokio::time::timeout(timeout, cmd.query_async::<Value>(&mut conn)).await {
                    Ok(r) => r.map_err(Failure::Redis),
                    Err(_) => Err(Failure::Timeout),
                }
            }
            Kind::Single(f) => f.query(cmd, timeout).await,
        }
    }
}

/// `redis://` settings as the crate takes them.
fn connection_info(t: &RedisTarget) -> Result<ConnectionInfo, RedisError> {
    let addr = if t.tls {
        ConnectionAddr::TcpTls {
            host: t.host.clone(),
            port: t.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(t.host.clone(), t.port)
    };
    Ok(addr
        .into_connection_info()?
        .set_redis_settings(redis_settings(t)))
}

fn redis_settings(t: &RedisTarget) -> RedisConnectionInfo {
    let mut r = RedisConnectionInfo::default().set_db(i64::from(t.db));
    if let Some(u) = &t.username {
        r = r.set_username(u);
    }
    if let Some(p) = &t.password {
        r = r.set_password(p);
    }
    r
}

fn sentinel_client(
    sentinels: &[RedisTarget],
    master_name: &str,
    master: Option<&RedisTarget>,
    certs: &Option<TlsCertificates>,
) -> Result<SentinelClient, RedisError> {
    let addrs = sentinels
        .iter()
        .map(|s| Ok(connection_info(s)?.addr().clone()))
        .collect::<Result<Vec<_>, RedisError>>()?;
    let mut b = SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)?;
    if let Some(s) = sentinels.iter().find(|s| s.password.is_some()) {
        if let Some(u) = &s.username {
            b = b.set_client_to_sentinel_username(u);
        }
        if let Some(p) = &s.password {
            b = b.set_client_to_sentinel_password(p);
        }
    }
    if sentinels.first().is_some_and(|s| s.tls) {
        b = b.set_client_to_sentinel_tls_mode(TlsMode::Secure);
        if let Some(c) = certs {
            b = b.set_client_to_sentinel_certificates(c.clone());
        }
    }
    if let Some(m) = master {
        b = b.set_client_to_redis_db(i64::from(m.db));
        if let Some(u) = &m.username {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = &m.password {
            b = b.set_client_to_redis_password(p);
        }
        if m.tls {
            b = b.set_client_to_redis_tls_mode(TlsMode::Secure);
            if let Some(c) = certs {
                b = b.set_client_to_redis_certificates(c.clone());
            }
        }
    }
    b.build()
}

/// How a single connection is made: to one address, or to the master the sentinels name.
enum Connector {
    Standalone(Client),
    Sentinel(SentinelClient),
}

impl Connector {
    async fn connect(
        &mut self,
        config: &AsyncConnectionConfig,
    ) -> Result<MultiplexedConnection, RedisError> {
        let client = match self {
            Connector::Standalone(c) => c.clone(),
            Connector::Sentinel(s) => s.async_get_client().await?,
        };
        client
            .get_multiplexed_async_connection_with_config(config)
            .await
    }
}

/// What checks see of a single connection.
#[derive(Clone)]
enum Current {
    /// A connection attempt is under way: checks wait for it (within their timeout).
    Connecting,
    /// Connected; the number tells this connection from the ones before it.
    Up(u64, MultiplexedConnection),
    /// The last attempt failed; the next is due soon. Checks fail at once.
    Down(String),
}

/// A connection kept by a background task, replaced when a check finds it broken.
struct Follower {
    current: watch::Receiver<Current>,
    signals: Arc<Signals>,
    dead_after: Duration,
    _stop: DropGuard,
}

struct Signals {
    /// The number of the connection a check found broken.
    broken: AtomicU64,
    wake: Notify,
    /// When a command last got a reply, as ms since `epoch`.
    last_reply: AtomicU64,
    epoch: Instant,
}

impl Signals {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn report_broken(&self, generation: u64) {
        self.broken.fetch_max(generation, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

impl Follower {
    fn start(
        connector: Connector,
        config: AsyncConnectionConfig,
        dead_after: Duration,
    ) -> Follower {
        let (tx, rx) = watch::channel(Current::Connecting);
        let signals = Arc::new(Signals {
            broken: AtomicU64::new(0),
            wake: Notify::new(),
            last_reply: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(keep_connected(
            connector,
            config,
            tx,
            Arc::clone(&signals),
            stop.clone(),
        ));
        Follower {
            current: rx,
            signals,
            dead_after,
            _stop: stop.drop_guard(),
        }
    }

    async fn query(&self, cmd: &Cmd, timeout: Duration) -> Result<Value, Failure> {
        let run = async {
            let (generation, mut conn) = self.connection().await?;
            let reply = conn
                .send_packed_command(cmd)
                .await
                .and_then(Value::extract_error);
            match &reply {
                Ok(_) => {
                    // Written at most once a millisecond: checks on every thread read it.
                    let (s, now) = (&self.signals, self.signals.now_ms());
                    if s.last_reply.load(Ordering::Relaxed) != now {
                        s.last_reply.store(now, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    let demoted = e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly);
                    if demoted || e.is_io_error() || e.is_unrecoverable_error() {
                        self.signals.report_broken(generation);
                    }
                }
            }
            reply.map_err(Failure::Redis)
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => {
                // Silent for too long while checks were waiting: a dead peer that sent no
                // reset (a host that vanished). Replace the connection.
                if let Current::Up(generation, _) = &*self.current.borrow() {
                    let s = &self.signals;
                    let silent = s
                        .now_ms()
                        .saturating_sub(s.last_reply.load(Ordering::Relaxed));
                    if u128::from(silent) >= self.dead_after.as_millis() {
                        s.report_broken(*generation);
                    }
                }
                Err(Failure::Timeout)
            }
        }
    }

    /// The current connection; waits while one is being made, fails while Redis is away.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection), Failure> {
        match &*self.current.borrow() {
            Current::Up(g, c) => return Ok((*g, c.clone())),
            Current::Down(e) => return Err(not_connected(e)),
            Current::Connecting => {}
        }
        let mut rx = self.current.clone();
        loop {
            match &*rx.borrow_and_update() {
                Current::Up(g, c) => return Ok((*g, c.clone())),
                Current::Down(e) => return Err(not_connected(e)),
                Current::Connecting => {}
            }
            if rx.changed().await.is_err() {
                return Err(not_connected("the connection task ended"));
            }
        }
    }
}

fn not_connected(why: &str) -> Failure {
    Failure::NotConnected(why.to_owned())
}

/// Connects, hands the connection out, and connects again when it is reported broken.
async fn keep_connected(
    mut connector: Connector,
    config: AsyncConnectionConfig,
    current: watch::Sender<Current>,
    signals: Arc<Signals>,
    stop: CancellationToken,
) {
    let mut generation = 0;
    let mut wait = RETRY_MIN;
    loop {
        current.send_replace(Current::Connecting);
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            r = connector.connect(&config) => r,
        };
        match attempt {
            Ok(conn) => {
                generation += 1;
                wait = RETRY_MIN;
                signals
                    .last_reply
                    .store(signals.now_ms(), Ordering::Relaxed);
                current.send_replace(Current::Up(generation, conn));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = signals.wake.notified() => {}
                    }
                    if signals.broken.load(Ordering::Relaxed) >= generation {
                        break;
                    }
                }
            }
            Err(e) => {
                current.send_replace(Current::Down(e.to_string()));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(RETRY_MAX);
            }
        }
    }
}

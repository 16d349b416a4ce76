//! Configuration: TOML read into strict serde structs, then validated into [`Settings`].
//! Every problem names the file and the key path. Nothing here binds or spawns.

mod budgets;
mod display;
mod parse;
mod prices;
mod quota;
mod redis;
mod redis_url;
pub mod secrets;
pub mod units;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

pub use budgets::{
    nanos, validate as validate_budgets, zone, Amount, BudgetConfig, BudgetKey, BudgetMatch,
    BudgetMode, BudgetStore, Period,
};
pub use prices::{decimal, overlap, Currency, ModelPrice, Price, PriceConfig, PricesConfig, Rates};
pub use quota::{MaxWait, Priority, QuotaConfig, QuotaMode, QuotaStore, Reserve, Share};
pub use redis::{OnFailure, RedisConfig, RedisMode, RedisShape, MIN_LEASE};
pub use redis_url::RedisTarget;
pub use units::{ByteSize, Dur, LimitKey, Rate, Secret, SecretRef};

pub const DEFAULT_UPSTREAM: &str = "https://api.ezlinkai.com";
/// Default cap on keys each policy tracks.
pub const DEFAULT_MAX_KEYS: usize = 100_000;
/// Completion tokens charged up front when a request sets no `max_tokens`.
pub const DEFAULT_COMPLETION_TOKENS: u32 = 1000;

/// The whole config file. Every table is optional; a missing file means all defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub log: LogConfig,
    pub clients: Vec<ClientConfig>,
    pub limits: Vec<LimitConfig>,
    pub prices: Option<PricesConfig>,
    pub budgets: Vec<BudgetConfig>,
    pub redis: Option<RedisConfig>,
    pub tracing: Option<TracingConfig>,
}

/// `[tracing]`: OpenTelemetry traces, one span per request, exported over OTLP/HTTP
/// (protobuf). Off when absent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's base URL (`http://` or `https://`); spans go to its `/v1/traces`.
    pub otlp_endpoint: String,
    /// The share of traces ezgate starts that it records, 0 to 1; a request whose
    /// `traceparent` is sampled is always recorded, one whose parent is not never is.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// The `service.name` of every span.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

impl TracingConfig {
    /// Where spans are sent: the endpoint's `/v1/traces`.
    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.otlp_endpoint.trim_end_matches('/'))
    }
}

fn default_sample_ratio() -> f64 {
    1.0
}
fn default_service_name() -> String {
    "ezgate".to_owned()
}

/// Where a policy keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    #[default]
    Local,
    Redis,
}

/// The shortest `server.admin_token` accepted: anyone who reaches the admin listener may
/// try tokens.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// An IP address and port ([`units::listen_addr`]); host names are refused.
    #[serde(deserialize_with = "units::de_listen_addr")]
    pub listen: SocketAddr,
    #[serde(deserialize_with = "units::de_listen_addr")]
    pub admin_listen: SocketAddr,
    pub max_request_body: ByteSize,
    pub shutdown_grace: Dur,
    /// Slow clients: time allowed to send a request's headers.
    pub header_read_timeout: Dur,
    /// Slow clients: longest pause between two pieces of a request body.
    pub request_body_timeout: Dur,
    /// Slow clients: longest time a whole request body may take once ezgate reads it.
    pub request_body_deadline: Dur,
    /// Memory: request bodies ezgate reads whole, all together, before 503 `overloaded`.
    pub max_buffered_bytes: ByteSize,
    /// Requests in flight at once before ezgate answers 503 `overloaded`.
    pub max_inflight: u32,
    /// WebSocket sessions open at once (handshakes included) before a handshake gets 503
    /// `overloaded`; they take no `max_inflight` place.
    pub max_websocket_sessions: u32,
    /// The longest a WebSocket session lasts; then ezgate closes both sides with 1008.
    pub websocket_max_lifetime: Dur,
    /// How often ezgate pings a WebSocket client to see that it still reads.
    pub websocket_ping_interval: Dur,
    /// How long a WebSocket client has to answer ezgate's ping before it is closed (1001).
    pub websocket_pong_timeout: Dur,
    /// Threads serving requests; 0 = one per CPU ezgate may run on (its affinity mask).
    pub worker_threads: usize,
    pub tls: Option<TlsConfig>,
    /// Enables the admin listener's POST endpoints (`Authorization: Bearer <token>`); without
    /// it they answer 403.
    pub admin_token: Option<Secret>,
    /// Where local budgets keep their spend across restarts (`budgets.json`); without it
    /// they live in memory.
    pub state_dir: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            max_request_body: ByteSize(16 << 20),
            shutdown_grace: Dur(Duration::from_secs(30)),
            header_read_timeout: Dur(Duration::from_secs(10)),
            request_body_timeout: Dur(Duration::from_secs(30)),
            request_body_deadline: Dur(Duration::from_secs(60)),
            // Sized for the shipped 128 MiB memory limit (docs/security.md).
            max_buffered_bytes: ByteSize(64 << 20),
            max_inflight: 10_000,
            max_websocket_sessions: 1_000,
            websocket_max_lifetime: Dur(Duration::from_secs(4 * 3600)),
            websocket_ping_interval: Dur(Duration::from_secs(20)),
            websocket_pong_timeout: Dur(Duration::from_secs(20)),
            worker_threads: 0,
            tls: None,
            admin_token: None,
            state_dir: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub connect_timeout: Dur,
    pub response_timeout: Dur,
    pub stream_idle_timeout: Dur,
    pub pool_idle_timeout: Dur,
    pub pool_max_idle_per_host: usize,
    pub ca_file: Option<PathBuf>,
    pub http2: Http2,
    /// Longest `Retry-After` of an upstream 429 that ezgate honours by holding the key back.
    pub max_retry_after: Dur,
    /// Ask the upstream to report usage on streamed chat and text completions
    /// (`stream_options.include_usage`), hidden from clients that did not ask for it.
    pub stream_usage: bool,
    /// Send the client's address upstream in `X-Forwarded-For`. Off: no `X-Forwarded-For`,
    /// `Forwarded` or `X-Real-IP` reaches the upstream, the client's own included (they
    /// carry the organization's internal addresses).
    pub forward_client_ip: bool,
    /// The upstream's own quota, learned from its `x-ratelimit-*` headers.
    pub quota: QuotaConfig,
}

/// Whether ezgate speaks HTTP/2 to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Http2 {
    /// HTTP/2 when the upstream picks it by ALPN (TLS); HTTP/1.1 otherwise.
    #[default]
    Auto,
    /// HTTP/2 only: offered alone by ALPN over TLS, spoken with prior knowledge (h2c)
    /// to an `http://` upstream.
    Always,
    /// HTTP/1.1 only.
    Never,
}

impl fmt::Display for Http2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Http2::Auto => "auto",
            Http2::Always => "always",
            Http2::Never => "never",
        })
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            base_url: DEFAULT_UPSTREAM.to_owned(),
            api_key: None,
            connect_timeout: Dur(Duration::from_secs(5)),
            response_timeout: Dur(Duration::from_secs(120)),
            stream_idle_timeout: Dur(Duration::from_secs(60)),
            pool_idle_timeout: Dur(Duration::from_secs(30)),
            pool_max_idle_per_host: 256,
            ca_file: None,
            http2: Http2::Auto,
            max_retry_after: Dur(Duration::from_secs(300)),
            stream_usage: true,
            forward_client_ip: false,
            quota: QuotaConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `RUST_LOG`-style filter, e.g. "info" or "info,ezgate=debug".
    pub level: String,
    /// One line per request on stderr (target `ezgate::access`), in `format`.
    pub access_log: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".to_owned(),
            access_log: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub name: String,
    pub key_sha256: String,
    #[serde(default)]
    pub models: Vec<String>,
    /// Routes (canonical paths, `*` for any run of characters) this client may use although
    /// ezgate cannot read the model they spend; only meaningful with `models`.
    #[serde(default)]
    pub unchecked_routes: Vec<String>,
    /// The client's priority for the upstream's quota (`upstream.quota.mode = "enforce"`).
    #[serde(default)]
    pub priority: Priority,
    /// The team whose costs this client's add up to (`/status` costs, budgets by team).
    #[serde(default)]
    pub team: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimit {
    #[default]
    Reject,
    Wait,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    #[serde(default)]
    pub routes: Vec<String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub clients: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    pub name: String,
    /// What the policy keys on: a [`LimitKey`] (checked when the config is read).
    pub key: String,
    pub requests: Option<Rate>,
    pub burst: Option<u32>,
    pub tokens: Option<Rate>,
    pub concurrency: Option<u32>,
    #[serde(rename = "match", default)]
    pub matches: MatchConfig,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub on_limit: OnLimit,
    pub max_wait: Option<Dur>,
    /// Tokens charged up front when a request says nothing of its size.
    pub default_tokens: Option<u32>,
    /// Most keys tracked at once; beyond it new keys share one overflow bucket.
    pub max_keys: Option<usize>,
    /// `local` (this process) or `redis` (shared by every replica, see `[redis]`).
    #[serde(default)]
    pub store: Store,
}

impl LimitConfig {
    /// `burst`, or the per-unit count of `requests`.
    pub fn effective_burst(&self) -> Option<u32> {
        self.requests.map(|r| self.burst.unwrap_or(r.count))
    }

    pub fn effective_default_tokens(&self) -> u32 {
        self.default_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS)
    }

    /// The parsed `key` ([`LimitKey::Global`] for one that failed validation).
    pub fn limit_key(&self) -> LimitKey {
        LimitKey::try_from(self.key.clone()).unwrap_or(LimitKey::Global)
    }

    pub fn effective_max_keys(&self) -> usize {
        self.max_keys.unwrap_or(DEFAULT_MAX_KEYS).max(1)
    }

    /// A policy that limits nothing yet: set `requests`, `tokens` or `concurrency`.
    pub fn new(name: &str, key: &str) -> LimitConfig {
        LimitConfig {
            name: name.to_owned(),
            key: key.to_owned(),
            requests: None,
            burst: None,
            tokens: None,
            concurrency: None,
            matches: MatchConfig::default(),
            mode: Mode::default(),
            on_limit: OnLimit::default(),
            max_wait: None,
            default_tokens: None,
            max_keys: None,
            store: Store::default(),
        }
    }
}

/// Command-line and environment overrides (flag > environment > file > default).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub upstream: Option<String>,
}

/// A config that has been read, resolved and validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub source: String,
    pub config: Config,
    pub upstream_uri: Uri,
    /// What `check-config` and startup warn about without refusing the config.
    pub notes: Vec<String>,
}

/// Every problem found in one config, each naming the file and the key path.
#[derive(Debug)]
pub struct ConfigError {
    pub source: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for p in &self.problems {
            if !first {
                f.write_str("\n")?;
            }
            first = false;
            write!(f, "{}: {p}", self.source)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Settings {
    /// Reads `path` (or runs on defaults when `None`), applies overrides, resolves `${VAR}`
    /// secrets through `env` and `${file:/path}` secrets by reading their files (afresh on
    /// every call: a reload picks up a rotated secret), and validates everything.
    pub fn load(
        path: Option<&Path>,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let (source, text) = match path {
            Some(p) => {
                let source = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError {
                    source: source.clone(),
                    problems: vec![format!("cannot read the config file: {e}")],
                })?;
                (source, text)
            }
            None => ("(built-in defaults)".to_owned(), String::new()),
        };
        Self::from_toml(&source, &text, overrides, env)
    }

    pub fn from_toml(
        source: &str,
        text: &str,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let fail = |problems| ConfigError {
            source: source.to_owned(),
            problems,
        };
        let mut read = parse::read(text).map_err(|p| fail(vec![p]))?;
        let mut config = std::mem::take(&mut read.config);
        if let Some(a) = overrides.listen {
            config.server.listen = a;
        }
        if let Some(a) = overrides.admin_listen {
            config.server.admin_listen = a;
        }
        if let Some(u) = &overrides.upstream {
            config.upstream.base_url = u.clone();
        }
        // Problems found on the config as read: each gets its line in the file, and those
        // that only follow from a value the reader had to remove are left out.
        let mut problems = Vec::new();
        if let Some(key) = &mut config.upstream.api_key {
            match secrets::resolve("upstream.api_key", key, env) {
                Ok(origin) => {
                    if http::HeaderValue::from_str(&format!("Bearer {}", key.expose())).is_err() {
                        // Where the key came from, never the key.
                        let origin = origin.map(|o| format!("{o} ")).unwrap_or_default();
                        problems.push(format!(
                            "upstream.api_key: {origin}holds a character a header cannot carry (a newline or another control character); give the key alone"
                        ));
                    }
                }
                Err(e) => problems.push(e),
            }
        }
        if let Some(token) = &mut config.server.admin_token {
            // `${VAR}` or `${file:/path}`, as every secret.
            match secrets::resolve("server.admin_token", token, env) {
                Ok(_) if token.expose().chars().count() < MIN_ADMIN_TOKEN_CHARS => {
                    problems.push(format!(
                        "server.admin_token: shorter than {MIN_ADMIN_TOKEN_CHARS} characters; use a random token (e.g. `openssl rand -hex 32`)"
                    ));
                }
                Ok(_) => {}
                Err(e) => problems.push(e),
            }
        }
        if let Some(redis) = &mut config.redis {
            let mut unresolved = false;
            let mut resolve = |key: String, secret: &mut Secret| {
                if let Err(e) = secrets::resolve(&key, secret, env) {
                    problems.push(e);
                    unresolved = true;
                }
            };
            if let Some(url) = &mut redis.url {
                resolve("redis.url".to_owned(), url);
            }
            for (i, node) in redis.nodes.iter_mut().enumerate() {
                resolve(format!("redis.nodes[{i}]"), node);
            }
            // A URL whose reference could not be read was reported above.
            if !unresolved {
                if let Err(e) = redis.shape() {
                    problems.extend(e);
                }
            }
            if redis.replicas == Some(0) {
                problems.push(
                    "redis.replicas: must be at least 1 (or leave it out to count the live gateways)"
                        .to_owned(),
                );
            }
        }
        if config.redis.is_none() {
            for (i, l) in config.limits.iter().enumerate() {
                if l.store == Store::Redis {
                    problems.push(format!(
                        "limits[{i}] (\"{}\").store: \"redis\" needs a [redis] table (url, or mode and nodes)",
                        l.name
                    ));
                }
            }
        }
        let upstream_uri = match parse_base_url(&config.upstream.base_url) {
            Ok(uri) => Some(uri),
            Err(e) => {
                problems.push(format!("upstream.base_url: {e}"));
                None
            }
        };
        let mut notes = Vec::new();
        validate::validate(&config, &mut problems, &mut notes);
        let mut from_flags = Vec::new();
        for (set, key) in [
            (overrides.listen.is_some(), "server.listen"),
            (overrides.admin_listen.is_some(), "server.admin_listen"),
            (overrides.upstream.is_some(), "upstream.base_url"),
        ] {
            if set {
                from_flags.push(key);
            }
        }
        let mut all = std::mem::take(&mut read.problems);
        for p in problems {
            if !read.follows_from_removed(&p) {
                all.push(read.locate(p, &from_flags));
            }
        }
        parse::by_line(&mut all);
        let problems = all;
        match (problems.is_empty(), upstream_uri) {
            (true, Some(upstream_uri)) => Ok(Settings {
                source: source.to_owned(),
                config,
                upstream_uri,
                notes,
            }),
            _ => Err(fail(problems)),
        }
    }

    /// The first 16 hex digits of the SHA-256 of the effective config as `check-config`
    /// prints it (secrets redacted, so a rotated secret keeps the hash): which config serves.
    pub fn hash(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.to_string().as_bytes());
        digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn managed(&self) -> bool {
        self.config.upstream.api_key.is_some()
    }
}

fn parse_base_url(s: &str) -> Result<Uri, String> {
    // Credentials in the URL would travel in logs and messages: refused, and never echoed.
    if let Some((scheme, rest)) = s.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
        if authority.contains('@') {
            let host = authority.rsplit('@').next().unwrap_or("");
            return Err(format!(
                "\"{scheme}://…@{host}\" carries credentials; remove them from the URL and give the organization's key as upstream.api_key = \"${{VAR}}\""
            ));
        }
    }
    let uri: Uri = s
        .parse()
        .map_err(|e| format!("\"{s}\" is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(format!(
                "\"{s}\" must start with https:// (or http:// for tests)"
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("\"{s}\" has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("\"{s}\" must not have a query"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests;

//! Checks of a config as read, all at once, each naming its key: values that parse but make
//! no sense (zero sizes and timeouts, a policy that limits nothing, a wait without
//! `max_wait`), names that must be unique, references that must exist. Nothing here needs
//! more than the config itself.

use std::collections::HashSet;

use super::{
    units, ClientConfig, Config, LimitConfig, LimitKey, OnLimit, RedisConfig, RedisMode,
    RedisShape, RedisTarget, TracingConfig,
};
use crate::route::Route;

pub(super) fn validate(c: &Config, problems: &mut Vec<String>, notes: &mut Vec<String>) {
    super::budgets::validate(
        &c.budgets,
        c.prices.is_some(),
        c.redis.is_some(),
        c.server.state_dir.is_some(),
        problems,
        notes,
    );
    super::quota::validate(&c.upstream.quota, c.redis.is_some(), problems);
    if c.server.max_request_body.0 == 0 {
        problems.push("server.max_request_body: must be above zero".to_owned());
    }
    if c.server.max_buffered_bytes.0 < c.server.max_request_body.0 {
        problems.push(format!(
            "server.max_buffered_bytes: {} is below server.max_request_body ({}); a body ezgate accepts could never be read whole",
            c.server.max_buffered_bytes, c.server.max_request_body
        ));
    }
    if c.server.max_inflight == 0 {
        problems.push("server.max_inflight: must be above zero".to_owned());
    }
    if c.server.max_websocket_sessions == 0 {
        problems.push(
            "server.max_websocket_sessions: must be above zero (every WebSocket handshake would be refused)"
                .to_owned(),
        );
    }
    for (name, d) in [
        ("upstream.connect_timeout", c.upstream.connect_timeout),
        ("upstream.response_timeout", c.upstream.response_timeout),
        (
            "upstream.stream_idle_timeout",
            c.upstream.stream_idle_timeout,
        ),
        ("server.header_read_timeout", c.server.header_read_timeout),
        ("server.request_body_timeout", c.server.request_body_timeout),
        (
            "server.websocket_max_lifetime",
            c.server.websocket_max_lifetime,
        ),
        (
            "server.websocket_ping_interval",
            c.server.websocket_ping_interval,
        ),
        (
            "server.websocket_pong_timeout",
            c.server.websocket_pong_timeout,
        ),
        (
            "server.request_body_deadline",
            c.server.request_body_deadline,
        ),
    ] {
        if d.0.is_zero() {
            problems.push(format!("{name}: must be above zero"));
        }
    }
    if let Err(e) = units::log_filter(&c.log.level) {
        problems.push(format!("log.level: {e}"));
    }
    if let Some(r) = &c.redis {
        if r.concurrency_lease.0 < super::MIN_LEASE {
            problems.push(format!(
                "redis.concurrency_lease: \"{}\" is too short; use at least \"{}s\" (slots are renewed every third of the lease)",
                r.concurrency_lease,
                super::MIN_LEASE.as_secs()
            ));
        }
    }
    clients(&c.clients, problems);
    if let Some(p) = &c.prices {
        super::prices::validate(p, problems);
    }
    limits(&c.limits, &c.clients, problems);
    if let Some(t) = &c.tracing {
        tracing(t, problems);
    }
}

fn tracing(t: &TracingConfig, problems: &mut Vec<String>) {
    if let Err(e) = otlp_endpoint(&t.otlp_endpoint) {
        problems.push(format!("tracing.otlp_endpoint: {e}"));
    }
    if !(0.0..=1.0).contains(&t.sample_ratio) {
        problems.push(format!(
            "tracing.sample_ratio: {} is not between 0 (record only sampled parents) and 1 (every request)",
            t.sample_ratio
        ));
    }
    if t.service_name.trim().is_empty() {
        problems.push("tracing.service_name: must not be empty".to_owned());
    }
}

/// The collector's base URL: `http(s)://host[:port][/prefix]`, no credentials, no query.
fn otlp_endpoint(s: &str) -> Result<(), String> {
    // Checked first and never echoed: a URL with user info may hold a password.
    let authority = s.split_once("://").map_or(s, |(_, rest)| rest);
    let authority = authority.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(
            "the URL carries credentials; give the collector's address only (without user or password)"
                .to_owned(),
        );
    }
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("\"{s}\" is not a URL ({e})"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!(
            "\"{s}\" must start with http:// or https:// (OTLP over HTTP, e.g. http://127.0.0.1:4318)"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("\"{s}\" has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("\"{s}\" must not have a query"));
    }
    Ok(())
}

fn clients(clients: &[ClientConfig], problems: &mut Vec<String>) {
    let mut names = HashSet::new();
    for (i, c) in clients.iter().enumerate() {
        if c.name.trim().is_empty() {
            problems.push(format!("clients[{i}].name: must not be empty"));
        }
        if !names.insert(c.name.as_str()) {
            problems.push(format!(
                "clients[{i}].name: duplicate client name \"{}\"",
                c.name
            ));
        }
        if !(c.key_sha256.len() == 64 && c.key_sha256.bytes().all(|b| b.is_ascii_hexdigit())) {
            problems.push(format!(
                "clients[{i}].key_sha256: must be 64 hex digits, the SHA-256 of the client's key (e.g. `printf %s \"$KEY\" | sha256sum`)"
            ));
        }
        if c.team.as_ref().is_some_and(|t| t.trim().is_empty()) {
            problems.push(format!(
                "clients[{i}].team: must not be empty; leave it out for no team"
            ));
        }
        if !c.unchecked_routes.is_empty() && c.models.is_empty() {
            problems.push(format!(
                "clients[{i}].unchecked_routes: has no effect without a models allow-list (clients[{i}].models); remove it"
            ));
        }
        for (j, r) in c.unchecked_routes.iter().enumerate() {
            if let Some(why) = unchecked_route_problem(r) {
                problems.push(format!("clients[{i}].unchecked_routes[{j}]: \"{r}\" {why}"));
            }
        }
    }
}

/// Why `pattern` cannot be a `clients[].unchecked_routes` entry: it must be a canonical
/// path (as ezgate makes request paths before matching them), with `*` as the only wildcard.
fn unchecked_route_problem(pattern: &str) -> Option<&'static str> {
    if !pattern.starts_with("/v1/") {
        return Some("must be a path under /v1/, e.g. \"/v1/batches\" or \"/v1/threads/*\"");
    }
    if pattern.contains(['?', '#', '%']) {
        return Some(
            "must be a plain path: no query, fragment or percent-escape (`*` is the only wildcard)",
        );
    }
    if !matches!(crate::route::normalize(pattern), Ok(None)) {
        return Some("must be a canonical path: no `.` or `..` segments, repeated slashes or control characters");
    }
    None
}

/// Checks `[[limits]]`, naming the policy and the key of each problem.
fn limits(limits: &[LimitConfig], clients: &[ClientConfig], problems: &mut Vec<String>) {
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
        if let Err(e) = LimitKey::try_from(l.key.clone()) {
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
    }
}

/// The deployment shape of `[redis]`, or every problem with it, each naming its key.
pub(super) fn redis_shape(r: &RedisConfig) -> Result<RedisShape, Vec<String>> {
    let mut problems = Vec::new();
    let mode = r.mode;
    let url = r.url.as_ref().map(|u| {
        RedisTarget::parse(u.expose()).map_err(|e| problems.push(format!("redis.url: {e}")))
    });
    let nodes: Vec<Option<RedisTarget>> = r
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| match RedisTarget::parse(n.expose()) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(format!("redis.nodes[{i}]: {e}"));
                None
            }
        })
        .collect();
    let parsed: Vec<&RedisTarget> = nodes.iter().flatten().collect();
    match mode {
        RedisMode::Standalone => {
            if url.is_none() {
                problems.push(
                    "redis.url: mode = \"standalone\" needs url, e.g. url = \"redis://127.0.0.1:6379\" (or mode = \"cluster\" / \"sentinel\" with nodes)"
                        .to_owned(),
                );
            }
            if !r.nodes.is_empty() {
                problems.push(
                    "redis.nodes: only read with mode = \"cluster\" (seed nodes) or \"sentinel\" (the sentinels); set mode, or give one server as url"
                        .to_owned(),
                );
            }
        }
        RedisMode::Cluster => {
            if r.url.is_some() {
                problems.push(
                    "redis.url: not read with mode = \"cluster\"; list the cluster's nodes in redis.nodes instead".to_owned(),
                );
            }
            if r.nodes.is_empty() {
                problems.push(
                    "redis.nodes: mode = \"cluster\" needs seed nodes, e.g. nodes = [\"redis://10.0.0.1:6379\", \"redis://10.0.0.2:6379\"]"
                        .to_owned(),
                );
            }
            for (i, n) in nodes.iter().enumerate() {
                let Some(n) = n else { continue };
                if n.db != 0 {
                    problems.push(format!(
                        "redis.nodes[{i}]: Redis Cluster has only database 0; remove /{} from the URL",
                        n.db
                    ));
                }
            }
            same_everywhere(&nodes, &mut problems);
        }
        RedisMode::Sentinel => {
            match &r.master_name {
                None => problems.push(
                    "redis.master_name: mode = \"sentinel\" needs the name the sentinels know the master by, e.g. master_name = \"mymaster\""
                        .to_owned(),
                ),
                Some(m) if m.trim().is_empty() => {
                    problems.push("redis.master_name: must not be empty".to_owned())
                }
                Some(m) => {
                    if let Some(Ok(u)) = &url {
                        if u.host != *m || r.url.as_ref().is_some_and(|s| has_port(s.expose())) {
                            problems.push(format!(
                                "redis.url: with mode = \"sentinel\" the URL names the master, not an address: write redis://[user:password@]{m}[/db] (the sentinels tell where it is)"
                            ));
                        }
                    }
                }
            }
            if r.nodes.is_empty() {
                problems.push(
                    "redis.nodes: mode = \"sentinel\" needs the sentinels' addresses, e.g. nodes = [\"redis://10.0.0.1:26379\", \"redis://10.0.0.2:26379\"]"
                        .to_owned(),
                );
            }
            for (i, n) in nodes.iter().enumerate() {
                if n.as_ref().is_some_and(|n| n.db != 0) {
                    problems.push(format!(
                        "redis.nodes[{i}]: a sentinel has no database; give the master's database in redis.url (redis://{}/N)",
                        r.master_name.as_deref().unwrap_or("mymaster")
                    ));
                }
            }
        }
    }
    if mode != RedisMode::Sentinel && r.master_name.is_some() {
        problems.push(format!(
            "redis.master_name: only read with mode = \"sentinel\" (mode is \"{mode}\")"
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let owned = parsed.into_iter().cloned().collect();
    Ok(match mode {
        RedisMode::Standalone => match url {
            Some(Ok(t)) => RedisShape::Standalone(t),
            _ => return Err(problems),
        },
        RedisMode::Cluster => RedisShape::Cluster(owned),
        RedisMode::Sentinel => RedisShape::Sentinel {
            sentinels: owned,
            master_name: r.master_name.clone().unwrap_or_default(),
            master: url.and_then(Result::ok),
        },
    })
}

/// A cluster's nodes share one ACL and one transport: one scheme, and one user and password
/// (written on every node, or on the first that has them).
fn same_everywhere(nodes: &[Option<RedisTarget>], problems: &mut Vec<String>) {
    let parsed: Vec<(usize, &RedisTarget)> = nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| Some((i, n.as_ref()?)))
        .collect();
    let Some((_, first)) = parsed.first() else {
        return;
    };
    let creds = parsed
        .iter()
        .find(|(_, n)| n.password.is_some())
        .map(|(i, n)| (*i, &n.username, &n.password));
    for (i, n) in &parsed {
        if n.tls != first.tls {
            problems.push(format!(
                "redis.nodes[{i}]: mixes redis:// and rediss://; every node of a cluster is reached the same way"
            ));
        }
        if let Some((j, user, password)) = creds {
            if n.password.is_some() && (&n.username != user || &n.password != password) {
                problems.push(format!(
                    "redis.nodes[{i}]: its user or password differs from redis.nodes[{j}]'s; a cluster's nodes share one ACL, so write the credentials once (or the same on every node)"
                ));
            }
        }
    }
}

/// Whether a URL writes a port after its host.
fn has_port(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host.split('/').next().unwrap_or(host);
    host.rsplit_once(']').map_or(host, |(_, p)| p).contains(':')
}

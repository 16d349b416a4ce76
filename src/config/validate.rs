//! Checks of a config as read, all at once, each naming its key: values that parse but make
//! no sense (zero sizes and timeouts, a policy that limits nothing, a wait without
//! `max_wait`), names that must be unique, references that must exist. Nothing here needs
//! more than the config itself.

use std::collections::HashSet;

use super::{units, ClientConfig, Config, LimitConfig, LimitKey, OnLimit, TracingConfig};
use crate::route::Route;

pub(super) fn validate(c: &Config, problems: &mut Vec<String>) {
    if c.server.max_request_body.0 == 0 {
        problems.push("server.max_request_body: must be above zero".to_owned());
    }
    if c.server.max_inflight == 0 {
        problems.push("server.max_inflight: must be above zero".to_owned());
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
    ] {
        if d.0.is_zero() {
            problems.push(format!("{name}: must be above zero"));
        }
    }
    if let Err(e) = units::log_filter(&c.log.level) {
        problems.push(format!("log.level: {e}"));
    }
    if !c.clients.is_empty() && c.upstream.api_key.is_none() {
        problems.push(
            "clients: [[clients]] needs upstream.api_key (managed mode); otherwise client keys would be forwarded upstream"
                .to_owned(),
        );
    }
    clients(&c.clients, problems);
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
    }
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

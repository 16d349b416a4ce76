//! `check-config` output: the effective config as TOML-like text, every default written
//! out, secrets redacted.

use std::fmt;

use super::{LogFormat, Mode, OnFailure, OnLimit, RedisTarget, Secret, Settings, Store};

/// `check-config` output: the effective config as TOML-like text, secrets redacted.
impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let s = &c.server;
        writeln!(f, "# effective configuration from {}", self.source)?;
        writeln!(f, "[server]")?;
        writeln!(f, "listen = \"{}\"", s.listen)?;
        writeln!(f, "admin_listen = \"{}\"", s.admin_listen)?;
        writeln!(f, "max_request_body = \"{}\"", s.max_request_body)?;
        writeln!(f, "shutdown_grace = \"{}\"", s.shutdown_grace)?;
        writeln!(f, "header_read_timeout = \"{}\"", s.header_read_timeout)?;
        writeln!(f, "request_body_timeout = \"{}\"", s.request_body_timeout)?;
        writeln!(f, "request_body_deadline = \"{}\"", s.request_body_deadline)?;
        writeln!(f, "max_buffered_bytes = \"{}\"", s.max_buffered_bytes)?;
        writeln!(f, "max_inflight = {}", s.max_inflight)?;
        writeln!(f, "max_websocket_sessions = {}", s.max_websocket_sessions)?;
        writeln!(
            f,
            "websocket_max_lifetime = \"{}\"",
            s.websocket_max_lifetime
        )?;
        writeln!(
            f,
            "websocket_ping_interval = \"{}\"",
            s.websocket_ping_interval
        )?;
        writeln!(
            f,
            "websocket_pong_timeout = \"{}\"",
            s.websocket_pong_timeout
        )?;
        writeln!(f, "worker_threads = {}", s.worker_threads)?;
        if let Some(tls) = &s.tls {
            writeln!(f, "tls = {{ cert = {:?}, key = {:?} }}", tls.cert, tls.key)?;
        }
        if let Some(t) = &s.admin_token {
            writeln!(f, "admin_token = \"{t}\"")?;
        }
        if let Some(d) = &s.state_dir {
            writeln!(f, "state_dir = {d:?}")?;
        }
        let u = &c.upstream;
        writeln!(f, "\n[upstream]")?;
        writeln!(f, "base_url = \"{}\"", u.base_url)?;
        if let Some(k) = &u.api_key {
            writeln!(f, "api_key = \"{k}\"")?;
        }
        writeln!(f, "connect_timeout = \"{}\"", u.connect_timeout)?;
        writeln!(f, "response_timeout = \"{}\"", u.response_timeout)?;
        writeln!(f, "stream_idle_timeout = \"{}\"", u.stream_idle_timeout)?;
        writeln!(f, "pool_idle_timeout = \"{}\"", u.pool_idle_timeout)?;
        writeln!(f, "pool_max_idle_per_host = {}", u.pool_max_idle_per_host)?;
        writeln!(f, "http2 = \"{}\"", u.http2)?;
        writeln!(f, "max_retry_after = \"{}\"", u.max_retry_after)?;
        writeln!(f, "stream_usage = {}", u.stream_usage)?;
        writeln!(f, "forward_client_ip = {}", u.forward_client_ip)?;
        if let Some(ca) = &u.ca_file {
            writeln!(f, "ca_file = {ca:?}")?;
        }
        let q = &u.quota;
        writeln!(f, "\n[upstream.quota]")?;
        writeln!(f, "mode = \"{}\"", q.mode.as_str())?;
        writeln!(f, "headroom = \"{}\"", q.headroom)?;
        let store = match q.store {
            super::QuotaStore::Local => "local",
            super::QuotaStore::Redis => "redis",
        };
        writeln!(f, "store = \"{store}\"")?;
        writeln!(
            f,
            "reserve = {{ critical = \"{}\", interactive = \"{}\" }}",
            q.reserve.critical, q.reserve.interactive
        )?;
        writeln!(
            f,
            "max_wait = {{ critical = \"{}\", interactive = \"{}\", batch = \"{}\" }}",
            q.max_wait.critical, q.max_wait.interactive, q.max_wait.batch
        )?;
        writeln!(f, "\n[log]")?;
        let format = match c.log.format {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        };
        writeln!(f, "format = \"{format}\"\nlevel = \"{}\"", c.log.level)?;
        writeln!(f, "access_log = {}", c.log.access_log)?;
        for cl in &c.clients {
            writeln!(
                f,
                "\n[[clients]]\nname = \"{}\"\nkey_sha256 = \"<redacted>\"",
                cl.name
            )?;
            if !cl.models.is_empty() {
                writeln!(f, "models = {:?}", cl.models)?;
            }
            if !cl.unchecked_routes.is_empty() {
                writeln!(f, "unchecked_routes = {:?}", cl.unchecked_routes)?;
            }
            writeln!(f, "priority = \"{}\"", cl.priority.as_str())?;
            if let Some(t) = &cl.team {
                writeln!(f, "team = {t:?}")?;
            }
        }
        if let Some(p) = &c.prices {
            prices(f, p)?;
        }
        if let Some(r) = &c.redis {
            writeln!(f, "\n[redis]\nmode = \"{}\"", r.mode)?;
            // Each URL shown without its password (or redacted whole if it does not parse).
            let shown = |s: &Secret| match RedisTarget::parse(s.expose()) {
                Ok(t) => t.to_string(),
                Err(_) => s.to_string(),
            };
            if let Some(u) = &r.url {
                writeln!(f, "url = \"{}\"", shown(u))?;
            }
            if !r.nodes.is_empty() {
                let nodes: Vec<String> = r
                    .nodes
                    .iter()
                    .map(|n| format!("\"{}\"", shown(n)))
                    .collect();
                writeln!(f, "nodes = [{}]", nodes.join(", "))?;
            }
            if let Some(m) = &r.master_name {
                writeln!(f, "master_name = {m:?}")?;
            }
            writeln!(
                f,
                "timeout = \"{}\"\nconnect_timeout = \"{}\"",
                r.timeout, r.connect_timeout
            )?;
            let on_failure = if r.on_failure == OnFailure::Deny {
                "deny"
            } else {
                "local"
            };
            match r.replicas {
                Some(n) => writeln!(f, "replicas = {n}")?,
                None => writeln!(f, "# replicas: the live gateways, counted in Redis")?,
            }
            writeln!(f, "on_failure = \"{on_failure}\"")?;
            writeln!(f, "concurrency_lease = \"{}\"", r.concurrency_lease)?;
        }
        if let Some(t) = &c.tracing {
            writeln!(f, "\n[tracing]\notlp_endpoint = \"{}\"", t.otlp_endpoint)?;
            writeln!(f, "# spans go to {}", t.traces_url())?;
            writeln!(
                f,
                "sample_ratio = {:?}\nservice_name = {:?}",
                t.sample_ratio, t.service_name
            )?;
        }
        for l in &c.limits {
            writeln!(
                f,
                "\n[[limits]]\nname = \"{}\"\nkey = \"{}\"",
                l.name, l.key
            )?;
            let store = if l.store == Store::Redis {
                "redis"
            } else {
                "local"
            };
            writeln!(f, "store = \"{store}\"")?;
            if let Some(r) = l.requests {
                writeln!(f, "requests = \"{r}\"")?;
            }
            if let Some(b) = l.effective_burst() {
                writeln!(f, "burst = {b}")?;
            }
            if let Some(t) = l.tokens {
                writeln!(f, "tokens = \"{t}\"")?;
                writeln!(f, "default_tokens = {}", l.effective_default_tokens())?;
            }
            if let Some(n) = l.concurrency {
                writeln!(f, "concurrency = {n}")?;
            }
            let m = &l.matches;
            if !(m.routes.is_empty() && m.models.is_empty() && m.clients.is_empty()) {
                writeln!(
                    f,
                    "match = {{ routes = {:?}, models = {:?}, clients = {:?} }}",
                    m.routes, m.models, m.clients
                )?;
            }
            let mode = if l.mode == Mode::Shadow {
                "shadow"
            } else {
                "enforce"
            };
            let on_limit = if l.on_limit == OnLimit::Wait {
                "wait"
            } else {
                "reject"
            };
            writeln!(f, "mode = \"{mode}\"\non_limit = \"{on_limit}\"")?;
            if let Some(w) = l.max_wait {
                writeln!(f, "max_wait = \"{w}\"")?;
            }
            writeln!(f, "max_keys = {}", l.effective_max_keys())?;
        }
        for b in &c.budgets {
            b.display(f)?;
        }
        for n in &self.notes {
            writeln!(f, "# warning: {n}")?;
        }
        Ok(())
    }
}

/// `[prices]`, every default written out.
fn prices(f: &mut fmt::Formatter<'_>, p: &super::PricesConfig) -> fmt::Result {
    writeln!(f, "\n[prices]\ncurrency = \"{}\"", p.currency.as_str())?;
    let row = |r: super::Rates| {
        let mut s = format!(
            "input = {}, cached_input = {}, output = {}",
            super::Price(r.input),
            super::Price(r.cached_input),
            super::Price(r.output)
        );
        if let Some(a) = r.audio_input {
            s.push_str(&format!(", audio_input = {}", super::Price(a)));
        }
        if let Some(a) = r.audio_output {
            s.push_str(&format!(", audio_output = {}", super::Price(a)));
        }
        s
    };
    writeln!(f, "models = [")?;
    for m in &p.models {
        writeln!(f, "  {{ model = {:?}, {} }},", m.model, row(m.rates()))?;
    }
    writeln!(f, "]")?;
    if let Some(d) = &p.default {
        writeln!(f, "default = {{ {} }}", row(d.rates()))?;
    }
    Ok(())
}

//! ezgate — a reverse-proxy sidecar for the EZLINK AI API (OpenAI-compatible): local rate
//! limits, one error schema for every failure, per-status Prometheus metrics.
//!
//! # Module map
//!
//! * [`server`] — listeners (TCP, TLS with ALPN), connections, graceful shutdown
//! * [`proxy`] — THE request path: identify → limit → forward → respond → record
//! * [`clients`] — who is asking: client keys, fingerprints, model allow-lists
//! * [`limits`] — rate, token and concurrency policies; upstream 429 cooldown
//! * [`upstream`] — where requests go, the response timeout, error classification
//! * [`pool`] — upstream connections over rustls: an HTTP/1.1 stack, HTTP/2 connections shared by streams
//! * [`stream`] — response body passthrough: idle timeout, usage, SSE error event
//! * [`errors`] — the error schema: [`errors::GatewayError`], rendering, upstream bodies
//! * [`outcome`] — what happened to one request; recorded once
//! * [`access_log`] — the per-request log line, formatted by hand
//! * [`metrics`] — Prometheus registry and cached handles
//! * [`headers`] — hop-by-hop removal, request ids, `X-Forwarded-For`
//! * [`route`] — the bounded set of route templates
//! * [`admin`] — `/metrics`, `/healthz`, `/readyz`
//! * [`config`] — strict TOML config, units, validation
//!
//! # Life of a request
//!
//! A connection is accepted in [`server::serve_proxy`]; each request goes to
//! [`proxy::serve`], which starts an [`outcome::Outcome`] and runs the phases: the caller is
//! identified by [`clients::Clients::identify`], limited by [`limits::Limits::check`], forwarded
//! by [`upstream::Upstream::send`]; an upstream error is normalized by
//! [`errors::upstream::normalize`], a gateway error rendered by [`errors::render`]. The
//! response body ([`stream::ResponseBody`]) carries the outcome and records it in
//! [`metrics::Metrics::record`] and the access log when it ends, or as a 499 when the client
//! goes away.

pub mod access_log;
pub mod admin;
pub mod clients;
pub mod config;
pub mod errors;
pub mod exchange;
pub mod gateway;
pub mod headers;
pub mod limits;
pub mod metrics;
pub mod outcome;
pub mod pool;
pub mod proxy;
pub mod route;
pub mod server;
pub mod stream;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use config::Settings;
use gateway::{Gateway, State};
use metrics::Metrics;
use server::Listeners;

/// How to re-read the config on SIGHUP.
pub type Reload = Box<dyn Fn() -> Result<Settings, String> + Send + Sync>;

/// Runs the gateway on bound listeners until `shutdown` resolves, then drains and returns.
/// `reload` is polled on each `reload_signal`.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    reload: Option<(Reload, tokio::sync::mpsc::Receiver<()>)>,
) -> Result<(), String> {
    let models = settings
        .config
        .clients
        .iter()
        .flat_map(|c| c.models.iter().cloned())
        .chain(
            settings
                .config
                .limits
                .iter()
                .flat_map(|l| l.matches.models.iter().cloned()),
        );
    let metrics = Arc::new(Metrics::new(models).map_err(|e| format!("metrics registry: {e}"))?);
    let grace = settings.config.server.shutdown_grace.0;
    let state = State::build(settings, &metrics)?;
    let gw = Arc::new(Gateway::new(state, Arc::clone(&metrics)));

    let admin = tokio::spawn(server::serve_admin(Arc::clone(&gw), listeners.admin));
    let reloader = reload.map(|(reload, mut signals)| {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move {
            while signals.recv().await.is_some() {
                apply_reload(&gw, &reload);
            }
        })
    });
    server::serve_proxy(
        Arc::clone(&gw),
        listeners.proxy,
        listeners.tls,
        shutdown,
        grace,
    )
    .await;
    admin.abort();
    if let Some(r) = reloader {
        r.abort();
    }
    Ok(())
}

fn apply_reload(gw: &Gateway, reload: &Reload) {
    let old = gw.state();
    let settings = match reload() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "config reload refused; the previous config keeps serving");
            return;
        }
    };
    let (o, n) = (&old.settings.config.server, &settings.config.server);
    if o.listen != n.listen
        || o.admin_listen != n.admin_listen
        || o.tls.is_some() != n.tls.is_some()
    {
        tracing::warn!(
            "listen addresses and TLS apply only at startup; restart ezgate to change them"
        );
    }
    match State::build(settings, &gw.metrics) {
        Ok(state) => {
            gw.replace(state);
            tracing::info!(source = %gw.state().settings.source, "config reloaded; new requests use it");
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload refused; the previous config keeps serving")
        }
    }
}

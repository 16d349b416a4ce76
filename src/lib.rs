//! ezgate — a reverse-proxy sidecar for the EZLINK AI API (OpenAI-compatible): local rate
//! limits, one error schema for every failure, per-status Prometheus metrics.
//!
//! # Module map, by floor
//!
//! Each floor imports only from the floors below it (`tests/layers.rs` keeps it so).
//!
//! * **entry** — [`server`]: listeners (TCP, TLS with ALPN), connections, the drain;
//!   [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/status`, `POST /cooldowns/clear`;
//!   [`status`]: the `/status` JSON, from the domain's snapshots; this file: [`run`] and
//!   reloads
//! * **the path**, where the domain and recording meet — [`proxy`]: THE request path,
//!   identify → limit → forward → respond → record; [`stream`]: the response body (idle
//!   timeout, usage, the SSE error event); [`exchange`]: what a request holds and when it is
//!   counted; [`gateway`]: the state a reload replaces, the drain, in-flight places;
//!   [`websocket`]: WebSocket sessions (the Realtime API) after their handshake
//! * **the domain** — [`clients`]: who is asking (keys, fingerprints, model allow-lists);
//!   [`limits`]: rate, token and concurrency policies, their decisions and permits as
//!   values; [`upstream`] and [`pool`]: where requests go, connections over rustls, error
//!   classification; [`quota`]: the upstream's own quota, learned per key and model from
//!   its `x-ratelimit-*` headers; [`cost`]: `[prices]` compiled, what a usage costs in
//!   exact nano-units of the currency
//! * **recording**, beside the domain — [`outcome`]: what happened to one request, plain
//!   data; [`metrics`]: the Prometheus registry; [`access_log`]: the per-request line;
//!   [`traces`]: the request's OpenTelemetry span and its export
//! * **config** — [`config`]: strict TOML read into plain data, units, checks
//! * **base** — [`errors`]: the error schema and failure kinds; [`headers`]: hop-by-hop,
//!   request ids, `X-Forwarded-For`; [`route`]: canonical paths, route templates and where
//!   each request names its model; [`tls`]: trust roots, certificates; [`buffers`]: the
//!   memory ceiling of buffered request bodies
//!
//! # Life of a request
//!
//! A connection is accepted in [`server::serve_proxy`]; each request goes to
//! [`proxy::serve`], which starts an [`exchange::Exchange`] and runs the phases: the caller is
//! identified by [`clients::Clients::identify`] (and, with a model allow-list, its route and
//! model checked by [`clients::Client::model_check`] and [`clients::Client::check_named`]),
//! limited by [`limits::Limits::check`], forwarded
//! by [`upstream::Upstream::send`]; an upstream error is normalized by
//! [`errors::upstream::normalize`], a gateway error rendered by [`errors::render`]. The
//! response body ([`stream::ResponseBody`]) carries the exchange; when it ends (or the client
//! goes away: a 499) the exchange settles its permit and records the [`outcome::Outcome`] in
//! [`metrics::Metrics::record`], the access log and its span ([`traces::RequestSpan`]),
//! once. A WebSocket handshake takes the same phases (forwarded by
//! [`upstream::Upstream::upgrade`]); after the `101`, its [`websocket`] session holds the
//! exchange instead of a body, until the session ends.

pub mod access_log;
pub mod admin;
pub mod budget;
pub mod buffers;
pub mod clients;
pub mod config;
pub mod cost;
pub mod errors;
pub mod exchange;
pub mod gateway;
pub mod headers;
pub mod limits;
pub mod metrics;
pub mod outcome;
pub mod pool;
pub mod proxy;
pub mod quota;
pub mod route;
pub mod server;
pub mod status;
pub mod stream;
pub mod tls;
pub mod traces;
pub mod upstream;
pub mod websocket;

use std::future::Future;
use std::sync::Arc;

use config::Settings;
use gateway::{Gateway, State};
use metrics::Metrics;
use server::Listeners;

/// The longest shutdown waits for the last spans to be exported.
const TRACE_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// How often the spend of local budgets is written to `server.state_dir` (when it
/// changed): what a crash can lose at most.
const BUDGETS_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

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
        )
        .chain(
            settings
                .config
                .prices
                .iter()
                .flat_map(|p| p.models.iter().map(|m| m.model.clone())),
        );
    let metrics = Arc::new(Metrics::new(models).map_err(|e| format!("metrics registry: {e}"))?);
    let grace = settings.config.server.shutdown_grace.0;
    let state = State::build(settings, &metrics, None)?;
    let gw = Arc::new(Gateway::new(state, Arc::clone(&metrics)));
    for note in &gw.state().settings.notes {
        tracing::warn!("{note}");
    }
    let weak = Arc::downgrade(&gw);
    metrics.budget.read_from(Box::new(move || {
        weak.upgrade()
            .map(|gw| {
                let state = gw.state();
                status::budget_samples(&state.budgets, &state.settings.config.clients)
            })
            .unwrap_or_default()
    }));
    // The state file is rewritten at once for the current period (a previous period's spend
    // leaves it now, not at the first charge).
    let budgets = Arc::clone(&gw.state().budgets);
    tokio::task::spawn_blocking(move || budgets.flush(true))
        .await
        .map_err(|e| e.to_string())??;
    let budgets_writer = tokio::spawn(write_budgets_forever(Arc::clone(&gw)));

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
    // Every drained request is settled: the last spend is written down.
    budgets_writer.abort();
    write_budgets(&gw, true, true).await;
    gw.state().budgets.push().await;
    // Spans of the drained requests reach the collector, if it answers soon.
    gw.state().tracer.flush(TRACE_FLUSH).await;
    admin.abort();
    if let Some(r) = reloader {
        r.abort();
    }
    Ok(())
}

/// Writes the spend of local budgets every [`BUDGETS_FLUSH_EVERY`] while it changes.
async fn write_budgets_forever(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(BUDGETS_FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let ok = write_budgets(&gw, false, !failing).await;
        if ok && failing {
            tracing::info!("the budgets' spend is written to server.state_dir again");
        }
        failing = !ok;
    }
}

/// Writes the spend of local budgets (`all`: whether or not it changed), off the request
/// threads: the file is flushed to disk. Says whether it was; logs a failure if `loud`.
async fn write_budgets(gw: &Gateway, all: bool, loud: bool) -> bool {
    let budgets = Arc::clone(&gw.state().budgets);
    let e = match tokio::task::spawn_blocking(move || budgets.flush(all)).await {
        Ok(Ok(())) => return true,
        Ok(Err(e)) => e,
        Err(e) => e.to_string(),
    };
    if loud {
        tracing::error!(error = %e, "cannot write the budgets' spend to server.state_dir; retrying every 2s, and a restart before it succeeds loses what was spent since the last write");
    }
    false
}

/// A refused reload: recorded (for `/status` and the metrics) before it is logged, so who
/// reads the log line finds it recorded.
fn refused(gw: &Gateway, error: String) {
    gw.reloaded(Err(error.clone()));
    tracing::error!(error = %error, "config reload refused; the previous config keeps serving");
}

fn apply_reload(gw: &Gateway, reload: &Reload) {
    let old = gw.state();
    let settings = match reload() {
        Ok(s) => s,
        Err(e) => return refused(gw, e),
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
    match State::build(settings, &gw.metrics, Some(&old)) {
        Ok(state) => {
            gw.replace(state);
            gw.reloaded(Ok(()));
            let state = gw.state();
            for note in &state.settings.notes {
                tracing::warn!("{note}");
            }
            tracing::info!(source = %state.settings.source, hash = %state.config_hash, "config reloaded; new requests use it");
        }
        Err(e) => refused(gw, e),
    }
}

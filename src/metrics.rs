//! Prometheus metrics (`docs/metrics.md`), in an owned registry with handles cached at start.
//! [`Metrics::record`] is called once per request, from the request's [`Outcome`].

use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::errors::FailureKind;
use crate::outcome::{Outcome, SessionEnd};
use crate::route::Route;

mod buckets;
mod budget;
mod cost;
mod models;
mod queue;
mod status;
mod store;
use buckets::{
    DURATION_BUCKETS, OVERHEAD_BUCKETS, STORE_CHECK_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS,
};
pub use budget::{BudgetMetrics, BudgetSample};
pub use cost::{currency_value, CostMetrics, CostTotals};
use models::WELL_KNOWN_MODELS;
pub use queue::QueueMetrics;
pub use status::StatusMetrics;

pub const DECISIONS: [&str; 4] = ["allowed", "limited", "shadow_limited", "waited"];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_responses: IntCounterVec,
    upstream_failures: Vec<IntCounter>,
    header_duration: Vec<Histogram>,
    overhead: Vec<Histogram>,
    gateway_errors: IntCounterVec,
    ratelimit_decisions: IntCounterVec,
    ratelimit_keys: IntGaugeVec,
    ratelimit_fallbacks: IntCounterVec,
    /// `ezgate_ratelimit_store_up`: no series while no `[redis]` is configured.
    store_up: IntGaugeVec,
    /// `ezgate_ratelimit_store_check_duration_seconds`: no series while no `[redis]`.
    store_check_duration: HistogramVec,
    /// `ezgate_fleet_gateways`: no series until a fleet heartbeat was answered.
    fleet_gateways: IntGaugeVec,
    /// `ezgate_buffered_request_bytes`: set when scraped.
    buffered_request_bytes: IntGauge,
    inflight: Vec<IntGauge>,
    tokens: IntCounterVec,
    time_to_first_token: HistogramVec,
    time_per_output_token: HistogramVec,
    client_requests: IntCounterVec,
    trace_spans_exported: IntCounter,
    /// `reason` = `queue_full`, `export_failed`.
    trace_spans_dropped: [IntCounter; 2],
    /// `ezgate_time_to_first_token_seconds` handles by route and model label index.
    ttft_cache: Box<[OnceLock<Histogram>]>,
    /// `ezgate_time_per_output_token_seconds` handles by model label index.
    tpot_cache: Box<[OnceLock<Histogram>]>,
    /// `ezgate_client_requests_total` handles by client label, then common status.
    client_cache: RwLock<Vec<ClientRequests>>,
    /// `ezgate_websocket_sessions_total`, by [`SessionEnd::ALL`] position.
    websocket_sessions: Vec<IntCounter>,
    /// `ezgate_websocket_bytes_total`: client to upstream, upstream to client.
    websocket_bytes: [IntCounter; 2],
    /// Config model names (exact, sorted): the first entries of the model label table.
    model_names: Vec<String>,
    /// `ezgate_tokens_total` handles (prompt, completion) by model label index, then by
    /// client label (a handful: the configured clients, `anonymous`, `other`).
    token_cache: Box<[RwLock<Vec<ClientTokens>>]>,
    /// Handles created on first use (so only series that happen are exported), then reused.
    request_cache: Box<[OnceLock<IntCounter>]>,
    durations: Box<[OnceLock<Histogram>]>,
    /// `ezgate_upstream_responses_total` by common status, then model label index.
    upstream_cache: Box<[OnceLock<IntCounter>]>,
    /// What the admin view reads too: set at scrape time and on reloads.
    pub status: StatusMetrics,
    pub queue: QueueMetrics,
    /// `ezgate_cost_total`, and the totals per client and team of `/status`.
    pub cost: CostMetrics,
    /// `ezgate_budget_spent` and `ezgate_budget_limit`, read from the budgets when scraped.
    pub budget: BudgetMetrics,
}

/// One client label's (prompt, completion) token counters.
type ClientTokens = (Box<str>, [IntCounter; 2]);
/// One client label's request counters, by [`COMMON_STATUSES`] index.
type ClientRequests = (Box<str>, Arc<[OnceLock<IntCounter>]>);

/// The `method` label values, `other` last (see `outcome::method_label`).
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other",
];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Statuses whose counters are cached; any other status still counts, just more slowly.
const COMMON_STATUSES: [u16; 24] = [
    200, 201, 202, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429,
    499, 500, 502, 503, 504,
];

fn common_status(status: u16) -> Option<usize> {
    COMMON_STATUSES.iter().position(|s| *s == status)
}

fn cache<T>(n: usize) -> Box<[OnceLock<T>]> {
    (0..n).map(|_| OnceLock::new()).collect()
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    /// Builds the registry. `models` are the model names from the config (exact names, not
    /// globs) that get their own label value.
    pub fn new(models: impl IntoIterator<Item = String>) -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            opts(
                "ezgate_requests_total",
                "Responses sent, by route, method, exact status and who produced it.",
            ),
            &["route", "method", "status", "source"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "ezgate_request_duration_seconds",
                "Time from request to the end of the response (streams: to the last event).",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route", "status_class"],
        )?;
        let upstream_responses = IntCounterVec::new(
            opts(
                "ezgate_upstream_responses_total",
                "Responses received from the upstream API, by raw status and model (a configured or well-known model, else other).",
            ),
            &["status", "model"],
        )?;
        let failures_vec = IntCounterVec::new(
            opts(
                "ezgate_upstream_failures_total",
                "Upstream exchanges that failed without a usable response, by kind.",
            ),
            &["kind"],
        )?;
        let header_vec = HistogramVec::new(
            HistogramOpts::new(
                "ezgate_upstream_header_duration_seconds",
                "Time from sending a request upstream to its response headers.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route"],
        )?;
        let overhead_vec = HistogramVec::new(
            HistogramOpts::new("ezgate_overhead_seconds", "Time spent in ezgate itself: total time to response headers minus time waiting on the upstream.")
                .buckets(OVERHEAD_BUCKETS.to_vec()),
            &["route"],
        )?;
        let gateway_errors = IntCounterVec::new(
            opts(
                "ezgate_gateway_errors_total",
                "Errors ezgate produced itself, by gateway error code.",
            ),
            &["code"],
        )?;
        let ratelimit_decisions = IntCounterVec::new(
            opts(
                "ezgate_ratelimit_decisions_total",
                "Rate-limit decisions, by policy and decision.",
            ),
            &["policy", "decision"],
        )?;
        let ratelimit_keys = IntGaugeVec::new(
            opts(
                "ezgate_ratelimit_keys",
                "Keys currently tracked by each rate-limit policy.",
            ),
            &["policy"],
        )?;
        let ratelimit_fallbacks = IntCounterVec::new(
            opts(
                "ezgate_ratelimit_store_fallbacks_total",
                "Checks of shared (Redis) policies answered by the local fallback (or refused, with on_failure = deny) because Redis was unavailable.",
            ),
            &["policy"],
        )?;
        let store_up = IntGaugeVec::new(
            opts(
                "ezgate_ratelimit_store_up",
                "1 while the shared rate-limit store ([redis]) answers, 0 from its first failed check or heartbeat until it answers again; absent without [redis].",
            ),
            &[],
        )?;
        let store_check_duration = HistogramVec::new(
            HistogramOpts::new(
                "ezgate_ratelimit_store_check_duration_seconds",
                "Round trip of each shared-store (Redis) check of a shared policy, answered or not (no answer: about redis.timeout).",
            )
            .buckets(STORE_CHECK_BUCKETS.to_vec()),
            &[],
        )?;
        let fleet_gateways = IntGaugeVec::new(
            opts(
                "ezgate_fleet_gateways",
                "Live gateways sharing this gateway's Redis, counted by their heartbeats (it included).",
            ),
            &[],
        )?;
        let buffered_request_bytes = IntGauge::with_opts(opts(
            "ezgate_buffered_request_bytes",
            "Memory held by the request bodies ezgate is reading whole, all together (bounded by server.max_buffered_bytes).",
        ))?;
        let inflight_vec = IntGaugeVec::new(
            opts("ezgate_inflight_requests", "Requests in flight, by route."),
            &["route"],
        )?;
        let tokens = IntCounterVec::new(
            opts(
                "ezgate_tokens_total",
                "Tokens reported by the upstream, by model, kind and client.",
            ),
            &["model", "kind", "client"],
        )?;
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                "ezgate_time_to_first_token_seconds",
                "From a request's arrival to the first event with content of its stream (other responses: their first body byte), model routes.",
            )
            .buckets(TTFT_BUCKETS.to_vec()),
            &["route", "model"],
        )?;
        let time_per_output_token = HistogramVec::new(
            HistogramOpts::new(
                "ezgate_time_per_output_token_seconds",
                "Per stream: (its end - the first token) / (completion tokens - 1), from the reported usage.",
            )
            .buckets(TPOT_BUCKETS.to_vec()),
            &["model"],
        )?;
        let client_requests = IntCounterVec::new(
            opts(
                "ezgate_client_requests_total",
                "Responses sent, by client (a configured client, anonymous, or other) and exact status.",
            ),
            &["client", "status"],
        )?;
        let trace_spans_exported = IntCounter::with_opts(opts(
            "ezgate_trace_spans_exported_total",
            "Request spans the OTLP collector accepted ([tracing]).",
        ))?;
        let trace_spans_dropped_vec = IntCounterVec::new(
            opts(
                "ezgate_trace_spans_dropped_total",
                "Request spans not exported: queue_full (the collector was slower than the traffic), export_failed (it refused them or could not be reached).",
            ),
            &["reason"],
        )?;
        let trace_spans_dropped = [
            trace_spans_dropped_vec.with_label_values(&["queue_full"]),
            trace_spans_dropped_vec.with_label_values(&["export_failed"]),
        ];
        let sessions_vec = IntCounterVec::new(
            opts(
                "ezgate_websocket_sessions_total",
                "WebSocket sessions (status 101) that ended, by how they ended.",
            ),
            &["end"],
        )?;
        let ws_bytes_vec = IntCounterVec::new(
            opts(
                "ezgate_websocket_bytes_total",
                "Bytes WebSocket sessions carried, counted when each ended.",
            ),
            &["direction"],
        )?;
        let build_info = IntGaugeVec::new(
            opts(
                "ezgate_build_info",
                "Always 1; its labels say which ezgate runs: version, git commit, cargo profile.",
            ),
            &["version", "commit", "profile"],
        )?;
        build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                env!("EZGATE_BUILD_COMMIT"),
                env!("EZGATE_BUILD_PROFILE"),
            ])
            .set(1);

        let status = StatusMetrics::new()?;
        let queue = QueueMetrics::new()?;
        let cost = CostMetrics::new()?;
        let budget = BudgetMetrics::new()?;
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(requests.clone()),
            Box::new(duration.clone()),
            Box::new(upstream_responses.clone()),
            Box::new(failures_vec.clone()),
            Box::new(header_vec.clone()),
            Box::new(overhead_vec.clone()),
            Box::new(gateway_errors.clone()),
            Box::new(ratelimit_decisions.clone()),
            Box::new(ratelimit_keys.clone()),
            Box::new(ratelimit_fallbacks.clone()),
            Box::new(store_up.clone()),
            Box::new(store_check_duration.clone()),
            Box::new(fleet_gateways.clone()),
            Box::new(buffered_request_bytes.clone()),
            Box::new(inflight_vec.clone()),
            Box::new(tokens.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(time_per_output_token.clone()),
            Box::new(client_requests.clone()),
            Box::new(trace_spans_exported.clone()),
            Box::new(trace_spans_dropped_vec),
            Box::new(sessions_vec.clone()),
            Box::new(ws_bytes_vec.clone()),
            Box::new(build_info),
            Box::new(status.utilization.clone()),
            Box::new(status.cooldowns.clone()),
            Box::new(status.reloads.clone()),
            Box::new(status.config_info.clone()),
            Box::new(status.quota_limit.clone()),
            Box::new(status.quota_remaining.clone()),
            Box::new(queue.queued.clone()),
            Box::new(queue.wait.clone()),
            Box::new(cost.clone()),
            Box::new(budget.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for c in collectors {
            registry.register(c)?;
        }
        let per_route = |v: &HistogramVec| -> Vec<Histogram> {
            Route::ALL
                .iter()
                .map(|r| v.with_label_values(&[r.as_str()]))
                .collect()
        };
        let header_duration = per_route(&header_vec);
        let overhead = per_route(&overhead_vec);
        let inflight = Route::ALL
            .iter()
            .map(|r| inflight_vec.with_label_values(&[r.as_str()]))
            .collect();
        let upstream_failures = FailureKind::ALL
            .iter()
            .map(|k| failures_vec.with_label_values(&[k.as_str()]))
            .collect();
        let websocket_sessions = SessionEnd::ALL
            .iter()
            .map(|e| sessions_vec.with_label_values(&[e.as_str()]))
            .collect();
        let websocket_bytes =
            ["to_upstream", "to_client"].map(|d| ws_bytes_vec.with_label_values(&[d]));
        let mut model_names: Vec<String> = models
            .into_iter()
            .filter(|m| !m.contains(['*', '?']))
            .collect();
        model_names.sort();
        model_names.dedup();
        let model_count = model_names.len() + WELL_KNOWN_MODELS.len();
        let token_cache = (0..model_count + 1)
            .map(|_| RwLock::new(Vec::new()))
            .collect();
        Ok(Metrics {
            registry,
            requests,
            duration,
            upstream_responses,
            upstream_failures,
            header_duration,
            overhead,
            gateway_errors,
            ratelimit_decisions,
            ratelimit_keys,
            ratelimit_fallbacks,
            store_up,
            store_check_duration,
            fleet_gateways,
            buffered_request_bytes,
            inflight,
            tokens,
            websocket_sessions,
            websocket_bytes,
            time_to_first_token,
            time_per_output_token,
            client_requests,
            trace_spans_exported,
            trace_spans_dropped,
            ttft_cache: cache(Route::ALL.len() * (model_count + 1)),
            tpot_cache: cache(model_count + 1),
            client_cache: RwLock::new(Vec::new()),
            model_names,
            token_cache,
            request_cache: cache(Route::ALL.len() * METHODS.len() * COMMON_STATUSES.len() * 2),
            durations: cache(Route::ALL.len() * STATUS_CLASSES.len()),
            upstream_cache: cache(COMMON_STATUSES.len() * (model_count + 1)),
            status,
            queue,
            cost,
            budget,
        })
    }

    fn route_index(route: Route) -> usize {
        Route::ALL
            .iter()
            .position(|r| *r == route)
            .unwrap_or(Route::ALL.len() - 1)
    }

    pub fn inflight(&self, route: Route) -> &IntGauge {
        &self.inflight[Self::route_index(route)]
    }

    /// Counts one finished request: its response, its errors, its tokens.
    pub fn record(&self, o: &Outcome, duration: Duration) {
        let idx = Self::route_index(o.route);
        self.count_request(idx, o);
        let class = usize::from(o.status / 100).clamp(1, 5) - 1;
        self.durations[idx * 5 + class]
            .get_or_init(|| {
                self.duration
                    .with_label_values(&[o.route.as_str(), STATUS_CLASSES[class]])
            })
            .observe(duration.as_secs_f64());
        if let Some(h) = o.header_wait {
            self.header_duration[idx].observe(h.as_secs_f64());
        }
        if o.responded.is_some() {
            self.overhead[idx].observe(o.overhead().as_secs_f64());
        }
        let model = self.model_index(o.model.as_deref());
        if let Some(s) = o.upstream_status {
            let create = || {
                self.upstream_responses
                    .with_label_values(&[status_code(s).as_str(), self.label_at(model)])
            };
            match common_status(s) {
                Some(i) => self.upstream_cache[i * self.model_slots() + model]
                    .get_or_init(create)
                    .inc(),
                None => create().inc(),
            }
        }
        if let Some(kind) = o.upstream_failure {
            let i = FailureKind::ALL
                .iter()
                .position(|k| *k == kind)
                .unwrap_or(0);
            self.upstream_failures[i].inc();
        }
        if let Some(code) = o.gateway_code {
            self.gateway_errors.with_label_values(&[code]).inc();
        }
        self.count_client(o);
        if let Some(s) = &o.session {
            let i = SessionEnd::ALL
                .iter()
                .position(|e| *e == s.end)
                .unwrap_or(0);
            self.websocket_sessions[i].inc();
            self.websocket_bytes[0].inc_by(s.bytes_in);
            self.websocket_bytes[1].inc_by(o.bytes_out);
        }
        if let Some(usage) = o.usage {
            let [prompt, completion] = self.token_counters(model, o.client.as_str());
            prompt.inc_by(usage.prompt);
            completion.inc_by(usage.completion);
        }
        if let Some(nanos) = o.cost {
            let team = o.team.as_deref();
            self.cost
                .add(o.client.as_str(), self.label_at(model), team, nanos);
        }
        if let Some(ttft) = o.time_to_first_token() {
            self.ttft_cache[idx * self.model_slots() + model]
                .get_or_init(|| {
                    self.time_to_first_token
                        .with_label_values(&[o.route.as_str(), self.label_at(model)])
                })
                .observe(ttft.as_secs_f64());
        }
        if let Some(tpot) = o.time_per_output_token() {
            self.tpot_cache[model]
                .get_or_init(|| {
                    self.time_per_output_token
                        .with_label_values(&[self.label_at(model)])
                })
                .observe(tpot.as_secs_f64());
        }
    }

    /// `ezgate_client_requests_total` for this outcome.
    fn count_client(&self, o: &Outcome) {
        let client = o.client.as_str();
        let by_status = {
            let read = self.client_cache.read().unwrap_or_else(|p| p.into_inner());
            read.iter()
                .find(|(name, _)| &**name == client)
                .map(|(_, c)| Arc::clone(c))
        };
        let by_status = by_status.unwrap_or_else(|| {
            let fresh: Arc<[OnceLock<IntCounter>]> = cache(COMMON_STATUSES.len()).into();
            let mut write = self.client_cache.write().unwrap_or_else(|p| p.into_inner());
            write.push((client.into(), Arc::clone(&fresh)));
            fresh
        });
        let create = || {
            self.client_requests
                .with_label_values(&[client, status_code(o.status).as_str()])
        };
        match common_status(o.status) {
            Some(i) => by_status[i].get_or_init(create).inc(),
            None => create().inc(),
        }
    }

    /// The (prompt, completion) counters of a model label and a client label.
    fn token_counters(&self, model: usize, client: &str) -> [IntCounter; 2] {
        let slot = &self.token_cache[model];
        let read = slot.read().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = read.iter().find(|(name, _)| &**name == client) {
            return c.clone();
        }
        drop(read);
        let model_label = self.label_at(model);
        let counters = [
            self.tokens
                .with_label_values(&[model_label, "prompt", client]),
            self.tokens
                .with_label_values(&[model_label, "completion", client]),
        ];
        let mut write = slot.write().unwrap_or_else(|p| p.into_inner());
        write.push((client.into(), counters.clone()));
        counters
    }

    /// The span export counters: (exported, dropped as queue_full, dropped as export_failed).
    pub fn trace_counters(&self) -> (IntCounter, IntCounter, IntCounter) {
        let [full, failed] = &self.trace_spans_dropped;
        (
            self.trace_spans_exported.clone(),
            full.clone(),
            failed.clone(),
        )
    }

    /// A policy's decision counters, in [`DECISIONS`] order, cached by the policy.
    pub fn decision_counters(&self, policy: &str) -> [IntCounter; 4] {
        DECISIONS.map(|d| self.ratelimit_decisions.with_label_values(&[policy, d]))
    }

    /// `ezgate_requests_total` for this outcome: a cached handle for the common statuses, so
    /// recording hashes no label strings and takes no lock.
    fn count_request(&self, route: usize, o: &Outcome) {
        let method = METHODS
            .iter()
            .position(|m| *m == o.method)
            .unwrap_or(METHODS.len() - 1);
        let source = usize::from(o.source == crate::errors::Source::Upstream);
        let create = || {
            let status = status_code(o.status);
            self.requests.with_label_values(&[
                o.route.as_str(),
                o.method,
                status.as_str(),
                o.source.as_str(),
            ])
        };
        match common_status(o.status) {
            Some(s) => {
                let slot =
                    ((route * METHODS.len() + method) * COMMON_STATUSES.len() + s) * 2 + source;
                self.request_cache[slot].get_or_init(create).inc();
            }
            None => create().inc(),
        }
    }

    /// A policy's `ezgate_ratelimit_store_fallbacks_total` counter, cached by its caller.
    pub fn fallback_counter(&self, policy: &str) -> IntCounter {
        self.ratelimit_fallbacks.with_label_values(&[policy])
    }

    /// `ezgate_buffered_request_bytes`: what buffered request bodies hold now.
    pub fn buffered_request_bytes(&self, bytes: u64) {
        self.buffered_request_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub fn ratelimit_keys(&self, policy: &str, keys: usize) {
        self.ratelimit_keys
            .with_label_values(&[policy])
            .set(i64::try_from(keys).unwrap_or(i64::MAX));
    }

    /// The number of model label values: config models, well-known ones, `other`.
    fn model_slots(&self) -> usize {
        self.model_names.len() + WELL_KNOWN_MODELS.len() + 1
    }

    /// A configured or well-known model name, else `other`: never free text from a request.
    pub fn model_label(&self, model: Option<&str>) -> &str {
        self.label_at(self.model_index(model))
    }

    /// The model's place in the label table: config models, then well-known ones, then
    /// `other`.
    fn model_index(&self, model: Option<&str>) -> usize {
        models::index(&self.model_names, model)
    }

    fn label_at(&self, i: usize) -> &str {
        models::label_at(&self.model_names, i)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on invalid metric families, which we never build.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

fn status_code(status: u16) -> http::StatusCode {
    http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY)
}

#[cfg(test)]
mod tests;

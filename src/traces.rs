//! OpenTelemetry traces (`[tracing]`, `docs/metrics.md#traces`): one server span per request,
//! continuing the client's W3C `traceparent`/`tracestate` and handed on to the upstream, with
//! the HTTP and GenAI semantic-convention attributes read from the request's [`Outcome`].
//!
//! The SDK samples (parent-based, then by trace id ratio), builds and ends the spans; the
//! OTLP exporter encodes them as protobuf and retries. Between the two sits ezgate's own
//! queue: a span that ends is put in a bounded channel without waiting, and one task sends
//! them in batches. When the collector is slow or down the channel fills and spans are
//! dropped and counted (`ezgate_trace_spans_dropped_total`): a request never waits on
//! tracing. An unreachable collector is logged once per outage.
//!
//! With `sample_ratio = 0` a request without a sampled parent costs one header lookup.

use std::borrow::Cow;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;
use tokio::sync::{mpsc, oneshot};

use crate::config::TracingConfig;
use crate::outcome::Outcome;
use crate::route::Route;

/// Spans waiting for export; beyond this, ended spans are dropped (and counted).
const QUEUE: usize = 4096;
/// Spans in one export request.
const MAX_BATCH: usize = 512;
/// Longest a span waits in a batch that is not full.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// One export request, retries included, before its spans count as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// A collector's answer is a small protobuf; anything larger is refused.
const MAX_ANSWER: usize = 64 * 1024;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// What the export counts: spans sent, spans dropped because the queue was full, spans
/// dropped because the collector refused them or could not be reached.
pub struct TraceCounters {
    pub exported: IntCounter,
    pub queue_full: IntCounter,
    pub export_failed: IntCounter,
}

/// The request spans of one `[tracing]` table (or none: tracing off).
pub struct Tracer {
    on: Option<On>,
}

struct On {
    tracer: SdkTracer,
    /// Held for the tracer's life; the last one dropped closes the queue.
    _provider: SdkTracerProvider,
    propagator: TraceContextPropagator,
    /// `sample_ratio = 0`: only a sampled parent starts a span.
    parents_only: bool,
    queue: mpsc::Sender<Item>,
}

enum Item {
    Span(Box<SpanData>),
    /// Export everything queued before this, then answer.
    Flush(oneshot::Sender<()>),
}

impl Tracer {
    pub fn off() -> Tracer {
        Tracer { on: None }
    }

    /// Starts the export task (on the current Tokio runtime).
    pub fn new(cfg: &TracingConfig, counters: TraceCounters) -> Result<Tracer, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "tracing: the exporter needs ezgate's runtime".to_owned())?;
        let url = cfg.traces_url();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Collector::new()?)
            .with_endpoint(url.clone())
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("tracing.otlp_endpoint: {e}"))?;
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
        let (queue, items) = mpsc::channel(QUEUE);
        let processor = Queue {
            queue: queue.clone(),
            full: counters.queue_full.clone(),
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let scope = InstrumentationScope::builder("ezgate")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let tracer = provider.tracer_with_scope(scope);
        runtime.spawn(
            Export {
                exporter,
                counters,
                url,
                reachable: true,
            }
            .run(items),
        );
        Ok(Tracer {
            on: Some(On {
                tracer,
                _provider: provider,
                propagator: TraceContextPropagator::new(),
                parents_only: cfg.sample_ratio <= 0.0,
                queue,
            }),
        })
    }

    /// The span of a request that just arrived, when it is recorded.
    pub fn start(
        &self,
        headers: &HeaderMap,
        method: &'static str,
        route: Route,
    ) -> Option<RequestSpan> {
        let on = self.on.as_ref()?;
        let parent = headers.get(TRACEPARENT);
        if on.parents_only && !parent.is_some_and(sampled) {
            return None;
        }
        let cx = match parent {
            Some(_) => on
                .propagator
                .extract_with_context(&Context::new(), &HeaderExtractor(headers)),
            None => Context::new(),
        };
        let builder = on
            .tracer
            .span_builder(span_name(method, route))
            .with_kind(SpanKind::Server);
        let span = on.tracer.build_with_context(builder, &cx);
        span.is_recording().then_some(RequestSpan { span })
    }

    /// Exports every span that ended before this call, waiting at most `within`.
    pub async fn flush(&self, within: Duration) {
        let Some(on) = &self.on else { return };
        let (ack, done) = oneshot::channel();
        let _ = tokio::time::timeout(within, async {
            if on.queue.send(Item::Flush(ack)).await.is_ok() {
                let _ = done.await;
            }
        })
        .await;
    }
}

/// `traceparent` says "sampled" (flags are its last two hex digits).
fn sampled(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    b.len() >= 55
        && std::str::from_utf8(&b[b.len() - 2..])
            .ok()
            .and_then(|f| u8::from_str_radix(f, 16).ok())
            .is_some_and(|f| f & 1 == 1)
}

/// `{method} {route}` (HTTP semantic conventions); the method alone off the known routes.
fn span_name(method: &'static str, route: Route) -> Cow<'static, str> {
    let method = http_method(method);
    match route {
        Route::Other => Cow::Borrowed(method),
        r => Cow::Owned(format!("{method} {}", r.as_str())),
    }
}

/// `http.request.method`: a known method, else `_OTHER`.
fn http_method(label: &'static str) -> &'static str {
    if label == "other" {
        "_OTHER"
    } else {
        label
    }
}

/// `gen_ai.operation.name` of a route.
fn operation(route: Route) -> Option<&'static str> {
    match route {
        Route::ChatCompletions | Route::Responses => Some("chat"),
        Route::Completions => Some("text_completion"),
        Route::Embeddings => Some("embeddings"),
        _ => None,
    }
}

/// One request's span, from its arrival to the end of its response.
pub struct RequestSpan {
    span: Span,
}

impl RequestSpan {
    /// The trace id, 32 hex digits (for the access log).
    pub fn trace_id(&self) -> String {
        self.span.span_context().trace_id().to_string()
    }

    /// Sends this span's context upstream: `traceparent` names ezgate's span as the parent,
    /// `tracestate` carries the client's on (when it sent a valid one).
    pub fn inject(&self, headers: &mut HeaderMap) {
        let cx = Context::new().with_remote_span_context(self.span.span_context().clone());
        headers.remove(TRACESTATE);
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
        if headers.get(TRACESTATE).is_some_and(HeaderValue::is_empty) {
            headers.remove(TRACESTATE);
        }
    }

    /// Ends the span with what the request did: attributes, the first token as an event, an
    /// error status for a 5xx. Never a key, a prompt or a completion.
    pub fn finish(mut self, o: &Outcome) {
        let mut attrs = Vec::with_capacity(18);
        attrs.push(KeyValue::new("http.request.method", http_method(o.method)));
        if o.route != Route::Other {
            attrs.push(KeyValue::new("http.route", o.route.as_str()));
        }
        attrs.push(KeyValue::new(
            "http.response.status_code",
            i64::from(o.status),
        ));
        let error_type = match o.gateway_code {
            Some(code) => Some(Cow::Borrowed(code)),
            None if o.status >= 400 => Some(Cow::Owned(o.status.to_string())),
            None => None,
        };
        if let Some(e) = &error_type {
            attrs.push(KeyValue::new("error.type", e.clone()));
        }
        attrs.push(KeyValue::new("ezgate.request_id", o.request_id.clone()));
        attrs.push(KeyValue::new("ezgate.source", o.source.as_str()));
        attrs.push(KeyValue::new("ezgate.client", o.client.as_str().to_owned()));
        if let Some(policy) = &o.refused_by {
            attrs.push(KeyValue::new("ezgate.ratelimit.policy", policy.to_string()));
        }
        if let Some(s) = o.upstream_status {
            attrs.push(KeyValue::new("ezgate.upstream.status_code", i64::from(s)));
        }
        if let Some(op) = operation(o.route) {
            attrs.push(KeyValue::new("gen_ai.operation.name", op));
            attrs.push(KeyValue::new("gen_ai.provider.name", "ezlink"));
        }
        if o.route.carries_model() {
            if let Some(m) = &o.model {
                attrs.push(KeyValue::new("gen_ai.request.model", m.clone()));
            }
            if let Some(m) = &o.response_model {
                attrs.push(KeyValue::new("gen_ai.response.model", m.clone()));
            }
        }
        if let Some(u) = o.usage {
            attrs.push(KeyValue::new(
                "gen_ai.usage.input_tokens",
                saturate(u.prompt),
            ));
            attrs.push(KeyValue::new(
                "gen_ai.usage.output_tokens",
                saturate(u.completion),
            ));
        }
        if let Some(charged) = o.charged {
            attrs.push(KeyValue::new("ezgate.charged_tokens", saturate(charged)));
        }
        if let Some(ttft) = o.time_to_first_token() {
            attrs.push(KeyValue::new(
                "gen_ai.server.time_to_first_token",
                ttft.as_secs_f64(),
            ));
        }
        self.span.set_attributes(attrs);
        if let (Some(first), true) = (o.first_token, o.route.carries_tokens()) {
            self.span
                .add_event_with_timestamp("first_token", wall_clock(first), Vec::new());
        }
        if o.status >= 500 && o.status != 499 {
            self.span
                .set_status(Status::error(error_type.unwrap_or(Cow::Borrowed("error"))));
        }
        self.span.end();
    }
}

fn saturate(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The wall-clock time of a monotonic instant in the past.
fn wall_clock(at: Instant) -> SystemTime {
    SystemTime::now() - at.elapsed()
}

/// The span processor: ended spans into the export queue, never waiting.
#[derive(Debug)]
struct Queue {
    queue: mpsc::Sender<Item>,
    full: IntCounter,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.queue.try_send(Item::Span(Box::new(span))).is_err() {
            self.full.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export task: batches from the queue to the collector, one request at a time.
struct Export {
    exporter: opentelemetry_otlp::SpanExporter,
    counters: TraceCounters,
    url: String,
    reachable: bool,
}

impl Export {
    async fn run(mut self, mut queue: mpsc::Receiver<Item>) {
        let mut items = Vec::with_capacity(MAX_BATCH);
        let mut spans = Vec::with_capacity(MAX_BATCH);
        let mut acks = Vec::new();
        while queue.recv_many(&mut items, MAX_BATCH).await > 0 {
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            let mut open = true;
            loop {
                for item in items.drain(..) {
                    match item {
                        Item::Span(s) => spans.push(*s),
                        Item::Flush(ack) => acks.push(ack),
                    }
                }
                if !acks.is_empty() || spans.len() >= MAX_BATCH {
                    break;
                }
                let room = MAX_BATCH - spans.len();
                match tokio::time::timeout_at(deadline, queue.recv_many(&mut items, room)).await {
                    Ok(0) => {
                        open = false;
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            self.send(&mut spans).await;
            for ack in acks.drain(..) {
                let _ = ack.send(());
            }
            if !open {
                break;
            }
        }
        let _ = self.exporter.shutdown();
    }

    async fn send(&mut self, spans: &mut Vec<SpanData>) {
        if spans.is_empty() {
            return;
        }
        let n = spans.len() as u64;
        let batch = std::mem::replace(spans, Vec::with_capacity(MAX_BATCH));
        match self.exporter.export(batch).await {
            Ok(()) => {
                self.counters.exported.inc_by(n);
                if !self.reachable {
                    self.reachable = true;
                    tracing::info!(collector = %self.url, "tracing: the collector accepts spans again");
                }
            }
            Err(e) => {
                self.counters.export_failed.inc_by(n);
                if self.reachable {
                    self.reachable = false;
                    tracing::warn!(
                        collector = %self.url,
                        error = %e,
                        "tracing: the collector cannot be reached or refuses spans; they are dropped and counted in ezgate_trace_spans_dropped_total{{reason=\"export_failed\"}} until it accepts them again (logged once per outage)"
                    );
                }
            }
        }
    }
}

/// The HTTP client of the exporter: hyper over rustls (system and Mozilla roots), idle
/// connections closed by ezgate before the collector closes them.
#[derive(Debug, Clone)]
struct Collector {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Collector {
    fn new() -> Result<Collector, String> {
        let tls = crate::tls::client_tls(None).map_err(|e| format!("tracing: {e}"))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(2)
            .build(connector);
        Ok(Collector { client })
    }
}

#[async_trait::async_trait]
impl HttpClient for Collector {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, Full::new(body));
        let answer = async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        };
        tokio::time::timeout(EXPORT_TIMEOUT, answer)
            .await
            .map_err(|_| format!("no answer within {}s", EXPORT_TIMEOUT.as_secs()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_flag_of_a_traceparent() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert!(sampled(&v(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        )));
        assert!(!sampled(&v(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        )));
        assert!(sampled(&v(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03"
        )));
        assert!(!sampled(&v("00-short-01")));
        assert!(!sampled(&v(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz"
        )));
    }

    #[test]
    fn span_names_follow_the_http_conventions() {
        assert_eq!(
            span_name("POST", Route::ChatCompletions),
            "POST /v1/chat/completions"
        );
        assert_eq!(span_name("GET", Route::Other), "GET");
        assert_eq!(span_name("other", Route::Models), "_OTHER /v1/models");
    }
}

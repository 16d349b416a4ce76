//! THE request path: identify → limit → forward → respond → record.
//!
//! [`serve`] is the service for every proxied request. It starts the request's [`Outcome`],
//! runs [`handle`] (catching a panic inside it), renders any [`GatewayError`] in the one error
//! schema, and hands the outcome to the response body, which records it when it ends.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderValue, ACCEPT_ENCODING, AUTHORIZATION, CONNECTION, CONTENT_ENCODING, CONTENT_LENGTH,
    CONTENT_TYPE, HOST, RETRY_AFTER,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::errors::{self, upstream::MAX_ERROR_BODY, GatewayError, Source};
use crate::exchange::Exchange;
use crate::gateway::{ConnWatch, Gateway, State, StreamSlot};
use crate::headers::{self, X_REQUEST_ID};
use crate::limits::LimitRequest;
use crate::outcome::ClientLabel;
use crate::pool::{RequestBody, UpstreamBody};
use crate::route::{PathError, Route};
use crate::stream::{ResponseBody, Watch};

/// What [`serve`] returns: boxed, so a connection holds a pointer to it, and the request
/// path's state is freed as soon as the response headers are out (a response that streams for
/// minutes holds only its body).
pub type ServeFuture =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

/// The service for every proxied request; `conn` is its HTTP/2 connection's watch.
pub fn serve(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    peer: SocketAddr,
    conn: Option<Arc<ConnWatch>>,
) -> ServeFuture {
    Box::pin(serve_request(gw, req, peer, conn))
}

async fn serve_request(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    peer: SocketAddr,
    conn: Option<Arc<ConnWatch>>,
) -> Result<Response<ResponseBody>, Infallible> {
    let state = gw.state();
    let http1 = req.version() < http::Version::HTTP_2;
    // Canonical before anything looks at it: routing, limits, the upstream prefix.
    let path = crate::route::normalize(req.uri().path());
    let route = match &path {
        Ok(Some(p)) => Route::from_path(p),
        Ok(None) => Route::from_path(req.uri().path()),
        Err(_) => Route::Other,
    };
    let request_id = headers::client_request_id(req.headers())
        .map(str::to_owned)
        .unwrap_or_else(headers::new_request_id);
    let access_log = state.settings.config.log.access_log;
    let mut out = Exchange::start(
        Arc::clone(&gw.metrics),
        access_log,
        request_id,
        req.method(),
        route,
    );
    out.stream = conn.map(StreamSlot::new);
    let result = CatchUnwind {
        inner: handle(&gw, &state, req, path, peer, &mut out),
    }
    .await;
    let mut resp = match result {
        Ok(Ok(resp)) => resp,
        Ok(Err(err)) => error_response(&err, &mut out),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(request_id = %out.request_id, panic = %what, "request handler panicked");
            error_response(
                &GatewayError::Internal("the request handler failed unexpectedly".into()),
                &mut out,
            )
        }
    };
    out.responded = Some(Instant::now());
    if http1 && gw.is_draining() {
        // The client's next request goes to a new connection (another replica).
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp.body_mut().attach(out);
    Ok(resp)
}

fn error_response(err: &GatewayError, out: &mut Exchange) -> Response<ResponseBody> {
    out.status = err.status().as_u16();
    out.source = Source::Gateway;
    out.gateway_error(err);
    let (status, headers, body) = errors::render(err, &out.request_id);
    with_parts(status, headers, ResponseBody::full(body))
}

fn with_parts(
    status: StatusCode,
    headers: HeaderMap,
    body: ResponseBody,
) -> Response<ResponseBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

async fn handle(
    gw: &Gateway,
    state: &State,
    req: Request<Incoming>,
    path: Result<Option<String>, PathError>,
    peer: SocketAddr,
    out: &mut Exchange,
) -> Result<Response<ResponseBody>, GatewayError> {
    let cfg = &state.settings.config;
    if req.method() == Method::CONNECT {
        return Err(GatewayError::MethodNotAllowed("CONNECT".into()));
    }
    let path = path.map_err(|e| GatewayError::BadRequest(e.to_string()))?;
    let Some(slot) = gw.take_place(cfg.server.max_inflight) else {
        return Err(GatewayError::Overloaded(format!(
            "{} requests already in flight (server.max_inflight)",
            cfg.server.max_inflight
        )));
    };
    out.slot = Some(slot);

    // Identify: who is asking.
    let caller = state.clients.identify(req.headers()).inspect_err(|_| {
        out.client = ClientLabel::Other;
    })?;
    out.caller = caller.label().map(Arc::from);
    if let Some(c) = &caller.client {
        out.client = ClientLabel::Named(Arc::clone(&c.name));
    }
    let (mut parts, body) = req.into_parts();
    let max_body = cfg.server.max_request_body.0;
    if content_length(&parts.headers).is_some_and(|len| len > max_body) {
        return Err(GatewayError::PayloadTooLarge { limit: max_body });
    }
    // The body of a model route is read when a check needs its model or size, or to ask
    // the upstream for the usage of a stream; whatever its content type says.
    let post = parts.method == Method::POST;
    let checks = post
        && out.route.carries_model()
        && (state.limits.needs_body(out.route)
            || caller.client.as_ref().is_some_and(|c| c.has_model_list()));
    let ask_usage = post
        && cfg.upstream.stream_usage
        && matches!(out.route, Route::ChatCompletions | Route::Completions);
    let mut strip = false;
    let (body, mut request) = if checks || ask_usage {
        let bytes = read_request_body(body, max_body, cfg.server.request_body_timeout.0).await?;
        let request = if out.route == Route::AudioTranscriptions {
            let model = crate::limits::form::model(
                parts.headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes),
                &bytes,
            );
            crate::limits::tokens::RequestInfo {
                understood: model.is_some(),
                model,
                ..Default::default()
            }
        } else {
            crate::limits::tokens::inspect(&bytes)
        };
        if checks && !request.understood {
            let what = if out.route == Route::AudioTranscriptions {
                "a multipart/form-data body with one model field"
            } else {
                "one JSON object (uncompressed)"
            };
            return Err(GatewayError::BadRequest(format!(
                "the body of POST {} must be {what}: ezgate reads its model for the policies that cover it",
                out.route.as_str()
            )));
        }
        let body = match ask_usage
            .then(|| crate::limits::tokens::ask_for_stream_usage(&bytes, &request))
            .flatten()
        {
            Some(pieces) => {
                strip = true;
                RequestBody::pieces(pieces)
            }
            None => RequestBody::full(bytes),
        };
        // The body is now whole: its length replaces chunked framing or an edited length.
        let len = body.size_hint().exact().unwrap_or(0);
        if content_length(&parts.headers) != Some(len) {
            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
        (body, Some(request))
    } else {
        (
            RequestBody::stream(body, max_body, cfg.server.request_body_timeout.0),
            None,
        )
    };
    let model = request.as_mut().and_then(|r| r.model.take());
    if let (Some(client), true) = (&caller.client, checks) {
        client.check_model(model.as_deref())?;
    }
    out.model = model;
    out.prompt_estimate = request.as_ref().map_or(0, |r| r.prompt_tokens);

    // Limit: every policy that covers this request must admit it.
    let limit_request = LimitRequest {
        client: caller.client.as_ref().map(|c| &c.name),
        fingerprint: caller.key_fingerprint.as_ref(),
        route: out.route,
        model: out.model.as_deref(),
        prompt_tokens: out.prompt_estimate,
        max_tokens: request.as_ref().and_then(|r| r.max_tokens),
        post,
        ip: peer.ip(),
        headers: &parts.headers,
        managed: state.api_key.is_some(),
    };
    let checked = state.limits.check(&limit_request).await;
    state.count_verdicts(&checked.verdicts);
    let admission = checked.result?;
    // From here the permit is settled with what the request spends, whatever happens.
    out.permit = Some(admission.permit);
    let admission_headers = admission.headers;
    if strip {
        // What ezgate removes from the stream must be readable: no compressed events.
        parts
            .headers
            .insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }

    // Forward.
    let path = state
        .upstream
        .target(parts.uri.path_and_query(), path.as_deref())?;
    let request_id = HeaderValue::from_str(&out.request_id).ok();
    rewrite_request(&mut parts.headers, state, request_id.clone(), peer);
    let mut up_req = Request::new(body);
    *up_req.method_mut() = parts.method;
    *up_req.headers_mut() = parts.headers;
    let sent = Instant::now();
    let result = state.upstream.send(up_req, path, sent).await;
    let arrived = Instant::now();
    let waited = arrived.saturating_duration_since(sent);
    out.upstream_wait = waited;
    out.header_wait = Some(waited);
    let resp = match result {
        Ok(resp) => resp,
        Err(failure) => {
            out.upstream_failure = failure.kind;
            return Err(failure.error);
        }
    };

    // Respond.
    let status = resp.status();
    out.status = status.as_u16();
    out.source = Source::Upstream;
    out.upstream_status = Some(status.as_u16());
    if status == StatusCode::TOO_MANY_REQUESTS {
        if let Some(wait) = resp.headers().get(RETRY_AFTER).and_then(parse_retry_after) {
            // One response may not hold a key back for a day.
            let wait = wait.min(cfg.upstream.max_retry_after.0);
            let key = crate::limits::cooldown_key(
                caller.key_fingerprint.as_deref(),
                out.model.as_deref(),
                state.api_key.is_some(),
            );
            state.limits.upstream_limited(&key, wait);
        }
    }
    let (mut rparts, incoming) = resp.into_parts();
    headers::strip_hop_by_hop(&mut rparts.headers);
    if let Some(theirs) = rparts.headers.remove(X_REQUEST_ID) {
        rparts.headers.insert("x-upstream-request-id", theirs);
    }
    if let Some(v) = request_id {
        rparts.headers.insert(X_REQUEST_ID, v);
    }
    for (name, value) in admission_headers {
        rparts.headers.insert(name, value);
    }
    if status.as_u16() >= 400 {
        // Boxed: the error path's future stays out of every request's state.
        return Ok(Box::pin(upstream_error(
            rparts.status,
            rparts.headers,
            incoming,
            state,
            out,
        ))
        .await);
    }
    let encoded = rparts.headers.contains_key(CONTENT_ENCODING);
    let watch = if is_event_stream(&rparts.headers) && !encoded {
        if strip {
            // Events may be removed: the upstream's length no longer describes the body.
            rparts.headers.remove(CONTENT_LENGTH);
        }
        Watch::Sse { strip }
    } else if out.route.carries_tokens() && is_json(&rparts.headers) && !encoded {
        Watch::JsonUsage
    } else {
        Watch::Nothing
    };
    let idle = cfg.upstream.stream_idle_timeout.0;
    let mut body = ResponseBody::upstream(incoming, idle, watch, arrived);
    if matches!(watch, Watch::Sse { .. }) {
        body.end_at(gw.cut_token());
    }
    Ok(with_parts(rparts.status, rparts.headers, body))
}

fn rewrite_request(
    h: &mut HeaderMap,
    state: &State,
    request_id: Option<HeaderValue>,
    peer: SocketAddr,
) {
    headers::strip_hop_by_hop(h);
    h.remove(HOST);
    // ezgate already answered any `Expect: 100-continue` by reading the body.
    h.remove(http::header::EXPECT);
    if let Some(v) = request_id {
        h.insert(X_REQUEST_ID, v);
    }
    headers::append_forwarded_for(h, peer.ip());
    if let Some(key) = &state.api_key {
        h.insert(AUTHORIZATION, key.clone());
    }
}

/// Reads an upstream error body (at most [`MAX_ERROR_BODY`]), maps it to the schema and
/// builds the response. Upstream status, `Retry-After` and `x-ratelimit-*` are kept.
async fn upstream_error(
    status: StatusCode,
    mut headers: HeaderMap,
    body: UpstreamBody,
    state: &State,
    out: &mut Exchange,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let idle = state.settings.config.upstream.stream_idle_timeout.0;
    let (raw, truncated) = tokio::time::timeout(idle, read_capped(body, MAX_ERROR_BODY))
        .await
        .unwrap_or_default();
    out.upstream_wait += started.elapsed();
    let encoding = headers
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let ctype = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = errors::upstream::normalize(
        status.as_u16(),
        encoding.as_deref(),
        ctype.as_deref(),
        &raw,
        truncated,
        &out.request_id,
    );
    let retry = headers.get(RETRY_AFTER).and_then(parse_retry_after);
    body.retry_after_ms = retry.map(errors::duration_ms);
    out.upstream_code = body.code.clone();
    for h in [
        CONTENT_LENGTH,
        CONTENT_ENCODING,
        CONTENT_TYPE,
        http::header::ETAG,
        http::header::LAST_MODIFIED,
    ] {
        headers.remove(h);
    }
    let retryable = headers.get("x-should-retry").is_none_or(|v| v != "false");
    let keep_retry_after = headers.get(RETRY_AFTER).cloned();
    let (status, mut headers, bytes) = body.into_parts(headers, retryable);
    if let Some(v) = keep_retry_after {
        headers.insert(RETRY_AFTER, v);
    }
    with_parts(status, headers, ResponseBody::full(bytes))
}

/// Reads up to `cap` bytes of a body; whatever follows is left unread and dropped.
async fn read_capped(mut body: UpstreamBody, cap: usize) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            let room = cap - buf.len();
            if data.len() > room {
                buf.extend_from_slice(&data[..room]);
                return (buf, true);
            }
            buf.extend_from_slice(data);
        }
    }
    (buf, false)
}

/// Buffers a request body (needed to see its model and size), refusing it past `max` and
/// giving up when the client pauses longer than `idle` between two pieces. Memory is the
/// body's own size: a body of known length is read into one buffer of that length, and a
/// small body that arrives as one frame is kept as it is, without a copy.
async fn read_request_body(
    mut body: Incoming,
    max: u64,
    idle: Duration,
) -> Result<Bytes, GatewayError> {
    let mut buf = BytesMut::new();
    let declared = body.size_hint().exact().filter(|n| *n <= max);
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(GatewayError::RequestTimeout(idle)),
            Ok(None) => break,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(_))) => return Err(GatewayError::ClientClosed),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if (buf.len() + data.len()) as u64 > max {
            return Err(GatewayError::PayloadTooLarge { limit: max });
        }
        // A body of known length ends with its last byte: no need to poll for the end.
        let end = body.is_end_stream();
        if buf.is_empty() && end {
            return Ok(data);
        }
        if buf.is_empty() {
            buf.reserve(declared.map_or(data.len(), |n| n as usize));
        }
        buf.extend_from_slice(&data);
        if end {
            break;
        }
    }
    Ok(buf.freeze())
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn is_json(h: &HeaderMap) -> bool {
    // A byte window, not `str::contains`, whose searcher costs more to build than this.
    h.get(CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .windows(4)
            .any(|w| w.eq_ignore_ascii_case(b"json"))
    })
}

fn is_event_stream(h: &HeaderMap) -> bool {
    // Media types are case-insensitive.
    h.get(CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .get(..17)
            .is_some_and(|t| t.eq_ignore_ascii_case(b"text/event-stream"))
    })
}

/// `Retry-After` as delay-seconds or an HTTP date (in the future), capped at one day.
pub fn parse_retry_after(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    // An HTTP date (IMF-fixdate, or the obsolete RFC 850 and asctime forms).
    let when = httpdate::parse_http_date(s).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .min(Duration::from_secs(86_400)),
    )
}

pin_project_lite::pin_project! {
    /// Runs a future and turns a panic inside it into an error value.
    struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("3")),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("0.5")),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
        assert!(parse_retry_after(&HeaderValue::from_static("99999999"))
            .is_some_and(|d| d.as_secs() == 86_400));
    }

    #[test]
    fn a_panic_inside_a_request_becomes_a_value() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let caught = rt.block_on(CatchUnwind {
            inner: async { panic!("handler bug") },
        });
        let panic = caught.unwrap_err();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"handler bug"));
        let ok = rt.block_on(CatchUnwind { inner: async { 7 } });
        assert_eq!(ok.unwrap(), 7);
        let err = GatewayError::Internal("the request handler failed unexpectedly".into());
        let (status, _, body) = errors::render(&err, "r");
        assert_eq!(status, 500);
        assert!(std::str::from_utf8(&body)
            .unwrap()
            .contains("\"code\":\"internal_error\""));
    }

    #[test]
    fn timeout_phase_names_the_setting() {
        let e = GatewayError::UpstreamTimeout(
            crate::errors::TimeoutPhase::Headers,
            Duration::from_secs(2),
        );
        assert!(e.to_string().contains("upstream.response_timeout"));
    }
}

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
use std::time::Instant;

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT_ENCODING, CONNECTION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE,
    RETRY_AFTER,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

mod budget;
mod quota;
mod request;
mod respond;

pub use respond::parse_retry_after;

use crate::errors::{self, GatewayError, Source};
use crate::exchange::Exchange;
use crate::gateway::{ConnSlot, Gateway, State};
use crate::headers::{self, X_REQUEST_ID};
use crate::limits::LimitRequest;
use crate::outcome::ClientLabel;
use crate::route::{self, ModelAt, PathError, Route};
use crate::stream::{ResponseBody, Watch};
use crate::websocket;

/// What [`serve`] returns: boxed, so a connection holds a pointer to it, and the request
/// path's state is freed as soon as the response headers are out (a response that streams for
/// minutes holds only its body).
pub type ServeFuture =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

/// The service for every proxied request; `conn` is its place on its connection, taken when
/// its head was read.
pub fn serve(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    peer: SocketAddr,
    conn: ConnSlot,
) -> ServeFuture {
    Box::pin(serve_request(gw, req, peer, conn))
}

// The two functions below return `async move` blocks instead of being `async fn`s: an
// `async fn` keeps a second copy of each argument in its future (the arguments, then the
// locals they are moved into), 264 bytes for the request alone, and the request's future
// is copied whole into its box.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps each argument twice in its future (see above)"
)]
fn serve_request(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    peer: SocketAddr,
    conn: ConnSlot,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send {
    async move {
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
        // Boxed: the request's future stays smaller, and the response body takes it as it is.
        let mut out = Box::new(Exchange::start(
            Arc::clone(&gw.metrics),
            access_log,
            request_id,
            req.method(),
            route,
        ));
        // An address that reset too many accepted streams: refused without going upstream.
        let refused = conn.refusing();
        out.conn = Some(conn);
        out.redact.clone_from(&state.redactor);
        out.prices.clone_from(&state.prices);
        out.trace = state.tracer.start(req.headers(), out.method, route);
        out.trace_id = out.trace.as_ref().map(|t| t.trace_id());
        // Until a client is identified: `anonymous` without [[clients]], else `other`.
        if !state.clients.is_empty() {
            out.client = ClientLabel::Other;
        }
        let result = if refused {
            Ok(Err(address_refused()))
        } else {
            CatchUnwind {
                inner: handle(&gw, &state, req, path, peer, &mut out),
            }
            .await
        };
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
        let session = resp.extensions_mut().remove::<websocket::Start>();
        if http1 && gw.is_draining() && session.is_none() {
            // The client's next request goes to a new connection (another replica).
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        match session {
            // A WebSocket session holds the exchange until it ends.
            Some(session) => session.run(out),
            None => resp.body_mut().attach(out),
        }
        Ok(resp)
    }
}

fn address_refused() -> GatewayError {
    use crate::gateway::resets::{ADDRESS_PENALTY, ADDRESS_RESET_WINDOW, MAX_ADDRESS_RESETS};
    GatewayError::Overloaded(format!(
        "this client address reset more than {MAX_ADDRESS_RESETS} accepted HTTP/2 streams within {ADDRESS_RESET_WINDOW:?}; its streams are refused for {ADDRESS_PENALTY:?} (docs/security.md, HTTP/2 resets)"
    ))
}

fn error_response(err: &GatewayError, out: &mut Exchange) -> Response<ResponseBody> {
    out.status = err.status().as_u16();
    out.source = Source::Gateway;
    out.gateway_error(err);
    if matches!(err, GatewayError::ClientClosed) {
        // Counted as the 499 of a client that left; what the wire gets (if anything) is 400.
        out.status = crate::outcome::CLIENT_CLOSED;
    }
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

#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps each argument twice in its future (see `serve_request`)"
)]
fn handle<'a>(
    gw: &'a Gateway,
    state: &'a State,
    mut req: Request<Incoming>,
    path: Result<Option<String>, PathError>,
    peer: SocketAddr,
    out: &'a mut Exchange,
) -> impl Future<Output = Result<Response<ResponseBody>, GatewayError>> + Send + 'a {
    async move {
        let cfg = &state.settings.config;
        if req.method() == Method::CONNECT {
            return Err(GatewayError::MethodNotAllowed("CONNECT".into()));
        }
        let path = path.map_err(|e| GatewayError::BadRequest(e.to_string()))?;
        // A WebSocket handshake: its model is in the query.
        let mut handshake = websocket::accept(&mut req, gw.is_draining())?;
        // A session holds a place of its own cap for its life, not one of `max_inflight`.
        if let Some(h) = &mut handshake {
            let max = cfg.server.max_websocket_sessions;
            let place = gw.take_session_place(max).ok_or_else(|| {
                GatewayError::Overloaded(format!(
                    "{max} WebSocket sessions already open (server.max_websocket_sessions)"
                ))
            })?;
            h.place = Some(place);
        } else {
            let Some(slot) = gw.take_place(cfg.server.max_inflight) else {
                return Err(GatewayError::Overloaded(format!(
                    "{} requests already in flight (server.max_inflight)",
                    cfg.server.max_inflight
                )));
            };
            out.slot = Some(slot);
        }

        // Identify: who is asking.
        // A caller refused here keeps its label: `other` with clients configured, else `anonymous`.
        let caller = state.clients.identify(req.headers())?;
        out.caller = caller.label().map(Arc::from);
        if let Some(c) = &caller.client {
            out.client = ClientLabel::Named(Arc::clone(&c.name));
            out.team.clone_from(&c.team);
        }
        let (mut parts, body) = req.into_parts();
        // Which model the request spends, for a client's allow-list: a route whose model ezgate
        // cannot read is refused here, unless allowed for the client (docs/security.md).
        let canonical = path.as_deref().unwrap_or(parts.uri.path());
        let client_reads = match &caller.client {
            Some(client) => client.model_check(&parts.method, canonical, handshake.is_some())?,
            None => None,
        };
        // Inspect: the body of a model route is read when a check needs its model or size, or
        // to ask the upstream for the usage of a stream.
        let post = parts.method == Method::POST;
        let checks = matches!(
            client_reads,
            Some(ModelAt::Json | ModelAt::JsonIfPresent | ModelAt::Session | ModelAt::Form)
        ) || (post
            && out.route.carries_model()
            && (state.limits.needs_body(out.route)
                || state.pacer.is_some()
                || state.budgets.may_cover(out.route)));
        let ask_usage = post
            && cfg.upstream.stream_usage
            && matches!(out.route, Route::ChatCompletions | Route::Completions);
        let request::Inspected {
            body,
            mut request,
            strip,
        } = request::inspect(
            body,
            &mut parts.headers,
            request::Reading {
                path: canonical,
                // The client's table already said where the model is; else ask it once here.
                form: match client_reads {
                    Some(at) => at == ModelAt::Form,
                    None => checks && route::model_at(&parts.method, canonical) == ModelAt::Form,
                },
                checks,
                ask_usage,
            },
            &cfg.server,
            &gw.buffers,
        )
        .await?;
        let model = match &handshake {
            Some(h) => h.model.clone(),
            None => request.as_mut().and_then(|r| r.model.take()),
        };
        if let Some(client) = &caller.client {
            match client_reads {
                Some(ModelAt::Query) => client.check_model(model.as_deref())?,
                Some(at) => {
                    // Models named inside the body (a tool's, a realtime session's) spend too.
                    let nested = request.as_ref().map_or(&[][..], |r| &r.other_models[..]);
                    // A client secret names its model in `session.model` (a transcription's
                    // model inside the session does not).
                    let session_named = request.as_ref().is_some_and(|r| r.session_model);
                    client.check_named(
                        at,
                        &parts.method,
                        canonical,
                        model.as_deref(),
                        nested,
                        session_named,
                    )?;
                    if request.as_ref().is_some_and(|r| r.unnamed_tool_model) {
                        client.check_unnamed_tool_model()?;
                    }
                }
                None => {}
            }
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
            // A session spends tokens too.
            post: post || handshake.is_some(),
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
        // Budget: the request's maximum cost must fit what every budget covering it has left.
        let asked = budget::Asked {
            max_tokens: request.as_ref().and_then(|r| r.max_tokens),
            choices: request.as_ref().map_or(1, |r| r.choices),
            spends: post || handshake.is_some(),
        };
        if !state.budgets.is_empty() {
            // Boxed: the admission's future is large, and only gateways with budgets await it.
            Box::pin(budget::admit(state, &caller, &parts.headers, asked, out)).await?;
        }
        // Pace (`upstream.quota.mode = "enforce"`): a request the upstream's learned quota
        // cannot carry waits its turn, by priority, instead of being spent on a 429.
        let mut ticket = match &state.pacer {
            Some(pacer) if quota::paced(out.route, post, handshake.is_some()) => {
                let max_tokens = request.as_ref().and_then(|r| r.max_tokens);
                Some(quota::pace(pacer, gw, state, &caller, out, max_tokens).await?)
            }
            _ => None,
        };
        if strip || (post && out.route.carries_tokens()) {
            // The usage ezgate charges and meters must be readable, and what it removes from a
            // stream too: no compressed answers on the model routes, whatever the client accepts.
            parts
                .headers
                .insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }

        // Forward.
        let path = state
            .upstream
            .target(parts.uri.path_and_query(), path.as_deref())?;
        let request_id = HeaderValue::from_str(&out.request_id).ok();
        request::rewrite_request(&mut parts.headers, state, request_id.clone(), peer);
        if let Some(span) = &out.trace {
            span.inject(&mut parts.headers);
        }
        if handshake.is_some() {
            websocket::upgrade_headers(&mut parts.headers);
        }
        let mut up_req = Request::new(body);
        *up_req.method_mut() = parts.method;
        *up_req.headers_mut() = parts.headers;
        if let Some(t) = &mut ticket {
            t.forwarded();
        }
        let sent = Instant::now();
        out.forwarded = true;
        let result = match handshake {
            // Boxed: a handshake is rare, and its connect future would sit in every request's.
            Some(_) => Box::pin(state.upstream.upgrade(up_req, path, sent)).await,
            // Boxed too: the request's future is allocated and moved whole, and this 1.7 KiB
            // was its largest part; one more allocation costs less (0.983–0.988 of the CPU per
            // request with a TLS upstream, benches/ab.py).
            None => Box::pin(state.upstream.send(up_req, path, sent)).await,
        };
        let arrived = Instant::now();
        let waited = arrived.saturating_duration_since(sent);
        out.upstream_wait = waited;
        out.header_wait = Some(waited);
        let mut resp = match result {
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
        let learned = quota::learn(
            resp.headers(),
            state,
            &caller,
            out.model.as_deref(),
            ticket.as_ref(),
        );
        if status == StatusCode::TOO_MANY_REQUESTS {
            if let Some(wait) = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(respond::parse_retry_after)
            {
                // One response may not hold a key back for a day.
                let wait = wait.min(cfg.upstream.max_retry_after.0);
                // Pacing learns a 429 like any answer: what it said, or else its Retry-After,
                // empties the picture, and requests behind it wait instead of being refused.
                let paced = state.pacer.is_some()
                    && (learned || quota::hold_empty(state, &caller, out.model.as_deref(), wait));
                if !paced {
                    let key = crate::limits::cooldown_key(
                        caller.key_fingerprint.as_deref(),
                        out.model.as_deref(),
                        state.api_key.is_some(),
                    );
                    state.limits.upstream_limited(&key, wait);
                }
            }
        }
        let upstream_io = websocket::upstream_side(handshake.is_some(), &mut resp)
            .inspect_err(|_| out.upstream_failure = Some(crate::errors::FailureKind::Protocol))?;
        let (mut rparts, incoming) = resp.into_parts();
        headers::strip_hop_by_hop(&mut rparts.headers);
        if let Some(r) = &state.redactor {
            // An upstream header may echo the organization's key.
            r.headers(&mut rparts.headers);
        }
        if let Some(theirs) = rparts.headers.remove(X_REQUEST_ID) {
            rparts.headers.insert("x-upstream-request-id", theirs);
        }
        if let Some(v) = request_id {
            rparts.headers.insert(X_REQUEST_ID, v);
        }
        for (name, value) in admission_headers {
            rparts.headers.insert(name, value);
        }
        if let (Some(h), Some(io)) = (handshake, upstream_io) {
            let timing = websocket::timing(cfg);
            let start = websocket::switch(h, io, &mut rparts.headers, timing, gw.cut_token());
            let mut resp = with_parts(
                rparts.status,
                rparts.headers,
                ResponseBody::full(Bytes::new()),
            );
            resp.extensions_mut().insert(start);
            return Ok(resp);
        }
        if status.as_u16() >= 400 {
            // Boxed: the error path's future stays out of every request's state.
            return Ok(Box::pin(respond::upstream_error(
                rparts.status,
                rparts.headers,
                incoming,
                state,
                out,
            ))
            .await);
        }
        let encoded = rparts.headers.contains_key(CONTENT_ENCODING);
        let content_type = rparts.headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes);
        let (sse, json) = (
            respond::is_event_stream(content_type),
            respond::is_json(content_type),
        );
        let watch = if sse && !encoded {
            if strip {
                // Events may be removed: the upstream's length no longer describes the body.
                rparts.headers.remove(CONTENT_LENGTH);
            }
            Watch::Sse { strip }
        } else if out.route.carries_tokens() && json && !encoded {
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
    use std::time::Duration;

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

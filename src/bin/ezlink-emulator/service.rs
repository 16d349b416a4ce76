//! One request: record it → read its fault plan → read the body → wait → fault or route →
//! encode, add headers, track completion.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::api;
use crate::body::{self, Payload, Tracked};
use crate::conn::ConnCtl;
use crate::echo::{self, path_and_query};
use crate::encoding::{self, Encoded};
use crate::faults::{self, openai_error, respond, JSON};
use crate::log::{Guard, RequestLog, Tokens};
use crate::objects;
use crate::options::{Opts, Reset};
use crate::quota::{self, Decision, Quota};
use crate::realtime;
use crate::sse::Kind;

/// Largest body the API routes read (echo and inspect stream theirs, unbounded).
pub const MAX_API_BODY: usize = 32 * 1024 * 1024;

/// Shared by every connection.
#[derive(Default)]
pub struct State {
    pub log: RequestLog,
    next_id: AtomicU64,
    /// TCP connections accepted since start (`/__emu/connections`).
    connections: AtomicU64,
    /// Quota mode (`--quota`, `/__emu/quota`).
    pub quota: Quota,
}

impl State {
    /// A process-unique number for response ids.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn connection_accepted(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }
}

/// The service error: hyper aborts the HTTP/1 connection (RST, see `conn::Io`) or resets
/// the HTTP/2 stream, without a response.
#[derive(Debug)]
pub struct Abort(&'static str);

impl fmt::Display for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Abort {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Models,
    Chat,
    Completions,
    Embeddings,
    Responses,
    /// `GET /v1/realtime` reaching the routes (a fault answers it).
    Realtime,
    /// Realtime sessions and client secrets, assistants, runs, jobs, batches, images, audio.
    Object(objects::Object),
    Echo,
    Inspect,
    NotFound,
}

fn route(method: &Method, path: &str) -> Route {
    if path.starts_with("/echo") {
        return Route::Echo;
    }
    if path.starts_with("/inspect") {
        return Route::Inspect;
    }
    if let Some(object) = objects::route(method, path) {
        return Route::Object(object);
    }
    match (method, path) {
        (&Method::GET, "/v1/models") => Route::Models,
        (&Method::POST, "/v1/chat/completions") => Route::Chat,
        (&Method::POST, "/v1/completions") => Route::Completions,
        (&Method::POST, "/v1/embeddings") => Route::Embeddings,
        (&Method::POST, "/v1/responses") => Route::Responses,
        (&Method::GET, "/v1/realtime") => Route::Realtime,
        _ => Route::NotFound,
    }
}

pub async fn handle(
    state: Arc<State>,
    conn: Arc<ConnCtl>,
    request: Request<Incoming>,
) -> Result<Response<Tracked>, Abort> {
    if let Some(name) = request.uri().path().strip_prefix("/__emu/") {
        let (method, name) = (request.method().clone(), name.to_owned());
        let body = read(request.into_body()).await?.unwrap_or_default();
        let response = control(&state, &method, &name, &body);
        return Ok(finalize(response, &Opts::default(), None));
    }
    let guard = state.log.record(
        request.method(),
        path_and_query(request.uri()),
        request.headers(),
    );
    let opts = match Opts::parse(request.headers()) {
        Ok(opts) => opts,
        Err(bad) => {
            drain(request.into_body()).await?;
            let message = bad.to_string();
            let kind = "invalid_request_error";
            let response = openai_error(
                StatusCode::BAD_REQUEST,
                &message,
                kind,
                Some("emulator_bad_header"),
            );
            return Ok(finalize(response, &Opts::default(), Some(guard)));
        }
    };
    if realtime::is_realtime(request.method(), request.uri().path()) && !opts.overrides_route() {
        let model = realtime::model(request.uri().query());
        let decision = state
            .quota
            .decide(&bearer(request.headers()), &model, 0, Instant::now());
        delay(&opts).await;
        if let Some(Decision::Limited(report, short)) = &decision {
            let response = quota::too_many(&model, report, short);
            return Ok(finalize(response, &opts, Some(guard)));
        }
        // The session holds the log entry until it ends.
        let (mut response, guard) = realtime::accept(request, &opts, &state, &conn, guard);
        if let Some(decision) = &decision {
            decision.report().write(response.headers_mut());
        }
        return Ok(finalize(response, &opts, guard));
    }
    let is_head = request.method() == Method::HEAD;
    let response = respond_to(&state, &conn, request, &opts, &guard.tokens()).await?;
    if is_head {
        // Headers are the whole response; hyper drops the body without polling it.
        guard.complete();
    }
    Ok(finalize(response, &opts, Some(guard)))
}

async fn respond_to(
    state: &State,
    conn: &ConnCtl,
    request: Request<Incoming>,
    opts: &Opts,
    tokens: &Tokens,
) -> Result<Response<Payload>, Abort> {
    let route = route(request.method(), request.uri().path());
    if route == Route::Echo && !opts.overrides_route() {
        delay(opts).await;
        return Ok(echo::echo(request));
    }
    let (parts, incoming) = request.into_parts();
    let reads_json = matches!(
        route,
        Route::Chat | Route::Completions | Route::Embeddings | Route::Responses | Route::Object(_)
    );
    let counted = counted(route) && state.quota.is_on();
    let (body, body_len, too_large) = if reads_json && (!opts.overrides_route() || counted) {
        match read(incoming).await? {
            Some(body) => {
                let len = body.len() as u64;
                (body, len, false)
            }
            None => (Bytes::new(), 0, true),
        }
    } else {
        // Drained even when unused, so the HTTP/1 connection stays reusable.
        (Bytes::new(), drain(incoming).await?, false)
    };
    // Quota mode charges the request as it arrives, before any delay or fault.
    let decision = if counted {
        charge(state, &parts, route, &body, opts)
    } else {
        None
    };
    delay(opts).await;
    if opts.malformed || opts.reset == Some(Reset::Headers) {
        if parts.version != Version::HTTP_2 {
            conn.abort();
        }
        return Err(Abort("emulated connection reset before the response"));
    }
    let mut response = if opts.reset == Some(Reset::Body) {
        faults::reset_body()
    } else if let Some((model, Decision::Limited(report, short))) = &decision {
        quota::too_many(model, report, short)
    } else if let Some(fault) = &opts.fault {
        faults::render(fault)
    } else if too_large {
        api::too_large(MAX_API_BODY)
    } else {
        answer(state, route, &parts, &body, body_len, opts, tokens)
    };
    if let Some((_, decision)) = &decision {
        decision.report().write(response.headers_mut());
    }
    Ok(response)
}

/// The route's own answer.
fn answer(
    state: &State,
    route: Route,
    parts: &http::request::Parts,
    body: &[u8],
    body_len: u64,
    opts: &Opts,
    tokens: &Tokens,
) -> Response<Payload> {
    match route {
        Route::Models => api::models(),
        Route::Chat => api::complete(state, Kind::Chat, body, opts, tokens),
        Route::Completions => api::complete(state, Kind::Text, body, opts, tokens),
        Route::Responses => api::complete(state, Kind::Responses, body, opts, tokens),
        Route::Embeddings => api::embeddings(body, opts, tokens),
        Route::Object(object) => objects::create(state, object, &parts.headers, body, tokens),
        Route::Inspect => echo::inspect(parts, body_len),
        Route::Echo | Route::NotFound | Route::Realtime => {
            api::not_found(&parts.method, parts.uri.path())
        }
    }
}

/// Whether quota mode counts the route (the realtime handshake is counted in `handle`).
fn counted(route: Route) -> bool {
    match route {
        Route::Chat | Route::Completions | Route::Responses | Route::Embeddings => true,
        Route::Realtime => true,
        Route::Object(object) => objects::counted(object),
        Route::Models | Route::Echo | Route::Inspect | Route::NotFound => false,
    }
}

/// Quota mode's decision on a counted request, with the model it was charged to.
fn charge(
    state: &State,
    parts: &http::request::Parts,
    route: Route,
    body: &[u8],
    opts: &Opts,
) -> Option<(String, Decision)> {
    let (model, tokens) = match route {
        Route::Chat => api::quota_cost(Some(Kind::Chat), body, opts),
        Route::Completions => api::quota_cost(Some(Kind::Text), body, opts),
        Route::Responses => api::quota_cost(Some(Kind::Responses), body, opts),
        Route::Embeddings => api::quota_cost(None, body, opts),
        Route::Realtime => (realtime::model(parts.uri.query()), 0),
        Route::Object(object) => {
            let model = objects::model(object, &parts.headers, body).ok().flatten();
            let model = model.unwrap_or_else(|| objects::default_model(object).to_owned());
            (model, 0)
        }
        Route::Models | Route::Echo | Route::Inspect | Route::NotFound => return None,
    };
    let key = bearer(&parts.headers);
    let decision = state.quota.decide(&key, &model, tokens, Instant::now())?;
    Some((model, decision))
}

/// The quota key: the value of `Authorization: Bearer <value>` (the whole header without
/// the `Bearer ` prefix), `anonymous` when there is none.
fn bearer(headers: &HeaderMap) -> String {
    let value = headers
        .get(AUTHORIZATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned())
        .unwrap_or_default();
    let key = match value.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("bearer ") => value[7..].trim(),
        _ => value.as_str(),
    };
    if key.is_empty() {
        "anonymous".to_owned()
    } else {
        key.to_owned()
    }
}

/// `x-emu-header-delay-ms`. If the client leaves meanwhile, hyper drops this future (it
/// watches for EOF once the request body is read) and the log entry turns cancelled.
async fn delay(opts: &Opts) {
    if let Some(delay) = opts.header_delay {
        tokio::time::sleep(delay).await;
    }
}

/// The whole body, or `None` when it exceeds [`MAX_API_BODY`].
async fn read(incoming: Incoming) -> Result<Option<Bytes>, Abort> {
    match Limited::new(incoming, MAX_API_BODY).collect().await {
        Ok(collected) => Ok(Some(collected.to_bytes())),
        Err(err) if err.is::<LengthLimitError>() => Ok(None),
        Err(_) => Err(Abort("request body failed")),
    }
}

/// Reads and discards the body; returns its length.
async fn drain(mut incoming: Incoming) -> Result<u64, Abort> {
    let mut len = 0;
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|_| Abort("request body failed"))?;
        if let Some(data) = frame.data_ref() {
            len += data.len() as u64;
        }
    }
    Ok(len)
}

/// `/__emu/…`: never recorded, never faulted.
fn control(state: &State, method: &Method, name: &str, body: &[u8]) -> Response<Payload> {
    let quota_json = || respond(StatusCode::OK, JSON, state.quota.to_json(Instant::now()));
    match (method, name) {
        (&Method::GET, "log") => respond(StatusCode::OK, JSON, state.log.to_json()),
        (&Method::GET, "connections") => respond(
            StatusCode::OK,
            JSON,
            format!(
                "{{\"accepted\":{}}}",
                state.connections.load(Ordering::Relaxed)
            ),
        ),
        (&Method::POST, "reset") => {
            state.log.clear();
            state.quota.reset();
            respond(StatusCode::OK, JSON, r#"{"reset":true}"#)
        }
        (&Method::GET, "quota") => quota_json(),
        (&Method::PUT, "quota") => match quota::Config::from_json(body) {
            Ok(config) => {
                state.quota.set(Some(config), Instant::now());
                quota_json()
            }
            Err(why) => openai_error(
                StatusCode::BAD_REQUEST,
                &format!("ezlink-emulator: bad quota: {why}"),
                "invalid_request_error",
                Some("emulator_bad_quota"),
            ),
        },
        (&Method::DELETE, "quota") => {
            state.quota.set(None, Instant::now());
            quota_json()
        }
        _ => api::not_found(method, &format!("/__emu/{name}")),
    }
}

/// Applies `x-emu-encoding`, `x-emu-retry-after`, `x-emu-echo-key` and
/// `x-emu-ratelimit-headers`, and ties the
/// log entry to the body.
fn finalize(response: Response<Payload>, opts: &Opts, guard: Option<Guard>) -> Response<Tracked> {
    let (mut parts, payload) = response.into_parts();
    let headers = &mut parts.headers;
    let body = match (payload, opts.encoding) {
        (Payload::Bytes(bytes), Some(encoding)) if !bytes.is_empty() => {
            match encoding::compress(encoding, &bytes) {
                Ok(compressed) => {
                    headers.insert(CONTENT_ENCODING, HeaderValue::from_static(encoding.token()));
                    body::full(compressed)
                }
                Err(_) => body::full(bytes),
            }
        }
        (Payload::Stream(stream), Some(encoding)) => {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static(encoding.token()));
            headers.remove(CONTENT_LENGTH);
            Encoded::new(stream, encoding).boxed_unsync()
        }
        (Payload::Bytes(bytes), _) => body::full(bytes),
        (Payload::Stream(stream), None) => stream,
    };
    if let Some(value) = &opts.retry_after {
        headers.insert(RETRY_AFTER, value.clone());
    }
    if let Some(key) = &opts.echo_key {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {key}")) {
            headers.insert("x-emu-seen-key", v);
        }
    }
    if opts.ratelimit_headers {
        let limits = [
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1s"),
        ];
        for (name, value) in limits {
            headers.insert(name, HeaderValue::from_static(value));
        }
    }
    for (name, value) in &opts.ratelimit {
        headers.insert(name.clone(), value.clone());
    }
    Response::from_parts(parts, Tracked::new(body, guard))
}

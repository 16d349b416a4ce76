//! One request: record it → read its fault plan → read the body → wait → fault or route →
//! encode, add headers, track completion.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
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
        _ => Route::NotFound,
    }
}

pub async fn handle(
    state: Arc<State>,
    conn: Arc<ConnCtl>,
    request: Request<Incoming>,
) -> Result<Response<Tracked>, Abort> {
    if let Some(name) = request.uri().path().strip_prefix("/__emu/") {
        let response = control(&state, request.method(), name);
        drain(request.into_body()).await?;
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
        delay(&opts).await;
        // The session holds the log entry until it ends.
        let (response, guard) = realtime::accept(request, &opts, &state, &conn, guard);
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
    let (body, body_len) = if reads_json && !opts.overrides_route() {
        match read(incoming).await? {
            Some(body) => {
                let len = body.len() as u64;
                (body, len)
            }
            None => {
                delay(opts).await;
                return Ok(api::too_large(MAX_API_BODY));
            }
        }
    } else {
        // Drained even when unused, so the HTTP/1 connection stays reusable.
        (Bytes::new(), drain(incoming).await?)
    };
    delay(opts).await;
    if opts.malformed || opts.reset == Some(Reset::Headers) {
        if parts.version != Version::HTTP_2 {
            conn.abort();
        }
        return Err(Abort("emulated connection reset before the response"));
    }
    if opts.reset == Some(Reset::Body) {
        return Ok(faults::reset_body());
    }
    if let Some(fault) = &opts.fault {
        return Ok(faults::render(fault));
    }
    Ok(match route {
        Route::Models => api::models(),
        Route::Chat => api::complete(state, Kind::Chat, &body, opts, tokens),
        Route::Completions => api::complete(state, Kind::Text, &body, opts, tokens),
        Route::Responses => api::complete(state, Kind::Responses, &body, opts, tokens),
        Route::Embeddings => api::embeddings(&body, opts, tokens),
        Route::Object(object) => objects::create(state, object, &parts.headers, &body, tokens),
        Route::Inspect => echo::inspect(&parts, body_len),
        Route::Echo | Route::NotFound => api::not_found(&parts.method, parts.uri.path()),
    })
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
fn control(state: &State, method: &Method, name: &str) -> Response<Payload> {
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
            respond(StatusCode::OK, JSON, r#"{"reset":true}"#)
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

//! Connections to the one upstream, reused across requests.
//!
//! ezgate talks to a single origin, so its pool is a stack, not a map: idle HTTP/1.1
//! connections wait in a `Vec` (the most recently used is taken first). When the upstream
//! speaks HTTP/2 (chosen by ALPN over TLS, or `upstream.http2 = "always"`), requests share
//! connections as streams: each connection carries as many as the upstream allows at once
//! (its `SETTINGS_MAX_CONCURRENT_STREAMS`), and a request that finds them all full opens
//! another connection instead of queueing behind streams that may last minutes (SSE) — or,
//! while another request is already opening one, waits for that one: a burst of requests
//! at startup opens a few connections, not one per request. Until the first connection says
//! which protocol the upstream speaks, HTTP/2 is expected wherever ALPN offers it; if the
//! upstream picks HTTP/1.1, the requests that waited open their own connections.
//! HTTP/1.1 is ezgate's own client (`wire.rs`): the request's future writes the request and
//! reads the response head, and the response body, polled by the client connection's task,
//! reads the rest from the socket: no task per connection and no hand-over between tasks
//! (hyper's client took three per request; with a TLS upstream this client and the trims that
//! came with it cut 16 % of a request's instructions and 9 % of its CPU, and 40 % of what a
//! stream over HTTP/1.1 holds, docs/performance.md "The fourth round"). An HTTP/1.1
//! connection goes back on the stack when its response body has been read to the end. A body
//! dropped before its end (client gone, error body cut short) takes the connection with it
//! and closes it: a half-read connection is never reused. HTTP/2 connections, and WebSocket
//! handshakes, are hyper's, each connection's I/O on a task of its own.
//!
//! HTTP/2 costs more CPU per request than HTTP/1.1 (HPACK, stream state and, in hyper's
//! client, a task per request between the connection and the request), and less memory
//! per open stream (many streams share one connection and one TLS session). With
//! `http2_above` set (`upstream.http2 = "auto"` over TLS), the pool takes the cheaper side
//! by how many requests are in flight: up to that many, HTTP/1.1 connections (dialled
//! with ALPN offering `http/1.1` alone); beyond it, streams on HTTP/2 connections (ALPN
//! offering h2 too). Connections opened by a burst and no longer needed are swept as idle.
//!
//! An idle HTTP/1.1 connection is checked when taken: one the upstream closed (or that has
//! bytes nobody asked for) is dropped and the next is taken. An HTTP/2 request that finds
//! its connection going away before anything was written is retried once on a new
//! connection. Once written, a request is never retried.
//!
//! A sweeper task drops connections idle longer than `upstream.pool_idle_timeout`, and ends
//! with the pool, and HTTP/2 connections left without streams for as long.
//!
//! Where things are: the pool, [`Pool::send`] and the connector here; the HTTP/1.1 client in
//! `wire.rs` (request and response head) and `decode.rs` (response body), its idle stack in
//! `http1.rs`; HTTP/2 sharing, and the requests waiting for a connection being opened, in
//! `http2.rs`; the sweeper in `sweep.rs`; the response body that gives a connection back in
//! `body.rs`.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::header::{HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::client::conn;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

mod body;
mod decode;
mod head;
mod http1;
mod http2;
mod request;
mod send;
mod sweep;
#[cfg(test)]
mod tests;
mod upgrade;
mod wire;

pub use body::UpstreamBody;
pub use request::{BodyStalled, BodyTooLarge, BodyTooSlow, ClientBodyFailed, RequestBody};
pub use wire::{Malformed, ResponseTimedOut};

use body::Back;
use http1::Idle;
use http2::{Opening, OpeningGuard, Stream, H2};
use sweep::sweep_forever;
use wire::{Exchange, H1Conn};

use crate::errors::BoxError;

/// An upstream connection's byte stream, boxed: the connector's type is sized for a TLS session
/// (1,112 bytes) even on plain TCP, and hyper keeps it inline in every connection's task and,
/// over HTTP/2, in every task it spawns to send a request body. The upstream stream keeps that
/// task's waker, and so its memory, until the response ends: minutes for a completion stream.
type UpstreamIo =
    Box<hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>>;

/// The connection to the upstream could not be made (TCP, DNS or TLS).
#[derive(Debug)]
pub struct ConnectError(pub BoxError);

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connecting to the upstream: {}", self.0)
    }
}

impl StdError for ConnectError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// Pool settings.
pub struct PoolConfig {
    pub max_idle: usize,
    pub idle_timeout: Duration,
    /// HTTP/2 on every connection, negotiated or not (prior knowledge on `http://`).
    pub http2_only: bool,
    /// HTTP/2 offered by ALPN on `https://` connections.
    pub http2_offered: bool,
    /// With `http2_offered`: HTTP/1.1 (connections dialled by the HTTP/1.1-only connector
    /// of [`Pool::with_upgrades`]) while at most this many requests are in flight, HTTP/2
    /// streams beyond. 0: HTTP/2 wherever ALPN picks it.
    pub http2_above: usize,
}

pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, what the connector dials.
    base: Uri,
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    h1: conn::http1::Builder,
    h2: conn::http2::Builder<TokioExecutor>,
    http2_only: bool,
    shared: Arc<Shared>,
    /// What dials the dedicated HTTP/1.1 connection of a WebSocket handshake (ALPN
    /// `http/1.1` only), and, under `http2_above`, the pool's connections while few
    /// requests are in flight; `None`: the pool's own connector.
    upgrades: Option<HttpsConnector<HttpConnector>>,
    /// See [`PoolConfig::http2_above`]; 0 when it does not apply (no HTTP/2 offered by ALPN).
    http2_above: usize,
}

struct Shared {
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Vec<H2>>,
    max_idle: usize,
    /// Sweeper ticks: a coarse clock, so returning a connection reads no clock.
    tick: AtomicU64,
    /// Ticks after which an idle connection is dropped.
    idle_ticks: u64,
    /// HTTP/2 connections being opened, and the requests waiting for them.
    opening: Mutex<Opening>,
    /// Notified when an HTTP/2 connection being opened is ready, or failed.
    opened: tokio::sync::Notify,
    /// The last connection made spoke HTTP/2 (so the next one most likely will).
    h2_seen: std::sync::atomic::AtomicBool,
    /// Requests in flight (sent, their response bodies not dropped), counted only under
    /// `http2_above`.
    in_flight: AtomicUsize,
    /// The upstream refused a connection that offered only `http/1.1` by ALPN.
    h1_refused: std::sync::atomic::AtomicBool,
}

/// Whether a TLS handshake failed because the upstream accepts none of the protocols ALPN
/// offered.
fn alpn_refused(err: &(dyn StdError + 'static)) -> bool {
    std::iter::successors(Some(err), |&e| e.source()).any(|e| {
        matches!(
            crate::tls::rustls_error(e),
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::NoApplicationProtocol
            ))
        )
    })
}

/// One request in flight, counted in [`Shared::in_flight`] until dropped (with its
/// response body, or with the request when it failed).
pub(super) struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    fn idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        // A panic while holding the lock leaves a valid Vec behind: keep using it.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn h2(&self) -> MutexGuard<'_, Vec<H2>> {
        self.h2.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn opening(&self) -> MutexGuard<'_, Opening> {
        self.opening.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The response head of a request [`Pool::send`] sends.
pub struct Sending<'a>(Sent<'a>);

#[expect(
    clippy::large_enum_variant,
    reason = "the common case is inline on purpose: boxing it costs every request an allocation"
)]
enum Sent<'a> {
    /// On an idle HTTP/1.1 connection: the pool and the in-flight count its body takes.
    H1 {
        exchange: Exchange,
        back: Option<(Arc<Shared>, Option<InFlight>)>,
    },
    Other(Pin<Box<dyn Future<Output = Result<Response<UpstreamBody>, BoxError>> + Send + 'a>>),
}

impl Future for Sending<'_> {
    type Output = Result<Response<UpstreamBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            Sent::H1 { exchange, back } => {
                let resp = ready!(Pin::new(exchange).poll(cx))?;
                let Some((shared, flight)) = back.take() else {
                    return Poll::Ready(Err("the exchange was polled after it ended".into()));
                };
                let back = Back::H1(shared);
                Poll::Ready(Ok(resp.map(|b| UpstreamBody::own(b, back, flight))))
            }
            Sent::Other(f) => f.as_mut().poll(cx),
        }
    }
}

/// `f`, failed with [`ResponseTimedOut`] if it has not resolved by `deadline`.
pub async fn within<T>(
    deadline: Option<tokio::time::Instant>,
    f: impl Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    match deadline {
        Some(at) => tokio::time::timeout_at(at, f)
            .await
            .unwrap_or_else(|_| Err(Box::new(ResponseTimedOut))),
        None => f.await,
    }
}

/// A connection to send one request on.
enum Conn {
    H1(H1Conn),
    H2(conn::http2::SendRequest<RequestBody>, Stream),
}

impl Pool {
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        scheme: Scheme,
        authority: Authority,
        cfg: PoolConfig,
    ) -> Result<Pool, String> {
        let base = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("upstream.base_url: {e}"))?;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("upstream.base_url: host: {e}"))?;
        let mut h1 = conn::http1::Builder::new();
        // One write per message: headers and a small body leave together.
        h1.writev(false);
        let mut h2 = conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new());
        // The sweeper ticks a few times per idle timeout, at most once per second.
        let tick = (cfg.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let idle_ticks = (cfg.idle_timeout.as_nanos() / tick.as_nanos().max(1)) as u64;
        let shared = Arc::new(Shared {
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(Vec::new()),
            max_idle: cfg.max_idle,
            tick: AtomicU64::new(0),
            idle_ticks,
            opening: Mutex::new(Opening::default()),
            opened: tokio::sync::Notify::new(),
            // Until the first connection says, HTTP/2 is expected wherever it is offered: a
            // burst at startup then waits for the first connection instead of opening one per
            // request (if the upstream picks HTTP/1.1, the waiters open their own).
            h2_seen: std::sync::atomic::AtomicBool::new(
                cfg.http2_only || (cfg.http2_offered && scheme == Scheme::HTTPS),
            ),
            in_flight: AtomicUsize::new(0),
            h1_refused: std::sync::atomic::AtomicBool::new(false),
        });
        let http2_above = if cfg.http2_offered && !cfg.http2_only && scheme == Scheme::HTTPS {
            cfg.http2_above
        } else {
            0
        };
        // ezgate builds its pools inside the runtime; a pool built outside one (a test of
        // config parsing, say) never sends, so it has nothing to sweep.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep_forever(Arc::downgrade(&shared), tick));
        }
        Ok(Pool {
            connector,
            base,
            scheme,
            authority,
            host,
            h1,
            h2,
            http2_only: cfg.http2_only,
            shared,
            upgrades: None,
            http2_above,
        })
    }

    /// Dials the connections of WebSocket handshakes with `connector` (one that offers only
    /// HTTP/1.1 by ALPN), instead of the pool's own.
    pub fn with_upgrades(mut self, connector: HttpsConnector<HttpConnector>) -> Pool {
        self.upgrades = Some(connector);
        self
    }

    /// Sends a request for `path` on a pooled connection (or a new one); resolves with the
    /// response headers. The request's URI is set here, and `Host` for HTTP/1.1.
    ///
    /// A request that finds an idle HTTP/1.1 connection is sent by [`Exchange`] alone; any
    /// other (a new connection, an HTTP/2 stream) by a boxed future. That future is 1.6 KiB,
    /// and every request would otherwise carry and move it.
    /// With a `deadline`, the response head must arrive before it ([`ResponseTimedOut`]).
    pub fn send(
        &self,
        req: Request<RequestBody>,
        path: PathAndQuery,
        deadline: Option<tokio::time::Instant>,
    ) -> Sending<'_> {
        // Under `http2_above`: whether this request goes over HTTP/1.1 (few in flight).
        let (flight, h1_first) = if self.http2_above == 0 {
            (None, false)
        } else {
            let before = self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
            (
                Some(InFlight(Arc::clone(&self.shared))),
                before < self.http2_above && !self.shared.h1_refused.load(Ordering::Relaxed),
            )
        };
        match self.checkout(h1_first) {
            // A pooled connection was found open when taken (`Shared::take`).
            Some(Conn::H1(c)) => Sending(Sent::H1 {
                exchange: Exchange::new(c, req, &path, &self.host, deadline),
                back: Some((Arc::clone(&self.shared), flight)),
            }),
            conn => Sending(Sent::Other(Box::pin(within(
                deadline,
                self.send_other(req, path, flight, h1_first, conn),
            )))),
        }
    }

    /// [`Pool::send`] on `conn`, an HTTP/2 stream, or on a new connection.
    async fn send_other(
        &self,
        mut req: Request<RequestBody>,
        path: PathAndQuery,
        flight: Option<InFlight>,
        h1_first: bool,
        mut conn: Option<Conn>,
    ) -> Result<Response<UpstreamBody>, BoxError> {
        let mut reused = true;
        loop {
            let c = match conn.take() {
                Some(c) => c,
                None => {
                    reused = false;
                    let placed = if h1_first {
                        Err(None)
                    } else {
                        self.shared.place_or_open().await
                    };
                    match placed {
                        Ok(c) => c,
                        // Boxed: the connect future is large and rarely needed; every
                        // request would otherwise carry (and move) it.
                        Err(opening) => Box::pin(self.connect(opening, h1_first)).await?,
                    }
                }
            };
            match c {
                Conn::H2(mut tx, stream) => {
                    *req.uri_mut() = self.absolute(path.clone())?;
                    req.headers_mut().remove(HOST);
                    match tx.try_send_request(req).await {
                        Ok(resp) => {
                            let back = Back::H2 { _stream: stream };
                            return Ok(resp.map(|b| UpstreamBody::new(b, back, flight)));
                        }
                        Err(mut e) => match e.take_message() {
                            // Never sent (the connection was going away): once more, on a new one.
                            Some(again) if reused => {
                                req = again;
                                reused = false;
                            }
                            _ => return Err(e.into_error().into()),
                        },
                    }
                }
                Conn::H1(c) => {
                    // `within` holds this exchange's deadline: a connection starts its
                    // timer with the first exchange `send` finds it idle for.
                    let resp = Exchange::new(c, req, &path, &self.host, None).await?;
                    let back = Back::H1(Arc::clone(&self.shared));
                    return Ok(resp.map(|b| UpstreamBody::own(b, back, flight)));
                }
            }
        }
    }

    fn absolute(&self, path: PathAndQuery) -> Result<Uri, BoxError> {
        Ok(Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()?)
    }

    /// A pooled connection: a place on a shared HTTP/2 connection, else an idle HTTP/1.1
    /// one; with `h1_only` (few requests in flight under `http2_above`), only an idle
    /// HTTP/1.1 connection: the streams of HTTP/2 connections a burst opened are left to
    /// end, and the connections to be swept.
    fn checkout(&self, h1_only: bool) -> Option<Conn> {
        if h1_only {
            return self.shared.take().map(Conn::H1);
        }
        self.shared
            .h2_stream()
            .or_else(|| self.shared.take().map(Conn::H1))
    }

    /// Opens a connection (`h1`: with the HTTP/1.1-only connector, if there is one);
    /// `_opening`, held until it is made or has failed, lets other requests wait for it.
    async fn connect(
        &self,
        _opening: Option<OpeningGuard<'_>>,
        h1: bool,
    ) -> Result<Conn, BoxError> {
        let mut h1_connector = if h1 { self.upgrades.as_ref() } else { None };
        let io = loop {
            let mut connector = h1_connector.unwrap_or(&self.connector).clone();
            std::future::poll_fn(|cx| connector.poll_ready(cx))
                .await
                .map_err(ConnectError)?;
            match connector.call(self.base.clone()).await {
                Ok(io) => break io,
                // An upstream that speaks only HTTP/2 refuses an ALPN of `http/1.1` alone:
                // offered h2 from now on.
                Err(e) if h1_connector.is_some() && alpn_refused(&*e) => {
                    self.shared.h1_refused.store(true, Ordering::Relaxed);
                    h1_connector = None;
                }
                Err(e) => return Err(ConnectError(e).into()),
            }
        };
        let h2 = self.http2_only || io.connected().is_negotiated_h2();
        // Only a connection that offered h2 says whether the upstream speaks it.
        if h1_connector.is_none() {
            self.shared.h2_seen.store(h2, Ordering::Relaxed);
        }
        let io: UpstreamIo = Box::new(io);
        if h2 {
            self.handshake_h2(io).await
        } else {
            Ok(Conn::H1(H1Conn::new(io)))
        }
    }
}

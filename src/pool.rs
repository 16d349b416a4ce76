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
//! An HTTP/1.1 connection goes back on the stack when its response body has been read to
//! the end — by [`UpstreamBody`], on the request's own task, with no extra task per request.
//! A body dropped before its end (client gone, error body cut short) takes the connection
//! with it, and hyper closes it: a half-read connection is never reused.
//!
//! Each connection's I/O runs on a task of its own. (Driving an HTTP/1.1 connection from the
//! request's task instead, which saves that task and its wake-ups, measured 5–10 % more CPU
//! per request: the client connection's task then polls both sides on every wake-up.)
//!
//! A request that finds its pooled connection closed before anything was written (the
//! upstream closed an idle keep-alive connection) is retried once on a new connection;
//! once written, it is never retried.
//!
//! A sweeper task drops connections idle longer than `upstream.pool_idle_timeout`, and ends
//! with the pool, and HTTP/2 connections left without streams for as long.

use std::error::Error as StdError;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

use crate::upstream::RequestBody;

type BoxError = Box<dyn StdError + Send + Sync>;

/// An upstream connection's byte stream, boxed: the connector's type is sized for a TLS session
/// (1,112 bytes) even on plain TCP, and hyper keeps it inline in every connection's task and,
/// over HTTP/2, in every task it spawns to send a request body. The upstream stream keeps that
/// task's waker, and so its memory, until the response ends: minutes for a completion stream.
type UpstreamIo =
    Box<hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>>;

/// Streams an HTTP/2 connection is assumed to allow until the upstream's SETTINGS say (the
/// least RFC 9113 recommends servers allow).
const DEFAULT_MAX_STREAMS: usize = 100;

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
}

pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, what the connector dials.
    base: Uri,
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    http2_only: bool,
    shared: Arc<Shared>,
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
}

#[derive(Default)]
struct Opening {
    connects: usize,
    waiting: usize,
}

/// One request waiting for a connection being opened; dropped when it stops waiting.
struct WaitingGuard<'a>(&'a Shared);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.opening().waiting -= 1;
    }
}

/// Marks an HTTP/2 connection as being opened; when dropped (made, failed or abandoned),
/// wakes the requests waiting for it.
struct OpeningGuard<'a>(&'a Shared);

impl Drop for OpeningGuard<'_> {
    fn drop(&mut self) {
        self.0.opening().connects -= 1;
        self.0.opened.notify_waiters();
    }
}

struct Idle {
    tx: http1::SendRequest<RequestBody>,
    since: u64,
}

/// A shared HTTP/2 connection.
struct H2 {
    tx: http2::SendRequest<RequestBody>,
    load: Arc<H2Load>,
}

struct H2Load {
    /// Streams open on the connection: requests sent whose response bodies have not ended.
    streams: AtomicUsize,
    /// How many the upstream allows at once, as its latest SETTINGS said.
    max: AtomicUsize,
    /// The sweeper tick when its last stream ended.
    since: AtomicU64,
}

/// One open stream of a shared HTTP/2 connection; dropping it frees the place.
struct Stream {
    load: Arc<H2Load>,
    shared: Arc<Shared>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.load.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
            let now = self.shared.tick.load(Ordering::Relaxed);
            self.load.since.store(now, Ordering::Relaxed);
        }
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

    /// For a request that found every connection full: with an HTTP/2 upstream, a place on a
    /// connection another request is opening, as long as that connection can be expected to
    /// take it (the streams it may carry are promised to the first waiters); else the duty
    /// to open one (`Err`), registered under the same lock that waiters check, so that two
    /// requests never both decide to open the first connection. The guard is `None` when no
    /// HTTP/2 is expected: nobody waits for an HTTP/1.1 connection.
    async fn place_or_open(self: &Arc<Self>) -> Result<Conn, Option<OpeningGuard<'_>>> {
        if !self.h2_seen.load(Ordering::Relaxed) {
            return Err(None);
        }
        let notified = {
            let mut o = self.opening();
            // A connection made since this request looked.
            if let Some(c) = self.h2_stream() {
                return Ok(c);
            }
            // Each connection being opened carries its opener's stream and up to
            // `DEFAULT_MAX_STREAMS - 1` waiters.
            if o.waiting >= o.connects * (DEFAULT_MAX_STREAMS - 1) {
                o.connects += 1;
                return Err(Some(OpeningGuard(self)));
            }
            o.waiting += 1;
            // Registered before the lock is released: a connection that completes from
            // now on wakes this request.
            self.opened.notified()
        };
        {
            // Counted out however the wait ends, also when the request is dropped meanwhile
            // (its client left, or its deadline passed).
            let _waiting = WaitingGuard(self);
            notified.await;
        }
        // Only once: if the connection failed, or the upstream allows fewer streams than
        // were promised, the request opens its own.
        match self.h2_stream() {
            Some(c) => Ok(c),
            None => {
                self.opening().connects += 1;
                Err(Some(OpeningGuard(self)))
            }
        }
    }

    /// A place on a shared HTTP/2 connection with room for one more stream.
    fn h2_stream(self: &Arc<Self>) -> Option<Conn> {
        let mut h2 = self.h2();
        h2.retain(|c| !c.tx.is_closed());
        // Under the lock, so two requests cannot both take the last place.
        let c = h2.iter().find(|c| {
            c.load.streams.load(Ordering::Relaxed) < c.load.max.load(Ordering::Relaxed)
        })?;
        c.load.streams.fetch_add(1, Ordering::Relaxed);
        let stream = Stream {
            load: Arc::clone(&c.load),
            shared: Arc::clone(self),
        };
        Some(Conn::H2(c.tx.clone(), stream))
    }

    fn put_back(&self, tx: http1::SendRequest<RequestBody>) {
        if tx.is_closed() {
            return;
        }
        let since = self.tick.load(Ordering::Relaxed);
        let mut idle = self.idle();
        if idle.len() < self.max_idle {
            idle.push(Idle { tx, since });
        }
    }

    fn take(&self) -> Option<http1::SendRequest<RequestBody>> {
        let mut idle = self.idle();
        while let Some(c) = idle.pop() {
            if !c.tx.is_closed() {
                return Some(c.tx);
            }
        }
        None
    }

    fn sweep(&self) {
        let now = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
        self.idle()
            .retain(|c| !c.tx.is_closed() && now.saturating_sub(c.since) <= self.idle_ticks);
        self.h2().retain(|c| {
            let idle = c.load.streams.load(Ordering::Relaxed) == 0
                && now.saturating_sub(c.load.since.load(Ordering::Relaxed)) > self.idle_ticks;
            !c.tx.is_closed() && !idle
        });
    }
}

/// A connection to send one request on.
enum Conn {
    H1(http1::SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>, Stream),
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
        let mut h1 = http1::Builder::new();
        // One write per message: headers and a small body leave together.
        h1.writev(false);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
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
        });
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
        })
    }

    /// Sends a request for `path` on a pooled connection (or a new one); resolves with the
    /// response headers. The request's URI is set here, and `Host` for HTTP/1.1.
    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
        path: PathAndQuery,
    ) -> Result<Response<UpstreamBody>, BoxError> {
        let mut reused = true;
        let mut conn = self.checkout();
        loop {
            let c = match conn.take() {
                Some(c) => c,
                None => {
                    reused = false;
                    match self.shared.place_or_open().await {
                        Ok(c) => c,
                        // Boxed: the connect future is large and rarely needed; every
                        // request would otherwise carry (and move) it.
                        Err(opening) => Box::pin(self.connect(opening)).await?,
                    }
                }
            };
            match c {
                Conn::H2(mut tx, stream) => {
                    *req.uri_mut() = self.absolute(path.clone())?;
                    req.headers_mut().remove(HOST);
                    match tx.try_send_request(req).await {
                        Ok(resp) => {
                            return Ok(
                                resp.map(|b| UpstreamBody::new(b, Back::H2 { _stream: stream }))
                            )
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
                Conn::H1(mut tx) => {
                    if tx.ready().await.is_err() {
                        if reused {
                            // Closed while idle: the next pooled one, or a new one.
                            conn = self.checkout();
                            continue;
                        }
                        return Err("the new upstream connection closed at once".into());
                    }
                    *req.uri_mut() = Uri::from(path.clone());
                    req.headers_mut().insert(HOST, self.host.clone());
                    match tx.try_send_request(req).await {
                        Ok(resp) => {
                            let back = Back::H1(tx, Arc::clone(&self.shared));
                            return Ok(resp.map(|b| UpstreamBody::new(b, back)));
                        }
                        Err(mut e) => match e.take_message() {
                            // Never written: safe to send again, once, on a new connection.
                            Some(again) if reused => {
                                req = again;
                                reused = false;
                            }
                            _ => return Err(e.into_error().into()),
                        },
                    }
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

    fn checkout(&self) -> Option<Conn> {
        self.shared
            .h2_stream()
            .or_else(|| self.shared.take().map(Conn::H1))
    }

    /// Opens a connection; `_opening`, held until it is made or has failed, lets other
    /// requests wait for it.
    async fn connect(&self, _opening: Option<OpeningGuard<'_>>) -> Result<Conn, BoxError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(ConnectError)?;
        let io = connector
            .call(self.base.clone())
            .await
            .map_err(ConnectError)?;
        let h2 = self.http2_only || io.connected().is_negotiated_h2();
        self.shared.h2_seen.store(h2, Ordering::Relaxed);
        let io: UpstreamIo = Box::new(io);
        if h2 {
            let (tx, conn) = self.h2.handshake(io).await?;
            // Shared from now on, with this request's stream open on it.
            let load = Arc::new(H2Load {
                streams: AtomicUsize::new(1),
                max: AtomicUsize::new(DEFAULT_MAX_STREAMS),
                since: AtomicU64::new(self.shared.tick.load(Ordering::Relaxed)),
            });
            let seen = Arc::clone(&load);
            tokio::spawn(async move {
                let mut conn = std::pin::pin!(conn);
                let end = poll_fn(|cx| {
                    let polled = conn.as_mut().poll(cx);
                    // The upstream's limit arrives in SETTINGS, and may change.
                    seen.max
                        .store(conn.current_max_send_streams(), Ordering::Relaxed);
                    polled
                })
                .await;
                if let Err(e) = end {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            self.shared.h2().push(H2 {
                tx: tx.clone(),
                load: Arc::clone(&load),
            });
            let stream = Stream {
                load,
                shared: Arc::clone(&self.shared),
            };
            return Ok(Conn::H2(tx, stream));
        }
        let (tx, conn) = self.h1.handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(Conn::H1(tx))
    }

    /// Idle HTTP/1.1 connections (for tests).
    pub fn idle_count(&self) -> usize {
        self.shared.idle().len()
    }

    /// HTTP/2 connections being opened, and requests waiting for them (for tests).
    #[cfg(test)]
    fn opening_counts(&self) -> (usize, usize) {
        let o = self.shared.opening();
        (o.connects, o.waiting)
    }

    /// HTTP/2 connections, and the streams open on each (for tests).
    pub fn h2_streams(&self) -> Vec<usize> {
        self.shared
            .h2()
            .iter()
            .map(|c| c.load.streams.load(Ordering::Relaxed))
            .collect()
    }
}

async fn sweep_forever(shared: Weak<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.sweep();
    }
}

/// What a response body holds of its connection until its end.
enum Back {
    /// Nothing more (the body ended, or failed).
    Done,
    /// An HTTP/1.1 connection on loan, which goes back to the pool.
    H1(http1::SendRequest<RequestBody>, Arc<Shared>),
    /// A stream's place on a shared HTTP/2 connection, freed when dropped.
    H2 { _stream: Stream },
}

/// An upstream response body; its end returns the connection to the pool.
pub struct UpstreamBody {
    inner: Incoming,
    back: Back,
}

impl UpstreamBody {
    fn new(inner: Incoming, back: Back) -> UpstreamBody {
        let mut body = UpstreamBody { inner, back };
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Back::H1(tx, shared) = std::mem::replace(&mut self.back, Back::Done) {
            shared.put_back(tx);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            // An error: the connection is not reusable; dropping the sender closes it.
            Poll::Ready(Some(Err(_))) => this.back = Back::Done,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::TcpListener;

    #[test]
    fn connection_tasks_are_not_sized_for_tls() {
        // One of these is held per open stream with an HTTP/1.1 upstream (1,752 bytes with the
        // connector's stream inline).
        let h1 = std::mem::size_of::<http1::Connection<UpstreamIo, RequestBody>>();
        assert!(h1 <= 1024, "HTTP/1.1 connection future is {h1} bytes");
    }

    /// An HTTP/1.1 upstream that counts the connections it accepted. `close` answers with
    /// `Connection: close`; a path `/big` answers 1 MiB.
    async fn upstream(close: bool) -> (String, Arc<AtomicUsize>) {
        upstream_with(close, None).await
    }

    /// A local upstream: each accepted connection is counted and handed to `serve`.
    async fn counting_upstream<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp));
            }
        });
        (format!("http://{addr}"), accepted)
    }

    /// As [`upstream`]; `idle_close` closes keep-alive connections idle that long.
    async fn upstream_with(
        close: bool,
        idle_close: Option<Duration>,
    ) -> (String, Arc<AtomicUsize>) {
        counting_upstream(move |tcp| async move {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let big = req.uri().path() == "/big";
                let _ = req.into_body().collect().await;
                let body = if big {
                    Bytes::from(vec![b'x'; 1 << 20])
                } else {
                    Bytes::from_static(b"{\"ok\":true}")
                };
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(body)))
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.keep_alive(!close);
            if let Some(idle) = idle_close {
                b.timer(TokioTimer::new()).header_read_timeout(idle);
            }
            let _ = b
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        })
        .await
    }

    /// A body that sends one byte, then ends after `hold`.
    struct Held {
        first: bool,
        hold: Pin<Box<tokio::time::Sleep>>,
    }

    impl Body for Held {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.first {
                self.first = false;
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))));
            }
            self.hold.as_mut().poll(cx).map(|()| None)
        }
    }

    /// An h2c upstream (prior knowledge) that allows `max_streams` at once and counts its
    /// connections; each response body lasts 300 ms.
    async fn upstream_h2(max_streams: u32) -> (String, Arc<AtomicUsize>) {
        counting_upstream(move |tcp| async move {
            let svc = hyper::service::service_fn(|_req: Request<Incoming>| async move {
                Ok::<_, std::convert::Infallible>(Response::new(Held {
                    first: true,
                    hold: Box::pin(tokio::time::sleep(Duration::from_millis(300))),
                }))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(max_streams)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        })
        .await
    }

    fn pool(base: &str, idle_timeout: Duration) -> Pool {
        pool_with(base, idle_timeout, false)
    }

    fn pool_with(base: &str, idle_timeout: Duration, http2_only: bool) -> Pool {
        let tls = crate::tls::client_tls(None).unwrap();
        build_pool(base, idle_timeout, tls, http2_only, http2_only)
    }

    /// A pool as `upstream.rs` builds one: `offer_h2` is ALPN's h2 on `https://` (and
    /// prior knowledge on `http://` when `http2_only`).
    fn build_pool(
        base: &str,
        idle_timeout: Duration,
        tls: rustls::ClientConfig,
        http2_only: bool,
        offer_h2: bool,
    ) -> Pool {
        let uri: Uri = base.parse().unwrap();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let https = if offer_h2 && !http2_only {
            https.enable_http1().enable_http2().wrap_connector(http)
        } else {
            https.enable_http1().wrap_connector(http)
        };
        Pool::new(
            https,
            uri.scheme().unwrap().clone(),
            uri.authority().unwrap().clone(),
            PoolConfig {
                max_idle: 8,
                idle_timeout,
                http2_only,
                http2_offered: offer_h2,
            },
        )
        .unwrap()
    }

    /// A TLS upstream on 127.0.0.1, signed by a CA made here, whose ALPN offers only
    /// `alpn`; it counts its connections and serves [`Held`] bodies over what ALPN chose.
    /// Returns a pool that trusts the CA and offers h2 and HTTP/1.1, and the connection count.
    async fn tls_upstream(alpn: &'static [u8]) -> (Arc<Pool>, Arc<AtomicUsize>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        server.alpn_protocols = vec![alpn.to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let (base, accepted) = counting_upstream(move |tcp| {
            let acceptor = acceptor.clone();
            async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let io = hyper_util::rt::TokioIo::new(tls);
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(Held {
                        first: true,
                        hold: Box::pin(tokio::time::sleep(Duration::from_millis(300))),
                    }))
                });
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            }
        })
        .await;
        let ca_file = std::env::temp_dir().join(format!(
            "ezgate-pool-ca-{}-{}.pem",
            std::process::id(),
            base.rsplit(':').next().unwrap_or("0")
        ));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let tls = crate::tls::client_tls(Some(&ca_file)).unwrap();
        let _ = std::fs::remove_file(&ca_file);
        let base = base.replace("http://", "https://");
        let pool = build_pool(&base, Duration::from_secs(30), tls, false, true);
        (Arc::new(pool), accepted)
    }

    async fn get(pool: &Pool, path: &'static str) -> Response<UpstreamBody> {
        let req = Request::new(RequestBody::full(Bytes::new()));
        pool.send(req, PathAndQuery::from_static(path))
            .await
            .unwrap()
    }

    /// `n` requests for `/` sent at once, each on a task of its own.
    fn send_at_once(
        pool: &Arc<Pool>,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<Response<UpstreamBody>, BoxError>>> {
        (0..n)
            .map(|_| {
                let pool = Arc::clone(pool);
                tokio::spawn(async move {
                    let req = Request::new(RequestBody::full(Bytes::new()));
                    pool.send(req, PathAndQuery::from_static("/")).await
                })
            })
            .collect()
    }

    /// Sends `n` requests at once and waits for all their response headers; the bodies stay
    /// unread, so each request keeps its place on its connection.
    async fn open_at_once(pool: &Arc<Pool>, n: usize) -> Vec<UpstreamBody> {
        let mut open = Vec::new();
        for t in send_at_once(pool, n) {
            open.push(t.await.unwrap().unwrap().into_body());
        }
        open
    }

    /// `n` requests sent at once to an HTTP/2 upstream all open on one connection.
    async fn shares_one_connection(pool: &Arc<Pool>, accepted: &AtomicUsize, n: usize) {
        let open = open_at_once(pool, n).await;
        assert_eq!(pool.h2_streams(), [n]);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection, not one per request"
        );
        read_all(open).await;
    }

    /// Reads each body to its end: every test upstream answers `x`.
    async fn read_all(open: Vec<UpstreamBody>) {
        for body in open {
            assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"x");
        }
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (base, accepted) = upstream(false).await;
        let pool = pool(&base, Duration::from_secs(30));
        for _ in 0..5 {
            let resp = get(&pool, "/").await;
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"{\"ok\":true}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_large_body_read_to_its_end_gives_its_connection_back() {
        let (base, accepted) = upstream(false).await;
        let pool = pool(&base, Duration::from_secs(30));
        for _ in 0..3 {
            let body = get(&pool, "/big").await.into_body();
            let bytes = body.collect().await.unwrap().to_bytes();
            assert_eq!(bytes.len(), 1 << 20);
            assert!(bytes.iter().all(|&b| b == b'x'));
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_sweeper_drops_a_connection_the_upstream_closed() {
        let (base, _) = upstream_with(false, Some(Duration::from_millis(30))).await;
        // Expiry is 10 s away: only noticing the close can empty the pool sooner.
        let pool = pool(&base, Duration::from_secs(10));
        let resp = get(&pool, "/").await;
        let _ = resp.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        for _ in 0..100 {
            if pool.idle_count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("a connection the upstream closed stayed in the pool");
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_takes_its_connection_along() {
        let (base, accepted) = upstream(false).await;
        let pool = pool(&base, Duration::from_secs(30));
        let mut body = get(&pool, "/big").await.into_body();
        let _first = body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(
            pool.idle_count(),
            0,
            "a half-read connection is never pooled"
        );
        let resp = get(&pool, "/").await;
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes().len(),
            11
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_the_upstream_closes_are_replaced() {
        let (base, accepted) = upstream(true).await;
        let pool = pool(&base, Duration::from_secs(30));
        for _ in 0..3 {
            let resp = get(&pool, "/").await;
            assert_eq!(
                resp.into_body().collect().await.unwrap().to_bytes().len(),
                11
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
        let (base, accepted) = upstream_with(false, Some(Duration::from_millis(30))).await;
        let pool = pool(&base, Duration::from_secs(30));
        for _ in 0..3 {
            let resp = get(&pool, "/").await;
            assert_eq!(
                resp.into_body().collect().await.unwrap().to_bytes().len(),
                11
            );
            // Long past the upstream's keep-alive timeout.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let (base, _) = upstream(false).await;
        let pool = pool(&base, Duration::from_millis(50));
        let resp = get(&pool, "/").await;
        let _ = resp.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        // Well past the timeout (the sweeper ticks every 12.5 ms here).
        for _ in 0..200 {
            if pool.idle_count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("an idle connection outlived pool_idle_timeout by seconds");
    }

    #[tokio::test]
    async fn http2_streams_fill_each_connection_up_to_the_upstreams_limit() {
        let (base, accepted) = upstream_h2(2).await;
        let pool = pool_with(&base, Duration::from_secs(30), true);
        // One request first: by its end the upstream's SETTINGS (2 streams) are known.
        let _ = get(&pool, "/").await.into_body().collect().await.unwrap();
        assert_eq!(pool.h2_streams(), [0]);
        // Five long responses at once: two per connection, never queued behind each other.
        let mut open = Vec::new();
        for _ in 0..5 {
            open.push(get(&pool, "/").await.into_body());
        }
        assert_eq!(pool.h2_streams(), [2, 2, 1]);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        for body in open {
            let bytes = body.collect().await.unwrap().to_bytes();
            assert_eq!(&bytes[..], b"x");
        }
        assert_eq!(pool.h2_streams(), [0, 0, 0]);
        // A body dropped half-read frees its place too.
        let mut body = get(&pool, "/").await.into_body();
        let _ = body.frame().await.unwrap().unwrap();
        assert_eq!(pool.h2_streams().iter().sum::<usize>(), 1);
        drop(body);
        assert_eq!(pool.h2_streams().iter().sum::<usize>(), 0);
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "free places are reused");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_http2_requests_shares_the_connection_being_opened() {
        let (base, accepted) = upstream_h2(100).await;
        let pool = Arc::new(pool_with(&base, Duration::from_secs(30), true));
        shares_one_connection(&pool, &accepted, 50).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_over_tls_expects_http2_where_alpn_offers_it() {
        let (pool, accepted) = tls_upstream(b"h2").await;
        shares_one_connection(&pool, &accepted, 20).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_over_tls_opens_its_own_connections_when_the_upstream_picks_http1() {
        let (pool, accepted) = tls_upstream(b"http/1.1").await;
        let open = open_at_once(&pool, 5).await;
        assert!(pool.h2_streams().is_empty());
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            5,
            "one HTTP/1.1 connection per request"
        );
        read_all(open).await;
    }

    #[tokio::test]
    async fn requests_waiting_for_a_connection_that_fails_report_the_failure() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let pool = Arc::new(pool_with(&base, Duration::from_secs(30), true));
        for t in send_at_once(&pool, 5) {
            let err = t.await.unwrap().err().expect("a closed port answered");
            assert!(err.is::<ConnectError>(), "{err}");
        }
    }

    #[tokio::test]
    async fn requests_that_stop_waiting_for_a_connection_are_counted_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("https://{}", listener.local_addr().unwrap());
        // Accepts and never answers the TLS handshake: the connection stays being opened.
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                sockets.push(s);
            }
        });
        let pool = Arc::new(pool_with(&base, Duration::from_secs(30), true));
        let tasks = send_at_once(&pool, 5);
        for _ in 0..200 {
            if pool.opening_counts() == (1, 4) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.opening_counts(), (1, 4), "one opens, four wait for it");
        // The clients leave: their requests are dropped mid-wait.
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        assert_eq!(pool.opening_counts(), (0, 0));
        held.abort();
    }

    #[tokio::test]
    async fn http2_connections_without_streams_expire() {
        let (base, _) = upstream_h2(100).await;
        let pool = pool_with(&base, Duration::from_millis(50), true);
        let _ = get(&pool, "/").await.into_body().collect().await.unwrap();
        assert_eq!(pool.h2_streams(), [0]);
        for _ in 0..200 {
            if pool.h2_streams().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("an HTTP/2 connection without streams outlived pool_idle_timeout by seconds");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let pool = pool(&base, Duration::from_secs(30));
        let req = Request::new(RequestBody::full(Bytes::new()));
        let Err(err) = pool.send(req, PathAndQuery::from_static("/")).await else {
            panic!("a closed port answered");
        };
        assert!(err.is::<ConnectError>(), "{err}");
    }
}

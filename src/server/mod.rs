//! Listeners and connections: the proxy listener (HTTP/1.1 + h2c, or TLS with ALPN h2 and
//! http/1.1), the admin listener, and graceful shutdown.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

mod refusals;

use crate::config::Settings;
use crate::gateway::{ConnSlot, ConnWatch, Gateway, HeadClock, HeadWait, StreamSlot};
use crate::proxy;

/// Largest request head (request line + headers) a client may send; beyond it: 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sockets bound before the gateway starts; binding is the last step of startup that can fail.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
    pub tls: Option<TlsAcceptor>,
}

impl Listeners {
    pub async fn bind(settings: &Settings) -> Result<Listeners, String> {
        let s = &settings.config.server;
        // Build TLS first: a bad certificate must fail before anything is bound.
        let tls = match &s.tls {
            Some(cfg) => Some(TlsAcceptor::from(crate::tls::server_config(
                &cfg.cert, &cfg.key,
            )?)),
            None => None,
        };
        let proxy = TcpListener::bind(s.listen).await.map_err(|e| {
            format!(
                "cannot listen on {} (server.listen / --listen): {e}",
                s.listen
            )
        })?;
        let admin = TcpListener::bind(s.admin_listen).await.map_err(|e| {
            format!(
                "cannot listen on {} (server.admin_listen / --admin-listen): {e}",
                s.admin_listen
            )
        })?;
        Ok(Listeners { proxy, admin, tls })
    }
}

/// The two protocol builders. A plain connection's first bytes, looked at without taking
/// them, pick HTTP/1.1 or h2c (the HTTP/2 preface); a TLS connection's ALPN picks. (hyper-util's
/// `auto` builder reads the first bytes and replays them: a layer on every read, and a read
/// buffer that grows to 16 KiB on the first request because the replayed bytes arrive as a
/// read of their own; nor can it cap the request head exactly.)
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
}

impl Builders {
    fn new(settings: &Settings) -> Builders {
        let header_read_timeout = settings.config.server.header_read_timeout.0;
        let mut h1 = http1::Builder::new();
        // The wait for a request head is timed by the connection's task, not by hyper (see
        // `until_cut`).
        h1.header_read_timeout(None)
            // The exact cap on the request line and headers; `max_buf_size` alone is only
            // checked between reads, so a head that arrives in large reads could pass it.
            .max_header_size(MAX_HEAD_BYTES)
            .max_buf_size(MAX_HEAD_BYTES)
            .writev(false)
            .keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            // A peer that stops answering pings is gone: its connection is closed.
            .keep_alive_interval(H2_PING_EVERY)
            .keep_alive_timeout(H2_PING_TIMEOUT)
            // Streams the client resets before ezgate accepts them, and streams ezgate
            // resets for a protocol error, each beyond these: GOAWAY (the h2 defaults, set
            // here so they never silently change). Streams reset after acceptance are
            // counted by `ConnWatch`.
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(1024);
        Builders {
            h1,
            h2,
            header_read_timeout,
        }
    }

    /// Serves one connection in the protocol chosen, until it ends or the drain closes it.
    /// HTTP/2 connections are few and long; their state is boxed so that the task of every
    /// HTTP/1.1 connection (one per open stream with most clients) is sized for HTTP/1.1 only.
    async fn serve<I>(&self, io: I, h2: bool, gw: Arc<Gateway>, peer: SocketAddr, drain: Drain)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        if h2 {
            Box::pin(self.serve_h2(io, gw, peer, drain)).await;
            return;
        }
        let heads = Arc::new(HeadClock::new());
        let io = refusals::Refusals::new(io, Arc::clone(&gw), Arc::clone(&heads));
        let requests = Arc::clone(&heads);
        let svc = service_fn(move |req| {
            let slot = ConnSlot::Http1(requests.begin());
            proxy::serve(Arc::clone(&gw), req, peer, slot)
        });
        // With upgrades: a WebSocket's `101` hands the connection to its session.
        let conn = self
            .h1
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        tokio::pin!(conn);
        let Drain { mut phase, _open } = drain;
        // While draining, responses carry `Connection: close` (the client's next request
        // goes to a new connection) and an idle connection ends at its header read
        // timeout; at the cut, whatever is left is closed once its response ends.
        // Errors (client gone, bad input) were answered or logged by hyper.
        let timeout = self.header_read_timeout;
        match until_cut(conn.as_mut(), &mut phase, HeadTimer::new(&heads, timeout)).await {
            Stop::Ended => {}
            Stop::Cut => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
            Stop::NoHead {
                served: true,
                blocked: false,
            } => {
                // Waiting for a head, with its last response out: closed at once. A close
                // that cannot go out (a TLS close_notify to a client that reads nothing)
                // gets one more timeout.
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(timeout, conn).await;
            }
            // Nothing served yet, so hyper has no response to finish; or the client has not
            // read the end of its last response for the whole timeout: dropped.
            Stop::NoHead { .. } => {}
        }
    }

    /// An HTTP/2 connection, bounded like an HTTP/1.1 one: GOAWAY when it has had no stream
    /// open for the header read timeout (an idle connection, or a HEADERS block that never
    /// completes), when its client resets too many accepted streams (on it, or from its
    /// address over all its connections), or when the drain starts. A connection from an
    /// address whose streams are refused gets GOAWAY as soon as its handshake is done.
    async fn serve_h2<I>(&self, io: I, gw: Arc<Gateway>, peer: SocketAddr, drain: Drain)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let watch = Arc::new(ConnWatch::new(
            MAX_CLIENT_RESETS,
            RESET_WINDOW,
            Some((peer.ip(), Arc::clone(&gw.resets))),
        ));
        let streams = Arc::clone(&watch);
        let svc = service_fn(move |req| {
            let slot = ConnSlot::Http2(StreamSlot::new(Arc::clone(&streams)));
            proxy::serve(Arc::clone(&gw), req, peer, slot)
        });
        let conn = self.h2.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let Drain { mut phase, _open } = drain;
        let mut watching_phase = true;
        // Set when ezgate sent GOAWAY of its own (idle, resets): a client that never answers
        // it (its PING goes unanswered, so h2 never closes by itself) is dropped then, once
        // no stream is open.
        let mut drop_at: Option<tokio::time::Instant> = None;
        let mut closing = watch.refusing();
        if closing {
            conn.as_mut().graceful_shutdown();
            drop_at = Some(tokio::time::Instant::now() + GOAWAY_ANSWER_WAIT);
        }
        loop {
            let idle_until = watch
                .idle_since()
                .map(|t| tokio::time::Instant::from_std(t) + self.header_read_timeout);
            tokio::select! {
                _ = conn.as_mut() => return,
                changed = phase.changed(), if watching_phase => {
                    let now = if changed.is_ok() { *phase.borrow() } else { Phase::Cut };
                    watching_phase = changed.is_ok() && now != Phase::Cut;
                    if now != Phase::Serving && !closing {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
                () = watch.changed(), if !closing => {
                    if watch.too_many_resets() {
                        tracing::warn!(%peer, limit = MAX_CLIENT_RESETS, "an HTTP/2 client reset too many streams; closing its connection (GOAWAY)");
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                        drop_at = Some(tokio::time::Instant::now() + GOAWAY_ANSWER_WAIT);
                    }
                }
                () = sleep_until_some(idle_until), if !closing && idle_until.is_some() => {
                    if watch.idle_since().is_some_and(|t| t.elapsed() >= self.header_read_timeout) {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                        drop_at = Some(tokio::time::Instant::now() + GOAWAY_ANSWER_WAIT);
                    }
                }
                () = sleep_until_some(drop_at), if drop_at.is_some() => {
                    // No stream is open: nothing is lost by closing. (One still open, or
                    // opened in the race with the GOAWAY, is served; look again after it.)
                    if watch.idle_since().is_some() {
                        return;
                    }
                    drop_at = Some(tokio::time::Instant::now() + GOAWAY_ANSWER_WAIT);
                }
            }
        }
    }

    /// A plain connection: HTTP/1.1 or h2c, as its first bytes say.
    async fn serve_plain(
        self: Arc<Self>,
        stream: TcpStream,
        gw: Arc<Gateway>,
        peer: SocketAddr,
        drain: Drain,
    ) {
        let h2 = match first_bytes(&stream, self.header_read_timeout).await {
            FirstBytes::Http1 => false,
            FirstBytes::Http2 => true,
            FirstBytes::Nothing => return,
        };
        self.serve(stream, h2, gw, peer, drain).await;
    }

    /// A TLS connection: the handshake, then HTTP/2 or HTTP/1.1 as ALPN chose. Its own task,
    /// so that the TLS session's state never sizes the tasks of plain connections.
    async fn serve_tls(
        self: Arc<Self>,
        acceptor: TlsAcceptor,
        stream: TcpStream,
        gw: Arc<Gateway>,
        peer: SocketAddr,
        drain: Drain,
    ) {
        let Some(tls_stream) = handshake(&acceptor, stream, peer).await else {
            return;
        };
        let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
        self.serve(tls_stream, h2, gw, peer, drain).await;
    }
}

/// Why [`until_cut`] stopped polling a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// It ended.
    Ended,
    /// The drain reached its cut.
    Cut,
    /// No request head came within the header read timeout; `served` when a request was
    /// served on it before, `blocked` when the end of the last response is still waiting
    /// for the client to read it.
    NoHead { served: bool, blocked: bool },
}

/// Polls an HTTP/1.1 connection until it ends, the drain reaches its cut, or it has waited
/// the header read timeout for a request head (`timer`): since it started, or since its last
/// response was out.
///
/// The phase is polled only when it moved. Its `changed()` future, once polled, keeps the
/// task's waker until the phase moves; polling it again on every wake-up of a busy
/// connection (three per request) cost ~470 instructions per request, about 1 % of one
/// (`benches/instructions.sh`). A second receiver answers "did it move?" with one load.
///
/// The head's timer is one per connection; requests tell their [`HeadClock`] when they
/// start and end.
async fn until_cut<C: Future>(
    mut conn: Pin<&mut C>,
    phase: &mut watch::Receiver<Phase>,
    mut timer: HeadTimer<'_>,
) -> Stop {
    loop {
        let moved = phase.clone();
        {
            // Outside the task's budget: the first poll must register the waker (a poll
            // refused for the budget would not, and the cut would go unseen).
            let mut changed = pin!(tokio::task::unconstrained(phase.changed()));
            let mut armed = false;
            let woke = poll_fn(|cx| {
                if conn.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(Stop::Ended));
                }
                if let Poll::Ready(stop) = timer.poll_overdue(cx) {
                    return Poll::Ready(Err(stop));
                }
                if !armed || moved.has_changed().unwrap_or(true) {
                    armed = true;
                    if let Poll::Ready(r) = changed.as_mut().poll(cx) {
                        return Poll::Ready(Ok(r.is_ok()));
                    }
                }
                Poll::Pending
            })
            .await;
            match woke {
                Err(stop) => return stop,
                Ok(false) => return Stop::Cut,
                Ok(true) => {}
            }
        }
        if *phase.borrow() == Phase::Cut {
            return Stop::Cut;
        }
    }
}

/// The timer of an HTTP/1.1 connection's wait for a request head: one per connection,
/// looked at only when it fired (one load per wake-up), then set again to when the wait that
/// is running now would be over. A request served past the timeout lets it go (an open
/// stream holds no timer: 112 bytes less each); it is set again when that request ends,
/// which the connection's task sees in the same wake-up (the response ends in its poll).
struct HeadTimer<'a> {
    heads: &'a HeadClock,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The sleep holds the task's waker.
    registered: bool,
}

impl<'a> HeadTimer<'a> {
    fn new(heads: &'a HeadClock, timeout: Duration) -> HeadTimer<'a> {
        HeadTimer {
            heads,
            timeout,
            sleep: Some(Box::pin(tokio::time::sleep(timeout))),
            registered: false,
        }
    }

    /// `Ready(Stop::NoHead)` once the connection has waited the timeout for a request head.
    fn poll_overdue(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Stop> {
        loop {
            let Some(sleep) = self.sleep.as_mut() else {
                let HeadWait::Awaited { since, .. } = self.heads.wait() else {
                    return Poll::Pending;
                };
                let due = tokio::time::Instant::from_std(since + self.timeout);
                self.sleep = Some(Box::pin(tokio::time::sleep_until(due)));
                self.registered = false;
                continue;
            };
            if self.registered && !sleep.is_elapsed() {
                return Poll::Pending;
            }
            // Outside the task's budget, like the phase: a refused poll would not register.
            if pin!(tokio::task::unconstrained(sleep.as_mut()))
                .poll(cx)
                .is_pending()
            {
                self.registered = true;
                return Poll::Pending;
            }
            // The clock the requests' times are read on.
            let now = std::time::Instant::now();
            let due = match self.heads.wait() {
                HeadWait::Serving => None,
                HeadWait::Awaited {
                    since,
                    served,
                    blocked,
                } => {
                    let due = since + self.timeout;
                    if due <= now {
                        return Poll::Ready(Stop::NoHead { served, blocked });
                    }
                    Some(due)
                }
            };
            match due {
                Some(due) => sleep.as_mut().reset(tokio::time::Instant::from_std(due)),
                None => self.sleep = None,
            }
            self.registered = false;
        }
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Where the drain is, as every connection task watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// SIGTERM: no new connections; HTTP/2 connections get GOAWAY, HTTP/1.1 responses
    /// `Connection: close`.
    Draining,
    /// `server.shutdown_grace` is over: streams still open end with the `shutting_down`
    /// event, connections close.
    Cut,
}

/// What a connection task holds of the drain: the phase, and a sender whose drop tells the
/// drain that one more connection ended.
struct Drain {
    phase: watch::Receiver<Phase>,
    _open: mpsc::Sender<()>,
}

/// HTTP/2 keep-alive: a ping this often on a quiet connection, an answer within the timeout.
const H2_PING_EVERY: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Accepted streams a client may reset within [`RESET_WINDOW`] before its connection gets
/// GOAWAY (each one was sent upstream before the client cancelled it).
const MAX_CLIENT_RESETS: u32 = 200;
const RESET_WINDOW: Duration = Duration::from_secs(10);
/// After a GOAWAY ezgate sent of its own (idle, resets), how long its client gets to answer
/// it (h2 waits for the answer to the PING sent with the GOAWAY) before ezgate drops the
/// connection, once no stream is open.
const GOAWAY_ANSWER_WAIT: Duration = Duration::from_secs(1);
/// After the cut, how long the final events get to reach clients before the process exits.
const CUT_FLUSH: Duration = Duration::from_secs(2);

/// Streams one client connection may have open at once over HTTP/2.
const MAX_STREAMS: u32 = 1000;

/// What a plain connection's first bytes say.
enum FirstBytes {
    Http1,
    Http2,
    /// Closed, failed, or silent past the header read timeout.
    Nothing,
}

/// Looks at the first bytes without taking them: the HTTP/2 preface, or anything else.
async fn first_bytes(stream: &TcpStream, within: Duration) -> FirstBytes {
    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let look = async {
        let mut buf = [0u8; 24];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return FirstBytes::Nothing,
                Ok(n) if buf[..n] != PREFACE[..n] => return FirstBytes::Http1,
                Ok(24) => return FirstBytes::Http2,
                // A beginning of the preface, split by the network (rare): the bytes stay
                // readable, so peeking again at once would spin; look again shortly.
                Ok(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    };
    // The same bound as on the headers that follow: a slow client gets at most twice it.
    tokio::time::timeout(within, look)
        .await
        .unwrap_or(FirstBytes::Nothing)
}

/// Accepts proxy connections until `shutdown` resolves, then drains: `/readyz` turns 503,
/// the listener closes, open connections get `grace` to finish their requests; streams still
/// open then end with the `shutting_down` event before their connections close.
pub async fn serve_proxy(
    gw: Arc<Gateway>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let (phase_tx, phase) = watch::channel(Phase::Serving);
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    let builders = Arc::new(Builders::new(&gw.state().settings));
    tokio::pin!(shutdown);
    let mut failing = AcceptFailures::default();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    failing.recovered();
                    conn
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning
                    // (the pending connections wait in the backlog), still watching for
                    // the shutdown.
                    let pause = failing.failed(&e);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let drain = Drain {
            phase: phase.clone(),
            _open: open_tx.clone(),
        };
        let b = Arc::clone(&builders);
        let gw = Arc::clone(&gw);
        match &tls {
            None => tokio::spawn(b.serve_plain(stream, gw, peer, drain)),
            Some(acceptor) => tokio::spawn(b.serve_tls(acceptor.clone(), stream, gw, peer, drain)),
        };
    }
    gw.drain();
    drop(listener);
    drop(open_tx);
    let _ = phase_tx.send(Phase::Draining);
    tracing::info!(grace = ?grace, "shutting down: listener closed, draining in-flight requests");
    // `recv` returns `None` once every connection task has dropped its sender; WebSocket
    // sessions, which outlive their connection's task, are counted by the gateway.
    if tokio::time::timeout(grace, all_ended(&mut open_rx, &gw))
        .await
        .is_ok()
    {
        tracing::info!("all connections finished");
        return;
    }
    tracing::warn!(grace = ?grace, "server.shutdown_grace elapsed; ending the streams still open with a shutting_down event and the WebSocket sessions with a close frame");
    gw.cut_streams();
    let _ = phase_tx.send(Phase::Cut);
    if tokio::time::timeout(CUT_FLUSH, all_ended(&mut open_rx, &gw))
        .await
        .is_err()
    {
        tracing::warn!("closing the connections still open");
    }
}

/// A burst of failed accepts (EMFILE, ENFILE, ENOBUFS…): logged once when it starts and
/// once when it ends, with a pause that doubles from 10 ms to 1 s between attempts.
#[derive(Default)]
struct AcceptFailures {
    count: u64,
    pause: Duration,
}

impl AcceptFailures {
    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    const MAX_PAUSE: Duration = Duration::from_secs(1);

    /// One more failure; how long to wait before accepting again.
    fn failed(&mut self, e: &std::io::Error) -> Duration {
        if self.count == 0 {
            tracing::warn!(error = %e, "accepting connections failed (out of file descriptors? raise LimitNOFILE / ulimit -n); backing off until it works again");
            self.pause = Self::FIRST_PAUSE;
        } else {
            self.pause = (self.pause * 2).min(Self::MAX_PAUSE);
        }
        self.count += 1;
        self.pause
    }

    /// An accept worked again: the end of a burst is logged.
    fn recovered(&mut self) {
        if self.count > 0 {
            tracing::info!(failures = self.count, "accepting connections again");
            self.count = 0;
        }
    }
}

/// Resolves once every connection task and every WebSocket session has ended.
async fn all_ended(open: &mut mpsc::Receiver<()>, gw: &Gateway) {
    while open.recv().await.is_some() {}
    gw.sessions_ended().await;
}

async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Serves the admin listener (`/metrics`, `/healthz`, `/readyz`) until the task is dropped.
pub async fn serve_admin(gw: Arc<Gateway>, listener: TcpListener) {
    let builder = {
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        b
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let gw = Arc::clone(&gw);
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| crate::admin::serve(Arc::clone(&gw), req));
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

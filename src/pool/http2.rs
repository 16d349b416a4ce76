//! HTTP/2 connections shared by streams, up to what the upstream allows on each, and the
//! requests that wait for a connection another request is opening.

use std::future::{poll_fn, Future};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use hyper::client::conn::http2;

use super::RequestBody;
use super::{BoxError, Conn, Pool, Shared, UpstreamIo};

/// Streams an HTTP/2 connection is assumed to allow until the upstream's SETTINGS say (the
/// least RFC 9113 recommends servers allow).
const DEFAULT_MAX_STREAMS: usize = 100;

#[derive(Default)]
pub(super) struct Opening {
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
pub(super) struct OpeningGuard<'a>(&'a Shared);

impl Drop for OpeningGuard<'_> {
    fn drop(&mut self) {
        self.0.opening().connects -= 1;
        self.0.opened.notify_waiters();
    }
}

/// A shared HTTP/2 connection.
pub(super) struct H2 {
    pub(super) tx: http2::SendRequest<RequestBody>,
    pub(super) load: Arc<H2Load>,
}

pub(super) struct H2Load {
    /// Streams open on the connection: requests sent whose response bodies have not ended.
    pub(super) streams: AtomicUsize,
    /// How many the upstream allows at once, as its latest SETTINGS said.
    max: AtomicUsize,
    /// The sweeper tick when its last stream ended.
    pub(super) since: AtomicU64,
}

/// One open stream of a shared HTTP/2 connection; dropping it frees the place.
pub(super) struct Stream {
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
    /// For a request that found every connection full: with an HTTP/2 upstream, a place on a
    /// connection another request is opening, as long as that connection can be expected to
    /// take it (the streams it may carry are promised to the first waiters); else the duty
    /// to open one (`Err`), registered under the same lock that waiters check, so that two
    /// requests never both decide to open the first connection. The guard is `None` when no
    /// HTTP/2 is expected: nobody waits for an HTTP/1.1 connection.
    pub(super) async fn place_or_open(self: &Arc<Self>) -> Result<Conn, Option<OpeningGuard<'_>>> {
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
    pub(super) fn h2_stream(self: &Arc<Self>) -> Option<Conn> {
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
}

impl Pool {
    /// The HTTP/2 handshake on a new connection, whose I/O then runs on a task of its own.
    pub(super) async fn handshake_h2(&self, io: UpstreamIo) -> Result<Conn, BoxError> {
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
        Ok(Conn::H2(tx, stream))
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use http::uri::PathAndQuery;
    use http::{Request, Response};
    use http_body_util::BodyExt;
    use tokio::net::TcpListener;

    use super::RequestBody;
    use crate::pool::tests::{get, pool_with, tls_upstream, tls_upstream_with, upstream_h2};
    use crate::pool::{BoxError, ConnectError, Pool, UpstreamBody};

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
                    pool.send(req, PathAndQuery::from_static("/"), None).await
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
    async fn up_to_http2_above_in_flight_go_over_http1_and_beyond_over_http2_streams() {
        // The upstream offers both; the pool carries up to two requests in flight on HTTP/1.1.
        let (pool, accepted) = tls_upstream_with(&[b"h2", b"http/1.1"], 2).await;
        let mut open = Vec::new();
        for _ in 0..2 {
            open.push(get(&pool, "/").await.into_body());
        }
        assert!(pool.h2_streams().is_empty(), "two in flight: HTTP/1.1");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        for _ in 0..3 {
            open.push(get(&pool, "/").await.into_body());
        }
        assert_eq!(pool.h2_streams(), [3], "beyond two: one HTTP/2 connection");
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        read_all(open).await;
        assert_eq!(pool.idle_count(), 2);
        // Few in flight again: an idle HTTP/1.1 connection, not the HTTP/2 one (left to be
        // swept when idle).
        let body = get(&pool, "/").await.into_body();
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(pool.h2_streams(), [0]);
        read_all(vec![body]).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_upstream_that_refuses_http1_by_alpn_is_offered_h2_from_then_on() {
        let (pool, accepted) = tls_upstream_with(&[b"h2"], 2).await;
        let first = get(&pool, "/").await.into_body();
        let second = get(&pool, "/").await.into_body();
        assert_eq!(pool.h2_streams(), [2]);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "one handshake refused, then one HTTP/2 connection"
        );
        read_all(vec![first, second]).await;
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
}

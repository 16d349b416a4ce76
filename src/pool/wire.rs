//! ezgate's HTTP/1.1 client: one request at a time on a pooled connection, written and read
//! by the request's own task.
//!
//! hyper's client runs each connection on a task of its own and hands every request to it
//! through a channel: three hand-overs between two tasks per request (the request, the
//! response head, the body), each a wake-up, plus a read buffer reallocated per message. With
//! a TLS upstream that was most of what ezgate spent above nginx per request
//! (docs/performance.md, "The fourth round"). Here the request's future writes the request and
//! reads the response head; the response body, polled by the client connection's task, reads
//! the rest from the socket itself. The read buffer is the connection's, kept across requests.
//!
//! What it reads is RFC 9112's: a response head parsed by `httparse` (at most 100 headers and
//! hyper's 408 KiB), `1xx` answers skipped, the body framed by `Transfer-Encoding` (chunked
//! last, else read to the close), then `Content-Length` (all values equal), else to the
//! close; a `HEAD` request's, `204`'s and `304`'s body is empty. A response whose framing is
//! ambiguous (both headers) or read to the close leaves its connection unpooled. A response
//! that arrives while the request body is still being sent does not stop it: the response
//! body writes the rest as it reads (an upstream may stream its answer while it reads the
//! request, as an echo does), and its connection is pooled once both ended. WebSocket
//! handshakes keep hyper's client (`upgrade.rs`).
//!
//! Where things are: the connection and the exchange up to the response head here; the
//! request's head and body in `send.rs`; the response head in `head.rs`; the response body
//! in `decode.rs`.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderValue;
use http::uri::PathAndQuery;
use http::{Method, Request, Response};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep};

use super::decode::{Framing, OwnBody};
use super::head::{parse_head, Head, Parsed};
use super::send::{is_write_error, Sender};
use super::{BoxError, RequestBody, UpstreamIo};

/// What a connection reads at a time (hyper's initial read buffer).
const READ_CHUNK: usize = 8 * 1024;
/// The largest response head (hyper's default limit of its read buffer).
pub(super) const MAX_HEAD: usize = 8192 + 4096 * 100;

/// The upstream's HTTP/1.1 was not HTTP: a malformed head, framing or chunk.
#[derive(Debug)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Malformed {}

/// No response head within the deadline the request was sent with.
#[derive(Debug)]
pub struct ResponseTimedOut;

impl std::fmt::Display for ResponseTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no response headers before the deadline")
    }
}

impl std::error::Error for ResponseTimedOut {}

pub(super) fn malformed(what: impl Into<String>) -> BoxError {
    Box::new(Malformed(what.into()))
}

/// The upstream closed the connection before its response was complete.
pub(super) fn closed_early() -> BoxError {
    Box::new(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "connection closed before message completed",
    ))
}

/// An HTTP/1.1 connection to the upstream.
pub(super) struct H1Conn {
    io: TokioIo<UpstreamIo>,
    /// Read and not yet consumed; its allocation is reused by the next response once the
    /// last one's bytes are dropped.
    pub(super) rd: BytesMut,
    /// The request head (and a small body) being written.
    pub(super) wr: Vec<u8>,
    /// The response timeout of the exchanges on this connection, one timer reset per
    /// exchange: tokio moves a registered timer's deadline later with one compare-and-swap,
    /// where a timer per exchange was registered and cancelled under the timer wheel's lock
    /// each time (~420 instructions per request). `None` while an exchange has no deadline.
    timer: Option<Pin<Box<Sleep>>>,
}

impl H1Conn {
    pub(super) fn new(io: UpstreamIo) -> H1Conn {
        H1Conn {
            io: TokioIo::new(io),
            rd: BytesMut::new(),
            wr: Vec::new(),
            timer: None,
        }
    }

    /// Reads what the upstream sent into `rd`; `Ok(0)` is the end of the connection.
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rd.capacity() - self.rd.len() < READ_CHUNK / 8 {
            self.rd.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rd)
    }

    /// Whether an idle connection can carry a request: the upstream has neither closed it
    /// nor sent anything unasked. Reads without waiting, and only when the socket is not
    /// known to have nothing to read (the read, through TLS, is ~500 instructions; asking the
    /// socket ~50).
    pub(super) fn is_open(&mut self) -> bool {
        if !self.rd.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        self.quiet(&mut cx) || self.poll_fill(&mut cx).is_pending()
    }

    /// The socket is not readable (no bytes, no end) as far as the runtime knows, and TLS
    /// holds no bytes read before.
    fn quiet(&self, cx: &mut Context<'_>) -> bool {
        let tcp = match &**self.io.inner() {
            MaybeHttpsStream::Http(tcp) => tcp.inner(),
            MaybeHttpsStream::Https(tls) => {
                let (io, session) = tls.inner().get_ref();
                // A session with plaintext waiting does not want to read.
                if !session.wants_read() {
                    return false;
                }
                io.inner().inner()
            }
        };
        tcp.poll_read_ready(cx).is_pending()
    }

    /// Writes `wr` from `*from` on; `from` counts what was written.
    pub(super) fn poll_write_all(
        &mut self,
        from: &mut usize,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        poll_write_from(&mut self.io, &self.wr, from, cx)
    }

    /// Writes `b`, which keeps what is not written yet.
    pub(super) fn poll_write_bytes(
        &mut self,
        b: &mut Bytes,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let mut written = 0;
        let polled = poll_write_from(&mut self.io, b, &mut written, cx);
        b.advance(written);
        polled
    }

    pub(super) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

/// Writes `buf` from `*at` on, advancing `at` by what was written.
fn poll_write_from(
    io: &mut TokioIo<UpstreamIo>,
    buf: &[u8],
    at: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while *at < buf.len() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, &buf[*at..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *at += n;
    }
    Poll::Ready(Ok(()))
}

/// One exchange on a connection: resolves with the response head, its body reading the
/// rest from the connection.
pub(super) struct Exchange {
    conn: Option<H1Conn>,
    /// What is left to write of the request; `None` once all of it is written.
    sender: Option<Sender>,
    /// Writing failed; kept to report if no response can be read either.
    write_error: Option<BoxError>,
    head_request: bool,
}

impl Exchange {
    /// Starts sending `req` for `path` (origin form) on `conn`, with `host`; with a
    /// `deadline`, the response head must arrive before it ([`ResponseTimedOut`]).
    pub(super) fn new(
        mut conn: H1Conn,
        req: Request<RequestBody>,
        path: &PathAndQuery,
        host: &HeaderValue,
        deadline: Option<Instant>,
    ) -> Exchange {
        match (deadline, conn.timer.as_mut()) {
            (Some(at), Some(timer)) => timer.as_mut().reset(at),
            (Some(at), None) => conn.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            (None, _) => conn.timer = None,
        }
        let (parts, body) = req.into_parts();
        let sender = Sender::new(&mut conn, &parts, body, path, host);
        Exchange {
            conn: Some(conn),
            sender: Some(sender),
            write_error: None,
            head_request: parts.method == Method::HEAD,
        }
    }
}

impl std::future::Future for Exchange {
    type Output = Result<Response<OwnBody>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(mut conn) = this.conn.take() else {
            return Poll::Ready(Err("the exchange was polled after it ended".into()));
        };
        let (head, framing, keep) = match this.drive(&mut conn, cx) {
            Poll::Ready(done) => done?,
            Poll::Pending => {
                // Outside the task's budget: a read that used it up must not hide a deadline
                // that passed (an upstream that keeps sending `1xx` answers would never be
                // timed out), as `tokio::time::timeout` polls its timer too.
                let fired = |t: &mut Pin<Box<Sleep>>| {
                    Pin::new(&mut tokio::task::coop::unconstrained(t.as_mut()))
                        .poll(cx)
                        .is_ready()
                };
                if conn.timer.as_mut().is_some_and(fired) {
                    // The connection goes with the exchange: its answer may still come.
                    return Poll::Ready(Err(Box::new(ResponseTimedOut)));
                }
                this.conn = Some(conn);
                return Poll::Pending;
            }
        };
        // An answer before the whole request left: the body writes the rest.
        let sender = this.sender.take().map(Box::new);
        let mut resp = Response::new(OwnBody::new(conn, framing, keep, sender));
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        Poll::Ready(Ok(resp))
    }
}

impl Exchange {
    fn drive(
        &mut self,
        conn: &mut H1Conn,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(Head, Framing, bool), BoxError>> {
        loop {
            if let Some(sender) = self.sender.as_mut() {
                match sender.poll_send(conn, cx) {
                    Poll::Ready(Ok(())) => self.sender = None,
                    // A failed write may still be followed by the upstream's answer (a 413
                    // before it read the whole body), so read on.
                    Poll::Ready(Err(e)) if is_write_error(&e) => {
                        self.sender = None;
                        self.write_error = Some(e);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            match parse_head(&mut conn.rd, self.head_request)? {
                Some(Parsed::Interim) => continue,
                Some(Parsed::Final(head, framing, keep)) => {
                    let keep = keep && self.write_error.is_none();
                    return Poll::Ready(Ok((head, framing, keep)));
                }
                None => {}
            }
            if conn.rd.len() >= MAX_HEAD {
                return Poll::Ready(Err(malformed(format!(
                    "the response head is larger than {MAX_HEAD} bytes"
                ))));
            }
            match conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(self.write_error.take().unwrap_or_else(closed_early)))
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(self.write_error.take().unwrap_or(Box::new(e))))
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;

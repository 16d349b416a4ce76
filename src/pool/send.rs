//! The request as ezgate's HTTP/1.1 client (`wire.rs`) writes it: the head, framed for this
//! hop (`Content-Length` when the body's length is known, else chunked), then the body as it
//! comes. Until the upstream answers the request future drives it; after an early answer the
//! response body does (an upstream may stream its answer while it still reads the request).

use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::PathAndQuery;
use http::{request, Method};
use http_body::Body;

use super::wire::H1Conn;
use super::{BoxError, RequestBody};

/// A request body frame up to this size is copied behind the head, so that both leave in
/// one write; a larger one is written from its own buffer.
const COALESCE: usize = 16 * 1024;
/// The most write buffer a connection keeps between requests.
const KEPT_WRITE_BUFFER: usize = 4 * 1024;

/// What is left to write of a request.
pub(super) struct Sender {
    /// The request body still to send; `None` once it ended.
    body: Option<RequestBody>,
    chunked: bool,
    /// Bytes of a `Content-Length` body still to send.
    left: Option<u64>,
    /// How much of the connection's write buffer is written.
    written: usize,
    /// A large body frame being written from its own buffer, then the chunk's end.
    big: Bytes,
    trail: Bytes,
}

impl Sender {
    /// Writes the head of a request for `path` (origin form) with `host` into `conn`'s
    /// write buffer; the sender writes it, then `body`.
    pub(super) fn new(
        conn: &mut H1Conn,
        parts: &request::Parts,
        body: RequestBody,
        path: &PathAndQuery,
        host: &HeaderValue,
    ) -> Sender {
        let exact = body.size_hint().exact();
        // A body of known length (held by ezgate, or the client's with its Content-Length)
        // says so; an empty one only where the method has a body; any other is chunked.
        let length = match exact {
            Some(0)
                if !parts.headers.contains_key(CONTENT_LENGTH)
                    && !matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) =>
            {
                None
            }
            other => other,
        };
        let chunked = exact.is_none();
        let wr = &mut conn.wr;
        wr.clear();
        wr.extend_from_slice(parts.method.as_str().as_bytes());
        wr.push(b' ');
        wr.extend_from_slice(path.as_str().as_bytes());
        wr.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        wr.extend_from_slice(host.as_bytes());
        wr.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            // The framing is this hop's, and `Host` the upstream's.
            if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == HOST {
                continue;
            }
            wr.extend_from_slice(name.as_str().as_bytes());
            wr.extend_from_slice(b": ");
            wr.extend_from_slice(value.as_bytes());
            wr.extend_from_slice(b"\r\n");
        }
        if let Some(n) = length {
            wr.extend_from_slice(b"content-length: ");
            wr.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            wr.extend_from_slice(b"\r\n");
        } else if chunked {
            wr.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        wr.extend_from_slice(b"\r\n");
        Sender {
            body: (exact != Some(0)).then_some(body),
            chunked,
            left: exact,
            written: 0,
            big: Bytes::new(),
            trail: Bytes::new(),
        }
    }

    /// Queues a frame of the request body behind what is not yet written.
    fn queue(&mut self, conn: &mut H1Conn, data: Bytes) -> Result<(), BoxError> {
        if let Some(left) = &mut self.left {
            *left = left.checked_sub(data.len() as u64).ok_or_else(|| {
                BoxError::from("the request body is longer than its Content-Length")
            })?;
        }
        if data.is_empty() {
            return Ok(());
        }
        if self.chunked {
            let _ = write!(conn.wr, "{:x}\r\n", data.len());
        }
        if conn.wr.len() - self.written + data.len() <= COALESCE {
            conn.wr.extend_from_slice(&data);
            if self.chunked {
                conn.wr.extend_from_slice(b"\r\n");
            }
        } else {
            self.big = data;
            if self.chunked {
                self.trail = Bytes::from_static(b"\r\n");
            }
        }
        Ok(())
    }

    fn end_body(&mut self, conn: &mut H1Conn) -> Result<(), BoxError> {
        // The body, and its share of the buffered bytes, go as soon as it ended.
        self.body = None;
        if matches!(self.left, Some(n) if n > 0) {
            return Err("the request body ended before its Content-Length".into());
        }
        if self.chunked {
            conn.wr.extend_from_slice(b"0\r\n\r\n");
        }
        Ok(())
    }

    /// Writes the request: the head, then the body as it comes. Ready when all of it is
    /// written and flushed. A failed write is an `io::Error`; anything else is the request
    /// body's own failure (too large, too slow, the client gone).
    pub(super) fn poll_send(
        &mut self,
        conn: &mut H1Conn,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), BoxError>> {
        loop {
            // Take the body's frames while they are ready and little is queued.
            let mut waiting = false;
            if self.big.is_empty() && conn.wr.len() - self.written < COALESCE {
                if let Some(body) = self.body.as_mut() {
                    match Pin::new(body).poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            // Request trailers are not sent on.
                            if let Ok(data) = frame.into_data() {
                                self.queue(conn, data)?;
                            }
                            continue;
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                        Poll::Ready(None) => {
                            self.end_body(conn)?;
                            continue;
                        }
                        Poll::Pending => waiting = true,
                    }
                }
            }
            ready!(conn.poll_write_all(&mut self.written, cx))?;
            conn.wr.clear();
            self.written = 0;
            ready!(conn.poll_write_bytes(&mut self.big, cx))?;
            ready!(conn.poll_write_bytes(&mut self.trail, cx))?;
            if self.body.is_none() || waiting {
                ready!(conn.poll_flush(cx))?;
                if self.body.is_some() {
                    return Poll::Pending;
                }
                // A large head or body leaves no large buffer behind for the connection's
                // life (a stream's, say).
                if conn.wr.capacity() > KEPT_WRITE_BUFFER {
                    conn.wr = Vec::new();
                }
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Whether a sender's failure is the connection's (a write failed), not the request body's.
pub(super) fn is_write_error(e: &BoxError) -> bool {
    e.is::<io::Error>()
}

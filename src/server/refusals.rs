//! hyper answers a request head it cannot parse by itself, before ezgate sees a request: a
//! status line and `content-length: 0` (400 for a malformed head, 431 for one over the size
//! limit, 414 for a request target too long). This layer on an HTTP/1.1 connection's
//! socket puts such an answer into the error schema: it recognises hyper's bytes (ezgate's
//! own 4xx responses always have a JSON body, so a 4xx head with `content-length: 0` and no
//! content type can only be hyper's) and writes the schema response in their place. The
//! refusal is counted and logged like any request, as route `other`, method `other`.
//!
//! It also tells the connection's [`HeadClock`] when its bytes cannot go out (the client is
//! not reading), and when they go out again: the wait for the next request head starts once
//! the last response is out.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::CONNECTION;
use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::errors::{self, GatewayError, Source};
use crate::exchange::Exchange;
use crate::gateway::{Gateway, HeadClock};
use crate::route::Route;

pub struct Refusals<I> {
    io: I,
    gw: Arc<Gateway>,
    /// The schema response being written in place of hyper's, and how much is out.
    pending: Option<Box<(Bytes, usize)>>,
    /// A `101 Switching Protocols` went out: the connection carries a WebSocket now.
    switched: bool,
    heads: Arc<HeadClock>,
}

impl<I> Refusals<I> {
    pub fn new(io: I, gw: Arc<Gateway>, heads: Arc<HeadClock>) -> Refusals<I> {
        Refusals {
            io,
            gw,
            pending: None,
            switched: false,
            heads,
        }
    }

    /// Tells the connection's clock whether its bytes go out (`pending`: they could not;
    /// `went_out`: some did). Only a change is told, so a connection whose writes go out at
    /// once pays a load and a branch.
    fn track(&self, pending: bool, went_out: bool) {
        let blocked = self.heads.is_write_blocked();
        if pending && !blocked {
            self.heads.write_blocked();
        } else if went_out && blocked {
            self.heads.wrote_after_block();
        }
    }
}

/// The error for hyper's automatic response in `buf`, if `buf` is one.
fn automatic_refusal(buf: &[u8]) -> Option<GatewayError> {
    let head = buf.strip_prefix(b"HTTP/1.1 4")?;
    if !buf.ends_with(b"\r\n\r\n") || buf.len() > 512 {
        return None;
    }
    let lower = buf.to_ascii_lowercase();
    let find = |needle: &[u8]| lower.windows(needle.len()).any(|w| w == needle);
    if !find(b"\r\ncontent-length: 0\r\n") || find(b"\r\ncontent-type:") {
        return None;
    }
    Some(match head.get(..2)? {
        b"31" => GatewayError::HeadersTooLarge,
        b"14" => GatewayError::UriTooLong,
        _ => GatewayError::BadRequest(
            "the request line or a header could not be parsed (HTTP/1.1, RFC 9112)".into(),
        ),
    })
}

impl<I> Refusals<I> {
    /// The schema response for `err`, recorded as a request of its own.
    fn respond(&self, err: &GatewayError) -> Bytes {
        let mut out = Exchange::start(
            Arc::clone(&self.gw.metrics),
            self.gw.state().settings.config.log.access_log,
            crate::headers::new_request_id(),
            &http::Method::from_bytes(b"UNPARSED").unwrap_or_default(),
            Route::Other,
        );
        out.status = err.status().as_u16();
        out.source = Source::Gateway;
        out.gateway_error(err);
        out.finished = true;
        let (status, mut headers, body) = errors::render(err, &out.request_id);
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        let mut bytes = Vec::with_capacity(256 + body.len());
        bytes.extend_from_slice(b"HTTP/1.1 ");
        bytes.extend_from_slice(status.as_str().as_bytes());
        bytes.push(b' ');
        bytes.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        bytes.extend_from_slice(b"\r\n");
        for (name, value) in &headers {
            bytes.extend_from_slice(name.as_str().as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        bytes.extend_from_slice(&body);
        out.bytes_out = body.len() as u64;
        Bytes::from(bytes)
    }
}

impl<I: AsyncWrite + Unpin> Refusals<I> {
    /// Writes what is left of a schema response.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(p) = &mut self.pending {
            let (bytes, at) = &mut **p;
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &bytes[*at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *at += n;
            if *at == bytes.len() {
                self.pending = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Refusals<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> Refusals<I> {
    fn write_through(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if self.switched {
            return Pin::new(&mut self.io).poll_write(cx, buf);
        }
        if buf.starts_with(b"HTTP/1.1 101 ") {
            self.switched = true;
        }
        if let Some(err) = automatic_refusal(buf) {
            let bytes = self.respond(&err);
            self.pending = Some(Box::new((bytes, 0)));
            // hyper's bytes are taken; the schema's go out in their place.
            let _ = self.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn flush_through(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Refusals<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = self.write_through(cx, buf);
        self.track(r.is_pending(), matches!(r, Poll::Ready(Ok(n)) if n > 0));
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = self.flush_through(cx);
        self.track(r.is_pending(), matches!(r, Poll::Ready(Ok(()))));
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::HeadWait;

    #[tokio::test]
    async fn the_clock_hears_when_bytes_cannot_go_out_and_when_they_go_out_again() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let settings =
            crate::config::Settings::load(None, &crate::config::Overrides::default(), &|_| None)
                .unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new(std::iter::empty()).unwrap());
        let state = crate::gateway::State::build(settings, &metrics, None).unwrap();
        let gw = Arc::new(Gateway::new(state, metrics));
        let heads = Arc::new(HeadClock::new());
        let blocked = |heads: &HeadClock| match heads.wait() {
            HeadWait::Awaited { blocked, since, .. } => (blocked, since),
            HeadWait::Serving => panic!("no request is in service"),
        };
        // A pipe that holds 16 bytes: the client reads nothing yet.
        let (near, mut far) = tokio::io::duplex(16);
        let mut io = Refusals::new(near, gw, Arc::clone(&heads));
        let (_, start) = blocked(&heads);
        let response = [b'x'; 24];
        assert_eq!(io.write(&response).await.unwrap(), 16);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(Pin::new(&mut io)
            .poll_write(&mut cx, &response[16..])
            .is_pending());
        assert!(blocked(&heads).0, "a write that cannot go out is told");
        // The client reads: the rest goes out, and the wait for a head starts again then.
        let mut got = [0u8; 16];
        far.read_exact(&mut got).await.unwrap();
        io.write_all(&response[16..]).await.unwrap();
        let (still, since) = blocked(&heads);
        assert!(!still);
        assert!(
            since > start,
            "the wait restarts when the last bytes go out"
        );
    }

    #[test]
    fn only_hypers_own_refusals_are_recognised() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 20:43:39 GMT\r\n\r\n";
        assert!(matches!(
            automatic_refusal(hyper_431),
            Some(GatewayError::HeadersTooLarge)
        ));
        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 20:43:39 GMT\r\n\r\n";
        assert!(matches!(
            automatic_refusal(hyper_400),
            Some(GatewayError::BadRequest(_))
        ));
        // ezgate's own responses, and anything with a body, pass.
        for ours in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 12\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
        ] {
            assert!(automatic_refusal(ours).is_none(), "{}", String::from_utf8_lossy(ours));
        }
    }
}

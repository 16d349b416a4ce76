//! The response body, which gives its connection back when it has been read to its end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::decode::OwnBody;
use super::http2::Stream;
use super::{BoxError, InFlight, Shared};

/// What a response body holds of its connection until its end.
pub(super) enum Back {
    /// Nothing more (the body ended, or failed).
    Done,
    /// The pool an HTTP/1.1 connection goes back to.
    H1(Arc<Shared>),
    /// A stream's place on a shared HTTP/2 connection, freed when dropped.
    H2 { _stream: Stream },
}

/// Where the body's bytes come from.
enum Source {
    /// hyper's client: HTTP/2 streams, WebSocket handshakes.
    Hyper(Incoming),
    /// ezgate's HTTP/1.1 client, reading the connection it holds.
    Own(OwnBody),
}

/// An upstream response body; its end returns the connection to the pool.
pub struct UpstreamBody {
    inner: Source,
    back: Back,
    /// Counts the request in flight until the body drops (under `http2_above`).
    _flight: Option<InFlight>,
}

impl UpstreamBody {
    pub(super) fn new(inner: Incoming, back: Back, flight: Option<InFlight>) -> UpstreamBody {
        UpstreamBody {
            inner: Source::Hyper(inner),
            back,
            _flight: flight,
        }
    }

    pub(super) fn own(inner: OwnBody, back: Back, flight: Option<InFlight>) -> UpstreamBody {
        let mut body = UpstreamBody {
            inner: Source::Own(inner),
            back,
            _flight: flight,
        };
        if body.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let (Back::H1(shared), Source::Own(body)) = (
            std::mem::replace(&mut self.back, Back::Done),
            &mut self.inner,
        ) {
            if let Some(conn) = body.take_conn() {
                shared.put_back(conn);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Source::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            Source::Own(b) => b.poll_frame(cx),
        };
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.is_end_stream() => this.release(),
            // An error: the connection is not reusable (it closes with the body).
            Poll::Ready(Some(Err(_))) => this.back = Back::Done,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Source::Hyper(b) => b.is_end_stream(),
            Source::Own(b) => b.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Source::Hyper(b) => b.size_hint(),
            Source::Own(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use http_body_util::BodyExt;

    use crate::pool::tests::{get, pool, upstream};

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
}

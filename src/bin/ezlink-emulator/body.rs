//! Response bodies: what handlers return ([`Payload`]), the one boxed body type, and the
//! wrapper every logged response leaves in ([`Tracked`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tokio::time::Sleep;

use crate::log::Guard;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// How long a deliberately failing body waits after its last good frame, so that frame
/// reaches the socket (HTTP/1) or the wire (HTTP/2 drops queued DATA on RST_STREAM)
/// before the abort.
pub const SETTLE_BEFORE_ABORT: Duration = Duration::from_millis(20);

/// What a handler produces; `finalize` encodes and tracks it.
pub enum Payload {
    /// A complete body, sent with `content-length`.
    Bytes(Bytes),
    /// A body produced frame by frame.
    Stream(Body),
}

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never: Infallible| -> BoxError { match never {} })
        .boxed_unsync()
}

/// A body sent as the given frames, without a length (chunked on HTTP/1.1).
pub struct Chunks(pub VecDeque<Bytes>);

impl HttpBody for Chunks {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// Sends `head`, then fails the body (the connection or stream is aborted).
pub struct ResetAfter {
    head: Option<Bytes>,
    length: u64,
    settle: Option<Pin<Box<Sleep>>>,
}

impl ResetAfter {
    /// `length` is the size the body claims to have (its `content-length`).
    pub fn new(head: Bytes, length: u64) -> Self {
        ResetAfter {
            head: Some(head),
            length,
            settle: None,
        }
    }
}

impl HttpBody for ResetAfter {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        let settle = self
            .settle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(SETTLE_BEFORE_ABORT)));
        match settle.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Some(Err("emulated reset mid-body".into()))),
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.length)
    }
}

/// The final response body: marks the log entry completed once the last frame was yielded.
/// Dropping it earlier (client gone, stream reset, emulated abort) marks it cancelled.
pub struct Tracked {
    inner: Body,
    guard: Option<Guard>,
}

impl Tracked {
    pub fn new(inner: Body, guard: Option<Guard>) -> Self {
        Tracked { inner, guard }
    }

    fn complete(&self) {
        if let Some(guard) = &self.guard {
            guard.complete();
        }
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.complete(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.complete(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // hyper may never poll a body that is already finished (an empty one).
        let end = self.inner.is_end_stream();
        if end {
            self.complete();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

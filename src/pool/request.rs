//! The request body ezgate sends upstream: the client's body streamed through a size cap,
//! an inactivity timeout and a total deadline, or a body ezgate holds (read whole, perhaps
//! spliced), sent in slices, with its share of `server.max_buffered_bytes` until it drops.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::buffers::Charge;
use crate::errors::BoxError;

/// The request body sent upstream: the client's body streamed through a size cap, an
/// inactivity timeout and a total deadline, or a body ezgate already holds.
pub struct RequestBody {
    inner: Inner,
    seen: u64,
    max: u64,
    /// Longest pause allowed between two frames of the client's body.
    idle: Duration,
    /// Longest time the whole client's body may take (`server.request_body_deadline`),
    /// counted from the first poll (when the upstream starts taking it: time the request
    /// spent waiting inside ezgate, for a limit or a queue, is not the client's), and the
    /// deadline that makes.
    total: Option<Duration>,
    until: Option<tokio::time::Instant>,
    /// Armed at the first pending poll (the pause or the deadline, whichever comes first),
    /// reset by every frame.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A held body's share of `server.max_buffered_bytes`, given back when it drops (once
    /// the upstream took it, or the exchange failed).
    _charge: Option<Charge>,
}

enum Inner {
    Stream(Incoming),
    /// A body ezgate holds, in up to three pieces sent in order (a body with a splice).
    Full {
        parts: [Bytes; 3],
        next: usize,
        left: u64,
    },
}

/// Largest frame of a body ezgate holds, as it is sent upstream.
const MAX_FRAME: usize = 64 * 1024;

/// The client's body went over `server.max_request_body` while streaming.
#[derive(Debug)]
pub struct BodyTooLarge(pub u64);

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request body exceeds {} bytes", self.0)
    }
}

impl StdError for BodyTooLarge {}

/// The client's body paused longer than `server.request_body_timeout`.
#[derive(Debug)]
pub struct BodyStalled(pub Duration);

impl fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the request body stalled for {:?}", self.0)
    }
}

impl StdError for BodyStalled {}

/// The client's body was still arriving at `server.request_body_deadline`.
#[derive(Debug)]
pub struct BodyTooSlow(pub Duration);

impl fmt::Display for BodyTooSlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the request body took longer than {:?}", self.0)
    }
}

impl StdError for BodyTooSlow {}

/// The client's body failed (the client went away mid-body): the client's fault, not the
/// upstream's.
#[derive(Debug)]
pub struct ClientBodyFailed(pub hyper::Error);

impl fmt::Display for ClientBodyFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the client's request body failed ({})", self.0)
    }
}

impl StdError for ClientBodyFailed {}

impl RequestBody {
    /// The client's body, streamed; refused past `max` bytes, a pause of `idle`, or when
    /// it is not complete `total` after it began to be sent.
    pub fn stream(body: Incoming, max: u64, idle: Duration, total: Duration) -> Self {
        RequestBody {
            inner: Inner::Stream(body),
            seen: 0,
            max,
            idle,
            total: Some(total),
            until: None,
            stall: None,
            _charge: None,
        }
    }

    /// The body keeps `charge` (its bytes of `server.max_buffered_bytes`) until it drops.
    pub fn holding(mut self, charge: Charge) -> Self {
        self._charge = Some(charge);
        self
    }

    pub fn full(bytes: Bytes) -> Self {
        Self::pieces([bytes, Bytes::new(), Bytes::new()])
    }

    /// A body made of `parts`, sent one after the other (a small one copied into one frame).
    pub fn pieces(parts: [Bytes; 3]) -> Self {
        let left: u64 = parts.iter().map(|p| p.len() as u64).sum();
        // A small body goes as one frame: one write upstream instead of three (copied only
        // when it is in pieces).
        let pieces = parts.iter().filter(|p| !p.is_empty()).count();
        let parts = if left <= MAX_FRAME as u64 && pieces > 1 {
            [Bytes::from(parts.concat()), Bytes::new(), Bytes::new()]
        } else {
            parts
        };
        RequestBody {
            inner: Inner::Full {
                parts,
                next: 0,
                left,
            },
            seen: 0,
            max: u64::MAX,
            idle: Duration::MAX,
            total: None,
            until: None,
            stall: None,
            _charge: None,
        }
    }
}

/// When a waiting stream gives up: after a pause of `idle`, or at the total deadline.
fn wake(idle: Duration, until: Option<tokio::time::Instant>) -> tokio::time::Instant {
    let paused = tokio::time::Instant::now() + idle;
    until.map_or(paused, |at| paused.min(at))
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let (None, Some(total)) = (this.until, this.total) {
            this.until = Some(tokio::time::Instant::now() + total);
        }
        match &mut this.inner {
            Inner::Full { parts, next, left } => {
                while let Some(part) = parts.get_mut(*next) {
                    if part.is_empty() {
                        *next += 1;
                        continue;
                    }
                    // In frames of at most 64 KiB (slices, not copies): hyper copies each
                    // frame into its write buffer, which it bounds only between frames.
                    let frame = part.split_to(part.len().min(MAX_FRAME));
                    *left -= frame.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(frame))));
                }
                Poll::Ready(None)
            }
            Inner::Stream(body) => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        this.seen += data.len() as u64;
                        if this.seen > this.max {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge(this.max)))));
                        }
                    }
                    if let Some(stall) = &mut this.stall {
                        stall.as_mut().reset(wake(this.idle, this.until));
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(ClientBodyFailed(e))))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => {
                    let (idle, until) = (this.idle, this.until);
                    let stall = this.stall.get_or_insert_with(|| {
                        Box::pin(tokio::time::sleep_until(wake(idle, until)))
                    });
                    match stall.as_mut().poll(cx) {
                        Poll::Ready(()) => match (until, this.total) {
                            (Some(at), Some(total)) if tokio::time::Instant::now() >= at => {
                                Poll::Ready(Some(Err(Box::new(BodyTooSlow(total)))))
                            }
                            _ => Poll::Ready(Some(Err(Box::new(BodyStalled(idle))))),
                        },
                        Poll::Pending => Poll::Pending,
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full { left, .. } => *left == 0,
            Inner::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full { left, .. } => SizeHint::with_exact(*left),
            Inner::Stream(body) => body.size_hint(),
        }
    }
}

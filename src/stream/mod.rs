//! The response body ezgate sends: the upstream's body passed through frame by frame, with
//! a stream idle timeout, token usage read on the way ([`sse`], [`usage`]), and — for a
//! stream that fails after it started — one final SSE error event instead of a silent cut.
//! Holds the request's [`Exchange`], so the request is settled and counted when the body
//! ends or is dropped.

pub mod sse;
pub mod usage;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::pool::UpstreamBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::errors::GatewayError;
use crate::errors::{BoxError, FailureKind};
use crate::exchange::Exchange;
use crate::limits::estimate::text_tokens;
use crate::upstream::classify;
use sse::{Pass, SseReader};

/// Most bytes of a JSON response kept to read its `usage` at the end.
const MAX_USAGE_JSON: usize = 4 << 20;

pub struct ResponseBody {
    inner: Inner,
    idle: Option<Idle>,
    scan: Scan,
    /// Set after an error event (or the held-back end of a stream) was sent: the next poll
    /// ends the body.
    ended: bool,
    outcome: Option<Box<Exchange>>,
    /// When the drain's grace is over, a stream ends with `shutting_down`.
    cut: Option<Box<Cut>>,
}

struct Cut {
    token: CancellationToken,
    wait: Pin<Box<WaitForCancellationFutureOwned>>,
}

enum Inner {
    Upstream(UpstreamBody),
    Full(Option<Bytes>),
}

struct Idle {
    timeout: Duration,
    /// Armed at the first pending poll: most small bodies never wait, and never pay for a timer.
    sleep: Option<Pin<Box<Sleep>>>,
    last: Instant,
}

/// How the body is read for usage, and how a failure mid-body is reported.
enum Scan {
    None,
    Sse(Box<SseReader>),
    Json(Vec<Bytes>, usize),
}

/// What to read from a passed-through body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    Nothing,
    /// `text/event-stream`: usage from the chunks, an error event if the stream breaks;
    /// `strip`: remove what ezgate's own usage request added (the client did not ask).
    Sse {
        strip: bool,
    },
    /// A JSON document with a `usage` member at the end.
    JsonUsage,
}

impl ResponseBody {
    /// A body ezgate made itself (an error, an admin page).
    pub fn full(bytes: Bytes) -> ResponseBody {
        ResponseBody {
            inner: Inner::Full(Some(bytes)),
            idle: None,
            scan: Scan::None,
            ended: false,
            outcome: None,
            cut: None,
        }
    }

    /// The upstream's body, passed through; `since` is when its headers arrived.
    pub fn upstream(
        body: UpstreamBody,
        idle_timeout: Duration,
        watch: Watch,
        since: std::time::Instant,
    ) -> ResponseBody {
        let scan = match watch {
            Watch::Nothing => Scan::None,
            Watch::Sse { strip } => Scan::Sse(Box::new(SseReader::new(strip))),
            Watch::JsonUsage => Scan::Json(Vec::new(), 0),
        };
        ResponseBody {
            inner: Inner::Upstream(body),
            idle: Some(Idle {
                timeout: idle_timeout,
                sleep: None,
                last: Instant::from_std(since),
            }),
            scan,
            ended: false,
            outcome: None,
            cut: None,
        }
    }

    /// Ends the stream with the `shutting_down` event once `token` is cancelled.
    pub fn end_at(&mut self, token: CancellationToken) {
        let wait = Box::pin(token.clone().cancelled_owned());
        self.cut = Some(Box::new(Cut { token, wait }));
    }

    /// Hands the request's outcome to the body; it is recorded when the body finishes.
    pub fn attach(&mut self, mut outcome: Box<Exchange>) {
        // hyper never polls a body that is empty from the start: it is complete as it is.
        if self.is_end_stream() {
            outcome.finished = true;
        }
        self.outcome = Some(outcome);
    }

    /// Moves what the body learnt (usage, model, how much content streamed) into the
    /// outcome.
    fn report(&mut self) {
        let Some(o) = self.outcome.as_deref_mut() else {
            return;
        };
        let (usage, model) = match std::mem::replace(&mut self.scan, Scan::None) {
            Scan::Sse(s) => {
                // A chunk is about one token; text packed denser is counted by its estimate.
                o.output_estimate = s.content_events.max(s.content.tokens());
                o.first_token = s.first_content;
                o.streamed = true;
                (s.usage, s.model)
            }
            Scan::Json(parts, len) if len > 0 => {
                let found = match parts.as_slice() {
                    [one] => usage::json_usage(one),
                    _ => usage::json_usage(&parts.concat()),
                };
                match found {
                    Some((u, m)) => (Some(u), m),
                    None => {
                        // Only what was not reported is estimated.
                        o.output_estimate = parts.iter().map(|p| text_tokens(p)).sum();
                        (None, None)
                    }
                }
            }
            _ => {
                // Nothing was read (an encoded body): a token is about four bytes of it, and
                // on a model route no less than the reservation (the usage is unknown).
                o.output_estimate = o.bytes_out.div_ceil(4);
                o.usage_unreadable = o.route.carries_tokens();
                (None, None)
            }
        };
        if usage.is_some() {
            o.usage = usage;
        }
        if o.model.is_none() {
            o.model.clone_from(&model);
        }
        o.response_model = model;
    }

    fn finish(&mut self) {
        self.ended = true;
        if let Some(o) = self.outcome.as_deref_mut() {
            o.ended = Some(std::time::Instant::now());
        }
        self.report();
        if let Some(o) = self.outcome.as_deref_mut() {
            o.finished = true;
        }
        // Dropping the outcome records the request now, not when hyper drops the body.
        self.outcome = None;
    }

    /// The upstream body failed or went silent. SSE gets a final error event; other bodies
    /// are aborted so the client sees an incomplete response, never a complete-looking one.
    fn fail(
        &mut self,
        err: GatewayError,
        kind: Option<FailureKind>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(o) = self.outcome.as_deref_mut() {
            o.gateway_error(&err);
            if kind.is_some() {
                o.upstream_failure = kind;
            }
        }
        // The request id lives in the outcome, which proxy::serve always attaches.
        let rid = self
            .outcome
            .as_deref()
            .map_or("unknown", |o| o.request_id.as_str())
            .to_owned();
        match &self.scan {
            Scan::Sse(s) => {
                let event = err.body(&rid).to_sse_event(s.at_boundary());
                self.finish();
                Poll::Ready(Some(Ok(Frame::data(event))))
            }
            _ => {
                self.report();
                if let Some(o) = self.outcome.as_deref_mut() {
                    o.finished = true;
                }
                self.ended = true;
                self.outcome = None;
                Poll::Ready(Some(Err(Box::new(err))))
            }
        }
    }

    /// Reads a data frame on its way; says what the client gets for it.
    fn observe(&mut self, data: &Bytes) -> Pass {
        let pass = match &mut self.scan {
            Scan::None => Pass::Frame,
            Scan::Sse(s) => s.feed(data),
            Scan::Json(parts, len) => {
                if *len + data.len() <= MAX_USAGE_JSON {
                    *len += data.len();
                    parts.push(data.clone());
                } else {
                    self.scan = Scan::None;
                }
                Pass::Frame
            }
        };
        if let Some(o) = self.outcome.as_deref_mut() {
            // Any other body: its first byte is its first token.
            if o.first_token.is_none() && !matches!(self.scan, Scan::Sse(_)) {
                o.first_token = Some(std::time::Instant::now());
            }
            o.bytes_out += match &pass {
                Pass::Frame => data.len(),
                Pass::Edited(b) => b.len(),
                Pass::Nothing => 0,
            } as u64;
        }
        pass
    }
}

impl ResponseBody {
    /// The upstream has nothing yet: fail the body once it has been silent for the idle
    /// timeout.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(idle) = &mut self.idle else {
            return Poll::Pending;
        };
        loop {
            let deadline = idle.last + idle.timeout;
            let sleep = idle
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            match sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if Instant::now() >= idle.last + idle.timeout => {
                    let t = idle.timeout;
                    return self.fail(
                        GatewayError::UpstreamTimeout(crate::errors::TimeoutPhase::Body, t),
                        Some(FailureKind::Timeout),
                    );
                }
                Poll::Ready(()) => continue,
            }
        }
    }

    /// The end of a stream that was held back (an event the upstream never finished).
    fn held_back(&mut self) -> Option<Bytes> {
        let rest = match &mut self.scan {
            Scan::Sse(s) => s.finish(),
            _ => None,
        }?;
        if let Some(o) = self.outcome.as_deref_mut() {
            o.bytes_out += rest.len() as u64;
        }
        Some(rest)
    }
}

/// A last data frame and the held-back bytes after it, as one frame.
fn join(frame: Frame<Bytes>, rest: Bytes) -> Bytes {
    match frame.into_data() {
        Ok(data) => [data, rest].concat().into(),
        Err(_) => rest,
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // The client left before the end: what streamed so far is what the request spent.
        if self.outcome.is_some() {
            self.report();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if this.cut.as_ref().is_some_and(|c| c.token.is_cancelled()) {
            return this.fail(GatewayError::ShuttingDown, None);
        }
        loop {
            let polled = match &mut this.inner {
                Inner::Full(b) => {
                    let next = b.take();
                    if let (Some(bytes), Some(o)) = (&next, this.outcome.as_deref_mut()) {
                        o.bytes_out += bytes.len() as u64;
                    }
                    // The only frame is the last: hyper will not poll again.
                    this.finish();
                    return Poll::Ready(next.map(|bytes| Ok(Frame::data(bytes))));
                }
                Inner::Upstream(body) => Pin::new(body).poll_frame(cx),
            };
            return match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    let is_end = matches!(&this.inner, Inner::Upstream(b) if b.is_end_stream());
                    let frame = match frame.into_data() {
                        Ok(data) => match this.observe(&data) {
                            Pass::Frame => Some(Frame::data(data)),
                            Pass::Edited(bytes) => Some(Frame::data(bytes)),
                            Pass::Nothing => None,
                        },
                        Err(frame) => Some(frame),
                    };
                    // hyper stops polling once the body says it has ended (known length).
                    if is_end {
                        let rest = this.held_back();
                        this.finish();
                        return Poll::Ready(match (frame, rest) {
                            (Some(f), None) => Some(Ok(f)),
                            (None, Some(r)) => Some(Ok(Frame::data(r))),
                            (Some(f), Some(r)) => Some(Ok(Frame::data(join(f, r)))),
                            (None, None) => None,
                        });
                    }
                    if let Some(idle) = &mut this.idle {
                        idle.last = Instant::now();
                    }
                    match frame {
                        Some(f) => Poll::Ready(Some(Ok(f))),
                        // Everything was held back or removed: read on.
                        None => continue,
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let failure = classify(&*e, Duration::ZERO);
                    let detail = match failure.error {
                        GatewayError::UpstreamBadResponse(d)
                        | GatewayError::UpstreamUnreachable(d) => d,
                        other => other.to_string(),
                    };
                    this.fail(
                        GatewayError::StreamInterrupted(detail),
                        Some(failure.kind.unwrap_or(FailureKind::Reset)),
                    )
                }
                Poll::Ready(None) => {
                    let rest = this.held_back();
                    this.finish();
                    Poll::Ready(rest.map(|r| Ok(Frame::data(r))))
                }
                Poll::Pending => {
                    if let Some(cut) = &mut this.cut {
                        if cut.wait.as_mut().poll(cx).is_ready() {
                            return this.fail(GatewayError::ShuttingDown, None);
                        }
                    }
                    this.poll_idle(cx)
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.ended {
            return true;
        }
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Upstream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            // An edited stream's length is not the upstream's.
            Inner::Upstream(_) if matches!(&self.scan, Scan::Sse(s) if s.strips()) => {
                SizeHint::default()
            }
            Inner::Upstream(body) if !self.ended => body.size_hint(),
            Inner::Upstream(_) => SizeHint::with_exact(0),
        }
    }
}

//! The response body ezgate sends: the upstream's body passed through frame by frame, with
//! a stream idle timeout, token usage read on the way, and — for a stream that fails after it
//! started — one final SSE error event instead of a silent cut. Holds the request's
//! [`Outcome`], so the request is counted when the body ends or is dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::pool::UpstreamBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::errors::GatewayError;
use crate::limits::scan;
use crate::outcome::{Outcome, Usage};
use crate::upstream::{classify, BoxError, FailureKind};

/// Most bytes of a JSON response kept to read its `usage` at the end.
const MAX_USAGE_JSON: usize = 4 << 20;

pub struct ResponseBody {
    inner: Inner,
    idle: Option<Idle>,
    scan: Scan,
    /// Set after an error event was sent: the next poll ends the body.
    ended: bool,
    outcome: Option<Box<Outcome>>,
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
    Sse(SseScan),
    Json(Vec<Bytes>, usize),
}

#[derive(Default)]
struct SseScan {
    carry: Vec<u8>,
    at_boundary: bool,
    usage: Option<Usage>,
    model: Option<String>,
}

/// What to read from a passed-through body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    Nothing,
    /// `text/event-stream`: usage from the chunks, an error event if the stream breaks.
    Sse,
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
            Watch::Sse => Scan::Sse(SseScan {
                at_boundary: true,
                ..SseScan::default()
            }),
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
        }
    }

    /// Hands the request's outcome to the body; it is recorded when the body finishes.
    pub fn attach(&mut self, mut outcome: Outcome) {
        // hyper never polls a body that is empty from the start: it is complete as it is.
        if self.is_end_stream() {
            outcome.finished = true;
        }
        self.outcome = Some(Box::new(outcome));
    }

    fn finish(&mut self) {
        self.ended = true;
        let usage_doc = match std::mem::replace(&mut self.scan, Scan::None) {
            Scan::Sse(s) => s.usage.map(|u| (u, s.model)),
            Scan::Json(parts, len) if len > 0 => match parts.as_slice() {
                [one] => json_usage(one),
                _ => json_usage(&parts.concat()),
            },
            _ => None,
        };
        if let Some(o) = self.outcome.as_deref_mut() {
            o.finished = true;
            if let Some((usage, model)) = usage_doc {
                o.usage = Some(usage);
                if o.model.is_none() {
                    o.model = model;
                }
            }
        }
        // Dropping the outcome records the request now, not when hyper drops the body.
        self.outcome = None;
    }

    /// The upstream body failed or went silent. SSE gets a final error event; other bodies
    /// are aborted so the client sees an incomplete response, never a complete-looking one.
    fn fail(
        &mut self,
        err: GatewayError,
        kind: FailureKind,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(o) = self.outcome.as_deref_mut() {
            o.gateway_error(&err);
            o.upstream_failure = Some(kind);
        }
        // The request id lives in the outcome, which proxy::serve always attaches.
        let rid = self
            .outcome
            .as_deref()
            .map_or("unknown", |o| o.request_id.as_str())
            .to_owned();
        match &self.scan {
            Scan::Sse(s) => {
                let event = err.body(&rid).to_sse_event(s.at_boundary);
                self.finish();
                Poll::Ready(Some(Ok(Frame::data(event))))
            }
            _ => {
                if let Some(o) = self.outcome.as_deref_mut() {
                    o.finished = true;
                }
                self.ended = true;
                self.outcome = None;
                Poll::Ready(Some(Err(Box::new(err))))
            }
        }
    }

    fn observe(&mut self, data: &Bytes) {
        if let Some(o) = self.outcome.as_deref_mut() {
            o.bytes_out += data.len() as u64;
        }
        match &mut self.scan {
            Scan::None => {}
            Scan::Sse(s) => s.feed(data),
            Scan::Json(parts, len) => {
                if *len + data.len() <= MAX_USAGE_JSON {
                    *len += data.len();
                    parts.push(data.clone());
                } else {
                    self.scan = Scan::None;
                }
            }
        }
    }
}

impl SseScan {
    fn feed(&mut self, data: &[u8]) {
        self.at_boundary = data.ends_with(b"\n\n")
            || data.ends_with(b"\r\n\r\n")
            || (data == b"\n" && self.carry.is_empty() && !self.at_boundary);
        let Some(last_nl) = data.iter().rposition(|&b| b == b'\n') else {
            self.carry.extend_from_slice(data);
            return;
        };
        let (complete, rest) = data.split_at(last_nl + 1);
        if self.carry.is_empty() {
            self.scan_lines(complete);
        } else {
            let mut joined = std::mem::take(&mut self.carry);
            joined.extend_from_slice(complete);
            self.scan_lines(&joined);
        }
        self.carry.clear();
        self.carry.extend_from_slice(rest);
    }

    fn scan_lines(&mut self, text: &[u8]) {
        for line in text.split(|&b| b == b'\n') {
            let Some(payload) = line.strip_prefix(b"data:") else {
                continue;
            };
            if finders().usage.find(payload).is_none() {
                continue;
            }
            // The same reader as for a JSON response: an SSE chunk is one JSON document.
            if let Some((usage, model)) = json_usage(payload.trim_ascii()) {
                self.usage = Some(usage);
                if model.is_some() {
                    self.model = model;
                }
            }
        }
    }
}

/// `usage` and `model` of a JSON response, read where their keys stand instead of parsing the
/// whole document. A key is `"name"` followed by `:`; inside a JSON string every quote is
/// escaped, so that byte pattern cannot come from string content.
fn json_usage(doc: &[u8]) -> Option<(Usage, Option<String>)> {
    // OpenAI writes `usage` last and `model` first: each is searched from that end.
    let f = finders();
    let (prompt, completion) = scan::usage_counts(value_after(
        doc,
        USAGE_KEY.len(),
        f.usage_rev.rfind_iter(doc),
    )?)?;
    let model = value_after(doc, MODEL_KEY.len(), f.model.find_iter(doc))
        .and_then(scan::string_at)
        .map(String::from);
    Some((Usage { prompt, completion }, model))
}

const USAGE_KEY: &[u8] = b"\"usage\"";
const MODEL_KEY: &[u8] = b"\"model\"";

/// Searchers for the keys, built once (building one costs more than a search).
struct Finders {
    usage: memchr::memmem::Finder<'static>,
    usage_rev: memchr::memmem::FinderRev<'static>,
    model: memchr::memmem::Finder<'static>,
}

fn finders() -> &'static Finders {
    static FINDERS: std::sync::OnceLock<Finders> = std::sync::OnceLock::new();
    FINDERS.get_or_init(|| Finders {
        usage: memchr::memmem::Finder::new(USAGE_KEY),
        usage_rev: memchr::memmem::FinderRev::new(USAGE_KEY),
        model: memchr::memmem::Finder::new(MODEL_KEY),
    })
}

/// The text after the first hit (in the iterator's order) that is a key (`"key":`): where
/// its value starts.
fn value_after(doc: &[u8], key_len: usize, mut hits: impl Iterator<Item = usize>) -> Option<&[u8]> {
    hits.find_map(|i| doc[i + key_len..].trim_ascii_start().strip_prefix(b":"))
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
        let polled = match &mut this.inner {
            Inner::Full(b) => {
                let next = b.take();
                match next {
                    Some(bytes) => {
                        if let Some(o) = this.outcome.as_deref_mut() {
                            o.bytes_out += bytes.len() as u64;
                        }
                        // The only frame is the last: hyper will not poll again.
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::data(bytes))));
                    }
                    None => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                }
            }
            Inner::Upstream(body) => Pin::new(body).poll_frame(cx),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.observe(data);
                }
                // hyper stops polling once the body says it has ended (known length).
                if matches!(&this.inner, Inner::Upstream(b) if b.is_end_stream()) {
                    this.finish();
                } else if let Some(idle) = &mut this.idle {
                    idle.last = Instant::now();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let failure = classify(&e, Duration::ZERO);
                let detail = match failure.error {
                    GatewayError::UpstreamBadResponse(d) | GatewayError::UpstreamUnreachable(d) => {
                        d
                    }
                    other => other.to_string(),
                };
                this.fail(
                    GatewayError::StreamInterrupted(detail),
                    failure.kind.unwrap_or(FailureKind::Reset),
                )
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(idle) = &mut this.idle else {
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
                            return this.fail(
                                GatewayError::UpstreamTimeout(crate::errors::TimeoutPhase::Body, t),
                                FailureKind::Timeout,
                            );
                        }
                        Poll::Ready(()) => continue,
                    }
                }
            }
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
            Inner::Upstream(body) if !self.ended => body.size_hint(),
            Inner::Upstream(_) => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_usage_across_frame_splits() {
        let mut s = SseScan {
            at_boundary: true,
            ..SseScan::default()
        };
        s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        assert!(s.at_boundary);
        s.feed(b"data: {\"model\":\"gpt-4o\",\"choices\":[],\"usa");
        assert!(!s.at_boundary);
        s.feed(b"ge\":{\"prompt_tokens\":12,\"completion_tokens\":5}}\n\ndata: [DONE]\n\n");
        assert_eq!(
            s.usage,
            Some(Usage {
                prompt: 12,
                completion: 5
            })
        );
        assert_eq!(s.model.as_deref(), Some("gpt-4o"));
        assert!(s.at_boundary);
    }

    #[test]
    fn json_usage_is_read_where_it_stands() {
        let doc = br#"{"id":"x","model":"gpt-4o","choices":[{"message":{"content":"say \"usage\": {} and \"model\":1"}}],"usage": {"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#;
        assert_eq!(
            json_usage(doc),
            Some((
                Usage {
                    prompt: 9,
                    completion: 3
                },
                Some("gpt-4o".into())
            ))
        );
        assert_eq!(json_usage(br#"{"usage":null}"#), None);
        assert_eq!(json_usage(br#"{"choices":[]}"#), None);
        assert_eq!(
            json_usage(br#"{"usage":{"input_tokens":4,"output_tokens":5}}"#),
            Some((
                Usage {
                    prompt: 4,
                    completion: 5
                },
                None
            ))
        );
        assert_eq!(json_usage(b"\"usage\":"), None);
    }

    #[test]
    fn null_usage_is_ignored() {
        let mut s = SseScan::default();
        s.feed(b"data: {\"usage\":null,\"choices\":[]}\n\n");
        assert_eq!(s.usage, None);
    }
}

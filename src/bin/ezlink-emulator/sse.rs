//! Streamed (`"stream": true`) chat and text completions: one SSE event per body frame,
//! produced on demand, with the stream faults (cut, stall, in-stream error event).

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use serde::Serialize;
use tokio::time::{Instant, Sleep};

use crate::api::{piece, Usage};
use crate::body::{BoxError, SETTLE_BEFORE_ABORT};
use crate::options::StreamOpts;

const ERROR_EVENT: &[u8] =
    b"event: error\ndata: {\"error\":{\"message\":\"emulated in-stream error\",\
\"type\":\"server_error\",\"code\":\"stream_error\"}}\n\n";
const DONE: &[u8] = b"data: [DONE]\n\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// Everything one stream needs to know up front.
pub struct Plan {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub opts: StreamOpts,
    /// `Some` when the request asked for `stream_options.include_usage`.
    pub usage: Option<Usage>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Content(usize),
    ErrorEvent,
    Usage,
    Done,
    End,
}

pub struct SseBody {
    plan: Plan,
    step: Step,
    /// A frame was sent, so the next one waits `interval` first.
    pause_due: bool,
    /// The cut was decided; the body fails once the timer fires.
    cutting: bool,
    timer: Option<Pin<Box<Sleep>>>,
    timer_armed: bool,
}

impl SseBody {
    pub fn new(plan: Plan) -> Self {
        SseBody {
            plan,
            step: Step::Content(0),
            pause_due: false,
            cutting: false,
            timer: None,
            timer_armed: false,
        }
    }

    /// Polls a timer of `duration`, armed on first call and disarmed when it fires.
    fn wait(&mut self, cx: &mut Context<'_>, duration: std::time::Duration) -> Poll<()> {
        let deadline = Instant::now() + duration;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.timer_armed {
            timer.as_mut().reset(deadline);
            self.timer_armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.timer_armed = false;
                Poll::Ready(())
            }
        }
    }

    fn content_sent(&self) -> usize {
        match self.step {
            Step::Content(i) => i,
            _ => self.plan.opts.events,
        }
    }

    fn event(&self, index: usize) -> Bytes {
        let plan = &self.plan;
        let last = index + 1 == plan.opts.events;
        let finish_reason = if last { Some("stop") } else { None };
        let text = piece(index);
        match plan.kind {
            Kind::Chat => data_event(&ChatChunk {
                id: &plan.id,
                object: "chat.completion.chunk",
                created: plan.created,
                model: &plan.model,
                system_fingerprint: "fp_emu",
                choices: [ChatChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: (index == 0).then_some("assistant"),
                        content: &text,
                    },
                    logprobs: None,
                    finish_reason,
                }],
            }),
            Kind::Text => data_event(&TextChunk {
                id: &plan.id,
                object: "text_completion",
                created: plan.created,
                model: &plan.model,
                choices: [TextChunkChoice {
                    text: &text,
                    index: 0,
                    logprobs: None,
                    finish_reason,
                }],
            }),
        }
    }

    fn usage_event(&self, usage: Usage) -> Bytes {
        let plan = &self.plan;
        let object = match plan.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        data_event(&UsageChunk {
            id: &plan.id,
            object,
            created: plan.created,
            model: &plan.model,
            choices: [],
            usage,
        })
    }

    /// The step after `step`, skipping what the plan does not include.
    fn after(&self, step: Step) -> Step {
        match step {
            Step::Content(i) if i + 1 < self.plan.opts.events => Step::Content(i + 1),
            Step::Content(_) if self.plan.usage.is_some() => Step::Usage,
            Step::Content(_) | Step::Usage if self.plan.opts.error_event => Step::ErrorEvent,
            Step::Content(_) | Step::Usage | Step::ErrorEvent => Step::Done,
            Step::Done | Step::End => Step::End,
        }
    }
}

impl HttpBody for SseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.step == Step::Content(0) && this.plan.opts.events == 0 {
            this.step = this.after(Step::Content(0));
        }
        if this.step == Step::End {
            return Poll::Ready(None);
        }
        let sent = this.content_sent();
        let opts = this.plan.opts;
        if opts.stall_after.is_some_and(|k| sent >= k.min(opts.events)) {
            // Silent until the client leaves; dropping the body then marks it cancelled.
            return Poll::Pending;
        }
        if this.cutting || opts.cut_after.is_some_and(|k| sent >= k.min(opts.events)) {
            this.cutting = true;
            if this.wait(cx, SETTLE_BEFORE_ABORT).is_pending() {
                return Poll::Pending;
            }
            this.step = Step::End;
            return Poll::Ready(Some(Err("emulated cut mid-stream".into())));
        }
        if this.pause_due && !opts.interval.is_zero() {
            if this.wait(cx, opts.interval).is_pending() {
                return Poll::Pending;
            }
            this.pause_due = false;
        }
        let frame = match this.step {
            Step::Content(i) => this.event(i),
            Step::ErrorEvent => Bytes::from_static(ERROR_EVENT),
            Step::Usage => match this.plan.usage {
                Some(usage) => this.usage_event(usage),
                None => Bytes::new(),
            },
            Step::Done => Bytes::from_static(DONE),
            Step::End => return Poll::Ready(None),
        };
        this.step = this.after(this.step);
        this.pause_due = true;
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.step == Step::End
    }
}

fn data_event<T: Serialize>(chunk: &T) -> Bytes {
    let mut out = Vec::with_capacity(320);
    out.extend_from_slice(b"data: ");
    if serde_json::to_writer(&mut out, chunk).is_err() {
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[derive(Serialize)]
struct ChatChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: [ChatChunkChoice<'a>; 1],
}

#[derive(Serialize)]
struct ChatChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    content: &'a str,
}

#[derive(Serialize)]
struct TextChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [TextChunkChoice<'a>; 1],
}

#[derive(Serialize)]
struct TextChunkChoice<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct UsageChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [(); 0],
    usage: Usage,
}

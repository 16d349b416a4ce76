//! Streamed (`"stream": true`) chat and text completions and Responses API responses: one
//! SSE event per body frame, produced on demand, with the stream faults (cut, stall,
//! in-stream error event).

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use serde::Serialize;
use tokio::time::{Instant, Sleep};

use crate::api::{piece, response_object, Usage};
use crate::body::{BoxError, SETTLE_BEFORE_ABORT};
use crate::log::Tokens;
use crate::options::StreamOpts;

const ERROR_EVENT: &[u8] =
    b"event: error\ndata: {\"error\":{\"message\":\"emulated in-stream error\",\
\"type\":\"server_error\",\"code\":\"stream_error\"}}\n\n";
const DONE: &[u8] = b"data: [DONE]\n\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
    /// The Responses API: `response.created`, `response.output_text.delta` events, then
    /// `response.completed` with the usage; no `[DONE]`.
    Responses,
}

/// Everything one stream needs to know up front.
pub struct Plan {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub opts: StreamOpts,
    /// `Some` when the request asked for `stream_options.include_usage` (then every chunk
    /// also carries `"usage": null`, as OpenAI's do); always for the Responses API.
    pub usage: Option<Usage>,
    /// The log entry's counts: each content event sent adds one.
    pub tokens: Tokens,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// `response.created` (Responses API only).
    Start,
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
        let step = if plan.kind == Kind::Responses {
            Step::Start
        } else {
            Step::Content(0)
        };
        SseBody {
            plan,
            step,
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
            Step::Start => 0,
            Step::Content(i) => i,
            _ => self.plan.opts.events,
        }
    }

    fn start_event(&self) -> Bytes {
        let plan = &self.plan;
        named_event(
            "response.created",
            &ResponseEvent {
                kind: "response.created",
                sequence_number: 0,
                response: response_object(
                    &plan.id,
                    plan.created,
                    &plan.model,
                    "in_progress",
                    "",
                    None,
                ),
            },
        )
    }

    fn event(&self, index: usize) -> Bytes {
        let plan = &self.plan;
        let last = index + 1 == plan.opts.events;
        let finish_reason = if last { Some("stop") } else { None };
        let text = piece(index);
        let usage = plan.usage.map(|_| ());
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
                usage,
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
                usage,
            }),
            Kind::Responses => named_event(
                "response.output_text.delta",
                &DeltaEvent {
                    kind: "response.output_text.delta",
                    sequence_number: index + 1,
                    item_id: format!("msg_{}", plan.id),
                    output_index: 0,
                    content_index: 0,
                    delta: &text,
                },
            ),
        }
    }

    fn usage_event(&self, usage: Usage) -> Bytes {
        let plan = &self.plan;
        let object = match plan.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
            Kind::Responses => {
                let text: String = (0..plan.opts.events).map(piece).collect();
                return named_event(
                    "response.completed",
                    &ResponseEvent {
                        kind: "response.completed",
                        sequence_number: plan.opts.events + 1,
                        response: response_object(
                            &plan.id,
                            plan.created,
                            &plan.model,
                            "completed",
                            &text,
                            Some(usage),
                        ),
                    },
                );
            }
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
            Step::Start if self.plan.opts.events > 0 => Step::Content(0),
            Step::Start => self.after(Step::Content(0)),
            Step::Content(i) if i + 1 < self.plan.opts.events => Step::Content(i + 1),
            Step::Content(_) if self.plan.usage.is_some() => Step::Usage,
            Step::Content(_) | Step::Usage if self.plan.opts.error_event => Step::ErrorEvent,
            Step::Content(_) | Step::Usage | Step::ErrorEvent
                if self.plan.kind == Kind::Responses =>
            {
                Step::End
            }
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
            Step::Start => this.start_event(),
            Step::Content(i) => {
                this.plan.tokens.add_completion(1);
                this.event(i)
            }
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

/// `event: NAME` then `data: {chunk}` (the Responses API names its events).
fn named_event<T: Serialize>(name: &str, chunk: &T) -> Bytes {
    let mut out = Vec::with_capacity(400);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&data_event(chunk));
    Bytes::from(out)
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
    /// `null` in every chunk of a stream that asked for usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<()>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<()>,
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

#[derive(Serialize)]
struct ResponseEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: usize,
    response: crate::api::ResponseObject<'a>,
}

#[derive(Serialize)]
struct DeltaEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: usize,
    item_id: String,
    output_index: u32,
    content_index: u32,
    delta: &'a str,
}

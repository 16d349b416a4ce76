//! The tokens a realtime session spent, from the upstream's `response.done` events (each
//! carries `response.usage.input_tokens` and `output_tokens`). The events pass to the
//! client as they arrive; a text message is copied aside only when its first bytes name
//! `response.done`, and read once it is complete. Other messages (audio deltas, transcripts)
//! are looked at for their first bytes only.

use memchr::memmem;
use serde::Deserialize;

/// Bytes of a text message looked at for its event type: OpenAI's events begin with
/// `{"type":…` or `{"event_id":"event_…","type":…`.
const PREFIX: usize = 128;
/// A `response.done` larger than this (its output items are in it) is not read.
const MAX_EVENT: usize = 1 << 20;

#[derive(Default)]
pub struct UsageWatch {
    /// The message being read: its first bytes, or all of it once it is a `response.done`.
    buf: Vec<u8>,
    state: Message,
    input: u64,
    output: u64,
    /// Some event reported usage.
    seen: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Message {
    /// Not a message worth reading (binary, compressed, or not a `response.done`).
    #[default]
    Skip,
    /// A text message whose first bytes are being collected.
    Prefix,
    /// A `response.done`, collected whole.
    Done,
}

impl UsageWatch {
    pub fn message_started(&mut self, readable: bool) {
        self.buf.clear();
        self.state = if readable {
            Message::Prefix
        } else {
            Message::Skip
        };
    }

    pub fn payload(&mut self, data: &[u8]) {
        match self.state {
            Message::Skip => {}
            Message::Prefix => {
                let room = PREFIX - self.buf.len();
                self.buf.extend_from_slice(&data[..data.len().min(room)]);
                if self.buf.len() == PREFIX {
                    if is_response_done(&self.buf) {
                        self.state = Message::Done;
                        self.buf.extend_from_slice(&data[room..]);
                    } else {
                        self.skip();
                    }
                }
            }
            Message::Done => {
                if self.buf.len() + data.len() > MAX_EVENT {
                    self.skip();
                } else {
                    self.buf.extend_from_slice(data);
                }
            }
        }
    }

    pub fn message_ended(&mut self) {
        let whole = match self.state {
            Message::Prefix => is_response_done(&self.buf),
            Message::Done => true,
            Message::Skip => false,
        };
        if whole {
            if let Some((input, output)) = response_usage(&self.buf) {
                self.input += input;
                self.output += output;
                self.seen = true;
            }
        }
        self.skip();
    }

    fn skip(&mut self) {
        self.state = Message::Skip;
        self.buf = Vec::new();
    }

    /// Input and output tokens of every `response.done` so far.
    pub fn total(&self) -> Option<(u64, u64)> {
        self.seen.then_some((self.input, self.output))
    }
}

fn is_response_done(prefix: &[u8]) -> bool {
    memmem::find(prefix, b"\"response.done\"").is_some()
}

/// `response.usage` of a `response.done` event.
fn response_usage(event: &[u8]) -> Option<(u64, u64)> {
    #[derive(Deserialize)]
    struct Event<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
        response: Option<Response>,
    }
    #[derive(Deserialize)]
    struct Response {
        usage: Option<Usage>,
    }
    #[derive(Deserialize)]
    struct Usage {
        #[serde(default)]
        input_tokens: u64,
        #[serde(default)]
        output_tokens: u64,
    }
    let e: Event = serde_json::from_slice(event).ok()?;
    if e.kind != "response.done" {
        return None;
    }
    let u = e.response?.usage?;
    Some((u.input_tokens, u.output_tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(w: &mut UsageWatch, message: &[u8], step: usize) {
        w.message_started(true);
        for piece in message.chunks(step) {
            w.payload(piece);
        }
        w.message_ended();
    }

    #[test]
    fn response_done_usage_is_summed_and_other_events_skipped() {
        let long_output = "x".repeat(5000);
        let done = format!(
            r#"{{"event_id":"event_123456789012345678901","type":"response.done","response":{{"id":"resp_1","output":[{{"text":"{long_output}"}}],"usage":{{"total_tokens":30,"input_tokens":20,"output_tokens":10}}}}}}"#
        );
        let delta =
            r#"{"type":"response.output_text.delta","delta":"the text says \"response.done\""}"#;
        let short =
            r#"{"type":"response.done","response":{"usage":{"input_tokens":1,"output_tokens":2}}}"#;
        for step in [1, 5, 64, 100_000] {
            let mut w = UsageWatch::default();
            assert_eq!(w.total(), None);
            feed(&mut w, done.as_bytes(), step);
            feed(&mut w, delta.as_bytes(), step);
            feed(&mut w, short.as_bytes(), step);
            assert_eq!(w.total(), Some((21, 12)), "pieces of {step}");
        }
        // A compressed or binary message is not read.
        let mut w = UsageWatch::default();
        w.message_started(false);
        w.payload(short.as_bytes());
        w.message_ended();
        assert_eq!(w.total(), None);
    }
}

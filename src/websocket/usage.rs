//! The tokens a realtime session spent, from the upstream's events as they pass: the usage of
//! each `response.done` (`response.usage.input_tokens` and `output_tokens`), and, for a
//! response still under way, an estimate of what its text deltas carried since
//! `response.created` (what the session is charged when it ends before that response's
//! `response.done`, as a cut stream is charged what streamed). The events pass to the client
//! as they arrive; a text message is copied aside only when its first bytes name
//! `response.done`, and read once it is complete. A text delta's `delta` string is counted
//! as it streams through, with a few bytes of state. Other messages (audio deltas) are looked
//! at for their first bytes only.

use memchr::memmem;
use serde::Deserialize;

use crate::limits::estimate::Counts;
use crate::outcome::Usage as Reported;

/// Bytes of a text message looked at for its event type: OpenAI's events begin with
/// `{"type":…` or `{"event_id":"event_…","type":…`.
const PREFIX: usize = 128;
/// A `response.done` larger than this (its output items are in it) is not read.
const MAX_EVENT: usize = 1 << 20;

/// The events whose `delta` is generated text (or a transcript of generated audio, or a
/// tool call's arguments), both the beta and the GA names. Audio deltas (base64) are not.
const TEXT_DELTAS: [&[u8]; 6] = [
    b"\"response.output_text.delta\"",
    b"\"response.text.delta\"",
    b"\"response.output_audio_transcript.delta\"",
    b"\"response.audio_transcript.delta\"",
    b"\"response.function_call_arguments.delta\"",
    b"\"response.mcp_call_arguments.delta\"",
];
const DONE: &[u8] = b"\"response.done\"";
const CREATED: &[u8] = b"\"response.created\"";

#[derive(Default)]
pub struct UsageWatch {
    /// The message being read: its first bytes, or all of it once it is a `response.done`.
    buf: Vec<u8>,
    state: Message,
    /// The usage of every `response.done` so far.
    reported: Reported,
    /// Some event reported usage.
    seen: bool,
    /// Responses created and not done yet.
    open: u32,
    /// What the text deltas carried since the last `response.done` that left no response
    /// open.
    pending: Counts,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Message {
    /// Not a message worth reading (binary, compressed, or not an event ezgate reads).
    #[default]
    Skip,
    /// A text message whose first bytes are being collected.
    Prefix,
    /// A `response.done`, collected whole.
    Done,
    /// A `response.done` too large to read: its response ended all the same.
    DoneUnread,
    /// A text delta: its `delta` string is counted.
    Delta(DeltaScan),
}

/// Where a text delta's reading stands: looking for `"delta"`, then `:`, then the string.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum DeltaScan {
    /// `"delta"` matched up to this many bytes.
    #[default]
    Key,
    Matched(u8),
    /// After the key: whitespace, then `:`.
    Colon,
    /// After the colon: whitespace, then `"`.
    Quote,
    /// Inside the string; `true` right after a backslash.
    Text(bool),
    /// The string ended (or the key held no string).
    Over,
}

const DELTA_KEY: &[u8] = b"\"delta\"";

impl DeltaScan {
    /// Reads `data`; the characters of the string go to `text`.
    fn feed(&mut self, data: &[u8], text: &mut Counts) {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            *self = match *self {
                DeltaScan::Key => match b {
                    b'"' => DeltaScan::Matched(1),
                    _ => DeltaScan::Key,
                },
                DeltaScan::Matched(n) => {
                    if b == DELTA_KEY[n as usize] {
                        if n as usize + 1 == DELTA_KEY.len() {
                            DeltaScan::Colon
                        } else {
                            DeltaScan::Matched(n + 1)
                        }
                    } else if b == b'"' {
                        DeltaScan::Matched(1)
                    } else {
                        DeltaScan::Key
                    }
                }
                DeltaScan::Colon => match b {
                    b' ' | b'\t' | b'\r' | b'\n' => DeltaScan::Colon,
                    b':' => DeltaScan::Quote,
                    // `"delta"` was a value, not a key.
                    b'"' => DeltaScan::Matched(1),
                    _ => DeltaScan::Key,
                },
                DeltaScan::Quote => match b {
                    b' ' | b'\t' | b'\r' | b'\n' => DeltaScan::Quote,
                    b'"' => DeltaScan::Text(false),
                    _ => DeltaScan::Over,
                },
                DeltaScan::Text(true) => {
                    // The escaped character counts as one (`\n`, `\"`; `\uXXXX` as five).
                    text.add_utf8(&data[i..=i]);
                    DeltaScan::Text(false)
                }
                DeltaScan::Text(false) => {
                    // A run of plain characters at once.
                    let run = data[i..]
                        .iter()
                        .position(|&c| c == b'"' || c == b'\\')
                        .unwrap_or(data.len() - i);
                    text.add_utf8(&data[i..i + run]);
                    i += run;
                    match data.get(i) {
                        Some(b'\\') => DeltaScan::Text(true),
                        Some(_) => DeltaScan::Over,
                        None => return,
                    }
                }
                DeltaScan::Over => return,
            };
            i += 1;
        }
    }
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
        match &mut self.state {
            Message::Skip | Message::DoneUnread => {}
            Message::Prefix => {
                let room = PREFIX - self.buf.len();
                let (head, rest) = data.split_at(data.len().min(room));
                self.buf.extend_from_slice(head);
                if self.buf.len() == PREFIX {
                    self.classify();
                    self.payload(rest);
                }
            }
            Message::Done => {
                if self.buf.len() + data.len() > MAX_EVENT {
                    self.state = Message::DoneUnread;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(data);
                }
            }
            Message::Delta(scan) => scan.feed(data, &mut self.pending),
        }
    }

    /// The message's first bytes are known (or all of it, when shorter): what it is.
    fn classify(&mut self) {
        let at = |needle: &[u8]| memmem::find(&self.buf, needle);
        // The event's type is the first of these names in its first bytes.
        let done = at(DONE);
        let created = at(CREATED);
        let delta = TEXT_DELTAS.iter().filter_map(|d| at(d)).min();
        let first = [done, created, delta].into_iter().flatten().min();
        self.state = match first {
            None => Message::Skip,
            f if f == done => Message::Done,
            f if f == created => {
                self.open = self.open.saturating_add(1);
                Message::Skip
            }
            _ => {
                let mut scan = DeltaScan::default();
                scan.feed(&self.buf, &mut self.pending);
                Message::Delta(scan)
            }
        };
        if self.state != Message::Done {
            self.buf = Vec::new();
        }
    }

    pub fn message_ended(&mut self) {
        if self.state == Message::Prefix {
            self.classify();
        }
        match self.state {
            Message::Done => {
                if let Some(usage) = response_usage(&self.buf) {
                    self.reported.add(usage);
                    self.seen = true;
                }
                self.response_done();
            }
            Message::DoneUnread => self.response_done(),
            _ => {}
        }
        self.state = Message::Skip;
        self.buf = Vec::new();
    }

    /// A response ended with its usage (read or not): once none is under way, what the
    /// deltas carried is accounted for by the reports.
    fn response_done(&mut self) {
        self.open = self.open.saturating_sub(1);
        if self.open == 0 {
            self.pending = Counts::default();
        }
    }

    /// The usage of every `response.done` so far (cached and audio tokens included).
    pub fn total(&self) -> Option<Reported> {
        self.seen.then_some(self.reported)
    }

    /// The estimated tokens of the text deltas of responses not done yet; `None` when no
    /// response is under way and no delta is unaccounted for.
    pub fn unfinished(&self) -> Option<u64> {
        (self.open > 0 || self.pending.chars() > 0).then(|| self.pending.tokens())
    }
}

/// `response.usage` of a `response.done` event, with its `input_token_details`
/// (`cached_tokens`, `audio_tokens`) and `output_token_details` (`audio_tokens`).
fn response_usage(event: &[u8]) -> Option<Reported> {
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
        #[serde(default)]
        input_token_details: Option<Details>,
        #[serde(default)]
        output_token_details: Option<Details>,
    }
    #[derive(Deserialize, Default)]
    struct Details {
        #[serde(default)]
        cached_tokens: u64,
        #[serde(default)]
        audio_tokens: u64,
    }
    let e: Event = serde_json::from_slice(event).ok()?;
    if e.kind != "response.done" {
        return None;
    }
    let u = e.response?.usage?;
    let input = u.input_token_details.unwrap_or_default();
    Some(Reported {
        prompt: u.input_tokens,
        completion: u.output_tokens,
        cached: input.cached_tokens,
        audio_in: input.audio_tokens,
        audio_out: u.output_token_details.unwrap_or_default().audio_tokens,
    })
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
            assert_eq!(w.total(), Some(Reported::new(21, 12)), "pieces of {step}");
        }
        // Realtime details: cached and audio tokens of each response, summed.
        let detailed = r#"{"type":"response.done","response":{"usage":{"input_tokens":100,"output_tokens":50,"input_token_details":{"cached_tokens":64,"text_tokens":40,"audio_tokens":60},"output_token_details":{"text_tokens":10,"audio_tokens":40}}}}"#;
        let mut w = UsageWatch::default();
        feed(&mut w, detailed.as_bytes(), 7);
        feed(&mut w, detailed.as_bytes(), 7);
        let want = Reported {
            prompt: 200,
            completion: 100,
            cached: 128,
            audio_in: 120,
            audio_out: 80,
        };
        assert_eq!(w.total(), Some(want));
        // A compressed or binary message is not read.
        let mut w = UsageWatch::default();
        w.message_started(false);
        w.payload(short.as_bytes());
        w.message_ended();
        assert_eq!(w.total(), None);
    }

    fn delta(text: &str) -> String {
        format!(
            r#"{{"type":"response.output_text.delta","event_id":"event_1","response_id":"resp_1","item_id":"item_1","output_index":0,"content_index":0,"delta":{}}}"#,
            serde_json::Value::from(text)
        )
    }

    #[test]
    fn deltas_of_a_response_not_done_are_estimated_until_its_done() {
        let created = r#"{"type":"response.created","event_id":"e","response":{"id":"resp_1","status":"in_progress"}}"#;
        let done =
            r#"{"type":"response.done","response":{"usage":{"input_tokens":3,"output_tokens":4}}}"#;
        let audio = r#"{"type":"response.output_audio.delta","delta":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}"#;
        let transcript =
            r#"{"type":"response.output_audio_transcript.delta", "delta" : "hello there"}"#;
        // A delta whose text names other events, with escapes, past the first bytes.
        let tricky = delta("say \"delta\": \"response.done\" and more words to estimate");
        let text = "say \"delta\": \"response.done\" and more words to estimate";
        for step in [1, 3, 17, 100_000] {
            let mut w = UsageWatch::default();
            feed(&mut w, created.as_bytes(), step);
            feed(&mut w, tricky.as_bytes(), step);
            feed(&mut w, audio.as_bytes(), step);
            feed(&mut w, transcript.as_bytes(), step);
            // The escapes' backslashes are not counted; the rest is the text.
            let want = crate::limits::estimate::text_tokens(
                format!("{}hello there", text.replace('\\', "")).as_bytes(),
            );
            assert_eq!(w.unfinished(), Some(want), "pieces of {step}");
            assert!(want > 0);
            assert_eq!(w.total(), None);
            feed(&mut w, done.as_bytes(), step);
            assert_eq!(
                (w.total(), w.unfinished()),
                (Some(Reported::new(3, 4)), None)
            );
            // Deltas without a `response.created` are counted too.
            feed(&mut w, delta("more").as_bytes(), step);
            assert_eq!(w.unfinished(), Some(1));
        }
    }

    #[test]
    fn a_delta_key_that_is_a_value_or_holds_no_string_counts_nothing() {
        for event in [
            r#"{"type":"response.text.delta","note":"delta","delta":null}"#,
            r#"{"type":"response.text.delta","delta":12}"#,
            r#"{"type":"response.text.delta"}"#,
        ] {
            let mut w = UsageWatch::default();
            feed(&mut w, event.as_bytes(), 2);
            assert_eq!(w.unfinished(), None, "{event}");
        }
        let mut w = UsageWatch::default();
        feed(
            &mut w,
            br#"{"type":"response.text.delta","note":"delta","delta":"abcd"}"#,
            1,
        );
        assert_eq!(w.unfinished(), Some(1));
    }
}

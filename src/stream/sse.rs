//! The events of a streamed response (`text/event-stream`), read as they pass: the usage
//! report, the model, and how much content streamed (what a stream that ends without a
//! report is charged). When ezgate asked the upstream for usage the client did not ask for
//! (`stream_options.include_usage`), it also removes what that added, so the client receives
//! the stream it would have received without it: the usage-only chunk (`"choices": []`) is
//! dropped and the `"usage": null` member of every other chunk is cut out.
//!
//! Frames pass through as they are unless they hold something to remove; only then is an
//! event's text copied. In that mode an event split across frames is held until it is whole
//! (a client cannot use half an event), so every event still leaves the moment it is complete.

use bytes::Bytes;

use super::usage;
use crate::limits::estimate::Counts;
use crate::limits::scan;
use crate::outcome::Usage;

/// What to send the client for one upstream frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Pass {
    /// The frame as it came.
    Frame,
    /// Other bytes instead (some events edited, dropped or held back).
    Edited(Bytes),
    /// Nothing for now.
    Nothing,
}

#[derive(Debug, Default)]
pub struct SseReader {
    /// Remove what ezgate's usage request added.
    strip: bool,
    /// The start of an event not yet complete.
    partial: Vec<u8>,
    /// The bytes the client has received end an event.
    at_boundary: bool,
    pub usage: Option<Usage>,
    pub model: Option<String>,
    /// Events that carried generated content, and that content by character class.
    pub content_events: u64,
    pub content: Counts,
    /// When the first event with content was read.
    pub first_content: Option<std::time::Instant>,
}

impl SseReader {
    pub fn new(strip: bool) -> SseReader {
        SseReader {
            strip,
            at_boundary: true,
            ..SseReader::default()
        }
    }

    /// True when the stream is edited on its way (its length is not the upstream's).
    pub fn strips(&self) -> bool {
        self.strip
    }

    /// True when the client has received whole events only (an error event can follow).
    pub fn at_boundary(&self) -> bool {
        self.at_boundary
    }

    /// Reads one frame of the upstream's stream; says what the client gets for it.
    pub fn feed(&mut self, data: &Bytes) -> Pass {
        if !self.strip {
            self.read_only(data);
            return Pass::Frame;
        }
        // The usual frame of a stream whose usage ezgate asked for: one whole chunk ending
        // `,"usage":null}`. Seen by its last bytes alone, and cut there.
        if self.partial.is_empty() {
            if let Some(cut) = trailing_null_usage(data) {
                self.read_event(data);
                let mut out = Vec::with_capacity(data.len());
                out.extend_from_slice(&data[..cut.start]);
                out.extend_from_slice(&data[cut.end..]);
                return Pass::Edited(Bytes::from(out));
            }
        }
        // The usual frame otherwise: whole events, none of them a usage report.
        if self.partial.is_empty() && ends_event(data) && !usage::mentions_usage(data) {
            for event in Events::new(data) {
                self.read_event(&data[event]);
            }
            return Pass::Frame;
        }
        let joined;
        let text: &[u8] = if self.partial.is_empty() {
            data
        } else {
            self.partial.extend_from_slice(data);
            joined = std::mem::take(&mut self.partial);
            &joined
        };
        let mut out = Vec::with_capacity(text.len());
        let mut events = Events::new(text);
        for event in events.by_ref() {
            let event = &text[event];
            self.read_event(event);
            match strip_event(event) {
                Edit::Keep => out.extend_from_slice(event),
                Edit::Cut(cut) => {
                    out.extend_from_slice(&event[..cut.start]);
                    out.extend_from_slice(&event[cut.end..]);
                }
                Edit::Drop => {}
            }
        }
        let rest = &text[events.consumed..];
        if rest.is_empty() && out.len() == text.len() && text.len() == data.len() {
            return Pass::Frame;
        }
        self.partial = rest.to_vec();
        if out.is_empty() {
            Pass::Nothing
        } else {
            Pass::Edited(Bytes::from(out))
        }
    }

    /// At the end of the stream: whatever was held back (an event without its blank line).
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.partial.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.partial);
        self.read_event(&rest);
        Some(Bytes::from(rest))
    }

    /// Passing frames through untouched: events are read once complete, the start of an
    /// incomplete one is kept (copied) until its end arrives.
    fn read_only(&mut self, data: &[u8]) {
        self.at_boundary =
            ends_event(data) || (data == b"\n" && self.partial.is_empty() && !self.at_boundary);
        if self.partial.is_empty() {
            let mut events = Events::new(data);
            for event in events.by_ref() {
                self.read_event(&data[event]);
            }
            self.partial.extend_from_slice(&data[events.consumed..]);
            return;
        }
        self.partial.extend_from_slice(data);
        let text = std::mem::take(&mut self.partial);
        let mut events = Events::new(&text);
        for event in events.by_ref() {
            self.read_event(&text[event]);
        }
        self.partial.extend_from_slice(&text[events.consumed..]);
    }

    fn read_event(&mut self, event: &[u8]) {
        let Some(payload) = data_payload(event) else {
            return;
        };
        // One search for the last `usage` key: an absent or `null` usage (most chunks) is
        // `None`, as is one that is not whole numbers.
        if let Some((usage, model)) = usage::json_usage(payload) {
            self.usage = Some(usage);
            if model.is_some() {
                self.model = model;
            }
            return;
        }
        if usage::content_text(payload, &mut self.content) {
            if self.content_events == 0 {
                self.first_content = Some(std::time::Instant::now());
            }
            self.content_events += 1;
        }
    }
}

/// How an event changes on its way to a client that did not ask for usage.
#[derive(Debug, PartialEq, Eq)]
enum Edit {
    Keep,
    /// Remove these bytes (the `usage` member and its comma).
    Cut(std::ops::Range<usize>),
    /// The usage-only chunk.
    Drop,
}

fn strip_event(event: &[u8]) -> Edit {
    let Some(payload) = data_payload(event) else {
        return Edit::Keep;
    };
    let Some(at) = usage::find_usage(payload) else {
        return Edit::Keep;
    };
    let offset = payload.as_ptr() as usize - event.as_ptr() as usize;
    // The usual chunk: `…,"usage":null}` ends the object. Found without reading the rest.
    if let Some(cut) = null_usage_last(payload, at) {
        return Edit::Cut(offset + cut.start..offset + cut.end);
    }
    let Some((member, cut)) = scan::member_cut(payload, b"usage") else {
        return Edit::Keep;
    };
    let usage_is_null = &payload[member.value.clone()] == b"null";
    if !usage_is_null {
        let no_choices = scan::member_cut(payload, b"choices")
            .is_some_and(|(c, _)| is_empty_array(&payload[c.value]));
        if no_choices {
            return Edit::Drop;
        }
    }
    Edit::Cut(offset + cut.start..offset + cut.end)
}

/// A frame that is one event, one `data:` line whose JSON ends `,"usage":null}`: the
/// bytes of `,"usage":null`.
fn trailing_null_usage(data: &[u8]) -> Option<std::ops::Range<usize>> {
    const TAIL: &[u8] = b",\"usage\":null}";
    let body = data.strip_suffix(b"\n\n")?;
    if !body.ends_with(TAIL) || !body.starts_with(b"data:") {
        return None;
    }
    // One line: no other line break (a second `data:` line or event would have one).
    if memchr::memchr(b'\n', body).is_some() || memchr::memchr(b'\r', body).is_some() {
        return None;
    }
    let end = body.len() - 1;
    Some(end - (TAIL.len() - 1)..end)
}

/// When the `"usage"` key at `at` is the object's last member and its value is `null`:
/// the bytes from the end of the member before it (its comma included) to the end of
/// `null`.
fn null_usage_last(payload: &[u8], at: usize) -> Option<std::ops::Range<usize>> {
    let after = &payload[at + b"\"usage\"".len()..];
    let value = after
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    let rest = value.strip_prefix(b"null")?;
    if rest.trim_ascii() != b"}" {
        return None;
    }
    let end = payload.len() - rest.len();
    // From the end of the value before it, as `scan::member_cut` cuts.
    let before = payload[..at].trim_ascii_end().strip_suffix(b",")?;
    Some(before.trim_ascii_end().len()..end)
}

fn is_empty_array(v: &[u8]) -> bool {
    v.strip_prefix(b"[")
        .and_then(|r| r.strip_suffix(b"]"))
        .is_some_and(|inner| inner.trim_ascii().is_empty())
}

/// The payload of an event's one `data:` line; `None` for events with none, or with
/// several (a payload split over lines is left as it is).
fn data_payload(event: &[u8]) -> Option<&[u8]> {
    let mut found = None;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            if found.is_some() {
                return None;
            }
            found = Some(rest.strip_prefix(b" ").unwrap_or(rest));
        }
    }
    found
}

/// The bytes end an event (a blank line).
fn ends_event(data: &[u8]) -> bool {
    data.ends_with(b"\n\n") || data.ends_with(b"\r\n\r\n")
}

/// The complete events of a text, each with the blank line that ends it; `consumed` is
/// where the incomplete rest begins once the iterator is done.
struct Events<'a> {
    text: &'a [u8],
    consumed: usize,
}

impl<'a> Events<'a> {
    fn new(text: &'a [u8]) -> Events<'a> {
        Events { text, consumed: 0 }
    }
}

impl Iterator for Events<'_> {
    type Item = std::ops::Range<usize>;

    fn next(&mut self) -> Option<Self::Item> {
        let start = self.consumed;
        let mut line = start;
        loop {
            let nl = line + memchr::memchr(b'\n', self.text.get(line..)?)?;
            let content = &self.text[line..nl];
            if content.is_empty() || content == b"\r" {
                // A blank line. One at the very start of an event is an empty event.
                self.consumed = nl + 1;
                return Some(start..nl + 1);
            }
            line = nl + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: &[u8] =
        b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
    const PLAIN: &[u8] = b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const USAGE: &[u8] = b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,\"total_tokens\":17}}\n\n";
    const DONE: &[u8] = b"data: [DONE]\n\n";

    fn run(reader: &mut SseReader, frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            let b = Bytes::copy_from_slice(f);
            match reader.feed(&b) {
                Pass::Frame => out.extend_from_slice(f),
                Pass::Edited(e) => out.extend_from_slice(&e),
                Pass::Nothing => {}
            }
        }
        if let Some(rest) = reader.finish() {
            out.extend_from_slice(&rest);
        }
        out
    }

    #[test]
    fn stripping_gives_the_stream_without_usage() {
        let mut r = SseReader::new(true);
        let out = run(&mut r, &[CHUNK, CHUNK, USAGE, DONE]);
        assert_eq!(out, [PLAIN, PLAIN, DONE].concat());
        assert_eq!(r.usage, Some(Usage::new(12, 5)));
        assert_eq!((r.content_events, r.content.chars()), (2, 4));
    }

    #[test]
    fn stripping_holds_split_events_until_whole() {
        let whole = [CHUNK, USAGE, DONE].concat();
        for split in 1..whole.len() {
            let mut r = SseReader::new(true);
            let out = run(&mut r, &[&whole[..split], &whole[split..]]);
            assert_eq!(out, [PLAIN, DONE].concat(), "split at {split}");
            assert!(r.usage.is_some());
            assert!(r.at_boundary());
        }
    }

    #[test]
    fn a_usage_member_in_a_content_chunk_is_cut() {
        let mut r = SseReader::new(true);
        let last = b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r\n\r\n";
        let out = run(&mut r, &[last]);
        assert_eq!(
            out,
            b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"},\"finish_reason\":\"stop\"}]}\r\n\r\n"
        );
        assert_eq!(r.usage.map(|u| u.completion), Some(2));
    }

    #[test]
    fn reading_only_passes_every_frame() {
        let mut r = SseReader::new(false);
        let whole = [CHUNK, USAGE, DONE].concat();
        let out = run(&mut r, &[&whole[..30], &whole[30..100], &whole[100..]]);
        assert_eq!(out, whole);
        assert_eq!(r.usage.map(|u| u.prompt), Some(12));
        assert_eq!(r.content_events, 1);
        assert!(r.at_boundary());
        let mut r = SseReader::new(false);
        assert_eq!(r.feed(&Bytes::from_static(&CHUNK[..20])), Pass::Frame);
        assert!(!r.at_boundary());
    }

    #[test]
    fn only_usage_members_are_touched() {
        let mut r = SseReader::new(true);
        let frames: [&[u8]; 4] = [
            b": keep-alive\n\n",
            b"event: ping\ndata: {\"usage\":\"in a string\"}\n\n",
            b"data: {\"usage\": \"text\"}\n\n",
            b"data: not json \"usage\"\n\n",
        ];
        let out = run(&mut r, &frames);
        let cut = b"data: {}\n\n";
        assert_eq!(
            out,
            [frames[0], b"event: ping\ndata: {}\n\n", cut, frames[3]].concat()
        );
    }

    #[test]
    fn a_null_usage_anywhere_in_the_chunk_is_cut() {
        for (chunk, want) in [
            (
                &b"data: {\"usage\":null,\"a\":1}\n\n"[..],
                &b"data: {\"a\":1}\n\n"[..],
            ),
            (
                b"data: {\"a\":1 , \"usage\" : null }\n\n",
                b"data: {\"a\":1 }\n\n",
            ),
            (
                b"data: {\"a\":1,\"usage\":null,\"b\":2}\n\n",
                b"data: {\"a\":1,\"b\":2}\n\n",
            ),
        ] {
            let mut r = SseReader::new(true);
            assert_eq!(
                run(&mut r, &[chunk]),
                want,
                "{}",
                String::from_utf8_lossy(chunk)
            );
        }
    }

    #[test]
    fn an_unfinished_event_is_flushed_at_the_end() {
        let mut r = SseReader::new(true);
        let out = run(&mut r, &[PLAIN, b"data: {\"choices\":[]}"]);
        assert_eq!(out, [PLAIN, b"data: {\"choices\":[]}"].concat());
    }
}

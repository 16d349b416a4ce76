//! What ezgate reads in a JSON request body, the few members rate limits and model
//! allow-lists need: the model (and the models named inside: Responses tools, a Realtime
//! session), the prompt's characters (counted by class for the token estimate), the
//! completion cap and the stream flags.
//!
//! It runs on every request a token or model policy covers, so it reads them in one pass
//! with the lexer of [`super::scan`], building nothing, and every other value skipped. It
//! follows the same rules as reading the body with serde into the few typed fields (a wrong
//! type or a malformed document means "not understood"), so the estimate does not depend on
//! how the body was read.
//!
//! One body, one reading: whatever two JSON parsers could read differently in a member
//! ezgate reads is [`Unread::Ambiguous`], refused whatever the policies: member names are
//! compared decoded (`"mod\u0065l"` is `model`), a member read twice (after decoding), a
//! name that only differs from one ezgate reads in case (Go's encoding/json matches names
//! ignoring case, `ſ` and `K` included), a name holding `\u0000`, a control character, a
//! lone surrogate or invalid UTF-8, a count that is not a plain whole number, a flag that
//! is not a boolean, a byte order mark, bytes after the object, nesting too deep.

use std::borrow::Cow;

use super::estimate::Counts;
use super::scan::{Scan, Str};

/// The top-level members ezgate reads, in the order of the bits of `seen`.
const TOP: [&[u8]; 14] = [
    b"model",
    b"messages",
    b"prompt",
    b"input",
    b"max_tokens",
    b"max_completion_tokens",
    b"max_output_tokens",
    b"stream",
    b"stream_options",
    b"tools",
    b"session",
    b"input_audio_transcription",
    b"audio",
    b"n",
];
const TOP_NAMES: Names = Names::new(&TOP, "");

/// The index in [`TOP`] of a name spelled plainly: one `match`, as fast as the scan was
/// before names were compared decoded.
fn top_index(raw: &[u8]) -> Option<usize> {
    Some(match raw {
        b"model" => 0,
        b"messages" => 1,
        b"prompt" => 2,
        b"input" => 3,
        b"max_tokens" => 4,
        b"max_completion_tokens" => 5,
        b"max_output_tokens" => 6,
        b"stream" => 7,
        b"stream_options" => 8,
        b"tools" => 9,
        b"session" => 10,
        b"input_audio_transcription" => 11,
        b"audio" => 12,
        b"n" => 13,
        _ => return None,
    })
}

/// The names ezgate reads in one object, and the lengths they have, so that most other
/// names are passed over with one test.
struct Names {
    list: &'static [&'static [u8]],
    /// Bit n set: one of the names is n bytes long.
    lengths: u64,
    /// Where the object is, before the names in messages (`stream_options.`).
    within: &'static str,
}

impl Names {
    const fn new(list: &'static [&'static [u8]], within: &'static str) -> Names {
        let mut lengths = 0u64;
        let mut i = 0;
        while i < list.len() {
            lengths |= 1 << list[i].len();
            i += 1;
        }
        Names {
            list,
            lengths,
            within,
        }
    }

    /// Some name in the list is `len` bytes long.
    fn may_be(&self, len: usize) -> bool {
        len < 64 && self.lengths & (1 << len) != 0
    }
}

/// Why a body's members were not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unread {
    /// Not one well-formed JSON object (or a member of the wrong type): refused only where
    /// a check needs the body.
    NotJson,
    /// A JSON object that parsers may read differently (the reason, for the client): always
    /// refused, whether a check needs the body or not.
    Ambiguous(String),
}

/// The members read from a request body.
#[derive(Debug, Default, PartialEq)]
pub struct Fields<'a> {
    pub model: Option<Cow<'a, str>>,
    /// Characters of the text in `messages`, `prompt` and `input`, decoded, by class (values
    /// of `role` and `type` members are not text).
    pub text: Counts,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub max_output_tokens: Option<u64>,
    /// `n`: how many choices the completion generates, each up to the cap.
    pub n: Option<u64>,
    pub stream: Option<bool>,
    pub include_usage: Option<bool>,
    /// Models named inside the body: every `tools[].model`, `session.model`, and the
    /// transcription models of a realtime session config.
    pub other_models: Vec<Cow<'a, str>>,
    /// A tool spends a model but names none (an `image_generation` tool without `model`):
    /// the upstream picks its default.
    pub unnamed_tool_model: bool,
    /// `session.model` names the session's model (the other models inside a session, its
    /// transcription's, do not).
    pub session_model: bool,
}

/// Reads the members of a top-level JSON object, counting its text.
#[cfg(test)]
pub fn request_fields(body: &[u8]) -> Result<Fields<'_>, Unread> {
    request_fields_counting(body, true)
}

/// Reads the members of a top-level JSON object; with `count_text`, counts the characters
/// of its text (`Fields::text`, for the prompt's estimate), which costs about half the scan
/// of a chat body and is skipped when nothing needs the estimate.
pub fn request_fields_counting(body: &[u8], count_text: bool) -> Result<Fields<'_>, Unread> {
    if body.starts_with(b"\xEF\xBB\xBF") {
        return Err(Unread::Ambiguous(
            "the body starts with a byte order mark (U+FEFF), which some JSON parsers skip and \
             others refuse; send the JSON object alone"
                .into(),
        ));
    }
    // Most prompts are ASCII: one check here saves one per string.
    let mut s = Scan::new(body, body.is_ascii());
    let mut f = Fields::default();
    let mut seen = 0u16;
    let read = s.members(|s, key| {
        let plain = if key.escaped {
            None
        } else {
            top_index(key.raw)
        };
        let Some(at) = plain.map_or_else(|| s.known(&key, &TOP_NAMES), |at| Some(Some(at)))? else {
            return s.value(None, 1);
        };
        if seen & (1 << at) != 0 {
            return s.twice(TOP[at]);
        }
        seen |= 1 << at;
        match at {
            0 => {
                f.model = match s.peek()? {
                    b'"' => Some(s.string(None)?.decode()?),
                    _ => {
                        s.literal(b"null")?;
                        None
                    }
                }
            }
            1..=3 => s.value(count_text.then_some(&mut f.text), 1)?,
            4 => f.max_tokens = s.count(TOP[at])?,
            5 => f.max_completion_tokens = s.count(TOP[at])?,
            6 => f.max_output_tokens = s.count(TOP[at])?,
            7 => f.stream = s.flag(TOP[at])?,
            8 => f.include_usage = s.stream_options()?,
            9 => s.tools(&mut f)?,
            10 => s.session(&mut f)?,
            // A realtime session's own body (`/v1/realtime/sessions`): its transcription
            // model spends too.
            11 => s.transcription(&mut f, 1)?,
            12 => s.audio(&mut f, 1)?,
            _ => f.n = s.count(TOP[at])?,
        }
        Some(())
    });
    if read.is_none() {
        return Err(s.unread());
    }
    s.ws();
    if s.i != body.len() {
        return Err(Unread::Ambiguous(
            "bytes follow the JSON object; some parsers ignore them, others refuse the body".into(),
        ));
    }
    // Invalid UTF-8 is refused where it is read (a name, `model`); elsewhere it decides
    // nothing ezgate reads, and checking every byte would cost more than the scan.
    Ok(f)
}

/// `name` as Go's encoding/json compares member names: ASCII letters in one case, and the
/// other characters whose lower or upper case is an ASCII letter (`ſ`, `K`, `İ`, `ı`, …)
/// as that letter. `None` when it holds a character no ASCII name can match.
fn fold(name: &str) -> Option<String> {
    name.chars()
        .map(|c| {
            if c.is_ascii() {
                return Some(c.to_ascii_lowercase());
            }
            c.to_lowercase()
                .next()
                .filter(char::is_ascii)
                .or_else(|| c.to_uppercase().next().filter(char::is_ascii))
                .map(|c| c.to_ascii_lowercase())
        })
        .collect()
}

/// A name, shortened and escaped, to show in a message.
fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name)
        .chars()
        .take(64)
        .flat_map(char::escape_debug)
        .collect()
}

/// The readings of a request body's members: names compared as parsers compare them, counts,
/// flags, `stream_options`, tools and session.
impl<'a> Scan<'a> {
    /// Why the reading stopped.
    fn unread(&mut self) -> Unread {
        self.ambiguous
            .take()
            .map_or(Unread::NotJson, Unread::Ambiguous)
    }

    #[cold]
    fn twice<T>(&mut self, name: &[u8]) -> Option<T> {
        self.refuse(format!(
            "member `{}` appears twice (names compared with their escapes decoded): parsers \
             disagree on which one counts; send it once",
            shown(name)
        ))
    }

    /// Which of `names` the member name `key` is, compared decoded; `None` (the reason
    /// kept) when a parser could read it as one of them while it is not spelled so.
    fn known(&mut self, key: &Str<'a>, names: &Names) -> Option<Option<usize>> {
        if !key.escaped {
            let raw = key.raw;
            let same_length = names.may_be(raw.len());
            if same_length {
                if let Some(at) = names.list.iter().position(|n| *n == raw) {
                    return Some(Some(at));
                }
            }
            // The usual other name: ASCII without control characters (as `i8`, bytes from
            // 0x80 are negative), not one of `names` in another case.
            if raw.iter().all(|&c| c as i8 >= 0x20) {
                if !same_length {
                    return Some(None);
                }
                return match names.list.iter().find(|n| n.eq_ignore_ascii_case(raw)) {
                    None => Some(None),
                    Some(name) => self.other_case(raw, name, names.within),
                };
            }
        }
        self.unusual_name(key, names.list, names.within)
    }

    /// A name with escapes, control characters or non-ASCII characters.
    #[cold]
    fn unusual_name(
        &mut self,
        key: &Str<'a>,
        names: &[&[u8]],
        within: &str,
    ) -> Option<Option<usize>> {
        let Some(name) = key.decode() else {
            return self.refuse(format!(
                "a member name{} holds a lone surrogate (`\\ud800` without its pair) or invalid \
                 UTF-8, which parsers refuse, keep or replace differently",
                match within.trim_end_matches('.') {
                    "" => String::new(),
                    object => format!(" in `{object}`"),
                }
            ));
        };
        if name.chars().any(char::is_control) {
            return self.refuse(format!(
                "member name `{}` holds `\\u0000` or another control character, where some \
                 parsers cut the name",
                shown(key.raw)
            ));
        }
        if let Some(at) = names.iter().position(|n| *n == name.as_bytes()) {
            return Some(Some(at));
        }
        match fold(&name).and_then(|f| names.iter().find(|n| n.eq_ignore_ascii_case(f.as_bytes())))
        {
            Some(n) => self.other_case(key.raw, n, within),
            None => Some(None),
        }
    }

    #[cold]
    fn other_case<T>(&mut self, raw: &[u8], name: &[u8], within: &str) -> Option<T> {
        self.refuse(format!(
            "member `{}` is `{within}{}` to parsers that match names ignoring case (Go's \
             encoding/json): spell it `{}` exactly",
            shown(raw),
            shown(name),
            shown(name)
        ))
    }

    /// A count (`max_tokens`, …): `null`, or a whole number written plainly that fits a
    /// `u64`. Anything else is ambiguous: `1e3`, `1000.0` or `"1000"` are 1000 to some
    /// parsers, and a count ezgate cannot read must never count as absent.
    fn count(&mut self, name: &[u8]) -> Option<Option<u64>> {
        match self.peek()? {
            b'n' => return self.literal(b"null").map(|()| None),
            b'0'..=b'9' => {
                let text = self.number()?;
                // Digits only, no leading zero, within a u64.
                let n = text.iter().try_fold(0u64, |n, &c| {
                    let digit = c.wrapping_sub(b'0');
                    (digit < 10)
                        .then(|| n.checked_mul(10)?.checked_add(u64::from(digit)))
                        .flatten()
                });
                if let (Some(n), false) = (n, text.len() > 1 && text[0] == b'0') {
                    return Some(Some(n));
                }
            }
            _ => {}
        }
        self.refuse(format!(
            "member `{}` must be a whole number written plainly (like 1000) or null: parsers \
             read `1e3`, `1000.0`, `-0`, `01`, a string or a number past 2^64 differently",
            shown(name)
        ))
    }

    /// A flag (`stream`, …): `true`, `false` or `null`; anything else is ambiguous (`1` or
    /// `"true"` are true to lenient parsers).
    fn flag(&mut self, name: &[u8]) -> Option<Option<bool>> {
        match self.peek()? {
            b't' => self.literal(b"true").map(|()| Some(true)),
            b'f' => self.literal(b"false").map(|()| Some(false)),
            b'n' => self.literal(b"null").map(|()| None),
            _ => self.refuse(format!(
                "member `{}` must be true, false or null: parsers read `1` or `\"true\"` \
                 differently",
                shown(name)
            )),
        }
    }

    /// `stream_options`: `null`, or an object whose `include_usage` is read.
    fn stream_options(&mut self) -> Option<Option<bool>> {
        const NAMES: Names = Names::new(&[b"include_usage"], "stream_options.");
        match self.peek()? {
            b'n' => return self.literal(b"null").map(|()| None),
            b'{' => {}
            // serde would read a struct from an array of its fields; Python and Go refuse.
            _ => return self.refuse("member `stream_options` must be an object or null".into()),
        }
        let mut include = None;
        let mut seen = false;
        self.members(|s, key| match s.known(&key, &NAMES)? {
            None => s.value(None, 1),
            Some(_) if seen => s.twice(b"stream_options.include_usage"),
            Some(_) => {
                seen = true;
                include = s.flag(b"stream_options.include_usage")?;
                Some(())
            }
        })?;
        Some(include)
    }

    /// `tools`: the `model` of every tool (an object) in the array; anything else skipped
    /// (the upstream refuses it).
    fn tools(&mut self, f: &mut Fields<'a>) -> Option<()> {
        if self.peek()? != b'[' {
            return self.value(None, 0);
        }
        self.i += 1;
        if self.eat(b']') {
            return Some(());
        }
        loop {
            if self.peek()? == b'{' {
                self.tool(f)?;
            } else {
                self.value(None, 1)?;
            }
            if self.eat(b',') {
                continue;
            }
            return self.want(b']');
        }
    }

    /// One tool: its `model`, or whether it spends one without naming it.
    fn tool(&mut self, f: &mut Fields<'a>) -> Option<()> {
        const NAMES: Names = Names::new(&[b"type", b"model"], "tools[].");
        let mut read: [Option<Cow<'a, str>>; 2] = [None, None];
        let mut seen = [false; 2];
        self.members(|s, key| {
            let Some(at) = s.known(&key, &NAMES)? else {
                return s.value(None, 2);
            };
            if seen[at] {
                return s.twice(if at == 0 {
                    b"tools[].type"
                } else {
                    b"tools[].model"
                });
            }
            seen[at] = true;
            read[at] = s.opt_string()?;
            Some(())
        })?;
        let [kind, model] = read;
        match model {
            Some(m) => f.other_models.push(m),
            // The upstream uses its default image model.
            None if kind.as_deref() == Some("image_generation") => f.unnamed_tool_model = true,
            None => {}
        }
        Some(())
    }

    /// `session` (a Realtime client secret's): its `model`.
    fn session(&mut self, f: &mut Fields<'a>) -> Option<()> {
        const NAMES: Names = Names::new(
            &[b"model", b"input_audio_transcription", b"audio"],
            "session.",
        );
        if self.peek()? != b'{' {
            return self.value(None, 0);
        }
        let mut seen = [false; 3];
        self.members(|s, key| match s.known(&key, &NAMES)? {
            None => s.value(None, 1),
            Some(i) if seen[i] => s.twice(match i {
                0 => b"session.model".as_slice(),
                1 => b"session.input_audio_transcription",
                _ => b"session.audio",
            }),
            Some(i) => {
                seen[i] = true;
                match i {
                    0 => {
                        let model = s.opt_string()?;
                        f.session_model = model.is_some();
                        f.other_models.extend(model);
                        Some(())
                    }
                    1 => s.transcription(f, 2),
                    _ => s.audio(f, 2),
                }
            }
        })
    }

    /// `{"model": …}` of a realtime transcription config (`input_audio_transcription`,
    /// `audio.input.transcription`): the transcription model spends too.
    fn transcription(&mut self, f: &mut Fields<'a>, depth: usize) -> Option<()> {
        const NAMES: Names = Names::new(&[b"model"], "transcription.");
        if self.peek()? != b'{' {
            return self.value(None, depth);
        }
        let mut seen = false;
        self.members(|s, key| match s.known(&key, &NAMES)? {
            None => s.value(None, depth + 1),
            Some(_) if seen => s.twice(b"transcription.model"),
            Some(_) => {
                seen = true;
                f.other_models.extend(s.opt_string()?);
                Some(())
            }
        })
    }

    /// `audio.input.transcription` of a realtime session config.
    fn audio(&mut self, f: &mut Fields<'a>, depth: usize) -> Option<()> {
        const AUDIO: Names = Names::new(&[b"input"], "audio.");
        const INPUT: Names = Names::new(&[b"transcription"], "audio.input.");
        if self.peek()? != b'{' {
            return self.value(None, depth);
        }
        let mut seen = false;
        self.members(|s, key| match s.known(&key, &AUDIO)? {
            None => s.value(None, depth + 1),
            Some(_) if seen => s.twice(b"audio.input"),
            Some(_) => {
                seen = true;
                if s.peek()? != b'{' {
                    return s.value(None, depth + 1);
                }
                let mut inner = false;
                s.members(|s, key| match s.known(&key, &INPUT)? {
                    None => s.value(None, depth + 2),
                    Some(_) if inner => s.twice(b"audio.input.transcription"),
                    Some(_) => {
                        inner = true;
                        s.transcription(f, depth + 2)
                    }
                })
            }
        })
    }

    /// A string, decoded, or `null`.
    fn opt_string(&mut self) -> Option<Option<Cow<'a, str>>> {
        if self.peek()? == b'"' {
            return self.string(None)?.decode().map(Some);
        }
        self.literal(b"null").map(|()| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::scan::tests::json;
    use crate::limits::scan::{string_at, usage_counts};
    use proptest::prelude::*;
    use serde::Deserialize;

    /// The reference: the same members read by serde_json.
    #[derive(Deserialize)]
    struct Doc {
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        messages: Text,
        #[serde(default)]
        prompt: Text,
        #[serde(default)]
        input: Text,
        #[serde(default)]
        max_tokens: Option<u64>,
        #[serde(default)]
        max_completion_tokens: Option<u64>,
        #[serde(default)]
        max_output_tokens: Option<u64>,
        #[serde(default)]
        stream: Option<bool>,
        #[serde(default)]
        stream_options: Option<StreamOptions>,
    }

    #[derive(Deserialize)]
    struct StreamOptions {
        #[serde(default)]
        include_usage: Option<bool>,
    }

    /// The characters of the text, decoded by serde and counted one `char` at a time.
    #[derive(Default)]
    struct Text(Counts);

    impl<'de> Deserialize<'de> for Text {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let v = serde_json::Value::deserialize(d)?;
            let mut c = Counts::default();
            count(&v, &mut c);
            Ok(Text(c))
        }
    }

    fn count(v: &serde_json::Value, c: &mut Counts) {
        match v {
            serde_json::Value::String(s) => s.chars().for_each(|ch| c.add_char(ch)),
            serde_json::Value::Number(_) => c.numbers += 1,
            serde_json::Value::Array(a) => a.iter().for_each(|v| count(v, c)),
            serde_json::Value::Object(o) => o
                .iter()
                .filter(|(k, _)| *k != "role" && *k != "type")
                .for_each(|(_, v)| count(v, c)),
            _ => {}
        }
    }

    fn reference(body: &[u8]) -> Option<Fields<'static>> {
        // serde reads a struct from an array of its fields; Python and Go do not.
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        if v.get("stream_options").is_some_and(|o| o.is_array()) {
            return None;
        }
        let d: Doc = serde_json::from_slice(body).ok()?;
        Some(Fields {
            model: d.model.map(Cow::Owned),
            text: {
                let mut c = d.messages.0;
                c.add(&d.prompt.0);
                c.add(&d.input.0);
                c
            },
            max_tokens: d.max_tokens,
            max_completion_tokens: d.max_completion_tokens,
            max_output_tokens: d.max_output_tokens,
            stream: d.stream,
            include_usage: d.stream_options.and_then(|o| o.include_usage),
            ..Fields::default()
        })
    }

    fn same(body: &[u8]) {
        assert_eq!(
            request_fields(body).ok(),
            reference(body),
            "body: {}",
            String::from_utf8_lossy(body)
        );
    }

    #[test]
    fn reads_a_chat_request() {
        let body = br#"{"model":"gpt-4o","max_tokens":100,"stream":true,
            "stream_options":{"include_usage":false,"x":[1]},
            "messages":[{"role":"user","content":"h\u00e9llo \"w\"\n"},
                        {"role":"system","content":[{"type":"text","text":"abcd"}]}]}"#;
        let f = request_fields(body).unwrap();
        assert_eq!(f.model.as_deref(), Some("gpt-4o"));
        assert_eq!(f.text.chars(), 10 + 4);
        // "hllo w" + LF and "abcd"; the quotes; é.
        assert_eq!((f.text.word, f.text.symbol, f.text.other), (7 + 4, 2, 1));
        assert_eq!(f.max_tokens, Some(100));
        assert_eq!(f.stream, Some(true));
        assert_eq!(f.include_usage, Some(false));
        same(body);
    }

    #[test]
    fn agrees_with_serde_on_edges() {
        for body in [
            &br#"{}"#[..],
            br#" { "model" : null , "prompt" : ["ab", "c\ud83d\ude00"] } "#,
            br#"{"model":"m\u0041","input":"x"}"#,
            br#"{"model":"a","model":"b"}"#,
            br#"{"max_tokens":1.5}"#,
            br#"{"max_tokens":-1}"#,
            br#"{"max_tokens":null,"stream":null,"stream_options":null}"#,
            br#"{"stream":"yes"}"#,
            br#"{"model":1}"#,
            br#"{"messages":[{"role":"user","content":"abc"}],}"#,
            br#"{"messages":[1,2,]}"#,
            br#"{"a":tru}"#,
            br#"{"a":"\x"}"#,
            br#"{"a":"unterminated"#,
            br#"{"a":1} trailing"#,
            br#"[1,2]"#,
            b"",
            b"{\"model\":\"\xff\"}",
        ] {
            same(body);
        }
        let deep = format!("{{\"messages\":{}{}}}", "[".repeat(200), "]".repeat(200));
        same(deep.as_bytes());
        // Each class's first and last character, written as it is and escaped.
        let edges = "\u{7f}\u{80}\u{2fff}\u{3000}\u{30ff}\u{3100}\u{33ff}\u{3400}\u{9fff}\u{a000}\u{abff}\u{ac00}\u{d7ff}\u{e000}\u{feff}\u{ff00}\u{ffff}\u{10000}\u{10ffff}";
        for text in [edges.to_owned(), escape_non_ascii(edges)] {
            let body = format!(r#"{{"messages":[{{"role":"user","content":"{text} a1\b\f\/"}}]}}"#);
            same(body.as_bytes());
        }
    }

    /// `json` with every non-ASCII character as a `\u` escape (a pair above U+FFFF).
    fn escape_non_ascii(json: &str) -> String {
        let mut out = String::new();
        for c in json.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
        out
    }

    #[test]
    fn counts_text_by_class() {
        let body = r#"{"model":"模型","messages":[{"role":"user","content":"東京は\u6771 Seoul 서울 42!"},{"role":"assistant","content":[{"type":"text","text":"ok \ud83d\ude00"}]}],"metadata":{"k":"值"}}"#;
        let f = request_fields(body.as_bytes()).unwrap();
        let want = Counts {
            word: 8 + 3,
            symbol: 3,
            cjk: 6,
            other: 0,
            astral: 1,
            numbers: 0,
        };
        assert_eq!(f.text, want);
        same(body.as_bytes());
    }

    fn member() -> impl Strategy<Value = (String, serde_json::Value)> {
        (
            prop::sample::select(vec![
                "model",
                "messages",
                "prompt",
                "input",
                "max_tokens",
                "max_completion_tokens",
                "max_output_tokens",
                "stream",
                "stream_options",
                "temperature",
            ]),
            json(),
        )
            .prop_map(|(k, v)| (k.to_owned(), v))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any object, written compactly or pretty, with or without escapes for non-ASCII
        /// characters, reads as serde reads it.
        #[test]
        fn matches_serde(
            members in prop::collection::vec(member(), 0..8),
            pretty in any::<bool>(),
            escaped in any::<bool>(),
        ) {
            let obj: serde_json::Map<String, serde_json::Value> = members.into_iter().collect();
            let v = serde_json::Value::Object(obj);
            let mut body = if pretty {
                serde_json::to_string_pretty(&v).unwrap()
            } else {
                serde_json::to_string(&v).unwrap()
            };
            if escaped {
                body = escape_non_ascii(&body);
            }
            let body = body.into_bytes();
            prop_assert_eq!(request_fields(&body).ok(), reference(&body));
        }

        /// Arbitrary bytes never panic.
        #[test]
        fn never_panics(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = request_fields(&body);
            let _ = usage_counts(&body);
            let _ = string_at(&body);
        }
    }

    /// The reason a body is ambiguous; fails when it is read or merely not JSON.
    fn ambiguous(body: &[u8]) -> String {
        match request_fields(body) {
            Err(Unread::Ambiguous(why)) => why,
            other => panic!(
                "{} is not ambiguous: {other:?}",
                String::from_utf8_lossy(body)
            ),
        }
    }

    /// `name` with its characters at `every`th positions written as `\u` escapes.
    fn escaped_name(name: &str, every: usize, from: usize) -> String {
        name.chars()
            .enumerate()
            .map(|(i, c)| {
                if (i + from).is_multiple_of(every) {
                    c.encode_utf16(&mut [0; 2])
                        .iter()
                        .map(|u| format!("\\u{u:04x}"))
                        .collect()
                } else {
                    c.to_string()
                }
            })
            .collect()
    }

    /// A value of the right type for each member ezgate reads.
    fn sample(name: &str) -> &'static str {
        match name {
            "model" => r#""gpt-4o-mini""#,
            "messages" => r#"[{"role":"user","content":"hi"}]"#,
            "prompt" | "input" => r#""hi""#,
            "stream" => "true",
            "stream_options" => r#"{"include_usage":true}"#,
            "tools" => r#"[{"type":"image_generation","model":"gpt-image-1"}]"#,
            "session" => r#"{"type":"realtime","model":"gpt-realtime"}"#,
            _ => "100",
        }
    }

    #[test]
    fn the_plain_lookup_is_the_list_of_names() {
        for (at, name) in TOP.iter().enumerate() {
            assert_eq!(top_index(name), Some(at));
            assert!(TOP_NAMES.may_be(name.len()));
        }
        assert_eq!(top_index(b"temperature"), None);
        assert!(!TOP_NAMES.may_be(b"temperature".len()) && !TOP_NAMES.may_be(64));
    }

    #[test]
    fn names_are_read_decoded() {
        let f = request_fields(
            br#"{"mod\u0065l":"gpt-4.1","\u006dax_tokens":7,"stream":true,
                "stream_\u006fptions":{"include\u005fusage":true}}"#,
        )
        .unwrap();
        assert_eq!(f.model.as_deref(), Some("gpt-4.1"));
        assert_eq!(f.max_tokens, Some(7));
        assert_eq!(f.include_usage, Some(true));
        // `role` and `type` are not text however they are spelled.
        let plain = request_fields(br#"{"messages":[{"role":"user","content":"ab"}]}"#).unwrap();
        let escaped =
            request_fields(br#"{"messages":[{"r\u006fle":"user","content":"ab"}]}"#).unwrap();
        assert_eq!(plain.text, escaped.text);
    }

    #[test]
    fn a_member_read_twice_is_ambiguous_however_spelled() {
        for name in TOP.map(|n| std::str::from_utf8(n).unwrap()) {
            let value = sample(name);
            for second in [
                name.to_owned(),
                escaped_name(name, 2, 0),
                escaped_name(name, 1, 0),
            ] {
                let body = format!(r#"{{"{name}":{value},"x":1,"{second}":{value}}}"#);
                let why = ambiguous(body.as_bytes());
                assert!(why.contains(&format!("`{name}` appears twice")), "{why}");
            }
        }
        for (body, member) in [
            (
                r#"{"stream_options":{"include_usage":true,"include\u005fusage":false}}"#,
                "stream_options.include_usage",
            ),
            (
                r#"{"tools":[{"type":"image_generation","model":"a","mod\u0065l":"b"}]}"#,
                "tools[].model",
            ),
            (
                r#"{"tools":[{"type":"x","t\u0079pe":"image_generation"}]}"#,
                "tools[].type",
            ),
            (r#"{"session":{"model":"a","model":"b"}}"#, "session.model"),
        ] {
            let why = ambiguous(body.as_bytes());
            assert!(why.contains(&format!("`{member}` appears twice")), "{why}");
        }
        // Members ezgate does not read may repeat: that is the upstream's business.
        assert!(request_fields(br#"{"model":"m","user":"a","user":"b"}"#).is_ok());
    }

    #[test]
    fn a_name_a_parser_folds_onto_a_read_member_is_ambiguous() {
        for body in [
            r#"{"MODEL":"gpt-4.1"}"#,
            r#"{"model":"gpt-4o-mini","Model":"gpt-4.1"}"#,
            r#"{"mod\u0045l":"gpt-4.1"}"#,
            r#"{"ſtream":true}"#,
            r#"{"\u017ftream":true}"#,
            r#"{"max_to\u212aens":1}"#,
            "{\"max_to\u{212a}ens\":1}",
            "{\"\u{130}nput\":\"x\"}",
            "{\"\u{131}nput\":\"x\"}",
            r#"{"Stream_Options":null}"#,
            r#"{"stream_options":{"INCLUDE_USAGE":false}}"#,
            r#"{"tools":[{"type":"image_generation","MODEL":"gpt-image-1"}]}"#,
            r#"{"tools":[{"Type":"image_generation"}]}"#,
            r#"{"session":{"Model":"gpt-realtime"}}"#,
            r#"{"Tools":[]}"#,
        ] {
            let why = ambiguous(body.as_bytes());
            assert!(why.contains("ignoring case"), "{body}: {why}");
        }
        // Names that fold onto nothing ezgate reads are left alone.
        assert!(request_fields("{\"modèle\":1,\"Temperature\":1,\"ſ\":1}".as_bytes()).is_ok());
    }

    #[test]
    fn names_with_nul_controls_or_lone_surrogates_are_ambiguous() {
        for body in [
            &br#"{"model\u0000":"gpt-4.1"}"#[..],
            br#"{"model\u0000x":"gpt-4.1"}"#,
            br#"{"\u0000":1}"#,
            b"{\"mo\x01del\":\"gpt-4.1\"}",
            b"{\"model\x00\":\"gpt-4.1\"}",
            br#"{"model\u007f":"gpt-4.1"}"#,
            br#"{"mod\ud800el":"gpt-4.1"}"#,
            br#"{"model\udc00":"gpt-4.1"}"#,
            br#"{"x\ud83d":1}"#,
            br#"{"stream_options":{"include_usage\u0000":true}}"#,
            br#"{"session":{"model\ud800":"x"}}"#,
        ] {
            ambiguous(body);
        }
        // A surrogate pair is one character: a name like any other.
        assert!(request_fields(br#"{"\ud83d\ude00":1,"model":"m"}"#).is_ok());
    }

    #[test]
    fn counts_are_plain_whole_numbers_or_null() {
        for name in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
            for bad in [
                "1e3",
                "1E3",
                "1000.0",
                "-0",
                "-1",
                "01",
                "00",
                "+5",
                "18446744073709551616",
                "99999999999999999999999",
                r#""1000""#,
                "true",
                "[1]",
                "{}",
            ] {
                let why = ambiguous(format!(r#"{{"{name}":{bad}}}"#).as_bytes());
                assert!(
                    why.contains(&format!("`{name}` must be a whole number")),
                    "{why}"
                );
            }
            for (good, want) in [
                ("0", Some(0)),
                ("1000", Some(1000)),
                ("18446744073709551615", Some(u64::MAX)),
                ("null", None),
            ] {
                let body = format!(r#"{{"{name}" : {good} }}"#);
                let f = request_fields(body.as_bytes()).unwrap();
                let got = [f.max_tokens, f.max_completion_tokens, f.max_output_tokens];
                assert!(got.contains(&want) && got.iter().filter(|n| n.is_some()).count() <= 1);
            }
        }
    }

    #[test]
    fn flags_are_booleans_or_null() {
        for body in [
            r#"{"stream":1}"#,
            r#"{"stream":"true"}"#,
            r#"{"stream":"yes"}"#,
            r#"{"stream":[]}"#,
            r#"{"stream":true,"stream_options":{"include_usage":1}}"#,
            r#"{"stream":true,"stream_options":[true]}"#,
            r#"{"stream":true,"stream_options":"include_usage"}"#,
        ] {
            ambiguous(body.as_bytes());
        }
    }

    #[test]
    fn what_else_makes_parsers_disagree_is_ambiguous() {
        let deep = format!(
            r#"{{"model":"m","x":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        for body in [
            &b"\xEF\xBB\xBF{\"model\":\"gpt-4.1\"}"[..],
            b"{\"model\":\"gpt-4o-mini\",\"mod\xe9l\":\"gpt-4.1\"}",
            b"{\"model\":\"gpt-4o-mini\",\"\xc3\x28\":1}",
            br#"{"model":"gpt-4o-mini"} x"#,
            br#"{"model":"gpt-4o-mini"}{"model":"gpt-4.1"}"#,
            deep.as_bytes(),
        ] {
            ambiguous(body);
        }
        // What is not a JSON object at all is merely not understood.
        for body in [
            &b"{not json"[..],
            b"",
            b"[1]",
            b"model=gpt-4.1",
            b"\x1f\x8b\x08\x00",
            br#"{"model":"gpt-4o-mini""#,
            br#"{"model":1}"#,
        ] {
            assert_eq!(request_fields(body).err(), Some(Unread::NotJson));
        }
    }

    #[test]
    fn reads_the_models_named_inside() {
        let f = request_fields(
            br#"{"model":"gpt-4.1","tools":[{"type":"web_search"},
                {"type":"image_generation","model":"gpt-image-1","quality":"low"},
                {"type":"function","function":{"name":"f","parameters":{"model":"x"}}},
                7, null, {"type":"image_generation","mod\u0065l":"dall-e-3"}]}"#,
        )
        .unwrap();
        assert_eq!(f.model.as_deref(), Some("gpt-4.1"));
        assert_eq!(f.other_models, ["gpt-image-1", "dall-e-3"]);
        assert!(!f.unnamed_tool_model);
        for body in [
            r#"{"tools":[{"type":"image_generation"}]}"#,
            r#"{"tools":[{"type":"image_generation","model":null}]}"#,
            r#"{"tools":[{"type":"image\u005fgeneration","size":"1024x1024"}]}"#,
        ] {
            let f = request_fields(body.as_bytes()).unwrap();
            assert!(f.unnamed_tool_model, "{body}");
            assert!(f.other_models.is_empty());
        }
        let f = request_fields(
            br#"{"session":{"type":"realtime","model":"gpt-realtime","audio":{"model":"x"}}}"#,
        )
        .unwrap();
        assert_eq!(f.other_models, ["gpt-realtime"]);
        let g = request_fields(
            br#"{"session":{"model":"gpt-realtime","input_audio_transcription":{"model":"whisper-1"},
                "audio":{"input":{"transcription":{"model":"gpt-4o-transcribe"}}}}}"#,
        )
        .unwrap();
        assert_eq!(
            g.other_models,
            ["gpt-realtime", "whisper-1", "gpt-4o-transcribe"]
        );
        assert!(g.session_model);
        let h = request_fields(
            br#"{"model":"gpt-realtime","input_audio_transcription":{"model":"whisper-1"}}"#,
        )
        .unwrap();
        assert_eq!(h.other_models, ["whisper-1"]);
        assert!(matches!(
            request_fields(br#"{"audio":{"input":{"transcription":{"model":"a","model":"b"}}}}"#),
            Err(Unread::Ambiguous(_))
        ));
        assert_eq!(f.model, None);
        // Not a list of tools, not a session object: nothing to read (the upstream refuses).
        let f = request_fields(br#"{"tools":{"model":"x"},"session":"s"}"#).unwrap();
        assert!(f.other_models.is_empty() && !f.unnamed_tool_model);
    }

    /// A JSON document like `v`, its member names written by `name`.
    fn write(v: &serde_json::Value, name: &dyn Fn(&str) -> String, out: &mut String) {
        match v {
            serde_json::Value::Object(o) => {
                out.push('{');
                for (i, (k, v)) in o.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push('"');
                    out.push_str(&name(k));
                    out.push_str("\":");
                    write(v, name, out);
                }
                out.push('}');
            }
            serde_json::Value::Array(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(v, name, out);
                }
                out.push(']');
            }
            v => out.push_str(&v.to_string()),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Names with escapes read as the same names written plainly; a read member written
        /// once more, in any spelling, makes the body ambiguous.
        #[test]
        fn escaped_names_read_as_plain_ones(
            members in prop::collection::vec(member(), 1..8),
            every in 1usize..4,
            from in 0usize..4,
            again in any::<prop::sample::Index>(),
        ) {
            let obj: serde_json::Map<String, serde_json::Value> = members.into_iter().collect();
            let v = serde_json::Value::Object(obj);
            let (mut plain, mut escaped) = (String::new(), String::new());
            write(&v, &|k| k.to_owned(), &mut plain);
            write(&v, &|k| escaped_name(k, every, from), &mut escaped);
            let read = request_fields(plain.as_bytes());
            let understood = read.is_ok();
            prop_assert_eq!(request_fields(escaped.as_bytes()), read, "{}", escaped);
            // The same member once more, spelled with escapes.
            let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
            let key = again.get(&keys);
            if TOP.contains(&key.as_bytes()) && understood {
                let twice = format!(
                    r#"{},"{}":{}}}"#,
                    plain.strip_suffix('}').unwrap(),
                    escaped_name(key, every, from),
                    v[key.as_str()]
                );
                let is_ambiguous = matches!(request_fields(twice.as_bytes()), Err(Unread::Ambiguous(_)));
                prop_assert!(is_ambiguous, "{}", twice);
            }
        }
    }
}

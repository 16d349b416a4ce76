//! A one-pass reader of the few members of a JSON request body that rate limits need: the
//! model, the prompt's characters (counted by class for the token estimate), the completion
//! cap and the stream flags.
//!
//! It runs on every request a token or model policy covers, so it builds nothing: strings
//! are found with a SIMD search for `"` and `\`, prompt characters counted from the bytes
//! ([`Counts`]; the ASCII between two hits in one vectorized pass), and every other value
//! skipped. It follows the same rules as reading the body with serde
//! into the few typed fields (a duplicated field, a wrong type or a malformed document
//! means "not understood"), so the estimate does not depend on how the body was read.
//! It is lenient only where the upstream rejects the body anyway (raw control characters
//! inside strings, the exact number grammar).

use std::borrow::Cow;
use std::ops::Range;

use super::estimate::Counts;

/// Nesting deeper than this is refused, as serde_json refuses it.
const MAX_DEPTH: usize = 128;

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
    pub stream: Option<bool>,
    pub include_usage: Option<bool>,
}

/// Reads the members of a top-level JSON object; `None` when the body is not one.
pub fn request_fields(body: &[u8]) -> Option<Fields<'_>> {
    // Most prompts are ASCII: one check here saves one per string.
    let mut s = Scan {
        b: body,
        i: 0,
        ascii: body.is_ascii(),
    };
    let mut f = Fields::default();
    let mut seen = 0u16;
    s.members(|s, key| {
        let (bit, known) = match key.raw {
            b"model" => (1, true),
            b"messages" => (2, true),
            b"prompt" => (4, true),
            b"input" => (8, true),
            b"max_tokens" => (16, true),
            b"max_completion_tokens" => (32, true),
            b"max_output_tokens" => (64, true),
            b"stream" => (128, true),
            b"stream_options" => (256, true),
            _ => (0, false),
        };
        if known {
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
        }
        match key.raw {
            b"model" => {
                f.model = match s.peek()? {
                    b'"' => Some(s.string(None)?.decode()?),
                    _ => {
                        s.literal(b"null")?;
                        None
                    }
                }
            }
            b"messages" | b"prompt" | b"input" => s.value(Some(&mut f.text), 0)?,
            b"max_tokens" => f.max_tokens = s.opt_u64()?,
            b"max_completion_tokens" => f.max_completion_tokens = s.opt_u64()?,
            b"max_output_tokens" => f.max_output_tokens = s.opt_u64()?,
            b"stream" => f.stream = s.opt_bool()?,
            b"stream_options" => f.include_usage = s.stream_options()?,
            _ => s.value(None, 0)?,
        }
        Some(())
    })?;
    s.ws();
    (s.i == body.len()).then_some(f)
}

/// The token counts of a `usage` object at the start of `doc` (after spaces): the
/// `prompt_tokens` (or `input_tokens`) and `completion_tokens` (or `output_tokens`) members,
/// 0 when absent, other members skipped. As serde reads them into `u64` fields: a value that
/// is not a whole number, or a count given twice, means `None`. What follows the object is
/// not looked at.
pub fn usage_counts(doc: &[u8]) -> Option<(u64, u64)> {
    let mut s = Scan {
        b: doc,
        i: 0,
        // Characters are not counted here.
        ascii: true,
    };
    let (mut prompt, mut completion) = (None, None);
    s.members(|s, key| {
        let slot = match key.raw {
            b"prompt_tokens" | b"input_tokens" => &mut prompt,
            b"completion_tokens" | b"output_tokens" => &mut completion,
            _ => return s.value(None, 0),
        };
        if slot.is_some() {
            return None;
        }
        let text = s.number()?;
        *slot = Some(std::str::from_utf8(text).ok()?.parse::<u64>().ok()?);
        Some(())
    })?;
    Some((prompt.unwrap_or(0), completion.unwrap_or(0)))
}

/// The string at the start of `doc` (after spaces), decoded; `None` for any other value.
pub fn string_at(doc: &[u8]) -> Option<Cow<'_, str>> {
    let mut s = Scan {
        b: doc,
        i: 0,
        // Characters are not counted here.
        ascii: true,
    };
    if s.peek()? != b'"' {
        return None;
    }
    s.string(None)?.decode()
}

/// A string as it appears in the document, between its quotes.
struct Str<'a> {
    raw: &'a [u8],
    escaped: bool,
}

impl<'a> Str<'a> {
    fn decode(&self) -> Option<Cow<'a, str>> {
        if !self.escaped {
            return std::str::from_utf8(self.raw).ok().map(Cow::Borrowed);
        }
        // Rare (a model name with escapes): let serde_json apply the full rules.
        let mut quoted = Vec::with_capacity(self.raw.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(self.raw);
        quoted.push(b'"');
        serde_json::from_slice::<String>(&quoted)
            .ok()
            .map(Cow::Owned)
    }
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    /// The whole document is ASCII: every byte of a string is a character.
    ascii: bool,
}

impl<'a> Scan<'a> {
    /// An object: `each` reads the value of every member, given its key.
    fn members(&mut self, mut each: impl FnMut(&mut Self, Str<'a>) -> Option<()>) -> Option<()> {
        self.expect(b'{')?;
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            let key = self.string(None)?;
            self.expect(b':')?;
            each(self, key)?;
            if self.eat(b',') {
                continue;
            }
            return self.expect(b'}');
        }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        if hit {
            self.i += 1;
        }
        hit
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        self.eat(c).then_some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.ws();
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// A string; with `text`, its characters are counted there.
    fn string(&mut self, mut text: Option<&mut Counts>) -> Option<Str<'a>> {
        self.expect(b'"')?;
        let start = self.i;
        let mut escaped = false;
        loop {
            let rest = self.b.get(self.i..)?;
            let at = self.i + memchr::memchr2(b'"', b'\\', rest)?;
            if let Some(t) = text.as_deref_mut() {
                let run = &self.b[self.i..at];
                if self.ascii {
                    t.add_ascii(run);
                } else {
                    t.add_utf8(run);
                }
            }
            if self.b[at] == b'"' {
                self.i = at + 1;
                return Some(Str {
                    raw: &self.b[start..at],
                    escaped,
                });
            }
            escaped = true;
            match *self.b.get(at + 1)? {
                c @ (b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                    if let Some(t) = text.as_deref_mut() {
                        t.add_char(match c {
                            b'b' => '\x08',
                            b'f' => '\x0c',
                            b'n' => '\n',
                            b'r' => '\r',
                            b't' => '\t',
                            _ => char::from(c),
                        });
                    }
                    self.i = at + 2;
                }
                b'u' => {
                    let unit = hex4(self.b.get(at + 2..at + 6)?)?;
                    // A surrogate pair is one character in 12 bytes.
                    let pair = (0xD800..0xDC00).contains(&unit)
                        && self.b.get(at + 6..at + 8) == Some(b"\\u")
                        && self
                            .b
                            .get(at + 8..at + 12)
                            .and_then(hex4)
                            .is_some_and(|low| (0xDC00..0xE000).contains(&low));
                    if let Some(t) = text.as_deref_mut() {
                        // A lone surrogate (which serde refuses) counts as one character.
                        match char::from_u32(unit) {
                            _ if pair => t.astral += 1,
                            Some(c) => t.add_char(c),
                            None => t.other += 1,
                        }
                    }
                    self.i = at + if pair { 12 } else { 6 };
                }
                _ => return None,
            }
        }
    }

    /// Skips one value; with `text`, counts the characters of its strings there.
    fn value(&mut self, mut text: Option<&mut Counts>, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string(text).map(|_| ()),
            b'{' => {
                self.i += 1;
                if self.eat(b'}') {
                    return Some(());
                }
                loop {
                    let key = self.string(None)?;
                    self.expect(b':')?;
                    let not_text = key.raw == b"role" || key.raw == b"type";
                    self.value(text.as_deref_mut().filter(|_| !not_text), depth + 1)?;
                    if self.eat(b',') {
                        continue;
                    }
                    return self.expect(b'}');
                }
            }
            b'[' => {
                self.i += 1;
                if self.eat(b']') {
                    return Some(());
                }
                loop {
                    self.value(text.as_deref_mut(), depth + 1)?;
                    if self.eat(b',') {
                        continue;
                    }
                    return self.expect(b']');
                }
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number().map(|_| ()),
            _ => None,
        }
    }

    /// A number's text.
    fn number(&mut self) -> Option<&'a [u8]> {
        self.ws();
        let start = self.i;
        while let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
        }
        let text = &self.b[start..self.i];
        text.iter().any(u8::is_ascii_digit).then_some(text)
    }

    /// `null`, or a whole number that fits a `u64`.
    fn opt_u64(&mut self) -> Option<Option<u64>> {
        if self.peek()? == b'n' {
            return self.literal(b"null").map(|()| None);
        }
        let text = self.number()?;
        std::str::from_utf8(text).ok()?.parse().ok().map(Some)
    }

    fn opt_bool(&mut self) -> Option<Option<bool>> {
        match self.peek()? {
            b't' => self.literal(b"true").map(|()| Some(true)),
            b'f' => self.literal(b"false").map(|()| Some(false)),
            _ => self.literal(b"null").map(|()| None),
        }
    }

    /// `stream_options`: `null`, or an object whose `include_usage` is read.
    fn stream_options(&mut self) -> Option<Option<bool>> {
        match self.peek()? {
            b'n' => return self.literal(b"null").map(|()| None),
            // serde reads a struct from an array of its fields, in order.
            b'[' => {
                self.i += 1;
                if self.eat(b']') {
                    return Some(None);
                }
                let include = self.opt_bool()?;
                self.expect(b']')?;
                return Some(include);
            }
            _ => {}
        }
        self.expect(b'{')?;
        let mut include = None;
        let mut seen = false;
        if self.eat(b'}') {
            return Some(None);
        }
        loop {
            let key = self.string(None)?;
            self.expect(b':')?;
            if key.raw == b"include_usage" {
                if seen {
                    return None;
                }
                seen = true;
                include = self.opt_bool()?;
            } else {
                self.value(None, 1)?;
            }
            if self.eat(b',') {
                continue;
            }
            self.expect(b'}')?;
            return Some(include);
        }
    }
}

/// One member of a JSON object, as byte ranges of its document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// From the key's opening quote to the end of the value.
    pub whole: Range<usize>,
    pub value: Range<usize>,
}

/// The object at the start of `doc` (after spaces): `each` sees every member (the key as
/// written, without its quotes) in order; returns the object's range, braces included, or
/// `None` when `doc` does not start with a well-formed object.
pub fn object_members(doc: &[u8], mut each: impl FnMut(&[u8], Member)) -> Option<Range<usize>> {
    let mut s = Scan {
        b: doc,
        i: 0,
        // Characters are not counted here.
        ascii: true,
    };
    s.ws();
    let open = s.i;
    s.expect(b'{')?;
    if s.eat(b'}') {
        return Some(open..s.i);
    }
    loop {
        s.ws();
        let start = s.i;
        let key = s.string(None)?;
        s.expect(b':')?;
        s.ws();
        let value = s.i;
        s.value(None, 1)?;
        each(
            key.raw,
            Member {
                whole: start..s.i,
                value: value..s.i,
            },
        );
        if s.eat(b',') {
            continue;
        }
        s.expect(b'}')?;
        return Some(open..s.i);
    }
}

/// The member `key` of the object at the start of `doc`, and the bytes to cut so that the
/// object stays well-formed without it (its comma and spaces included).
pub fn member_cut(doc: &[u8], key: &[u8]) -> Option<(Member, Range<usize>)> {
    let mut prev_end = None;
    let mut found: Option<(Member, Option<usize>)> = None;
    let mut next_start = None;
    object_members(doc, |k, m| match &found {
        None if k == key => found = Some((m, prev_end)),
        None => prev_end = Some(m.whole.end),
        Some(_) => {
            if next_start.is_none() {
                next_start = Some(m.whole.start);
            }
        }
    })?;
    let (m, prev_end) = found?;
    let cut = match (prev_end, next_start) {
        // `, "key": value` after the previous member.
        (Some(end), _) => end..m.whole.end,
        // `"key": value, ` before the next one.
        (None, Some(next)) => m.whole.start..next,
        (None, None) => m.whole.clone(),
    };
    Some((m, cut))
}

fn hex4(h: &[u8]) -> Option<u32> {
    std::str::from_utf8(h)
        .ok()
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .filter(|_| h.len() == 4 && h.iter().all(u8::is_ascii_hexdigit))
}

#[cfg(test)]
mod tests {
    use super::*;
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
            serde_json::Value::Array(a) => a.iter().for_each(|v| count(v, c)),
            serde_json::Value::Object(o) => o
                .iter()
                .filter(|(k, _)| *k != "role" && *k != "type")
                .for_each(|(_, v)| count(v, c)),
            _ => {}
        }
    }

    fn reference(body: &[u8]) -> Option<Fields<'static>> {
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
        })
    }

    fn same(body: &[u8]) {
        assert_eq!(
            request_fields(body),
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
        };
        assert_eq!(f.text, want);
        same(body.as_bytes());
    }

    fn json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            ".*".prop_map(Value::String),
            "[\\p{Han}\\p{Hiragana}\\p{Katakana}\\p{Hangul}，。、 a-z0-9\n\"\\\\é😀]{0,24}"
                .prop_map(Value::String),
            prop::sample::select(vec!["role", "type", "user", "text"])
                .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::vec(
                    (
                        prop::sample::select(vec![
                            "role",
                            "type",
                            "content",
                            "text",
                            "model",
                            "stream",
                            "include_usage",
                            "x"
                        ]),
                        inner
                    ),
                    0..6
                )
                .prop_map(|kv| serde_json::Value::Object(
                    kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
            ]
        })
    }

    #[derive(Deserialize)]
    struct UsageRef {
        #[serde(default, alias = "input_tokens")]
        prompt_tokens: u64,
        #[serde(default, alias = "output_tokens")]
        completion_tokens: u64,
    }

    /// A member of a `usage` object: a count (well or badly typed) or anything else.
    fn usage_member() -> impl Strategy<Value = (String, String)> {
        let key = prop::sample::select(vec![
            "prompt_tokens",
            "input_tokens",
            "completion_tokens",
            "output_tokens",
            "total_tokens",
            "prompt_tokens_details",
        ]);
        let value = prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            (0u64..100_000).prop_map(|n| n.to_string()),
            Just("null".to_owned()),
            Just("-1".to_owned()),
            Just("1.5".to_owned()),
            Just("1e3".to_owned()),
            Just("\"12\"".to_owned()),
            Just("18446744073709551616".to_owned()),
            json().prop_map(|v| serde_json::to_string(&v).unwrap()),
        ];
        (key, value).prop_map(|(k, v)| (k.to_owned(), v))
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
            prop_assert_eq!(request_fields(&body), reference(&body));
        }

        /// Arbitrary bytes never panic.
        #[test]
        fn never_panics(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = request_fields(&body);
            let _ = usage_counts(&body);
            let _ = string_at(&body);
        }

        /// A `usage` object (members written by hand, so a count may come twice) reads as
        /// serde reads it into the two counts; what follows it does not matter.
        #[test]
        fn usage_matches_serde(
            members in prop::collection::vec(usage_member(), 0..6),
            tail in prop::sample::select(vec!["", "}", ",\"model\":1}", " garbage"]),
        ) {
            let inner: Vec<String> = members
                .iter()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v))
                .collect();
            let object = format!("{{{}}}", inner.join(","));
            let reference = serde_json::from_str::<UsageRef>(&object)
                .ok()
                .map(|u| (u.prompt_tokens, u.completion_tokens));
            let doc = format!("{object}{tail}");
            prop_assert_eq!(usage_counts(doc.as_bytes()), reference, "{}", doc);
        }

        /// A string value reads as serde reads a `String`; any other value is none.
        #[test]
        fn string_matches_serde(v in json()) {
            let text = serde_json::to_string(&v).unwrap();
            let reference = match &v {
                serde_json::Value::String(s) => Some(s.clone()),
                _ => None,
            };
            prop_assert_eq!(string_at(text.as_bytes()).map(String::from), reference);
        }
    }

    #[test]
    fn members_and_cuts_keep_the_object_well_formed() {
        let doc = br#" {"a":1, "usage" : null ,"b":{"c":[2]}} "#;
        let mut keys = Vec::new();
        let whole = object_members(doc, |k, m| keys.push((k.to_vec(), m.value))).unwrap();
        assert_eq!(
            &doc[whole],
            &br#"{"a":1, "usage" : null ,"b":{"c":[2]}}"#[..]
        );
        assert_eq!(keys.len(), 3);
        assert_eq!(&doc[keys[2].1.clone()], b"{\"c\":[2]}");
        for (doc, key, left) in [
            (
                &br#"{"a":1,"usage":null}"#[..],
                &b"usage"[..],
                &br#"{"a":1}"#[..],
            ),
            (br#"{"usage":null, "a":1}"#, b"usage", br#"{"a":1}"#),
            (br#"{"usage":{"x":1}}"#, b"usage", br#"{}"#),
            (
                br#"{"a":1, "usage" : null ,"b":2}"#,
                b"usage",
                br#"{"a":1 ,"b":2}"#,
            ),
        ] {
            let (_, cut) = member_cut(doc, key).unwrap();
            let mut out = doc[..cut.start].to_vec();
            out.extend_from_slice(&doc[cut.end..]);
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(left));
            assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
        }
        assert!(member_cut(br#"{"a":"usage"}"#, b"usage").is_none());
        assert!(object_members(b"[1]", |_, _| {}).is_none());
        assert!(object_members(br#"{"a":1"#, |_, _| {}).is_none());
    }
}

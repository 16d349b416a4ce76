//! A one-pass JSON lexer for the hot path: a cursor ([`Scan`]) over a document's bytes that
//! reads strings, skips values and walks an object's members without building anything.
//! Strings are found with a SIMD search for `"` and `\`, and the characters of the strings
//! that are text counted from the bytes ([`Counts`]; the ASCII between two hits in one
//! vectorized pass). It follows serde_json's grammar (a malformed document reads as
//! `None`), lenient only where the upstream rejects the body anyway (raw control characters
//! inside string values, the exact number grammar of values it skips); nesting past
//! [`MAX_DEPTH`] stops the reading as ambiguous.
//!
//! Read with it: a request body's members ([`super::fields`], which adds the reading of
//! the names and values ezgate needs to `Scan`), a response's `usage` counts
//! ([`usage_counts`]) and streamed strings ([`string_at`]), and the members of an event to
//! cut ([`object_members`], [`member_cut`]).

use std::borrow::Cow;
use std::ops::Range;

use super::estimate::Counts;

/// Nesting deeper than this is refused, as serde_json refuses it.
const MAX_DEPTH: usize = 128;

/// The token counts of a `usage` object, as the upstream reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCounts {
    pub prompt: u64,
    pub completion: u64,
    /// `prompt_tokens_details.cached_tokens` (Responses: `input_tokens_details`, realtime:
    /// `input_token_details`): prompt tokens read from the upstream's cache.
    pub cached: u64,
    /// `audio_tokens` of those details: audio in the prompt.
    pub audio_in: u64,
    /// `completion_tokens_details.audio_tokens` (`output_tokens_details`,
    /// `output_token_details`): audio in the completion.
    pub audio_out: u64,
}

/// The token counts of a `usage` object at the start of `doc` (after spaces): the
/// `prompt_tokens` (or `input_tokens`) and `completion_tokens` (or `output_tokens`) members,
/// 0 when absent, other members skipped. As serde reads them into `u64` fields: a value that
/// is not a whole number, or a count given twice, means `None`. What follows the object is
/// not looked at. The details objects are read leniently (a count there that is not a whole
/// number is 0): they refine the price of tokens already counted.
pub fn usage_counts(doc: &[u8]) -> Option<UsageCounts> {
    // Characters are not counted here.
    let mut s = Scan::new(doc, true);
    let (mut prompt, mut completion) = (None, None);
    let mut counts = UsageCounts::default();
    s.members(|s, key| {
        let slot = match &*key.name() {
            b"prompt_tokens" | b"input_tokens" => &mut prompt,
            b"completion_tokens" | b"output_tokens" => &mut completion,
            b"prompt_tokens_details" | b"input_tokens_details" | b"input_token_details" => {
                return details(s, &mut |name, n| match name {
                    b"cached_tokens" => counts.cached = n,
                    b"audio_tokens" => counts.audio_in = n,
                    _ => {}
                });
            }
            b"completion_tokens_details" | b"output_tokens_details" | b"output_token_details" => {
                return details(s, &mut |name, n| {
                    if name == b"audio_tokens" {
                        counts.audio_out = n;
                    }
                });
            }
            _ => return s.value(None, 0),
        };
        if slot.is_some() {
            return None;
        }
        *slot = Some(whole(s.number()?)?);
        Some(())
    })?;
    counts.prompt = prompt.unwrap_or(0);
    counts.completion = completion.unwrap_or(0);
    Some(counts)
}

/// A details object of a usage: `each` gets every member whose value is a whole number
/// (the last one given); anything else is skipped.
fn details(s: &mut Scan<'_>, each: &mut dyn FnMut(&[u8], u64)) -> Option<()> {
    s.ws();
    if s.peek()? != b'{' {
        return s.value(None, 1);
    }
    s.members(|s, key| {
        s.ws();
        match s.peek()? {
            b'-' | b'0'..=b'9' => {
                if let Some(n) = whole(s.number()?) {
                    each(&key.name(), n);
                }
                Some(())
            }
            _ => s.value(None, 2),
        }
    })
}

/// A number's text as serde reads it into a `u64`: digits, no leading zero, at most
/// `u64::MAX`; else `None`. (`str::parse` cost ~80 instructions more per count, two to six
/// counts per answer, and took `+5` and `007`.)
fn whole(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let d = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// The string at the start of `doc` (after spaces), decoded; `None` for any other value.
pub fn string_at(doc: &[u8]) -> Option<Cow<'_, str>> {
    // Characters are not counted here.
    let mut s = Scan::new(doc, true);
    if s.peek()? != b'"' {
        return None;
    }
    s.string(None)?.decode()
}

/// A string as it appears in the document, between its quotes.
pub(super) struct Str<'a> {
    pub(super) raw: &'a [u8],
    pub(super) escaped: bool,
}

impl<'a> Str<'a> {
    pub(super) fn decode(&self) -> Option<Cow<'a, str>> {
        if !self.escaped {
            return std::str::from_utf8(self.raw).ok().map(Cow::Borrowed);
        }
        // Rare (a name or model with escapes): let serde_json apply the full rules (a lone
        // surrogate is refused).
        let mut quoted = Vec::with_capacity(self.raw.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(self.raw);
        quoted.push(b'"');
        serde_json::from_slice::<String>(&quoted)
            .ok()
            .map(Cow::Owned)
    }

    /// The name as parsers read it: decoded when escaped (as written when it cannot be).
    pub(super) fn name(&self) -> Cow<'a, [u8]> {
        if !self.escaped {
            return Cow::Borrowed(self.raw);
        }
        match self.decode() {
            Some(name) => Cow::Owned(name.into_owned().into_bytes()),
            None => Cow::Borrowed(self.raw),
        }
    }
}

/// A cursor over one JSON document: each method reads what comes next (after spaces) and
/// moves past it, or returns `None` where the document is not what it expects.
pub(super) struct Scan<'a> {
    pub(super) b: &'a [u8],
    pub(super) i: usize,
    /// The whole document is ASCII: every byte of a string is a character.
    pub(super) ascii: bool,
    /// Why the document is ambiguous, once a reading stopped for that.
    pub(super) ambiguous: Option<String>,
}

impl<'a> Scan<'a> {
    pub(super) fn new(b: &'a [u8], ascii: bool) -> Self {
        Scan {
            b,
            i: 0,
            ascii,
            ambiguous: None,
        }
    }

    /// Stops the reading: the document is ambiguous (the first reason is kept).
    #[cold]
    pub(super) fn refuse<T>(&mut self, why: String) -> Option<T> {
        self.ambiguous.get_or_insert(why);
        None
    }

    #[cold]
    fn too_deep<T>(&mut self) -> Option<T> {
        self.refuse(format!(
            "the body nests deeper than {MAX_DEPTH} levels, where parsers give up at different \
             depths"
        ))
    }

    /// An object: `each` reads the value of every member, given its key.
    pub(super) fn members(
        &mut self,
        mut each: impl FnMut(&mut Self, Str<'a>) -> Option<()>,
    ) -> Option<()> {
        self.want(b'{')?;
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            let key = self.string(None)?;
            self.want(b':')?;
            each(self, key)?;
            if self.eat(b',') {
                continue;
            }
            return self.want(b'}');
        }
    }

    pub(super) fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    pub(super) fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    pub(super) fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        if hit {
            self.i += 1;
        }
        hit
    }

    /// `c` is next: moves past it.
    pub(super) fn want(&mut self, c: u8) -> Option<()> {
        self.eat(c).then_some(())
    }

    pub(super) fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.ws();
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// A string; with `text`, its characters are counted there.
    pub(super) fn string(&mut self, mut text: Option<&mut Counts>) -> Option<Str<'a>> {
        self.want(b'"')?;
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
    pub(super) fn value(&mut self, mut text: Option<&mut Counts>, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return self.too_deep();
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
                    self.want(b':')?;
                    let not_text = text.is_some()
                        && if key.escaped {
                            matches!(&*key.name(), b"role" | b"type")
                        } else {
                            key.raw == b"role" || key.raw == b"type"
                        };
                    self.value(text.as_deref_mut().filter(|_| !not_text), depth + 1)?;
                    if self.eat(b',') {
                        continue;
                    }
                    return self.want(b'}');
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
                    return self.want(b']');
                }
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => {
                self.number()?;
                // In a prompt, a number is a token id (`prompt: [[1, 2, …]]`): one token.
                if let Some(t) = text {
                    t.numbers += 1;
                }
                Some(())
            }
            _ => None,
        }
    }

    /// A number's text.
    pub(super) fn number(&mut self) -> Option<&'a [u8]> {
        self.ws();
        let start = self.i;
        while let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
        }
        let text = &self.b[start..self.i];
        text.iter().any(u8::is_ascii_digit).then_some(text)
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
    // Characters are not counted here.
    let mut s = Scan::new(doc, true);
    s.ws();
    let open = s.i;
    s.want(b'{')?;
    if s.eat(b'}') {
        return Some(open..s.i);
    }
    loop {
        s.ws();
        let start = s.i;
        let key = s.string(None)?;
        s.want(b':')?;
        s.ws();
        let value = s.i;
        s.value(None, 1)?;
        each(
            &key.name(),
            Member {
                whole: start..s.i,
                value: value..s.i,
            },
        );
        if s.eat(b',') {
            continue;
        }
        s.want(b'}')?;
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
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    /// Any JSON value, its strings and member names drawn to resemble request bodies.
    pub(in crate::limits) fn json() -> impl Strategy<Value = serde_json::Value> {
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
            Just("18446744073709551615".to_owned()),
            json().prop_map(|v| serde_json::to_string(&v).unwrap()),
        ];
        (key, value).prop_map(|(k, v)| (k.to_owned(), v))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

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
            prop_assert_eq!(usage_counts(doc.as_bytes()).map(|u| (u.prompt, u.completion)), reference, "{}", doc);
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

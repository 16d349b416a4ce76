//! A one-pass reader of the few members of a JSON request body that rate limits and model
//! allow-lists need: the model (and the models named inside: Responses tools, a Realtime
//! session), the prompt's characters (counted by class for the token estimate), the
//! completion cap and the stream flags.
//!
//! It runs on every request a token or model policy covers, so it builds nothing: strings
//! are found with a SIMD search for `"` and `\`, prompt characters counted from the bytes
//! ([`Counts`]; the ASCII between two hits in one vectorized pass), and every other value
//! skipped. It follows the same rules as reading the body with serde
//! into the few typed fields (a wrong type or a malformed document means "not understood"),
//! so the estimate does not depend on how the body was read.
//! It is lenient only where the upstream rejects the body anyway (raw control characters
//! inside string values, the exact number grammar of values it skips).
//!
//! One body, one reading: whatever two JSON parsers could read differently in a member
//! ezgate reads is [`Unread::Ambiguous`], refused whatever the policies: member names are
//! compared decoded (`"mod\u0065l"` is `model`), a member read twice (after decoding), a
//! name that only differs from one ezgate reads in case (Go's encoding/json matches names
//! ignoring case, `ſ` and `K` included), a name holding `\u0000`, a control character, a
//! lone surrogate or invalid UTF-8, a count that is not a plain whole number, a flag that
//! is not a boolean, a byte order mark, bytes after the object, nesting past [`MAX_DEPTH`].

use std::borrow::Cow;
use std::ops::Range;

use super::estimate::Counts;

/// Nesting deeper than this is refused, as serde_json refuses it.
const MAX_DEPTH: usize = 128;

/// The top-level members ezgate reads, in the order of the bits of `seen`.
const TOP: [&[u8]; 11] = [
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
    pub stream: Option<bool>,
    pub include_usage: Option<bool>,
    /// Models named inside the body: every `tools[].model`, and `session.model`.
    pub other_models: Vec<Cow<'a, str>>,
    /// A tool spends a model but names none (an `image_generation` tool without `model`):
    /// the upstream picks its default.
    pub unnamed_tool_model: bool,
}

/// Reads the members of a top-level JSON object.
pub fn request_fields(body: &[u8]) -> Result<Fields<'_>, Unread> {
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
            1..=3 => s.value(Some(&mut f.text), 1)?,
            4 => f.max_tokens = s.count(TOP[at])?,
            5 => f.max_completion_tokens = s.count(TOP[at])?,
            6 => f.max_output_tokens = s.count(TOP[at])?,
            7 => f.stream = s.flag(TOP[at])?,
            8 => f.include_usage = s.stream_options()?,
            9 => s.tools(&mut f)?,
            _ => s.session(&mut f)?,
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

/// The token counts of a `usage` object at the start of `doc` (after spaces): the
/// `prompt_tokens` (or `input_tokens`) and `completion_tokens` (or `output_tokens`) members,
/// 0 when absent, other members skipped. As serde reads them into `u64` fields: a value that
/// is not a whole number, or a count given twice, means `None`. What follows the object is
/// not looked at.
pub fn usage_counts(doc: &[u8]) -> Option<(u64, u64)> {
    // Characters are not counted here.
    let mut s = Scan::new(doc, true);
    let (mut prompt, mut completion) = (None, None);
    s.members(|s, key| {
        let slot = match &*key.name() {
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
    // Characters are not counted here.
    let mut s = Scan::new(doc, true);
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
    fn name(&self) -> Cow<'a, [u8]> {
        if !self.escaped {
            return Cow::Borrowed(self.raw);
        }
        match self.decode() {
            Some(name) => Cow::Owned(name.into_owned().into_bytes()),
            None => Cow::Borrowed(self.raw),
        }
    }
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

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    /// The whole document is ASCII: every byte of a string is a character.
    ascii: bool,
    /// Why the document is ambiguous, once a reading stopped for that.
    ambiguous: Option<String>,
}

impl<'a> Scan<'a> {
    fn new(b: &'a [u8], ascii: bool) -> Self {
        Scan {
            b,
            i: 0,
            ascii,
            ambiguous: None,
        }
    }

    /// Why the reading stopped.
    fn unread(&mut self) -> Unread {
        self.ambiguous
            .take()
            .map_or(Unread::NotJson, Unread::Ambiguous)
    }

    /// Stops the reading: the document is ambiguous (the first reason is kept).
    #[cold]
    fn refuse<T>(&mut self, why: String) -> Option<T> {
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
                    self.expect(b':')?;
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
            return self.expect(b']');
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
        const NAMES: Names = Names::new(&[b"model"], "session.");
        if self.peek()? != b'{' {
            return self.value(None, 0);
        }
        let mut seen = false;
        self.members(|s, key| match s.known(&key, &NAMES)? {
            None => s.value(None, 1),
            Some(_) if seen => s.twice(b"session.model"),
            Some(_) => {
                seen = true;
                f.other_models.extend(s.opt_string()?);
                Some(())
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
            &key.name(),
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
            prop_assert_eq!(request_fields(&body).ok(), reference(&body));
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

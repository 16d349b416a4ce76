//! The access log: one line per request, target `ezgate::access`.
//!
//! It is written on every request, so it does not go through `tracing`'s formatter: each line
//! is formatted by hand into a buffer reused by the thread (JSON with the same fields, names
//! and shape as the other log lines, or tracing's `key=value` text shape) and handed whole to
//! the same batched writer as the other logs ([`sink`]), which keeps the lines in order and never
//! drops one. Nothing is written until [`install`] is called, which the `ezgate` command does
//! at startup when the log filter lets `info` through for `ezgate::access`.
//!
//! The fields are names, codes, numbers and durations; never a key or a body.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub mod sink;

pub use sink::{LineSink, SinkGuard};

use crate::config::LogFormat;
use crate::outcome::Outcome;

/// The target of access lines, as in `RUST_LOG=ezgate::access=off`.
pub const TARGET: &str = "ezgate::access";

/// A buffer that grew past this (a very long model name) is not kept for the next line.
const KEEP_CAPACITY: usize = 16 * 1024;

/// One request, as the access log shows it. `None` fields are left out of the line.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub request_id: &'a str,
    /// ezgate's own labels (`method`, `route`, `source`, `session_end`): `'static`, written
    /// without an escape check.
    pub method: &'static str,
    pub route: &'static str,
    pub status: u16,
    pub source: &'static str,
    pub code: &'a str,
    pub upstream_status: Option<u16>,
    pub duration: Duration,
    pub upstream: Duration,
    /// Time waited for the upstream's quota (`upstream.quota.mode = "enforce"`), when any.
    pub queued: Option<Duration>,
    pub bytes: u64,
    pub client: Option<&'a str>,
    pub model: Option<&'a str>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Prompt tokens the upstream read from its cache, when it reported any.
    pub cached_tokens: Option<u64>,
    /// What the request cost, in nano-units of `prices.currency`; shown as a decimal of
    /// the currency (`"cost":0.0075`).
    pub cost: Option<u64>,
    /// Tokens a token policy charged in the end (reported, estimated, or 0 when refunded).
    pub charged_tokens: Option<u64>,
    /// The request's trace id, when its span is recorded (`[tracing]`).
    pub trace_id: Option<&'a str>,
    /// A WebSocket session: how it ended, and the bytes the client sent through.
    pub session_end: Option<&'static str>,
    pub bytes_in: Option<u64>,
}

struct Sink {
    writer: LineSink,
    format: LogFormat,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Per thread: the line being formatted, and the timestamp's second.
struct Local {
    line: Vec<u8>,
    second: Second,
}

/// A timestamp up to its second (`2026-11-25T04:29:45`), written once per second: the date
/// arithmetic cost ~8 % of a line.
#[derive(Clone, Copy)]
struct Second {
    unix: u64,
    text: [u8; 19],
}

impl Second {
    const NONE: Second = Second {
        unix: u64::MAX,
        text: [0; 19],
    };
}

thread_local! {
    static LOCAL: RefCell<Local> = const {
        RefCell::new(Local { line: Vec::new(), second: Second::NONE })
    };
}

/// Sends access lines to `writer`, formatted as `format`. The first call wins.
pub fn install(writer: LineSink, format: LogFormat) {
    let _ = SINK.set(Sink { writer, format });
}

/// Whether [`write`] writes anything.
pub fn enabled() -> bool {
    SINK.get().is_some()
}

/// Writes the line of one request, if the access log is installed.
pub fn write(entry: &Entry<'_>) {
    let Some(sink) = SINK.get() else {
        return;
    };
    let now = SystemTime::now();
    let written = LOCAL
        .try_with(|local| match local.try_borrow_mut() {
            Ok(mut local) => {
                local.emit(sink, entry, now);
                true
            }
            Err(_) => false,
        })
        .unwrap_or(false);
    if !written {
        // Thread-local storage is being torn down (or in use): a one-off buffer does.
        Local {
            line: Vec::new(),
            second: Second::NONE,
        }
        .emit(sink, entry, now);
    }
}

impl Local {
    fn emit(&mut self, sink: &Sink, entry: &Entry<'_>, now: SystemTime) {
        self.line.clear();
        format_at(&mut self.line, sink.format, entry, now, &mut self.second);
        sink.writer.append(&self.line);
        if self.line.capacity() > KEEP_CAPACITY {
            self.line = Vec::new();
        }
    }
}

/// Appends the line of `entry`, newline included, as logged at `now`.
pub fn format(buf: &mut Vec<u8>, format: LogFormat, entry: &Entry<'_>, now: SystemTime) {
    let mut second = Second::NONE;
    format_at(buf, format, entry, now, &mut second);
}

/// [`format`], with the timestamp's second as last written (rewritten when it changed).
fn format_at(
    buf: &mut Vec<u8>,
    format: LogFormat,
    entry: &Entry<'_>,
    now: SystemTime,
    second: &mut Second,
) {
    // One growth for the usual line.
    buf.reserve(480);
    match format {
        LogFormat::Json => line::<true>(buf, entry, now, second),
        LogFormat::Text => line::<false>(buf, entry, now, second),
    }
}

/// A field's key with the separator before it, as each format writes it: `,"status":` and
/// ` status=`. One copy of a constant per key: writing the separator, quotes and name one
/// piece at a time cost ~300 instructions per line.
#[derive(Clone, Copy)]
struct Key {
    json: &'static [u8],
    text: &'static [u8],
}

macro_rules! key {
    ($name:literal) => {
        Key {
            json: concat!(",\"", $name, "\":").as_bytes(),
            text: concat!(" ", $name, "=").as_bytes(),
        }
    };
}

/// The line in one format (`JSON`, else tracing's text shape), each format's code compiled
/// on its own so that every key is a constant.
fn line<const JSON: bool>(
    buf: &mut Vec<u8>,
    entry: &Entry<'_>,
    now: SystemTime,
    second: &mut Second,
) {
    if JSON {
        buf.extend_from_slice(b"{\"timestamp\":\"");
        push_timestamp_cached(buf, now, second);
        buf.extend_from_slice(b"\",\"level\":\"INFO\"");
    } else {
        push_timestamp_cached(buf, now, second);
        buf.extend_from_slice(b"  INFO ");
        buf.extend_from_slice(TARGET.as_bytes());
        buf.push(b':');
    }
    let mut f = Fields::<JSON> { buf };
    f.id(key!("request_id"), entry.request_id);
    f.label(key!("method"), entry.method);
    f.label(key!("route"), entry.route);
    f.num(key!("status"), entry.status.into());
    f.label(key!("source"), entry.source);
    f.str(key!("code"), entry.code);
    if let Some(s) = entry.upstream_status {
        f.num(key!("upstream_status"), s.into());
    }
    f.millis(key!("duration_ms"), entry.duration);
    f.millis(key!("upstream_ms"), entry.upstream);
    if let Some(q) = entry.queued {
        f.millis(key!("queue_ms"), q);
    }
    f.num(key!("bytes"), entry.bytes);
    if let Some(c) = entry.client {
        f.str(key!("client"), c);
    }
    if let Some(m) = entry.model {
        f.str(key!("model"), m);
    }
    if let Some(n) = entry.prompt_tokens {
        f.num(key!("prompt_tokens"), n);
    }
    if let Some(n) = entry.completion_tokens {
        f.num(key!("completion_tokens"), n);
    }
    if let Some(n) = entry.cached_tokens {
        f.num(key!("cached_tokens"), n);
    }
    if let Some(n) = entry.cost {
        f.key(key!("cost"));
        f.buf
            .extend_from_slice(crate::config::decimal(u128::from(n), 9).as_bytes());
    }
    if let Some(n) = entry.charged_tokens {
        f.num(key!("charged_tokens"), n);
    }
    if let Some(t) = entry.trace_id {
        f.id(key!("trace_id"), t);
    }
    if let Some(e) = entry.session_end {
        f.label(key!("session_end"), e);
    }
    if let Some(n) = entry.bytes_in {
        f.num(key!("bytes_in"), n);
    }
    if JSON {
        buf.extend_from_slice(b",\"target\":\"");
        buf.extend_from_slice(TARGET.as_bytes());
        buf.extend_from_slice(b"\"}\n");
    } else {
        buf.push(b'\n');
    }
}

/// Writes `key:value` pairs of a JSON object (`JSON`), or `key=value` pairs of a text line.
struct Fields<'b, const JSON: bool> {
    buf: &'b mut Vec<u8>,
}

// Inlined: each key is a constant, so its copy is a few moves instead of a call.
impl<const JSON: bool> Fields<'_, JSON> {
    #[inline(always)]
    fn key(&mut self, key: Key) {
        self.buf
            .extend_from_slice(if JSON { key.json } else { key.text });
    }

    #[inline(always)]
    fn str(&mut self, key: Key, value: &str) {
        self.key(key);
        push_quoted(self.buf, value);
    }

    /// One of ezgate's own labels (a method, route, source, session end): nothing in it to
    /// escape, so it is copied without looking. (An error code can be the upstream's: it
    /// goes through [`Fields::str`].)
    #[inline(always)]
    fn label(&mut self, key: Key, value: &str) {
        debug_assert!(!needs_escape(value.as_bytes()), "{value:?}");
        self.key(key);
        self.buf.push(b'"');
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(b'"');
    }

    /// A string that the text format shows bare when it is a plain token (as tracing shows
    /// the request id), quoted otherwise.
    fn id(&mut self, key: Key, value: &str) {
        if JSON {
            return self.str(key, value);
        }
        let plain = !value.is_empty()
            && value
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        if !plain {
            self.str(key, value);
        } else {
            self.key(key);
            self.buf.extend_from_slice(value.as_bytes());
        }
    }

    #[inline(always)]
    fn num(&mut self, key: Key, value: u64) {
        self.key(key);
        push_u64(self.buf, value);
    }

    #[inline(always)]
    fn millis(&mut self, key: Key, value: Duration) {
        self.key(key);
        push_millis(self.buf, value);
    }
}

/// A JSON string literal: quotes, backslash and control characters escaped as serde_json
/// escapes them; everything else, UTF-8 included, as is.
fn push_quoted(buf: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.push(b'"');
    let bytes = s.as_bytes();
    if !needs_escape(bytes) {
        // The usual value (an id, a route, a model): copied whole.
        buf.extend_from_slice(bytes);
        buf.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        buf.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => buf.extend_from_slice(b"\\\""),
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            0x08 => buf.extend_from_slice(b"\\b"),
            0x0c => buf.extend_from_slice(b"\\f"),
            _ => {
                buf.extend_from_slice(b"\\u00");
                buf.push(HEX[usize::from(b >> 4)]);
                buf.push(HEX[usize::from(b & 0xf)]);
            }
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
    buf.push(b'"');
}

/// Whether `bytes` hold a quote, a backslash or a control character, eight bytes at a time
/// (a byte-by-byte look cost ~10 instructions per byte of a line's values).
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Exact for "some byte is below n" (n ≤ 128): a borrow only reaches a byte above one
    // that matched.
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH != 0;
    let special = |w: u64| {
        below(w, 0x20)
            || below(w ^ (ONES * u64::from(b'"')), 1)
            || below(w ^ (ONES * u64::from(b'\\')), 1)
    };
    let mut words = bytes.chunks_exact(8);
    let any = words
        .by_ref()
        .any(|c| c.try_into().is_ok_and(|c| special(u64::from_ne_bytes(c))));
    any || words
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// Writes the access line of a finished request (when access lines are on).
pub fn record(o: &Outcome, duration: Duration) {
    if !enabled() {
        return;
    }
    write(&Entry {
        request_id: &o.request_id,
        method: o.method,
        route: o.route.as_str(),
        status: o.status,
        source: o.source.as_str(),
        code: o.code(),
        upstream_status: o.upstream_status,
        duration,
        upstream: o.upstream_wait,
        queued: (o.queue_wait > Duration::ZERO).then_some(o.queue_wait),
        bytes: o.bytes_out,
        client: o.caller.as_deref(),
        model: o.model.as_deref(),
        prompt_tokens: o.usage.map(|u| u.prompt),
        completion_tokens: o.usage.map(|u| u.completion),
        cached_tokens: o.usage.map(|u| u.cached).filter(|&n| n > 0),
        cost: o.cost,
        charged_tokens: o.charged,
        trace_id: o.trace_id.as_deref(),
        session_end: o.session.map(|s| s.end.as_str()),
        bytes_in: o.session.map(|s| s.bytes_in),
    });
}

/// The decimal digits of `n`.
fn push_u64(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `n` as exactly `width` digits (`n` is below `10^width`).
fn push_padded(buf: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 6];
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    buf.extend_from_slice(&digits[..width]);
}

/// Milliseconds with up to six decimals, exact to the nanosecond: `2.5`, `0.206748`, `3.0`.
fn push_millis(buf: &mut Vec<u8>, d: Duration) {
    // In u64: a u128 division costs ~100 instructions, twice per line.
    let millis = d
        .as_secs()
        .saturating_mul(1000)
        .saturating_add(u64::from(d.subsec_millis()));
    push_u64(buf, millis);
    buf.push(b'.');
    let point = buf.len();
    push_padded(buf, u64::from(d.subsec_nanos() % 1_000_000), 6);
    // Trailing zeros go, one digit stays: `2.5`, `3.0`.
    while buf.len() > point + 1 && buf.last() == Some(&b'0') {
        buf.pop();
    }
}

/// `now` as the log lines write it (RFC 3339, UTC, microseconds), for the lines ezgate writes
/// outside tracing (`listening on`) and other readers (the admin view).
pub fn rfc3339(now: SystemTime) -> String {
    let mut buf = Vec::with_capacity(32);
    push_timestamp(&mut buf, now);
    String::from_utf8_lossy(&buf).into_owned()
}

/// [`push_timestamp`], its second taken from `second` while it is the same second.
fn push_timestamp_cached(buf: &mut Vec<u8>, now: SystemTime, second: &mut Second) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let unix = since.as_secs();
    if unix != second.unix {
        let mut text = Vec::with_capacity(24);
        push_second(&mut text, unix);
        match <[u8; 19]>::try_from(text.as_slice()) {
            Ok(text) => *second = Second { unix, text },
            // A year past 9999 (never in practice) is longer: written, not cached.
            Err(_) => {
                buf.extend_from_slice(&text);
                return push_fraction(buf, since);
            }
        }
    }
    buf.extend_from_slice(&second.text);
    push_fraction(buf, since);
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber writes it:
/// `2026-11-25T04:29:45.443892Z`.
fn push_timestamp(buf: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    push_second(buf, since.as_secs());
    push_fraction(buf, since);
}

/// A timestamp up to its second: `2026-11-25T04:29:45`.
fn push_second(buf: &mut Vec<u8>, secs: u64) {
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    if year > 9999 {
        buf.push(b'+');
        push_u64(buf, year);
    } else {
        push_padded(buf, year, 4);
    }
    buf.push(b'-');
    push_padded(buf, month, 2);
    buf.push(b'-');
    push_padded(buf, day, 2);
    buf.push(b'T');
    push_padded(buf, rem / 3600, 2);
    buf.push(b':');
    push_padded(buf, rem / 60 % 60, 2);
    buf.push(b':');
    push_padded(buf, rem % 60, 2);
}

/// A timestamp's microseconds and zone: `.443892Z`.
fn push_fraction(buf: &mut Vec<u8>, since: Duration) {
    buf.push(b'.');
    push_padded(buf, since.subsec_micros().into(), 6);
    buf.push(b'Z');
}

/// (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests;

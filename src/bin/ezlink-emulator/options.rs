//! The per-request fault plan, read once from the `x-emu-*` request headers.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::encoding::Encoding;
use crate::faults::{Fault, Shape};

const DEFAULT_MESSAGE: &str = "emulated upstream failure";
const DEFAULT_CODE: &str = "emulated_error";

pub struct Opts {
    /// `x-emu-header-delay-ms`: wait before the response headers.
    pub header_delay: Option<Duration>,
    /// `x-emu-status` (+ `x-emu-body`, `x-emu-message`, `x-emu-code`).
    pub fault: Option<Fault>,
    /// `x-emu-encoding`.
    pub encoding: Option<Encoding>,
    /// `x-emu-retry-after`, copied to `retry-after`.
    pub retry_after: Option<HeaderValue>,
    /// `x-emu-ratelimit-headers: 1`.
    pub ratelimit_headers: bool,
    /// `x-emu-ratelimit: limit-requests=100,remaining-tokens=9,…`: `x-ratelimit-*` headers
    /// sent as given (nonsense included), after `x-emu-ratelimit-headers`.
    pub ratelimit: Vec<(HeaderName, HeaderValue)>,
    /// `x-emu-reset`.
    pub reset: Option<Reset>,
    /// `x-emu-malformed` reaching the service (HTTP/2, or not the first request of an
    /// HTTP/1 connection): handled like `x-emu-reset: headers`.
    pub malformed: bool,
    pub stream: StreamOpts,
    /// `x-emu-completion-tokens` (non-streamed responses).
    pub completion_tokens: u64,
    /// `x-emu-cached-tokens`: prompt tokens the usage reports as read from the cache.
    pub cached_tokens: Option<u64>,
    /// `x-emu-audio-tokens: IN,OUT` (a realtime handshake): audio tokens of each response.
    pub audio_tokens: Option<(u64, u64)>,
    /// `x-emu-id`: the response's id, with a fixed creation time (byte-comparable bodies).
    pub fixed_id: Option<String>,
    /// `x-emu-echo-key: 1`: the key of the request's `Authorization`, echoed back as a
    /// careless upstream does.
    pub echo_key: Option<String>,
    /// `x-emu-duplicates`: how a JSON body's member given twice is read.
    pub duplicates: Duplicates,
}

/// How the API routes read a JSON member given twice (names compared decoded, as every
/// parser compares them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Duplicates {
    /// The last one counts: Python's `json`, JavaScript's `JSON.parse`, Go's encoding/json.
    #[default]
    Last,
    /// 400, as strict parsers (Rust's serde) answer.
    Reject,
}

#[derive(Clone, Copy, Debug)]
pub struct StreamOpts {
    /// `x-emu-stream-events`: content events in a streamed response.
    pub events: usize,
    /// `x-emu-stream-interval-ms`: pause before every event after the first.
    pub interval: Duration,
    /// `x-emu-cut-after`: abort after this many content events.
    pub cut_after: Option<usize>,
    /// `x-emu-stall-after`: go silent after this many content events.
    pub stall_after: Option<usize>,
    /// `x-emu-stream-error-event: 1`: an `event: error` before `[DONE]`.
    pub error_event: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reset {
    /// Abort the connection (HTTP/1) or stream (HTTP/2) before any response byte.
    Headers,
    /// 200 with `content-length: 1000`, 10 body bytes, then abort.
    Body,
}

/// An `x-emu-*` header the emulator cannot honour; answered with 400 so a test typo
/// fails loudly instead of silently testing the happy path.
#[derive(Debug)]
pub struct BadHeader {
    pub name: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl fmt::Display for BadHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ezlink-emulator: header {}: {:?} is not valid; expected {}",
            self.name, self.value, self.expected
        )
    }
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            header_delay: None,
            fault: None,
            encoding: None,
            retry_after: None,
            ratelimit_headers: false,
            ratelimit: Vec::new(),
            reset: None,
            malformed: false,
            stream: StreamOpts {
                events: 5,
                interval: Duration::ZERO,
                cut_after: None,
                stall_after: None,
                error_event: false,
            },
            completion_tokens: 7,
            cached_tokens: None,
            audio_tokens: None,
            fixed_id: None,
            echo_key: None,
            duplicates: Duplicates::Last,
        }
    }
}

impl Opts {
    pub fn parse(headers: &HeaderMap) -> Result<Opts, BadHeader> {
        let mut opts = Opts::default();
        if !headers.keys().any(|k| k.as_str().starts_with("x-emu-")) {
            return Ok(opts);
        }
        let ms = |name| number::<u64>(headers, name, "a number of milliseconds");
        let count = |name| number::<usize>(headers, name, "a non-negative integer");
        opts.header_delay = ms("x-emu-header-delay-ms")?.map(Duration::from_millis);
        opts.fault = fault(headers)?;
        opts.encoding = match text(headers, "x-emu-encoding")? {
            None => None,
            Some(value) => Some(Encoding::parse(value).ok_or_else(|| BadHeader {
                name: "x-emu-encoding",
                value: value.to_owned(),
                expected: "gzip, deflate or br",
            })?),
        };
        opts.retry_after = headers.get("x-emu-retry-after").cloned();
        opts.ratelimit_headers = flag(headers, "x-emu-ratelimit-headers");
        if let Some(list) = text(headers, "x-emu-ratelimit")? {
            opts.ratelimit = ratelimit(list)?;
        }
        opts.reset = match text(headers, "x-emu-reset")? {
            None => None,
            Some(v) if v.eq_ignore_ascii_case("headers") => Some(Reset::Headers),
            Some(v) if v.eq_ignore_ascii_case("body") => Some(Reset::Body),
            Some(v) => {
                return Err(BadHeader {
                    name: "x-emu-reset",
                    value: v.to_owned(),
                    expected: "headers or body",
                })
            }
        };
        opts.malformed = flag(headers, "x-emu-malformed");
        if let Some(events) = count("x-emu-stream-events")? {
            opts.stream.events = events;
        }
        if let Some(interval) = ms("x-emu-stream-interval-ms")? {
            opts.stream.interval = Duration::from_millis(interval);
        }
        opts.stream.cut_after = count("x-emu-cut-after")?;
        opts.stream.stall_after = count("x-emu-stall-after")?;
        opts.stream.error_event = flag(headers, "x-emu-stream-error-event");
        if let Some(tokens) = number::<u64>(headers, "x-emu-completion-tokens", "an integer")? {
            opts.completion_tokens = tokens;
        }
        opts.cached_tokens = number::<u64>(headers, "x-emu-cached-tokens", "an integer")?;
        opts.audio_tokens = match text(headers, "x-emu-audio-tokens")? {
            None => None,
            Some(v) => Some(
                v.split_once(',')
                    .and_then(|(i, o)| Some((i.trim().parse().ok()?, o.trim().parse().ok()?)))
                    .ok_or_else(|| BadHeader {
                        name: "x-emu-audio-tokens",
                        value: v.to_owned(),
                        expected: "two integers, IN,OUT",
                    })?,
            ),
        };
        opts.fixed_id = text(headers, "x-emu-id")?.map(str::to_owned);
        if flag(headers, "x-emu-echo-key") {
            let auth = lossy(headers, "authorization").unwrap_or_default();
            let key = auth.strip_prefix("Bearer ").unwrap_or(&auth).to_owned();
            if let Some(f) = &mut opts.fault {
                f.message = format!(
                    "Incorrect API key provided: {key}. Manage it at https://ezlink.example/keys?key={}. {}",
                    percent(&key),
                    f.message
                );
                if let Some(code) = &mut f.code {
                    code.push(' ');
                    code.push_str(&key);
                }
            }
            opts.echo_key = Some(key);
        }
        opts.duplicates = match text(headers, "x-emu-duplicates")? {
            None => Duplicates::Last,
            Some(v) if v.eq_ignore_ascii_case("last") => Duplicates::Last,
            Some(v) if v.eq_ignore_ascii_case("reject") => Duplicates::Reject,
            Some(v) => {
                return Err(BadHeader {
                    name: "x-emu-duplicates",
                    value: v.to_owned(),
                    expected: "last or reject",
                })
            }
        };
        Ok(opts)
    }

    /// Whether the response is dictated by a fault rather than by the route.
    pub fn overrides_route(&self) -> bool {
        self.fault.is_some() || self.reset.is_some() || self.malformed
    }
}

fn fault(headers: &HeaderMap) -> Result<Option<Fault>, BadHeader> {
    let expected = "an HTTP status from 200 to 599";
    let Some(status) = number::<u16>(headers, "x-emu-status", expected)? else {
        return Ok(None);
    };
    let status = StatusCode::from_u16(status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| BadHeader {
            name: "x-emu-status",
            value: status.to_string(),
            expected,
        })?;
    let shape = match text(headers, "x-emu-body")? {
        None => Shape::OpenAi,
        Some(value) => Shape::parse(value).ok_or_else(|| BadHeader {
            name: "x-emu-body",
            value: value.to_owned(),
            expected: Shape::NAMES,
        })?,
    };
    let message = lossy(headers, "x-emu-message").unwrap_or_else(|| DEFAULT_MESSAGE.to_owned());
    let code = match lossy(headers, "x-emu-code") {
        None => Some(DEFAULT_CODE.to_owned()),
        Some(code) if code == "null" => None,
        Some(code) => Some(code),
    };
    Ok(Some(Fault {
        status,
        shape,
        message,
        code,
    }))
}

fn text<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, BadHeader> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim()))
            .map_err(|_| BadHeader {
                name,
                value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
                expected: "visible ASCII",
            }),
    }
}

fn lossy(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn number<T: FromStr>(
    headers: &HeaderMap,
    name: &'static str,
    expected: &'static str,
) -> Result<Option<T>, BadHeader> {
    match text(headers, name)? {
        None => Ok(None),
        Some(value) => value.parse().map(Some).map_err(|_| BadHeader {
            name,
            value: value.to_owned(),
            expected,
        }),
    }
}

/// Every byte but RFC 3986's unreserved ones as `%XX`.
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Present and not `0`/`false`.
/// The six `x-ratelimit-*` suffixes `x-emu-ratelimit` may set.
const RATELIMIT_NAMES: [&str; 6] = [
    "limit-requests",
    "limit-tokens",
    "remaining-requests",
    "remaining-tokens",
    "reset-requests",
    "reset-tokens",
];

/// `limit-requests=100,reset-requests=6m0s`: comma-separated `suffix=value` pairs.
fn ratelimit(list: &str) -> Result<Vec<(HeaderName, HeaderValue)>, BadHeader> {
    let bad = || {
        BadHeader {
        name: "x-emu-ratelimit",
        value: list.to_owned(),
        expected: "comma-separated SUFFIX=VALUE, SUFFIX one of limit-requests, limit-tokens, remaining-requests, remaining-tokens, reset-requests, reset-tokens",
    }
    };
    let mut out = Vec::new();
    for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (suffix, value) = pair.split_once('=').ok_or_else(bad)?;
        let suffix = suffix.trim();
        if !RATELIMIT_NAMES.contains(&suffix) {
            return Err(bad());
        }
        let name = HeaderName::try_from(format!("x-ratelimit-{suffix}")).map_err(|_| bad())?;
        let value = HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
        out.push((name, value));
    }
    Ok(out)
}

fn flag(headers: &HeaderMap, name: &str) -> bool {
    headers.get(name).is_some_and(|v| {
        let v = v.as_bytes().trim_ascii();
        !(v == b"0" || v.eq_ignore_ascii_case(b"false"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratelimit_pairs_are_sent_as_given_and_unknown_names_refused() {
        let got = ratelimit("limit-requests=100, reset-tokens=forever,").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0.as_str(), "x-ratelimit-limit-requests");
        assert_eq!(got[0].1, "100");
        assert_eq!(got[1].0.as_str(), "x-ratelimit-reset-tokens");
        assert_eq!(got[1].1, "forever");
        assert!(ratelimit("limit-bytes=1").is_err());
        assert!(ratelimit("limit-requests").is_err());
    }
}

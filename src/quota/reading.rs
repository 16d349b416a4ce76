//! The six `x-ratelimit-*` headers of one upstream response, read into a [`Reading`].

use std::time::Duration;

use http::header::HeaderValue;
use http::HeaderMap;

use super::duration::parse_go_duration;

/// The longest integer text read (u64 has 20 digits).
const MAX_DIGITS: usize = 20;

/// One unit's quota as one response told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub limit: u64,
    pub remaining: u64,
    /// From the response's arrival until the part is whole again (capped, see
    /// [`super::duration::MAX_RESET`]).
    pub reset: Duration,
}

/// What one response told of its key's quota. A unit is `None` unless all three of its
/// headers were present and valid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    pub requests: Option<Part>,
    pub tokens: Option<Part>,
}

impl Reading {
    /// Reads the headers, in one pass over them (cheaper than six lookups by name: a
    /// response carries about ten headers, and a name that does not start with
    /// `x-ratelimit-` is passed over after a few bytes).
    ///
    /// A part is taken only whole and sane: a missing, repeated, non-integer or overlong
    /// value, a reset that is not a non-negative Go duration, a limit of 0, or a remaining
    /// above its limit (a response that contradicts itself) leaves the part out, so what was
    /// learned before stays.
    pub fn from_headers(headers: &HeaderMap) -> Reading {
        // limit, remaining, reset of requests, then of tokens; `Err` when sent twice.
        let mut seen: [Option<Result<&HeaderValue, ()>>; 6] = [None; 6];
        for (name, value) in headers {
            let Some(rest) = name.as_str().strip_prefix("x-ratelimit-") else {
                continue;
            };
            let i = match rest {
                "limit-requests" => 0,
                "remaining-requests" => 1,
                "reset-requests" => 2,
                "limit-tokens" => 3,
                "remaining-tokens" => 4,
                "reset-tokens" => 5,
                _ => continue,
            };
            seen[i] = Some(match seen[i] {
                None => Ok(value),
                Some(_) => Err(()),
            });
        }
        Reading {
            requests: part(&seen[0..3]),
            tokens: part(&seen[3..6]),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }
}

/// One unit from its limit, remaining and reset headers (each sent once).
fn part(seen: &[Option<Result<&HeaderValue, ()>>]) -> Option<Part> {
    let text = |i: usize| -> Option<&str> { seen.get(i)?.as_ref()?.ok()?.to_str().ok() };
    let limit = integer(text(0)?)?;
    let remaining = integer(text(1)?)?;
    let reset = parse_go_duration(text(2)?)?;
    // A limit of 0 is no quota anyone could pace on (a proxy's placeholder, or "none"):
    // read, it would refuse every request, and nothing forwarded could correct it.
    // Beyond 2^53 a count is not exact as a float (the pictures' arithmetic): as good as
    // unlimited, and kept there.
    const EXACT: u64 = 1 << 53;
    let (limit, remaining) = (limit.min(EXACT), remaining.min(EXACT));
    (remaining <= limit && limit > 0).then_some(Part {
        limit,
        remaining,
        reset,
    })
}

/// A plain decimal integer: ASCII digits only (no sign, space, point or exponent).
fn integer(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > MAX_DIGITS || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use http::header::HeaderName;

    use super::*;

    const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
    const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
    const REMAINING_REQUESTS: HeaderName =
        HeaderName::from_static("x-ratelimit-remaining-requests");
    const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
    const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
    const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

    fn headers(pairs: &[(HeaderName, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_static(v));
        }
        h
    }

    const FULL: [(HeaderName, &str); 6] = [
        (LIMIT_REQUESTS, "100"),
        (REMAINING_REQUESTS, "99"),
        (RESET_REQUESTS, "6m0s"),
        (LIMIT_TOKENS, "30000"),
        (REMAINING_TOKENS, "29000"),
        (RESET_TOKENS, "20ms"),
    ];

    #[test]
    fn all_six_headers() {
        let r = Reading::from_headers(&headers(&FULL));
        assert_eq!(
            r.requests,
            Some(Part {
                limit: 100,
                remaining: 99,
                reset: Duration::from_secs(360)
            })
        );
        assert_eq!(
            r.tokens,
            Some(Part {
                limit: 30000,
                remaining: 29000,
                reset: Duration::from_millis(20)
            })
        );
    }

    #[test]
    fn no_headers_nothing_read() {
        assert!(Reading::from_headers(&HeaderMap::new()).is_empty());
    }

    #[test]
    fn a_partial_or_nonsense_part_is_left_out_alone() {
        // Tokens lack their reset: only requests are read.
        let r = Reading::from_headers(&headers(&FULL[..5]));
        assert!(r.requests.is_some());
        assert_eq!(r.tokens, None);
        for (name, bad) in [
            (REMAINING_REQUESTS, "-1"),
            (REMAINING_REQUESTS, "9 9"),
            (REMAINING_REQUESTS, "1e2"),
            (REMAINING_REQUESTS, "101"),
            (LIMIT_REQUESTS, ""),
            (LIMIT_REQUESTS, "0"),
            (LIMIT_REQUESTS, "99999999999999999999999"),
            (RESET_REQUESTS, "soon"),
            (RESET_REQUESTS, "-1s"),
            (RESET_REQUESTS, "60"),
        ] {
            let mut h = headers(&FULL);
            h.insert(name.clone(), HeaderValue::from_static(bad));
            let r = Reading::from_headers(&h);
            assert_eq!(r.requests, None, "{name}: {bad:?}");
            assert!(r.tokens.is_some(), "{name}: {bad:?}");
        }
        // Sent twice: ambiguous.
        let mut h = headers(&FULL);
        h.append(LIMIT_TOKENS, HeaderValue::from_static("30000"));
        assert_eq!(Reading::from_headers(&h).tokens, None);
        // Not text.
        let mut h = headers(&FULL);
        h.insert(LIMIT_TOKENS, HeaderValue::from_bytes(b"3\xff").unwrap());
        assert_eq!(Reading::from_headers(&h).tokens, None);
    }

    #[test]
    fn an_exhausted_quota_is_a_reading() {
        let mut h = headers(&FULL);
        h.insert(REMAINING_REQUESTS, HeaderValue::from_static("0"));
        assert_eq!(
            Reading::from_headers(&h).requests.map(|p| p.remaining),
            Some(0)
        );
    }
}

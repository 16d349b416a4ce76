//! The response head read by ezgate's HTTP/1.1 client (`wire.rs`): status line and headers
//! parsed by `httparse`, the values sliced out of the read buffer without copies, and how
//! the body that follows is framed (RFC 9112 §6.3).

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{self, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, StatusCode, Version};

use super::decode::Framing;
use super::wire::malformed;
use super::BoxError;

/// The most headers a response head may have (hyper's default).
pub(super) const MAX_HEADERS: usize = 100;
/// Headers ezgate may add to a response before it goes back to the client.
const ADDED_HEADERS: usize = 8;
/// Response headers whose positions are kept on the stack; more go to the heap.
const FEW_HEADERS: usize = 32;

/// A response's status line and headers.
pub(super) struct Head {
    pub(super) status: StatusCode,
    pub(super) version: Version,
    pub(super) headers: HeaderMap,
}

pub(super) enum Parsed {
    /// A `1xx` answer, skipped.
    Interim,
    /// The response head, how its body is framed, and whether its connection can be reused.
    Final(Head, Framing, bool),
}

/// Parses a response head at the start of `rd`, taking it out; `None` while incomplete.
pub(super) fn parse_head(
    rd: &mut BytesMut,
    head_request: bool,
) -> Result<Option<Parsed>, BoxError> {
    if rd.is_empty() {
        return Ok(None);
    }
    // Uninitialized, and positions kept for the first few headers only: zeroing room for
    // 100 of each cost ~3,200 instructions per response.
    let mut raw = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, rd, &mut raw)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(malformed(format!("invalid response head: {e}"))),
    };
    let code = res.code.unwrap_or(0);
    let version = if res.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where each name and value lies, to slice them out of the head without copies.
    let base = rd.as_ptr() as usize;
    let count = res.headers.len();
    let mut first = [[0usize; 4]; FEW_HEADERS];
    let mut more = Vec::new();
    for (i, h) in res.headers.iter().enumerate() {
        let (n, v) = (
            h.name.as_ptr() as usize - base,
            h.value.as_ptr() as usize - base,
        );
        let at = [n, n + h.name.len(), v, v + h.value.len()];
        match first.get_mut(i) {
            Some(slot) => *slot = at,
            None => more.push(at),
        }
    }
    let head = rd.split_to(len).freeze();
    if code == 101 {
        return Err(malformed(
            "101 Switching Protocols to a request that asked for none",
        ));
    }
    if (100..200).contains(&code) {
        return Ok(Some(Parsed::Interim));
    }
    let status =
        StatusCode::from_u16(code).map_err(|_| malformed(format!("invalid status code {code}")))?;
    // Room for what ezgate adds on the way back (`x-request-id`, the limits' headers), so
    // the map does not grow (and rehash) per response.
    let mut headers = HeaderMap::with_capacity(count + ADDED_HEADERS);
    let mut framed = Framed::default();
    for at in first[..count.min(FEW_HEADERS)].iter().chain(&more) {
        let name = name_of(&head[at[0]..at[1]]).map_err(|_| malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(at[2]..at[3]))
            .map_err(|_| malformed("invalid header value"))?;
        framed.learn(&name, &value);
        headers.append(name, value);
    }
    let (framing, keep) = framed.framing(status, version, head_request)?;
    if framed.te && framed.content_length && framing != Framing::Length(0) {
        // RFC 9112 §6.3: the coding overrides the length, and an intermediary removes the
        // length before it forwards the message (else the client would read it, and cut
        // the body, or read the next response into it).
        headers.remove(CONTENT_LENGTH);
    }
    let head = Head {
        status,
        version,
        headers,
    };
    Ok(Some(Parsed::Final(head, framing, keep)))
}

/// `name_of(raw)`: a header's name. The names most answers of an OpenAI-compatible API
/// carry are matched as sent in lowercase, without `HeaderName::from_bytes`, which costs ~120
/// instructions a name and allocates for a name it does not know (each `x-ratelimit-*` of
/// every answer). Any other spelling goes to `from_bytes`.
macro_rules! known_names {
    ($($raw:literal => ($($name:tt)+),)*) => {
        fn name_of(raw: &[u8]) -> Result<HeaderName, header::InvalidHeaderName> {
            Ok(match raw {
                $($raw => $($name)+,)*
                _ => return HeaderName::from_bytes(raw),
            })
        }

        #[cfg(test)]
        const KNOWN_NAMES: &[&[u8]] = &[$($raw),*];
    };
}

known_names! {
    b"content-type" => (header::CONTENT_TYPE),
    b"content-length" => (header::CONTENT_LENGTH),
    b"date" => (header::DATE),
    b"server" => (header::SERVER),
    b"connection" => (header::CONNECTION),
    b"transfer-encoding" => (header::TRANSFER_ENCODING),
    b"content-encoding" => (header::CONTENT_ENCODING),
    b"cache-control" => (header::CACHE_CONTROL),
    b"vary" => (header::VARY),
    b"retry-after" => (header::RETRY_AFTER),
    b"strict-transport-security" => (header::STRICT_TRANSPORT_SECURITY),
    b"x-content-type-options" => (header::X_CONTENT_TYPE_OPTIONS),
    b"access-control-expose-headers" => (header::ACCESS_CONTROL_EXPOSE_HEADERS),
    b"alt-svc" => (header::ALT_SVC),
    b"set-cookie" => (header::SET_COOKIE),
    b"x-request-id" => (const { HeaderName::from_static("x-request-id") }),
    b"x-ratelimit-limit-requests" => (const { HeaderName::from_static("x-ratelimit-limit-requests") }),
    b"x-ratelimit-limit-tokens" => (const { HeaderName::from_static("x-ratelimit-limit-tokens") }),
    b"x-ratelimit-remaining-requests" => (const { HeaderName::from_static("x-ratelimit-remaining-requests") }),
    b"x-ratelimit-remaining-tokens" => (const { HeaderName::from_static("x-ratelimit-remaining-tokens") }),
    b"x-ratelimit-reset-requests" => (const { HeaderName::from_static("x-ratelimit-reset-requests") }),
    b"x-ratelimit-reset-tokens" => (const { HeaderName::from_static("x-ratelimit-reset-tokens") }),
    b"openai-organization" => (const { HeaderName::from_static("openai-organization") }),
    b"openai-processing-ms" => (const { HeaderName::from_static("openai-processing-ms") }),
    b"openai-version" => (const { HeaderName::from_static("openai-version") }),
    b"openai-project" => (const { HeaderName::from_static("openai-project") }),
}

/// What a response's framing headers said, learned as they are read (a lookup per header
/// afterwards cost ~350 instructions per response).
#[derive(Default)]
struct Framed {
    close: bool,
    keep_alive: bool,
    /// `Transfer-Encoding` was present; and whether its last coding is `chunked`.
    te: bool,
    chunked: bool,
    content_length: bool,
    length: Option<u64>,
    /// An invalid or conflicting `Content-Length`.
    bad_length: Option<&'static str>,
}

/// The comma-separated tokens of a header value, trimmed, empty ones left out.
fn tokens(v: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    v.as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

impl Framed {
    fn learn(&mut self, name: &HeaderName, value: &HeaderValue) {
        if name == CONTENT_LENGTH {
            self.content_length = true;
            let mut any = false;
            for t in tokens(value) {
                any = true;
                let n = std::str::from_utf8(t)
                    .ok()
                    .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok());
                match n {
                    None => self.bad_length = Some("invalid Content-Length"),
                    Some(n) if self.length.is_some_and(|l| l != n) => {
                        self.bad_length = Some("conflicting Content-Length values")
                    }
                    Some(n) => self.length = Some(n),
                }
            }
            if !any {
                self.bad_length = Some("empty Content-Length");
            }
        } else if name == TRANSFER_ENCODING {
            self.te = true;
            if let Some(last) = tokens(value).last() {
                self.chunked = last.eq_ignore_ascii_case(b"chunked");
            }
        } else if name == CONNECTION {
            for t in tokens(value) {
                self.close |= t.eq_ignore_ascii_case(b"close");
                self.keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }

    /// How the body is framed (RFC 9112 §6.3), and whether the connection can carry another
    /// request after it.
    fn framing(
        &self,
        status: StatusCode,
        version: Version,
        head_request: bool,
    ) -> Result<(Framing, bool), BoxError> {
        let keep = if version == Version::HTTP_11 {
            !self.close
        } else {
            self.keep_alive && !self.close
        };
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Ok((Framing::Length(0), keep));
        }
        if self.te {
            // Chunked last: chunked; any other coding, or an HTTP/1.0 message, to the close.
            // With a Content-Length beside it the message is ambiguous: read as chunked,
            // never reused.
            if !(self.chunked && version == Version::HTTP_11) {
                return Ok((Framing::Close, false));
            }
            return Ok((Framing::Chunked, keep && !self.content_length));
        }
        if let Some(bad) = self.bad_length {
            return Err(malformed(bad));
        }
        Ok(match self.length {
            Some(n) => (Framing::Length(n), keep),
            None => (Framing::Close, false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_names_are_the_names_they_say() {
        for raw in KNOWN_NAMES {
            let name = name_of(raw).unwrap();
            assert_eq!(name.as_str().as_bytes(), *raw);
            assert_eq!(name, HeaderName::from_bytes(raw).unwrap());
        }
        // Other spellings, and names it does not know, as `from_bytes` reads them.
        assert_eq!(name_of(b"Content-Type").unwrap(), header::CONTENT_TYPE);
        assert_eq!(
            name_of(b"X-RateLimit-Limit-Tokens").unwrap().as_str(),
            "x-ratelimit-limit-tokens"
        );
        assert_eq!(name_of(b"x-emu").unwrap().as_str(), "x-emu");
        assert!(name_of(b"bad name").is_err());
        assert!(name_of(b"").is_err());
    }
}

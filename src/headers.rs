//! Header rewriting on the way through: hop-by-hop removal (both ways), request ids,
//! `X-Forwarded-For`.

use std::cell::Cell;
use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue, CONNECTION};
use http::HeaderMap;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1), plus the
/// legacy ones proxies still meet. HTTP/2 forbids all of them.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers and every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there are none (`Connection` among them): one pass over the names instead of
    // ten lookups (the `Connection` lookup alone cost ~90 instructions, twice per request).
    if !headers.keys().any(|k| HOP_BY_HOP.contains(&k.as_str())) {
        return;
    }
    if let Some(named) = connection_named(headers) {
        for name in named {
            headers.remove(&name);
        }
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
}

fn connection_named(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut out = Vec::new();
    for v in headers.get_all(CONNECTION) {
        let Ok(s) = v.to_str() else { continue };
        for token in s.split(',') {
            if let Ok(name) = HeaderName::from_bytes(token.trim().as_bytes()) {
                out.push(name);
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The client's `x-request-id` if it is a sane token (1–128 visible ASCII characters).
pub fn client_request_id(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(X_REQUEST_ID)?.to_str().ok()?;
    let ok = !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic());
    ok.then_some(v)
}

/// Removes every header that names a client address on its way (`X-Forwarded-For`,
/// `Forwarded`, `X-Real-IP`, in any spelling or number): with
/// `upstream.forward_client_ip = false` the upstream learns none of the organization's
/// internal addresses, whoever wrote them.
pub fn strip_forwarded_for(headers: &mut HeaderMap) {
    // Usually there are none: one pass over the names instead of three removals.
    if headers
        .keys()
        .any(|k| *k == X_FORWARDED_FOR || *k == FORWARDED || *k == X_REAL_IP)
    {
        headers.remove(X_FORWARDED_FOR);
        headers.remove(FORWARDED);
        headers.remove(X_REAL_IP);
    }
}

/// Appends the peer to `X-Forwarded-For`, keeping what earlier proxies wrote.
pub fn append_forwarded_for(headers: &mut HeaderMap, peer: IpAddr) {
    use std::fmt::Write;
    let prev = headers
        .get(X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
        .filter(|p| !p.trim().is_empty());
    let Some(prev) = prev else {
        // The usual case, a first hop: the peer's address alone, which each thread keeps
        // rendered for the last peer it saw (a sidecar hears from very few).
        headers.insert(X_FORWARDED_FOR, peer_value(peer));
        return;
    };
    let mut value = String::with_capacity(prev.len() + 48);
    value.push_str(prev);
    value.push_str(", ");
    let _ = write!(value, "{peer}");
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// `peer` as a header value, remembered per thread for the last peer.
fn peer_value(peer: IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((seen, v)) if *seen == peer => v.clone(),
            _ => {
                let v = HeaderValue::from_maybe_shared(bytes::Bytes::from(peer.to_string()))
                    .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
                *last = Some((peer, v.clone()));
                v
            }
        }
    })
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    let rng = ring::rand::SystemRandom::new();
    if ring::rand::SecureRandom::fill(&rng, &mut b).is_err() {
        // No OS randomness: fall back to time and address entropy; ids stay unique enough.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ (&b as *const _ as u64);
    }
    u64::from_le_bytes(b) | 1
}

fn next_random() -> u64 {
    RNG.with(|s| {
        // xorshift64*: fast, and ids need uniqueness, not secrecy.
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// A new UUIDv7 request id: time-ordered, so logs sort by it. The layout and the text are
/// the `uuid` crate's; the 74 random bits come from [`next_random`] rather than
/// `Uuid::now_v7`, whose OS random source costs a system call per id (measured in
/// `cargo bench --bench hot_path -- request_id`).
pub fn new_request_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut random = [0u8; 10];
    random[..8].copy_from_slice(&next_random().to_le_bytes());
    random[8..].copy_from_slice(&next_random().to_le_bytes()[..2]);
    let id = uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut text).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_every_client_address_header() {
        let mut h = HeaderMap::new();
        h.append("X-Forwarded-For", "10.0.0.1".parse().unwrap());
        h.append("x-forwarded-for", "10.0.0.2".parse().unwrap());
        h.insert("FORWARDED", "for=10.0.0.3".parse().unwrap());
        h.insert("x-real-ip", "10.0.0.4".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        strip_forwarded_for(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-forwarded-proto"));
        let mut none = HeaderMap::new();
        none.insert("content-type", "application/json".parse().unwrap());
        strip_forwarded_for(&mut none);
        assert_eq!(none.len(), 1);
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
        // `Connection` alone still takes what it names; a head without any keeps all.
        let mut h = HeaderMap::new();
        h.insert("Connection", "X-Secret-Hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
        let mut h = HeaderMap::new();
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn request_ids() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "7");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(
            a.char_indices()
                .filter(|(_, c)| *c == '-')
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
            [8, 13, 18, 23]
        );
        assert!(a.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
        // The first 48 bits are the time in milliseconds.
        let ms = u64::from_str_radix(&a[..8], 16).unwrap() << 16
            | u64::from_str_radix(&a[9..13], 16).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now.abs_diff(ms) < 60_000);
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, "abc-123".parse().unwrap());
        assert_eq!(client_request_id(&h), Some("abc-123"));
        h.insert(X_REQUEST_ID, "has space".parse().unwrap());
        assert_eq!(client_request_id(&h), None);
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        append_forwarded_for(&mut h, "127.0.0.1".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        // A first hop gets its own address, whichever peer the thread saw before.
        for peer in ["127.0.0.1", "::1", "127.0.0.1", "10.1.2.3"] {
            let mut h = HeaderMap::new();
            append_forwarded_for(&mut h, peer.parse().unwrap());
            assert_eq!(h[X_FORWARDED_FOR], peer);
        }
        // A blank header counts as none.
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("  "));
        append_forwarded_for(&mut h, "10.0.0.9".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.9");
    }
}

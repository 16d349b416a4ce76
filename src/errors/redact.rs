//! The organization's key (managed mode: `upstream.api_key`) never leaves ezgate, whoever
//! wrote it: an upstream that echoes the key it received ("Incorrect API key provided:
//! sk-…") has it replaced in everything ezgate writes from what the upstream said — the
//! normalized error body (message, code, param), the response headers passed to the client,
//! the access log line and the span.
//!
//! Forms found: the whole key, its JSON-escaped form, and its percent-encoded form (either
//! hex case). Error bodies are searched after they are decoded (compression, JSON escapes,
//! HTML entities), so an escaped key in them is found as the key. A key the upstream
//! masked itself (`sk-abc…xyz`) is not the key and stays.

use http::{HeaderMap, HeaderValue};
use memchr::memmem::Finder;

/// What stands where the key was.
pub const REDACTED: &str = "[organization key redacted]";
/// The shortest start of the key that is redacted where a text was cut inside the key.
const MIN_CUT_PREFIX: usize = 8;

/// Finds and replaces the forms of one key.
pub struct Redactor {
    key: Vec<u8>,
    forms: Vec<Finder<'static>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redactor(<redacted>)")
    }
}

impl Redactor {
    /// `None` for an empty key.
    pub fn new(key: &str) -> Option<Redactor> {
        if key.is_empty() {
            return None;
        }
        let mut forms: Vec<Vec<u8>> = vec![key.as_bytes().to_vec()];
        let json = serde_json::to_string(key).unwrap_or_default();
        let json = json
            .strip_prefix('"')
            .and_then(|j| j.strip_suffix('"'))
            .unwrap_or_default();
        for form in [
            json.as_bytes().to_vec(),
            percent(key.as_bytes(), b"0123456789ABCDEF"),
            percent(key.as_bytes(), b"0123456789abcdef"),
        ] {
            if !form.is_empty() && !forms.contains(&form) {
                forms.push(form);
            }
        }
        Some(Redactor {
            key: key.as_bytes().to_vec(),
            forms: forms.iter().map(|f| Finder::new(f).into_owned()).collect(),
        })
    }

    /// Whether `text` holds a form of the key.
    pub fn found_in(&self, text: &[u8]) -> bool {
        self.forms.iter().any(|f| f.find(text).is_some())
    }

    /// `text` with every form of the key replaced, or `None` when it holds none.
    pub fn replace(&self, text: &[u8]) -> Option<Vec<u8>> {
        let mut current: Option<Vec<u8>> = None;
        for form in &self.forms {
            let src = current.as_deref().unwrap_or(text);
            if form.find(src).is_none() {
                continue;
            }
            let mut out = Vec::with_capacity(src.len());
            let mut at = 0;
            for i in form.find_iter(src) {
                out.extend_from_slice(&src[at..i]);
                out.extend_from_slice(REDACTED.as_bytes());
                at = i + form.needle().len();
            }
            out.extend_from_slice(&src[at..]);
            current = Some(out);
        }
        current
    }

    /// Replaces the key in a string.
    pub fn string(&self, s: &mut String) {
        if let Some(out) = self.replace(s.as_bytes()) {
            *s = String::from_utf8_lossy(&out).into_owned();
        }
    }

    /// Replaces the key in a string, and a start of the key (at least 8 bytes) that ends
    /// it: a text cut at a size cap can end inside the key.
    pub fn cut_text(&self, s: &mut String) {
        self.string(s);
        let longest = self.key.len().saturating_sub(1).min(s.len());
        let shortest = MIN_CUT_PREFIX.min(self.key.len());
        for n in (shortest..=longest).rev() {
            if s.as_bytes().ends_with(&self.key[..n]) {
                s.truncate(s.len() - n);
                s.push_str(REDACTED);
                return;
            }
        }
    }

    /// Replaces the key in header values. One substring search per value.
    pub fn headers(&self, headers: &mut HeaderMap) {
        for value in headers.values_mut() {
            if let Some(out) = self.replace(value.as_bytes()) {
                // The replacement is visible ASCII: the value stays valid.
                *value = HeaderValue::from_bytes(&out)
                    .unwrap_or_else(|_| HeaderValue::from_static(REDACTED));
            }
        }
    }
}

/// `bytes` with every byte but RFC 3986's unreserved ones as `%XX`.
fn percent(bytes: &[u8], hex: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-org/secret+key=42\"x";

    #[test]
    fn every_form_of_the_key_is_replaced() {
        let r = Redactor::new(KEY).unwrap();
        for (text, want) in [
            (
                format!("Incorrect API key provided: {KEY}. Twice: {KEY}"),
                format!("Incorrect API key provided: {REDACTED}. Twice: {REDACTED}"),
            ),
            (
                r#"{"key":"sk-org\/secret+key=42\"x"}"#.replace("\\/", "/"),
                format!(r#"{{"key":"{REDACTED}"}}"#),
            ),
            (
                "?k=sk-org%2Fsecret%2Bkey%3D42%22x&y".to_owned(),
                format!("?k={REDACTED}&y"),
            ),
            (
                "?k=sk-org%2fsecret%2bkey%3d42%22x".to_owned(),
                format!("?k={REDACTED}"),
            ),
        ] {
            let mut s = text.clone();
            r.string(&mut s);
            assert_eq!(s, want, "{text}");
        }
        // A key the upstream masked is not the key.
        let mut masked = "Incorrect API key provided: sk-org...=42".to_owned();
        r.string(&mut masked);
        assert_eq!(masked, "Incorrect API key provided: sk-org...=42");
        assert!(r.replace(b"nothing here").is_none());
    }

    #[test]
    fn a_text_cut_inside_the_key_loses_the_start_of_it() {
        let r = Redactor::new("sk-0123456789abcdef").unwrap();
        let mut s = "bad key sk-0123456789ab".to_owned();
        r.cut_text(&mut s);
        assert_eq!(s, format!("bad key {REDACTED}"));
        // Shorter than 8 bytes of the key: an ordinary ending.
        let mut s = "ends with sk-01".to_owned();
        r.cut_text(&mut s);
        assert_eq!(s, "ends with sk-01");
    }

    #[test]
    fn header_values_stay_valid() {
        let r = Redactor::new("sk-abc12345").unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-echo", HeaderValue::from_static("Bearer sk-abc12345"));
        h.insert("x-other", HeaderValue::from_static("fine"));
        r.headers(&mut h);
        assert_eq!(h["x-echo"], format!("Bearer {REDACTED}").as_str());
        assert_eq!(h["x-other"], "fine");
        assert!(Redactor::new("").is_none());
        assert_eq!(format!("{r:?}"), "Redactor(<redacted>)");
    }
}

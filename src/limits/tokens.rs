//! Token cost of a request: estimated before forwarding from its JSON body, settled later
//! with the usage the upstream reports.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

/// What ezgate reads from an OpenAI-style JSON request body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestInfo {
    pub model: Option<String>,
    /// Prompt size estimate: characters of the prompt text / 4, at least 1.
    pub prompt_tokens: u64,
    /// `max_tokens` / `max_completion_tokens` / `max_output_tokens`, when the request caps it.
    pub max_tokens: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    /// Estimate used when no policy default applies: prompt + max_tokens (or 0).
    pub estimated_tokens: u64,
    pub body_len: usize,
}

#[derive(Deserialize)]
struct Doc<'a> {
    #[serde(default, borrow)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    messages: TextChars,
    #[serde(default)]
    prompt: TextChars,
    #[serde(default)]
    input: TextChars,
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

/// Reads model, prompt size and completion cap. A body that is not JSON yields the
/// defaults (the upstream will refuse it; ezgate does not guess).
pub fn inspect(body: &[u8]) -> RequestInfo {
    let Ok(doc) = serde_json::from_slice::<Doc>(body) else {
        return RequestInfo {
            body_len: body.len(),
            ..RequestInfo::default()
        };
    };
    let chars = doc.messages.0 + doc.prompt.0 + doc.input.0;
    let prompt_tokens = (chars as u64).div_ceil(4).max(1);
    let max_tokens = doc
        .max_tokens
        .or(doc.max_completion_tokens)
        .or(doc.max_output_tokens);
    RequestInfo {
        model: doc.model.map(|m| m.chars().take(256).collect()),
        prompt_tokens,
        max_tokens,
        stream: doc.stream.unwrap_or(false),
        include_usage: doc
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        estimated_tokens: prompt_tokens + max_tokens.unwrap_or(0),
        body_len: body.len(),
    }
}

/// Characters of all strings in a JSON value (message contents, prompt lists, inputs),
/// counted while parsing, without building the value. `role` and `type` members are not text.
#[derive(Default)]
struct TextChars(usize);

impl<'de> Deserialize<'de> for TextChars {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CountVisitor).map(TextChars)
    }
}

struct CountVisitor;

impl<'de> serde::de::Visitor<'de> for CountVisitor {
    type Value = usize;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, v: &str) -> Result<usize, E> {
        Ok(v.chars().count())
    }
    fn visit_bool<E>(self, _: bool) -> Result<usize, E> {
        Ok(0)
    }
    fn visit_i64<E>(self, _: i64) -> Result<usize, E> {
        Ok(0)
    }
    fn visit_u64<E>(self, _: u64) -> Result<usize, E> {
        Ok(0)
    }
    fn visit_f64<E>(self, _: f64) -> Result<usize, E> {
        Ok(0)
    }
    fn visit_unit<E>(self) -> Result<usize, E> {
        Ok(0)
    }
    fn visit_none<E>(self) -> Result<usize, E> {
        Ok(0)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut n = 0;
        while let Some(TextChars(c)) = seq.next_element()? {
            n += c;
        }
        Ok(n)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
        let mut n = 0;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "role" || key == "type" {
                map.next_value::<serde::de::IgnoredAny>()?;
            } else {
                n += map.next_value::<TextChars>()?.0;
            }
        }
        Ok(n)
    }
}

/// For a streamed request that did not ask for usage, the body with
/// `stream_options.include_usage = true`, so the final chunk reports the tokens used.
pub fn ask_for_stream_usage(body: &Bytes, info: &RequestInfo) -> Option<Bytes> {
    if !info.stream || info.include_usage {
        return None;
    }
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    let obj = doc.as_object_mut()?;
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Default::default()));
    opts.as_object_mut()?
        .insert("include_usage".into(), Value::Bool(true));
    serde_json::to_vec(&doc).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_prompt_and_cap() {
        let body = br#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"abcdefgh"},{"role":"system","content":[{"type":"text","text":"abcd"}]}]}"#;
        let info = inspect(body);
        assert_eq!(info.model.as_deref(), Some("gpt-4o"));
        assert_eq!(info.prompt_tokens, 3);
        assert_eq!(info.estimated_tokens, 103);
        assert!(!info.stream);
    }

    #[test]
    fn not_json_is_not_guessed() {
        let info = inspect(b"{not json");
        assert_eq!(info.model, None);
        assert_eq!(info.estimated_tokens, 0);
    }

    #[test]
    fn asks_for_usage_on_streams_only() {
        let body = Bytes::from_static(br#"{"model":"m","stream":true,"messages":[]}"#);
        let info = inspect(&body);
        let new = ask_for_stream_usage(&body, &info).unwrap();
        assert!(inspect(&new).include_usage);
        let plain = Bytes::from_static(br#"{"model":"m","messages":[]}"#);
        assert!(ask_for_stream_usage(&plain, &inspect(&plain)).is_none());
    }
}

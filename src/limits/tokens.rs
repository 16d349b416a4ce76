//! Token cost of a request: estimated before forwarding from its JSON body, settled later
//! with the usage the upstream reports.

use bytes::Bytes;
use serde_json::Value;

/// What ezgate reads from an OpenAI-style JSON request body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestInfo {
    pub model: Option<String>,
    /// Prompt size estimate: the prompt text's characters weighed by class
    /// ([`super::estimate`]), at least 1.
    pub prompt_tokens: u64,
    /// `max_tokens` / `max_completion_tokens` / `max_output_tokens`, when the request caps it.
    pub max_tokens: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    /// Estimate used when no policy default applies: prompt + max_tokens (or 0).
    pub estimated_tokens: u64,
    pub body_len: usize,
}

/// Reads model, prompt size and completion cap. A body that is not JSON yields the
/// defaults (the upstream will refuse it; ezgate does not guess).
pub fn inspect(body: &[u8]) -> RequestInfo {
    let Some(doc) = super::scan::request_fields(body) else {
        return RequestInfo {
            body_len: body.len(),
            ..RequestInfo::default()
        };
    };
    let prompt_tokens = doc.text.tokens().max(1);
    let max_tokens = doc
        .max_tokens
        .or(doc.max_completion_tokens)
        .or(doc.max_output_tokens);
    RequestInfo {
        model: doc.model.map(|m| match m.char_indices().nth(256) {
            Some((cut, _)) => m[..cut].to_owned(),
            None => m.into_owned(),
        }),
        prompt_tokens,
        max_tokens,
        stream: doc.stream.unwrap_or(false),
        include_usage: doc.include_usage.unwrap_or(false),
        estimated_tokens: prompt_tokens + max_tokens.unwrap_or(0),
        body_len: body.len(),
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
    fn weighs_scripts() {
        // 71 characters of Chinese, at 0.74 a token each; characters / 4 said 18.
        let body = r#"{"model":"m","messages":[{"role":"user","content":"请帮我总结下面这个工单，并建议下一步应该怎么处理。客户说他们的发票上同一个月出现了两笔扣款。请帮我总结下面这个工单，并建议下一步应该怎么处理。"}]}"#;
        assert_eq!(inspect(body.as_bytes()).prompt_tokens, 53);
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

//! Token cost of a request: estimated before forwarding from its JSON body, settled later
//! with the usage the upstream reports.

use bytes::Bytes;

use super::{fields, scan};

/// What ezgate reads from an OpenAI-style JSON request body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestInfo {
    /// The body is one JSON object whose members ezgate read.
    pub understood: bool,
    pub model: Option<String>,
    /// Prompt size estimate: the prompt text's characters weighed by class
    /// ([`super::estimate`]), at least 1.
    pub prompt_tokens: u64,
    /// `max_tokens` / `max_completion_tokens` / `max_output_tokens`, when the request caps it,
    /// times its `n` choices.
    pub max_tokens: Option<u64>,
    /// `n`: the completions generated (at least 1).
    pub choices: u64,
    pub stream: bool,
    pub include_usage: bool,
    /// Estimate used when no policy default applies: prompt + max_tokens (or 0).
    pub estimated_tokens: u64,
    pub body_len: usize,
    /// Models named inside the body (each `tools[].model` of a Responses request, a Realtime
    /// client secret's `session.model`), each checked like `model`.
    pub other_models: Vec<String>,
    /// A tool spends a model but names none (an `image_generation` tool without `model`:
    /// the upstream picks its default).
    pub unnamed_tool_model: bool,
    /// A realtime client secret's `session.model` was given.
    pub session_model: bool,
    /// Why the body is refused whatever the policies: a JSON object parsers may read
    /// differently (a member twice, a name in another case, a count written `1e3`, …).
    pub ambiguous: Option<String>,
}

/// A model name as kept: at most 256 characters.
fn kept(model: std::borrow::Cow<'_, str>) -> String {
    match model.char_indices().nth(256) {
        Some((cut, _)) => model[..cut].to_owned(),
        None => model.into_owned(),
    }
}

/// Reads model, prompt size and completion cap. A body that is not JSON yields the
/// defaults (the upstream will refuse it; ezgate does not guess); one parsers may read
/// differently says why in `ambiguous`.
pub fn inspect(body: &[u8]) -> RequestInfo {
    inspect_estimating(body, true)
}

/// [`inspect`]; the prompt is estimated only with `estimate` (`prompt_tokens` is 0 without):
/// a body read only to ask a stream for its usage needs no estimate.
pub fn inspect_estimating(body: &[u8], estimate: bool) -> RequestInfo {
    let doc = match fields::request_fields_counting(body, estimate) {
        Ok(doc) => doc,
        Err(unread) => {
            return RequestInfo {
                body_len: body.len(),
                ambiguous: match unread {
                    fields::Unread::Ambiguous(why) => Some(why),
                    fields::Unread::NotJson => None,
                },
                ..RequestInfo::default()
            }
        }
    };
    let prompt_tokens = if estimate {
        doc.text.tokens().max(1)
    } else {
        0
    };
    let choices = doc.n.unwrap_or(1).max(1);
    // Upstreams differ in which cap they read when several are given: the largest counts.
    let max_tokens = [
        doc.max_tokens,
        doc.max_completion_tokens,
        doc.max_output_tokens,
    ]
    .into_iter()
    .flatten()
    .max()
    .map(|cap| cap.saturating_mul(choices));
    RequestInfo {
        understood: true,
        model: doc.model.map(kept),
        prompt_tokens,
        max_tokens,
        choices,
        stream: doc.stream.unwrap_or(false),
        include_usage: doc.include_usage.unwrap_or(false),
        estimated_tokens: prompt_tokens.saturating_add(max_tokens.unwrap_or(0)),
        body_len: body.len(),
        other_models: doc.other_models.into_iter().map(kept).collect(),
        unnamed_tool_model: doc.unnamed_tool_model,
        session_model: doc.session_model,
        ambiguous: None,
    }
}

/// For a streamed request that did not ask for usage, the body with
/// `stream_options.include_usage = true`, so the final chunk reports the tokens used.
///
/// The edit is a splice, not a rewrite: the result is the body's own bytes before and after
/// the edit (slices of `body`, not copies) with the few bytes that ask for usage between them,
/// so a request of any size costs no more memory than it already holds.
pub fn ask_for_stream_usage(body: &Bytes, info: &RequestInfo) -> Option<[Bytes; 3]> {
    if !info.stream || info.include_usage {
        return None;
    }
    let mut options = None;
    let whole = scan::object_members(body, |key, m| {
        if key == b"stream_options" {
            options = Some(m);
        }
    })?;
    let (at, end, insert): (usize, usize, &'static [u8]) = match options {
        // The first member of the request: nothing before it needs a comma.
        None => (
            whole.start + 1,
            whole.start + 1,
            br#""stream_options":{"include_usage":true},"#,
        ),
        Some(m) => {
            let value = m.value.start;
            let mut include = None;
            let mut members = 0;
            match scan::object_members(&body[m.value.clone()], |key, im| {
                members += 1;
                if key == b"include_usage" {
                    include = Some(im);
                }
            }) {
                // `"include_usage": false` (or null): the value becomes `true`.
                Some(_) if include.is_some() => {
                    let v = include.map(|im| im.value)?;
                    (value + v.start, value + v.end, b"true")
                }
                Some(obj) if members == 0 => (
                    value + obj.start + 1,
                    value + obj.start + 1,
                    br#""include_usage":true"#,
                ),
                Some(obj) => (
                    value + obj.start + 1,
                    value + obj.start + 1,
                    br#""include_usage":true,"#,
                ),
                // `null`, or a form the upstream would refuse anyway: replaced whole.
                None => (m.value.start, m.value.end, br#"{"include_usage":true}"#),
            }
        }
    };
    Some([
        body.slice(..at),
        Bytes::from_static(insert),
        body.slice(end..),
    ])
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
    fn token_ids_count_one_token_each() {
        let ids: Vec<String> = (0..8000).map(|i| i.to_string()).collect();
        let body = format!(r#"{{"model":"m","prompt":[[{}]]}}"#, ids.join(","));
        assert_eq!(inspect(body.as_bytes()).prompt_tokens, 8000);
        let body = format!(r#"{{"model":"m","input":[{}]}}"#, ids.join(","));
        assert_eq!(inspect(body.as_bytes()).prompt_tokens, 8000);
    }

    #[test]
    fn the_largest_of_several_caps_counts() {
        let info = inspect(br#"{"model":"m","max_tokens":1,"max_completion_tokens":16000}"#);
        assert_eq!(info.max_tokens, Some(16000));
        let info = inspect(br#"{"model":"m","max_output_tokens":5,"max_tokens":3}"#);
        assert_eq!(info.max_tokens, Some(5));
    }

    #[test]
    fn n_choices_multiply_the_cap() {
        let info = inspect(br#"{"model":"m","n":3,"max_completion_tokens":100,"messages":[]}"#);
        assert_eq!((info.max_tokens, info.choices), (Some(300), 3));
        // Spelled in another case (Go's decoder would read it as `n`): ambiguous, as for
        // every member ezgate reads.
        assert!(inspect(br#"{"model":"m","N":2,"max_tokens":10}"#)
            .ambiguous
            .is_some());
        assert!(inspect(br#"{"model":"m","n":1e3}"#).ambiguous.is_some());
        let info = inspect(br#"{"model":"m","n":null}"#);
        assert_eq!((info.max_tokens, info.choices), (None, 1));
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

    fn spliced(body: &str) -> Option<String> {
        let body = Bytes::from(body.to_owned());
        let parts = ask_for_stream_usage(&body, &inspect(&body))?;
        Some(String::from_utf8(parts.concat()).unwrap())
    }

    #[test]
    fn asks_for_usage_on_streams_only() {
        for (body, want) in [
            (
                r#"{"model":"m","stream":true,"messages":[]}"#,
                r#"{"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[]}"#,
            ),
            (
                r#" {"stream":true,"stream_options":{"include_usage":false}}"#,
                r#" {"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{ "include_usage" : null }}"#,
                r#"{"stream":true,"stream_options":{ "include_usage" : true }}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{}}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{"x":1}}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true,"x":1}}"#,
            ),
            (
                r#"{"stream":true,"stream_options":null}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
        ] {
            let got = spliced(body).unwrap();
            assert_eq!(got, want);
            assert!(inspect(got.as_bytes()).include_usage);
        }
        // Not streamed, already asked, or not understood: left alone.
        assert!(spliced(r#"{"model":"m","messages":[]}"#).is_none());
        assert!(spliced(r#"{"stream":true,"stream_options":{"include_usage":true}}"#).is_none());
        assert!(spliced(r#"{"stream":true,"stream":true}"#).is_none());
        assert!(spliced(r#"[{"stream":true}]"#).is_none());
    }

    #[test]
    fn the_splice_finds_members_however_their_names_are_escaped() {
        for (body, want) in [
            (
                r#"{"stream":true,"stream\u005foptions":{"include\u005fusage":false}}"#,
                r#"{"stream":true,"stream\u005foptions":{"include\u005fusage":true}}"#,
            ),
            (
                r#"{"str\u0065am":true,"stream_options":{"x":1}}"#,
                r#"{"str\u0065am":true,"stream_options":{"include_usage":true,"x":1}}"#,
            ),
        ] {
            let got = spliced(body).unwrap();
            assert_eq!(got, want);
            let info = inspect(got.as_bytes());
            assert!(info.include_usage && info.ambiguous.is_none());
        }
        // A stream flag ezgate cannot read the way the upstream would: no splice, refused.
        let info = inspect(br#"{"stream":true,"Stream_options":{"include_usage":false}}"#);
        assert!(info.ambiguous.is_some() && !info.understood);
        assert!(ask_for_stream_usage(&Bytes::from_static(b"{}"), &info).is_none());
    }

    #[test]
    fn exposes_the_models_named_inside() {
        let info = inspect(
            br#"{"model":"gpt-4.1","tools":[{"type":"image_generation","model":"gpt-image-1"},{"type":"image_generation"}]}"#,
        );
        assert_eq!(info.model.as_deref(), Some("gpt-4.1"));
        assert_eq!(info.other_models, ["gpt-image-1"]);
        assert!(info.unnamed_tool_model);
        let info = inspect(br#"{"model":"a","model":"b"}"#);
        assert!(info.ambiguous.unwrap().contains("`model` appears twice"));
        assert_eq!(inspect(b"{not json").ambiguous, None);
    }

    #[test]
    fn the_splice_keeps_every_other_byte() {
        let body = format!(
            r#"{{"model":"gpt-4o","stream":true,"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x\\\"y".repeat(1000)
        );
        let got = spliced(&body).unwrap();
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(&body).unwrap(),
            serde_json::from_str(&got).unwrap(),
        );
        let mut b = b;
        b.as_object_mut().unwrap().remove("stream_options");
        assert_eq!(a, b);
        assert_eq!(
            got.len(),
            body.len() + r#""stream_options":{"include_usage":true},"#.len()
        );
    }
}

//! The normal OpenAI-compatible API: models, chat completions, text completions, embeddings.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::body::Payload;
use crate::faults::{openai_error, respond, JSON};
use crate::log::Tokens;
use crate::options::{Duplicates, Opts};
use crate::service::State;
use crate::sse::{Kind, Plan, SseBody};

const MODELS: &str = concat!(
    r#"{"object":"list","data":["#,
    r#"{"id":"gpt-4o","object":"model","created":1715367049,"owned_by":"ezlink"},"#,
    r#"{"id":"gpt-4o-mini","object":"model","created":1721172741,"owned_by":"ezlink"},"#,
    r#"{"id":"gpt-4.1","object":"model","created":1744316542,"owned_by":"ezlink"},"#,
    r#"{"id":"text-embedding-3-small","object":"model","created":1705948997,"owned_by":"ezlink"},"#,
    r#"{"id":"text-embedding-3-large","object":"model","created":1705953180,"owned_by":"ezlink"}"#,
    r#"]}"#
);

/// Non-streamed content holds at most this many pieces, whatever `x-emu-completion-tokens`.
const MAX_CONTENT_PIECES: u64 = 64;
const EMBEDDING: [f32; 8] = [
    0.0023, -0.0093, 0.0157, -0.0076, 0.0311, -0.0188, 0.0042, -0.0271,
];

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// With `x-emu-cached-tokens`: `{"cached_tokens": min(K, P)}`, as OpenAI reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<CachedTokens>,
}

impl Usage {
    fn new(prompt_tokens: u64, completion_tokens: u64, cached: Option<u64>) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: cached.map(|k| CachedTokens {
                cached_tokens: k.min(prompt_tokens),
            }),
        }
    }

    fn cached(&self) -> u64 {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }
}

/// The text of content piece `index` (0-based): `"tok0 "`, `"tok1 "`, …
pub fn piece(index: usize) -> String {
    format!("tok{index} ")
}

#[derive(Deserialize)]
struct ApiRequest<'a> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    instructions: Option<Value>,
    /// The output caps quota mode charges (read leniently: any JSON value).
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    max_completion_tokens: Option<Value>,
    #[serde(default)]
    max_output_tokens: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<Value>,
}

pub fn models() -> Response<Payload> {
    respond(StatusCode::OK, JSON, MODELS)
}

/// Seconds since the epoch written into responses with `x-emu-id`.
const FIXED_CREATED: u64 = 1_700_000_000;

/// `POST /v1/chat/completions`, `POST /v1/completions` and `POST /v1/responses`.
pub fn complete(
    state: &State,
    kind: Kind,
    body: &[u8],
    opts: &Opts,
    tokens: &Tokens,
) -> Response<Payload> {
    let mut tree = None;
    let request = match parse(body, opts.duplicates, &mut tree) {
        Ok(request) => request,
        Err(err) => return invalid_json(&err),
    };
    let prompt_tokens = prompt_tokens(Some(kind), &request);
    // `x-emu-echo-key`: an upstream careless enough to name the key as the model.
    let model = opts
        .echo_key
        .as_deref()
        .or(request.model.as_deref())
        .unwrap_or("gpt-4o");
    let (id, created) = match &opts.fixed_id {
        Some(id) => (id.clone(), FIXED_CREATED),
        None => (
            match kind {
                Kind::Chat => format!("chatcmpl-emu{}", state.next_id()),
                Kind::Text => format!("cmpl-emu{}", state.next_id()),
                Kind::Responses => format!("resp_emu{}", state.next_id()),
            },
            now(),
        ),
    };
    if request.stream == Some(true) {
        // The Responses API always reports usage, in its `response.completed` event.
        let include_usage = kind == Kind::Responses
            || request
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
        tokens.set(prompt_tokens, 0);
        let plan = Plan {
            kind,
            id,
            created,
            model: model.to_owned(),
            opts: opts.stream,
            usage: include_usage
                .then(|| Usage::new(prompt_tokens, opts.stream.events as u64, opts.cached_tokens)),
            tokens: tokens.clone(),
        };
        let mut response = Response::new(Payload::Stream(SseBody::new(plan).boxed_unsync()));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return response;
    }
    let usage = Usage::new(prompt_tokens, opts.completion_tokens, opts.cached_tokens);
    tokens.set(prompt_tokens, opts.completion_tokens);
    let content: String = (0..opts.completion_tokens.min(MAX_CONTENT_PIECES) as usize)
        .map(piece)
        .collect();
    let body = match kind {
        Kind::Chat => serde_json::to_vec(&ChatCompletion {
            id: &id,
            object: "chat.completion",
            created,
            model,
            choices: [ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: &content,
                    refusal: None,
                },
                logprobs: None,
                finish_reason: "stop",
            }],
            usage,
            system_fingerprint: "fp_emu",
        }),
        Kind::Text => serde_json::to_vec(&TextCompletion {
            id: &id,
            object: "text_completion",
            created,
            model,
            choices: [TextChoice {
                text: &content,
                index: 0,
                logprobs: None,
                finish_reason: "stop",
            }],
            usage,
        }),
        Kind::Responses => serde_json::to_vec(&response_object(
            &id,
            created,
            model,
            "completed",
            &content,
            Some(usage),
        )),
    };
    respond(StatusCode::OK, JSON, body.unwrap_or_default())
}

/// A Responses API `response` object (`status` `in_progress` has no output or usage yet).
pub fn response_object<'a>(
    id: &'a str,
    created_at: u64,
    model: &'a str,
    status: &'static str,
    text: &'a str,
    usage: Option<Usage>,
) -> ResponseObject<'a> {
    let done = status == "completed";
    ResponseObject {
        id,
        object: "response",
        created_at,
        status,
        model,
        output: done
            .then(|| OutputMessage {
                kind: "message",
                id: format!("msg_{id}"),
                status: "completed",
                role: "assistant",
                content: [OutputText {
                    kind: "output_text",
                    text,
                    annotations: [],
                }],
            })
            .into_iter()
            .collect(),
        usage: usage.map(|u| ResponsesUsage {
            input_tokens: u.prompt_tokens,
            input_tokens_details: CachedTokens {
                cached_tokens: u.cached(),
            },
            output_tokens: u.completion_tokens,
            output_tokens_details: ReasoningTokens {
                reasoning_tokens: 0,
            },
            total_tokens: u.total_tokens,
        }),
    }
}

#[derive(Serialize)]
pub struct ResponseObject<'a> {
    id: &'a str,
    object: &'static str,
    created_at: u64,
    status: &'static str,
    model: &'a str,
    output: Vec<OutputMessage<'a>>,
    usage: Option<ResponsesUsage>,
}

#[derive(Serialize)]
struct OutputMessage<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: String,
    status: &'static str,
    role: &'static str,
    content: [OutputText<'a>; 1],
}

#[derive(Serialize)]
struct OutputText<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    annotations: [(); 0],
}

#[derive(Serialize)]
struct ResponsesUsage {
    input_tokens: u64,
    input_tokens_details: CachedTokens,
    output_tokens: u64,
    output_tokens_details: ReasoningTokens,
    total_tokens: u64,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct CachedTokens {
    cached_tokens: u64,
}

#[derive(Serialize)]
struct ReasoningTokens {
    reasoning_tokens: u64,
}

/// `POST /v1/embeddings`: one 8-float embedding per input.
pub fn embeddings(body: &[u8], opts: &Opts, tokens: &Tokens) -> Response<Payload> {
    let mut tree = None;
    let request = match parse(body, opts.duplicates, &mut tree) {
        Ok(request) => request,
        Err(err) => return invalid_json(&err),
    };
    let inputs = match &request.input {
        None | Some(Value::Null) => 0,
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => 1,
        Some(Value::Array(items)) => items.len(),
        Some(_) => 1,
    };
    let prompt_tokens = prompt_tokens(None, &request);
    tokens.set(prompt_tokens, 0);
    let data: Vec<Embedding> = (0..inputs)
        .map(|index| Embedding {
            object: "embedding",
            index,
            embedding: EMBEDDING,
        })
        .collect();
    let body = serde_json::to_vec(&Embeddings {
        object: "list",
        data,
        model: request.model.as_deref().unwrap_or("text-embedding-3-small"),
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    });
    respond(StatusCode::OK, JSON, body.unwrap_or_default())
}

/// `P` of a completion, a response (`kind`) or embeddings (`None`).
fn prompt_tokens(kind: Option<Kind>, request: &ApiRequest) -> u64 {
    let chars = match kind {
        Some(Kind::Chat) => request
            .messages
            .iter()
            .flatten()
            .filter_map(|m| m.content.as_ref())
            .map(text_chars)
            .sum(),
        Some(Kind::Text) => request.prompt.as_ref().map_or(0, text_chars),
        Some(Kind::Responses) => {
            request.input.as_ref().map_or(0, text_chars)
                + request.instructions.as_ref().map_or(0, text_chars)
        }
        None => request.input.as_ref().map_or(0, text_chars),
    };
    (chars / 4).max(1) as u64
}

/// What quota mode charges a completion, a response (`kind`) or embeddings (`None`): the
/// model and `P + M` tokens. A body that does not parse costs `P` = 1 and the default `M`.
pub fn quota_cost(kind: Option<Kind>, body: &[u8], opts: &Opts) -> (String, u64) {
    let default_model = if kind.is_some() {
        "gpt-4o"
    } else {
        "text-embedding-3-small"
    };
    let mut tree = None;
    let Ok(request) = parse(body, opts.duplicates, &mut tree) else {
        let m = if kind.is_some() {
            opts.completion_tokens
        } else {
            0
        };
        return (default_model.to_owned(), 1 + m);
    };
    let cap = match kind {
        None => Some(0),
        Some(Kind::Responses) => request.max_output_tokens.as_ref().and_then(Value::as_u64),
        Some(_) => [&request.max_tokens, &request.max_completion_tokens]
            .into_iter()
            .find_map(|v| v.as_ref().and_then(Value::as_u64)),
    };
    let completion = cap.unwrap_or(if request.stream == Some(true) {
        opts.stream.events as u64
    } else {
        opts.completion_tokens
    });
    let model = request.model.as_deref().unwrap_or(default_model).to_owned();
    (
        model,
        prompt_tokens(kind, &request).saturating_add(completion),
    )
}

pub fn not_found(method: &Method, path: &str) -> Response<Payload> {
    let message = format!("Invalid URL ({method} {path})");
    openai_error(
        StatusCode::NOT_FOUND,
        &message,
        "invalid_request_error",
        Some("unknown_url"),
    )
}

pub fn too_large(limit: usize) -> Response<Payload> {
    let message = format!("Request body is larger than the emulator's {limit} byte limit.");
    openai_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &message,
        "invalid_request_error",
        Some("request_too_large"),
    )
}

/// The request as the upstream reads it. A member given twice (names compared decoded) is
/// the last one, read from the document `tree` kept by the caller (a JSON map keeps the
/// last value of a key), or refused.
fn parse<'a>(
    body: &'a [u8],
    duplicates: Duplicates,
    tree: &'a mut Option<Value>,
) -> Result<ApiRequest<'a>, serde_json::Error> {
    match duplicates {
        Duplicates::Last => {
            let tree = tree.insert(serde_json::from_slice(body)?);
            ApiRequest::deserialize(&*tree)
        }
        Duplicates::Reject => {
            serde_json::from_slice::<Unique>(body)?;
            serde_json::from_slice(body)
        }
    }
}

/// Any JSON document whose objects name each member once.
struct Unique;

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Unique)
    }
}

impl<'de> serde::de::Visitor<'de> for Unique {
    type Value = Unique;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
        Ok(Unique)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
        Ok(Unique)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
        Ok(Unique)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
        Ok(Unique)
    }

    fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
        Ok(Unique)
    }

    fn visit_unit<E>(self) -> Result<Unique, E> {
        Ok(Unique)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
        while seq.next_element::<Unique>()?.is_some() {}
        Ok(Unique)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            if seen.contains(&name) {
                let name: String = name.escape_debug().take(64).collect();
                let why = format!("member `{name}` appears twice");
                return Err(serde::de::Error::custom(why));
            }
            map.next_value::<Unique>()?;
            seen.insert(name);
        }
        Ok(Unique)
    }
}

fn invalid_json(err: &serde_json::Error) -> Response<Payload> {
    let message = format!("We could not parse the JSON body of your request. ({err})");
    openai_error(
        StatusCode::BAD_REQUEST,
        &message,
        "invalid_request_error",
        None,
    )
}

/// Characters of text in a content value: strings, arrays of them, `{"text": …}` parts and
/// `{"content": …}` messages;
/// a number (a token id) counts as 4.
fn text_chars(value: &Value) -> usize {
    match value {
        Value::String(s) => s.chars().count(),
        Value::Array(items) => items.iter().map(text_chars).sum(),
        Value::Object(map) => ["text", "content"]
            .iter()
            .filter_map(|k| map.get(*k))
            .map(text_chars)
            .sum(),
        Value::Number(_) => 4,
        Value::Null | Value::Bool(_) => 0,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChatChoice<'a>; 1],
    usage: Usage,
    system_fingerprint: &'static str,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
}

#[derive(Serialize)]
struct TextCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [TextChoice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Embeddings<'a> {
    object: &'static str,
    data: Vec<Embedding>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: [f32; 8],
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

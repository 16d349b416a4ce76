//! Failure responses: the error body shapes of `x-emu-status`/`x-emu-body`, the
//! OpenAI-style errors of the normal API, and the `x-emu-reset: body` response.

use std::collections::VecDeque;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use serde::Serialize;
use serde_json::json;

use crate::body::{Chunks, Payload, ResetAfter};

pub const JSON: &str = "application/json";
const HTML: &str = "text/html";
const TEXT: &str = "text/plain";

/// Length of the run of `x` appended to the message by the `huge` shape.
pub const HUGE_PADDING: usize = 2 * 1024 * 1024;
const HUGE_CHUNK: usize = 64 * 1024;
static XS: [u8; HUGE_CHUNK] = [b'x'; HUGE_CHUNK];

/// `x-emu-status` and its companions.
#[derive(Debug)]
pub struct Fault {
    pub status: StatusCode,
    pub shape: Shape,
    pub message: String,
    /// `None` when `x-emu-code: null`.
    pub code: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    OpenAi,
    ErrorString,
    Detail,
    DetailList,
    DetailObject,
    Message,
    Errors,
    Html,
    Text,
    Empty,
    InvalidUtf8,
    InvalidJson,
    Huge,
}

impl Shape {
    pub const NAMES: &'static str = "openai, error-string, detail, detail-list, detail-object, \
        message, errors, html, text, empty, invalid-utf8, invalid-json or huge";

    pub fn parse(value: &str) -> Option<Shape> {
        Some(match value.to_ascii_lowercase().as_str() {
            "openai" => Shape::OpenAi,
            "error-string" => Shape::ErrorString,
            "detail" => Shape::Detail,
            "detail-list" => Shape::DetailList,
            "detail-object" => Shape::DetailObject,
            "message" => Shape::Message,
            "errors" => Shape::Errors,
            "html" => Shape::Html,
            "text" => Shape::Text,
            "empty" => Shape::Empty,
            "invalid-utf8" => Shape::InvalidUtf8,
            "invalid-json" => Shape::InvalidJson,
            "huge" => Shape::Huge,
            _ => return None,
        })
    }
}

#[derive(Serialize)]
struct OpenAiError<'a> {
    error: OpenAiErrorInner<'a>,
}

#[derive(Serialize)]
struct OpenAiErrorInner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// `{"error":{"message","type","param":null,"code"}}` as the OpenAI API sends it.
pub fn openai_error(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: Option<&str>,
) -> Response<Payload> {
    let body = OpenAiError {
        error: OpenAiErrorInner {
            message,
            kind,
            param: None,
            code,
        },
    };
    respond(status, JSON, to_vec(&body))
}

/// The response `x-emu-status` asks for.
pub fn render(fault: &Fault) -> Response<Payload> {
    let status = fault.status;
    let text = fault.message.as_str();
    let code = fault.code.as_deref();
    match fault.shape {
        Shape::OpenAi => openai_error(status, text, "invalid_request_error", code),
        Shape::ErrorString => json_body(status, &json!({ "error": text })),
        Shape::Detail => json_body(status, &json!({ "detail": text })),
        Shape::DetailList => json_body(
            status,
            &json!({ "detail": [{ "loc": ["body", "model"], "msg": text, "type": "value_error" }] }),
        ),
        Shape::DetailObject => json_body(
            status,
            &json!({ "detail": { "message": text, "code": code } }),
        ),
        Shape::Message => json_body(status, &json!({ "message": text })),
        Shape::Errors => json_body(
            status,
            &json!({ "errors": [{ "message": text, "code": code }] }),
        ),
        Shape::Html => respond(status, HTML, html_page(status, text).into_bytes()),
        Shape::Text => respond(status, TEXT, text.as_bytes().to_vec()),
        Shape::Empty => {
            let mut response = Response::new(Payload::Bytes(Bytes::new()));
            *response.status_mut() = status;
            response
        }
        Shape::InvalidUtf8 => {
            let mut bytes = Vec::with_capacity(text.len() + 4);
            bytes.extend_from_slice(b"\xff\xfe");
            bytes.extend_from_slice(text.as_bytes());
            bytes.extend_from_slice(b"\xc3\x28");
            respond(status, TEXT, bytes)
        }
        Shape::InvalidJson => {
            let quoted = serde_json::to_string(text).unwrap_or_default();
            respond(
                status,
                JSON,
                format!(r#"{{"error": {{"message": {quoted}"#).into_bytes(),
            )
        }
        Shape::Huge => huge(status, text, code),
    }
}

/// An OpenAI error whose message is `text` + 2 MiB of `x`, sent in 64 KiB frames.
fn huge(status: StatusCode, text: &str, code: Option<&str>) -> Response<Payload> {
    let text = serde_json::to_string(text).unwrap_or_default();
    let open = text.strip_suffix('"').unwrap_or(&text);
    let code = serde_json::to_string(&code).unwrap_or_default();
    let mut chunks = VecDeque::with_capacity(HUGE_PADDING / HUGE_CHUNK + 2);
    chunks.push_back(Bytes::from(format!(r#"{{"error":{{"message":{open}"#)));
    for _ in 0..HUGE_PADDING / HUGE_CHUNK {
        chunks.push_back(Bytes::from_static(&XS));
    }
    chunks.push_back(Bytes::from(format!(
        r#"","type":"invalid_request_error","param":null,"code":{code}}}}}"#
    )));
    let mut response = Response::new(Payload::Stream(http_body_util::BodyExt::boxed_unsync(
        Chunks(chunks),
    )));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    response
}

/// `x-emu-reset: body`: 200, `content-length: 1000`, 10 bytes, then the abort.
pub fn reset_body() -> Response<Payload> {
    let body = ResetAfter::new(Bytes::from_static(b"{\"id\":\"cha"), 1000);
    let mut response = Response::new(Payload::Stream(http_body_util::BodyExt::boxed_unsync(body)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    headers.insert(CONTENT_LENGTH, HeaderValue::from_static("1000"));
    response
}

/// What a load balancer in front of the API shows when it fails.
fn html_page(status: StatusCode, text: &str) -> String {
    let text = escape_html(text);
    format!(
        "<!DOCTYPE html><html><head><title>{status} {text}</title><style>body{{width:35em;\
         margin:0 auto;font-family:Tahoma,Verdana,Arial,sans-serif;}}</style></head><body>\
         <h1>{text}</h1><hr><center>ezlink-lb</center></body></html>",
        status = status.as_u16()
    )
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn json_body(status: StatusCode, value: &serde_json::Value) -> Response<Payload> {
    respond(status, JSON, to_vec(value))
}

fn to_vec<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Payload> {
    let mut response = Response::new(Payload::Bytes(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

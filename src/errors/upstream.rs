//! Any upstream error body, whatever its shape or encoding, becomes an [`ErrorBody`].
//!
//! Shapes understood: OpenAI `{"error": {…}}`, `{"error": "text"}`, `{"detail": string | list
//! | object}`, `{"message": …}`, `{"errors": […]}`, HTML pages (title or heading text), plain
//! text, empty bodies, invalid UTF-8 and invalid JSON. Bodies are decoded per
//! `Content-Encoding` (gzip, deflate, br) with the decoded size capped.

use std::io::Read;

use serde_json::Value;

use super::redact::Redactor;
use super::{type_for, ErrorBody, Source};

/// How much of an upstream error body ezgate reads and decodes; the rest is discarded.
pub const MAX_ERROR_BODY: usize = 64 * 1024;
/// The longest message ezgate passes on.
const MAX_MESSAGE_CHARS: usize = 1000;

/// What the upstream said, reduced to the schema's members.
#[derive(Debug, Default, PartialEq)]
struct Said {
    message: Option<String>,
    code: Option<String>,
    param: Option<String>,
}

/// Maps an upstream error response to the schema. `body` is at most [`MAX_ERROR_BODY`] raw
/// bytes, `truncated` says whether more followed.
pub fn normalize(
    status: u16,
    content_encoding: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
    truncated: bool,
    request_id: &str,
) -> ErrorBody {
    normalize_redacted(
        status,
        content_encoding,
        content_type,
        body,
        truncated,
        request_id,
        None,
    )
}

/// [`normalize`], with the organization's key (`secret`, managed mode) replaced in every
/// member taken from the upstream, found after decoding and before the message is clipped
/// (a message cut inside the key loses the start of it too).
pub fn normalize_redacted(
    status: u16,
    content_encoding: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
    truncated: bool,
    request_id: &str,
    secret: Option<&Redactor>,
) -> ErrorBody {
    let decoded = decode(content_encoding, body);
    let mut said = match &decoded {
        Ok(bytes) => read_body(content_type, bytes),
        Err(reason) => Said {
            message: Some(format!(
                "(upstream error body could not be decoded: {reason})"
            )),
            ..Said::default()
        },
    };
    if let Some(r) = secret {
        for member in [&mut said.code, &mut said.param].into_iter().flatten() {
            r.cut_text(member);
        }
    }
    let message = said
        .message
        .map(|m| {
            let mut m = collapse_ws(&m);
            if let Some(r) = secret {
                r.cut_text(&mut m);
            }
            clip(m)
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| meaning(status).to_owned());
    let message = if truncated {
        format!("{message} (upstream body truncated)")
    } else {
        message
    };
    ErrorBody {
        message,
        kind: type_for(status),
        code: said.code,
        param: said.param,
        status,
        source: Source::Upstream,
        request_id: request_id.to_owned(),
        retry_after_ms: None,
        upstream_status: Some(status),
    }
}

/// Decodes per `Content-Encoding`, producing at most [`MAX_ERROR_BODY`] bytes.
fn decode(encoding: Option<&str>, body: &[u8]) -> Result<Vec<u8>, String> {
    let limit = MAX_ERROR_BODY as u64;
    let mut out = Vec::new();
    let enc = encoding.map(|e| e.trim().to_ascii_lowercase());
    let result = match enc.as_deref() {
        None | Some("") | Some("identity") => return Ok(body.to_vec()),
        Some("gzip") | Some("x-gzip") => flate2::read::MultiGzDecoder::new(body)
            .take(limit)
            .read_to_end(&mut out),
        Some("deflate") => {
            let zlib = flate2::read::ZlibDecoder::new(body)
                .take(limit)
                .read_to_end(&mut out);
            if zlib.is_err() {
                out.clear();
                flate2::read::DeflateDecoder::new(body)
                    .take(limit)
                    .read_to_end(&mut out)
            } else {
                zlib
            }
        }
        Some("br") => brotli::Decompressor::new(body, 4096)
            .take(limit)
            .read_to_end(&mut out),
        Some(other) => return Err(format!("unsupported content-encoding '{other}'")),
    };
    match result {
        Ok(_) => Ok(out),
        // A body cut at our read cap ends mid-stream; keep what decoded.
        Err(_) if !out.is_empty() => Ok(out),
        Err(e) => Err(format!("{} body is corrupt ({e})", enc.unwrap_or_default())),
    }
}

fn read_body(content_type: Option<&str>, bytes: &[u8]) -> Said {
    let text = String::from_utf8_lossy(bytes);
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Said::default();
    }
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        if let Ok(value) = serde_json::from_str::<Value>(trimmed) {
            return from_json(&value);
        }
    }
    let is_html = content_type.is_some_and(|c| c.contains("html"))
        || trimmed
            .get(..15)
            .is_some_and(|s| s.to_ascii_lowercase().starts_with("<!doctype html"))
        || trimmed
            .get(..5)
            .is_some_and(|s| s.eq_ignore_ascii_case("<html"));
    if is_html {
        return Said {
            message: html_text(trimmed),
            ..Said::default()
        };
    }
    Said {
        message: Some(trimmed.to_owned()),
        ..Said::default()
    }
}

fn from_json(value: &Value) -> Said {
    let obj = match value {
        Value::Object(obj) => obj,
        Value::Array(items) => {
            return Said {
                message: join_messages(items),
                ..Said::default()
            };
        }
        other => {
            return Said {
                message: scalar_text(other),
                ..Said::default()
            }
        }
    };
    if let Some(err) = obj.get("error") {
        return match err {
            Value::Object(inner) => Said {
                message: inner.get("message").and_then(any_text),
                code: inner.get("code").and_then(scalar_text).or_else(|| {
                    inner
                        .get("type")
                        .and_then(|t| t.as_str())
                        .map(str::to_owned)
                }),
                param: inner.get("param").and_then(scalar_text),
            },
            other => Said {
                message: any_text(other),
                code: obj.get("code").and_then(scalar_text),
                ..Said::default()
            },
        };
    }
    if let Some(detail) = obj.get("detail") {
        let said = match detail {
            Value::Object(inner) => Said {
                message: inner
                    .get("message")
                    .or_else(|| inner.get("msg"))
                    .and_then(any_text),
                code: inner.get("code").and_then(scalar_text),
                param: None,
            },
            other => Said {
                message: any_text(other),
                ..Said::default()
            },
        };
        if said.message.is_some() {
            return said;
        }
    }
    if let Some(msg) = obj.get("message").and_then(any_text) {
        return Said {
            message: Some(msg),
            code: obj.get("code").and_then(scalar_text),
            param: obj.get("param").and_then(scalar_text),
        };
    }
    if let Some(Value::Array(items)) = obj.get("errors") {
        let code = items
            .first()
            .and_then(|e| e.get("code"))
            .and_then(scalar_text);
        return Said {
            message: join_messages(items),
            code,
            param: None,
        };
    }
    Said {
        message: Some(value.to_string()),
        ..Said::default()
    }
}

/// Text of a message-ish JSON value: a string, a number, an object's `message`/`msg`, or a
/// list of those.
fn any_text(value: &Value) -> Option<String> {
    match value {
        Value::Array(items) => join_messages(items),
        Value::Object(obj) => {
            let msg = obj
                .get("message")
                .or_else(|| obj.get("msg"))
                .and_then(any_text)?;
            match obj.get("loc").and_then(Value::as_array) {
                Some(loc) => {
                    let loc: Vec<String> = loc.iter().filter_map(scalar_text).collect();
                    Some(format!("{}: {msg}", loc.join(".")))
                }
                None => Some(msg),
            }
        }
        other => scalar_text(other),
    }
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn join_messages(items: &[Value]) -> Option<String> {
    let parts: Vec<String> = items.iter().filter_map(any_text).collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// The words of an HTML error page: its `<title>`, else its first `<h1>`, else its text.
fn html_text(html: &str) -> Option<String> {
    let lower = html.to_ascii_lowercase();
    let element = |tag: &str| -> Option<String> {
        let open = lower.find(&format!("<{tag}"))?;
        let start = open + lower[open..].find('>')? + 1;
        let end = start + lower[start..].find(&format!("</{tag}"))?;
        let text = strip_tags(html.get(start..end)?);
        (!text.trim().is_empty()).then_some(text)
    };
    element("title").or_else(|| element("h1")).or_else(|| {
        let body = strip_tags(&remove_blocks(html, &lower));
        (!body.trim().is_empty()).then_some(body)
    })
}

/// Drops `<script>` and `<style>` blocks, whose text is not words for a person.
fn remove_blocks(html: &str, lower: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut pos = 0;
    while pos < html.len() {
        let next = ["<script", "<style"]
            .iter()
            .filter_map(|t| lower[pos..].find(t).map(|i| (pos + i, *t)))
            .min();
        let Some((start, tag)) = next else { break };
        out.push_str(html.get(pos..start).unwrap_or_default());
        let close = format!("</{}", &tag[1..]);
        pos = match lower[start..].find(&close) {
            Some(i) => start + i + close.len(),
            None => html.len(),
        };
    }
    out.push_str(html.get(pos..).unwrap_or_default());
    out
}

fn strip_tags(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
}

fn collapse_ws(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn clip(mut s: String) -> String {
    if let Some((idx, _)) = s.char_indices().nth(MAX_MESSAGE_CHARS) {
        s.truncate(idx);
        s.push('…');
    }
    s
}

/// What a status means, for bodies that say nothing usable.
pub fn meaning(status: u16) -> &'static str {
    match status {
        400 => "The upstream API rejected the request as malformed (400).",
        401 => "The upstream API rejected the credentials (401). Check the API key.",
        403 => "The upstream API refused access (403).",
        404 => "The upstream API has no such resource (404).",
        408 => "The upstream API timed out reading the request (408).",
        409 => "The upstream API reported a conflict (409).",
        413 => "The upstream API rejected the request as too large (413).",
        422 => "The upstream API could not process the request (422).",
        429 => "The upstream API rate-limited the request (429). Retry later.",
        500 => "The upstream API failed with an internal error (500). Retrying may help.",
        502 => {
            "A proxy in front of the upstream API reported a bad gateway (502). Retrying may help."
        }
        503 => "The upstream API is unavailable (503). Retry later.",
        504 => "A proxy in front of the upstream API timed out (504). Retrying may help.",
        _ if status < 500 => "The upstream API rejected the request.",
        _ => "The upstream API failed. Retrying may help.",
    }
}

#[cfg(test)]
#[path = "upstream_tests.rs"]
mod tests;

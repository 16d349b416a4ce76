//! `/echo*` (the request body streamed back) and `/inspect*` (the request as received).

use std::borrow::Cow;

use http::header::{CONTENT_TYPE, HOST};
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;

use crate::body::{BoxError, Payload};
use crate::faults::{respond, JSON};

/// The request body streamed back frame by frame, never buffered whole.
pub fn echo(request: Request<Incoming>) -> Response<Payload> {
    let (parts, body) = request.into_parts();
    let body = body.map_err(BoxError::from).boxed_unsync();
    let mut response = Response::new(Payload::Stream(body));
    let headers = response.headers_mut();
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    headers.insert(CONTENT_TYPE, content_type);
    if let Ok(method) = HeaderValue::from_str(parts.method.as_str()) {
        headers.insert("x-echo-method", method);
    }
    if let Ok(uri) = HeaderValue::from_str(path_and_query(&parts.uri)) {
        headers.insert("x-echo-uri", uri);
    }
    response
}

#[derive(Serialize)]
struct Inspection<'a> {
    method: &'a str,
    uri: &'a str,
    version: &'static str,
    headers: Vec<(&'a str, Cow<'a, str>)>,
    body_len: u64,
}

/// The request line and headers as hyper parsed them, plus the body's length.
pub fn inspect(parts: &Parts, body_len: u64) -> Response<Payload> {
    let mut headers = Vec::with_capacity(parts.headers.len() + 1);
    if parts.version == Version::HTTP_2 && !parts.headers.contains_key(HOST) {
        if let Some(authority) = parts.uri.authority() {
            headers.push(("host", Cow::Borrowed(authority.as_str())));
        }
    }
    headers.extend(
        parts
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value.as_bytes()))),
    );
    let inspection = Inspection {
        method: parts.method.as_str(),
        uri: path_and_query(&parts.uri),
        version: version(parts.version),
        headers,
        body_len,
    };
    let body = serde_json::to_vec(&inspection).unwrap_or_default();
    respond(StatusCode::OK, JSON, body)
}

/// Path and query as received (also for HTTP/2 and absolute-form HTTP/1 targets).
pub fn path_and_query(uri: &Uri) -> &str {
    uri.path_and_query()
        .map_or_else(|| uri.path(), |pq| pq.as_str())
}

fn version(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

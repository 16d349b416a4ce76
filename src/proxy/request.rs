//! Reading a request: its body, read whole when a check needs its model or size (or when
//! ezgate asks for the usage of a stream) and streamed otherwise, and its headers rewritten
//! for the upstream.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::HeaderMap;
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::config::ServerConfig;
use crate::errors::GatewayError;
use crate::gateway::State;
use crate::headers::{self, X_REQUEST_ID};
use crate::limits::{form, tokens};
use crate::pool::RequestBody;
use crate::route::Route;

/// A request body as it will be sent, and what ezgate read in it.
pub(super) struct Inspected {
    pub body: RequestBody,
    /// What the body said of its model and size, when it was read.
    pub request: Option<tokens::RequestInfo>,
    /// ezgate asked for the usage of the stream: what that adds comes out of the answer.
    pub strip: bool,
}

/// Reads the body when `checks` need its model or size, or when `ask_usage` may edit it;
/// whatever its content type says. A body a check cannot read is refused, never waved
/// through; a body parsers may read differently is refused whenever it is read. Otherwise
/// the body streams.
pub(super) async fn inspect(
    body: Incoming,
    headers: &mut HeaderMap,
    route: Route,
    checks: bool,
    ask_usage: bool,
    server: &ServerConfig,
) -> Result<Inspected, GatewayError> {
    let (max, idle) = (server.max_request_body.0, server.request_body_timeout.0);
    if content_length(headers).is_some_and(|len| len > max) {
        return Err(GatewayError::PayloadTooLarge { limit: max });
    }
    if !(checks || ask_usage) {
        return Ok(Inspected {
            body: RequestBody::stream(body, max, idle),
            request: None,
            strip: false,
        });
    }
    let bytes = read_whole(body, max, idle).await?;
    let request = if route == Route::AudioTranscriptions {
        let model = form::model(headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes), &bytes);
        tokens::RequestInfo {
            understood: model.is_some(),
            model,
            ..Default::default()
        }
    } else {
        tokens::inspect(&bytes)
    };
    // Whatever the checks: a body ezgate read must mean to the upstream what it meant here.
    if let Some(why) = &request.ambiguous {
        return Err(GatewayError::BadRequest(format!(
            "the body of POST {} is ambiguous: {why}",
            route.as_str()
        )));
    }
    if checks && !request.understood {
        let what = if route == Route::AudioTranscriptions {
            "a multipart/form-data body with one model field"
        } else {
            "one JSON object (uncompressed)"
        };
        return Err(GatewayError::BadRequest(format!(
            "the body of POST {} must be {what}: ezgate reads its model for the policies that cover it",
            route.as_str()
        )));
    }
    let (body, strip) = match ask_usage
        .then(|| tokens::ask_for_stream_usage(&bytes, &request))
        .flatten()
    {
        Some(pieces) => (RequestBody::pieces(pieces), true),
        None => (RequestBody::full(bytes), false),
    };
    // The body is now whole: its length replaces chunked framing or an edited length.
    let len = body.size_hint().exact().unwrap_or(0);
    if content_length(headers) != Some(len) {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    Ok(Inspected {
        body,
        request: Some(request),
        strip,
    })
}

/// Buffers a request body (needed to see its model and size), refusing it past `max` and
/// giving up when the client pauses longer than `idle` between two pieces. Memory is the
/// body's own size: a body of known length is read into one buffer of that length, and a
/// small body that arrives as one frame is kept as it is, without a copy.
async fn read_whole(mut body: Incoming, max: u64, idle: Duration) -> Result<Bytes, GatewayError> {
    let mut buf = BytesMut::new();
    let declared = body.size_hint().exact().filter(|n| *n <= max);
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(GatewayError::RequestTimeout(idle)),
            Ok(None) => break,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(_))) => return Err(GatewayError::ClientClosed),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if (buf.len() + data.len()) as u64 > max {
            return Err(GatewayError::PayloadTooLarge { limit: max });
        }
        // A body of known length ends with its last byte: no need to poll for the end.
        let end = body.is_end_stream();
        if buf.is_empty() && end {
            return Ok(data);
        }
        if buf.is_empty() {
            buf.reserve(declared.map_or(data.len(), |n| n as usize));
        }
        buf.extend_from_slice(&data);
        if end {
            break;
        }
    }
    Ok(buf.freeze())
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// The request's headers as the upstream gets them.
pub(super) fn rewrite_request(
    h: &mut HeaderMap,
    state: &State,
    request_id: Option<HeaderValue>,
    peer: SocketAddr,
) {
    headers::strip_hop_by_hop(h);
    h.remove(HOST);
    // ezgate already answered any `Expect: 100-continue` by reading the body.
    h.remove(http::header::EXPECT);
    if let Some(v) = request_id {
        h.insert(X_REQUEST_ID, v);
    }
    headers::append_forwarded_for(h, peer.ip());
    if let Some(key) = &state.api_key {
        h.insert(AUTHORIZATION, key.clone());
    }
}

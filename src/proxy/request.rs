//! Reading a request: its body, read whole when a check needs its model or size (or when
//! ezgate asks for the usage of a stream) and streamed otherwise, and its headers rewritten
//! for the upstream.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::HeaderMap;
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::buffers::{Buffers, Charge};
use crate::config::{ByteSize, ServerConfig};
use crate::errors::GatewayError;
use crate::gateway::State;
use crate::headers::{self, X_REQUEST_ID};
use crate::limits::{form, tokens};
use crate::pool::RequestBody;

/// A request body as it will be sent, and what ezgate read in it.
pub(super) struct Inspected {
    pub body: RequestBody,
    /// What the body said of its model and size, when it was read.
    pub request: Option<tokens::RequestInfo>,
    /// ezgate asked for the usage of the stream: what that adds comes out of the answer.
    pub strip: bool,
}

/// What the request path wants of a body.
pub(super) struct Reading<'a> {
    /// The canonical path, for a refusal's message.
    pub path: &'a str,
    /// A multipart body is read as a form (else as JSON).
    pub form: bool,
    /// A check needs the body's model or size.
    pub checks: bool,
    /// ezgate may edit the body to ask a stream for its usage.
    pub ask_usage: bool,
}

/// Reads the body when `checks` need its model or size, or when `ask_usage` may edit it;
/// whatever its content type says (on a `form` route, a multipart body is read as a form,
/// anything else as JSON). A body a check cannot read is refused, never waved through; a
/// body parsers may read differently is refused whenever it is read. Otherwise the body
/// streams. Either way it must be complete within `server.request_body_deadline` of when
/// ezgate starts reading it.
pub(super) async fn inspect(
    body: Incoming,
    headers: &mut HeaderMap,
    reading: Reading<'_>,
    server: &ServerConfig,
    buffers: &Buffers,
) -> Result<Inspected, GatewayError> {
    let Reading {
        path,
        form,
        checks,
        ask_usage,
    } = reading;
    let (max, idle) = (server.max_request_body.0, server.request_body_timeout.0);
    let declared = content_length(headers);
    if declared.is_some_and(|len| len > max) {
        return Err(GatewayError::PayloadTooLarge { limit: max });
    }
    let total = server.request_body_deadline.0;
    if !(checks || ask_usage) {
        return Ok(Inspected {
            body: RequestBody::stream(body, max, idle, total),
            request: None,
            strip: false,
        });
    }
    let mut charge = buffers.charge();
    let until = tokio::time::Instant::now() + total;
    let bytes = read_whole(body, server, until, &mut charge).await?;
    let content_type = headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes);
    let request = if form && form::is_multipart(content_type) {
        let model = form::model(content_type, &bytes);
        tokens::RequestInfo {
            understood: model.is_some(),
            model,
            ..Default::default()
        }
    } else {
        tokens::inspect_estimating(&bytes, checks)
    };
    // For a refusal's message only.
    let path = || path.chars().take(200).collect::<String>();
    // Whatever the checks: a body ezgate read must mean to the upstream what it meant here.
    if let Some(why) = &request.ambiguous {
        return Err(GatewayError::BadRequest(format!(
            "the body of POST {} is ambiguous: {why}",
            path()
        )));
    }
    if checks && !request.understood {
        let what = if form {
            "a multipart/form-data body with one model field, or one JSON object (uncompressed)"
        } else {
            "one JSON object (uncompressed)"
        };
        return Err(GatewayError::BadRequest(format!(
            "the body of POST {} must be {what}: ezgate reads its model for the policies that cover it",
            path()
        )));
    }
    let (body, strip) = match ask_usage
        .then(|| tokens::ask_for_stream_usage(&bytes, &request))
        .flatten()
    {
        Some(pieces) => (RequestBody::pieces(pieces), true),
        None => (RequestBody::full(bytes), false),
    };
    // The body holds its bytes of `server.max_buffered_bytes` until the upstream took it.
    let body = body.holding(charge);
    // The body is now whole: its length replaces chunked framing or an edited length.
    let len = body.size_hint().exact().unwrap_or(0);
    if declared != Some(len) {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    Ok(Inspected {
        body,
        request: Some(request),
        strip,
    })
}

/// Bytes of a body of declared length after which its buffer is grown to that length at once.
const JUMP: u64 = 256 << 10;

/// Buffers a request body (needed to see its model and size), refusing it past
/// `server.max_request_body`, when the client pauses longer than
/// `server.request_body_timeout` between two pieces, when it is not complete at `until`,
/// and when all buffered bodies together would hold more than `server.max_buffered_bytes`.
/// Memory grows with the bytes that arrive, never with the length a header announces alone
/// (doubling, capped by that length; past [`JUMP`] bytes, to that length): `charge` takes each
/// piece's bytes before they are kept. A body that arrives as one frame is kept as it is,
/// without a copy.
async fn read_whole(
    mut body: Incoming,
    server: &ServerConfig,
    until: tokio::time::Instant,
    charge: &mut Charge,
) -> Result<Bytes, GatewayError> {
    let (max, idle) = (server.max_request_body.0, server.request_body_timeout.0);
    let budget = server.max_buffered_bytes.0;
    // No body grows past the length it declared (hyper refuses the bytes beyond it).
    let declared = body.size_hint().exact().filter(|n| *n <= max);
    let limit = declared.unwrap_or(max);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let wake = (tokio::time::Instant::now() + idle).min(until);
        let frame = match tokio::time::timeout_at(wake, body.frame()).await {
            Err(_) if tokio::time::Instant::now() >= until => {
                return Err(GatewayError::BodyDeadline(server.request_body_deadline.0))
            }
            Err(_) => return Err(GatewayError::RequestTimeout(idle)),
            Ok(None) => break,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => return Err(GatewayError::client_body(&e)),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let len = (buf.len() + data.len()) as u64;
        if len > max {
            return Err(GatewayError::PayloadTooLarge { limit: max });
        }
        // A body of known length ends with its last byte: no need to poll for the end.
        let end = body.is_end_stream();
        if buf.capacity() == 0 && end {
            if !charge.take(data.len() as u64, budget) {
                return Err(over_budget(budget));
            }
            return Ok(data);
        }
        // The budget is charged for the bytes that arrived: the capacity reserved beyond them
        // is address space that no page backs until those bytes are written.
        if !charge.take(data.len() as u64, budget) {
            return Err(over_budget(budget));
        }
        if len > buf.capacity() as u64 {
            // Each doubling copies the buffer. Once a body that declared its length has sent
            // `JUMP` bytes of it, the rest is taken at once: a large body then costs its own
            // length (plus at most `JUMP` during that one copy), not one and a half times it.
            // Measured: four 8 MiB bodies at once peak 6-16 MiB lower with 256 KiB than with
            // 1 MiB (`attacks::bodies_at_the_limit_cost_memory_in_proportion`, debug build).
            let cap = if declared.is_some() && len >= JUMP {
                limit.max(len)
            } else {
                len.max(buf.capacity() as u64 * 2).min(limit.max(len))
            };
            grow(&mut buf, cap, budget)?;
        }
        buf.extend_from_slice(&data);
        if end {
            break;
        }
    }
    Ok(Bytes::from(buf))
}

/// Grows `buf` to `cap` bytes. The old buffer is freed within this call (a reallocation
/// runs on one worker thread, start to end), so the moment both exist is bounded by the
/// worker threads, not by the requests.
fn grow(buf: &mut Vec<u8>, cap: u64, budget: u64) -> Result<(), GatewayError> {
    let more = usize::try_from(cap)
        .unwrap_or(usize::MAX)
        .saturating_sub(buf.len());
    if buf.try_reserve_exact(more).is_err() {
        return Err(over_budget(budget));
    }
    Ok(())
}

fn over_budget(budget: u64) -> GatewayError {
    GatewayError::Overloaded(format!(
        "the request bodies ezgate is reading would hold more than {} of memory together (server.max_buffered_bytes)",
        ByteSize(budget)
    ))
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Headers that pick which of the key's organizations and projects a request is billed to.
const OPENAI_ORGANIZATION: http::header::HeaderName =
    http::header::HeaderName::from_static("openai-organization");
const OPENAI_PROJECT: http::header::HeaderName =
    http::header::HeaderName::from_static("openai-project");

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
    if state.settings.config.upstream.forward_client_ip {
        headers::append_forwarded_for(h, peer.ip());
    } else {
        headers::strip_forwarded_for(h);
    }
    if let Some(key) = &state.api_key {
        h.insert(AUTHORIZATION, key.clone());
        // The organization chooses the billed organization and project, not the application.
        h.remove(OPENAI_ORGANIZATION);
        h.remove(OPENAI_PROJECT);
    }
}

//! The upstream's answer when it is an error: its body read (capped) and put into the one
//! error schema, its `Retry-After` and `x-ratelimit-*` kept; and what ezgate reads of any
//! answer's headers.

use std::time::{Duration, Instant};

use http::header::{HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;

use super::with_parts;
use crate::errors::{self, upstream::MAX_ERROR_BODY};
use crate::exchange::Exchange;
use crate::gateway::State;
use crate::pool::UpstreamBody;
use crate::stream::ResponseBody;

/// Reads an upstream error body (at most [`MAX_ERROR_BODY`]), maps it to the schema and
/// builds the response. Upstream status, `Retry-After` and `x-ratelimit-*` are kept.
pub(super) async fn upstream_error(
    status: StatusCode,
    mut headers: HeaderMap,
    body: UpstreamBody,
    state: &State,
    out: &mut Exchange,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let idle = state.settings.config.upstream.stream_idle_timeout.0;
    let (raw, truncated) = tokio::time::timeout(idle, read_capped(body, MAX_ERROR_BODY))
        .await
        .unwrap_or_default();
    out.upstream_wait += started.elapsed();
    let encoding = headers
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let ctype = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = errors::upstream::normalize_redacted(
        status.as_u16(),
        encoding.as_deref(),
        ctype.as_deref(),
        &raw,
        truncated,
        &out.request_id,
        state.redactor.as_deref(),
    );
    let retry = headers.get(RETRY_AFTER).and_then(parse_retry_after);
    body.retry_after_ms = retry.map(errors::duration_ms);
    out.upstream_code = body.code.clone();
    for h in [
        CONTENT_LENGTH,
        CONTENT_ENCODING,
        CONTENT_TYPE,
        http::header::ETAG,
        http::header::LAST_MODIFIED,
    ] {
        headers.remove(h);
    }
    let retryable = headers.get("x-should-retry").is_none_or(|v| v != "false");
    let keep_retry_after = headers.get(RETRY_AFTER).cloned();
    let (status, mut headers, bytes) = body.into_parts(headers, retryable);
    if let Some(v) = keep_retry_after {
        headers.insert(RETRY_AFTER, v);
    }
    with_parts(status, headers, ResponseBody::full(bytes))
}

/// Reads up to `cap` bytes of a body; whatever follows is left unread and dropped.
async fn read_capped(mut body: UpstreamBody, cap: usize) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            let room = cap - buf.len();
            if data.len() > room {
                buf.extend_from_slice(&data[..room]);
                return (buf, true);
            }
            buf.extend_from_slice(data);
        }
    }
    (buf, false)
}

/// A `Content-Type` (its bytes, when there is one) that says JSON.
pub(super) fn is_json(content_type: Option<&[u8]>) -> bool {
    // The usual type first; then a byte window, not `str::contains`, whose searcher costs
    // more to build than this.
    content_type.is_some_and(|t| {
        t.get(..16)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"application/json"))
            || t.windows(4).any(|w| w.eq_ignore_ascii_case(b"json"))
    })
}

/// A `Content-Type` (its bytes, when there is one) that says `text/event-stream`.
pub(super) fn is_event_stream(content_type: Option<&[u8]>) -> bool {
    // Media types are case-insensitive.
    content_type.is_some_and(|t| {
        t.get(..17)
            .is_some_and(|t| t.eq_ignore_ascii_case(b"text/event-stream"))
    })
}

/// `Retry-After` as delay-seconds or an HTTP date (in the future), capped at one day.
pub fn parse_retry_after(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    // An HTTP date (IMF-fixdate, or the obsolete RFC 850 and asctime forms).
    let when = httpdate::parse_http_date(s).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .min(Duration::from_secs(86_400)),
    )
}

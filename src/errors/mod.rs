//! The one error schema (`docs/errors.md`): every failure ezgate produces is a [`GatewayError`];
//! every error body that leaves ezgate — ours or the upstream's — is an [`ErrorBody`] rendered
//! by [`render`] or [`ErrorBody::into_response`].

pub mod redact;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, StatusCode};
use serde::Serialize;

/// Why an upstream exchange failed: the `kind` label of `ezgate_upstream_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Connect,
    Tls,
    Timeout,
    Reset,
    Protocol,
}

impl FailureKind {
    pub const ALL: [FailureKind; 5] = [
        FailureKind::Connect,
        FailureKind::Tls,
        FailureKind::Timeout,
        FailureKind::Reset,
        FailureKind::Protocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Tls => "tls",
            FailureKind::Timeout => "timeout",
            FailureKind::Reset => "reset",
            FailureKind::Protocol => "protocol",
        }
    }
}

/// An error of any kind, as bodies and clients hand them around.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which piece of the upstream exchange ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPhase {
    Connect,
    Headers,
    Body,
}

/// A policy's quota: `count` per `window` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub count: u64,
    pub window: u64,
}

/// Everything ezgate itself refuses or fails at. `code()` is the bounded list of `docs/errors.md`
/// and the `code` label of `ezgate_gateway_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("Rate limit '{policy}' exceeded: {limit}. Retry in {}.", secs(*retry_after))]
    RateLimited {
        policy: Arc<str>,
        limit: String,
        retry_after: Duration,
        quota: Quota,
    },
    #[error("Token rate limit '{policy}' exceeded: {limit}, {remaining} left; this request is estimated at {estimate}. Retry in {}.", secs(*retry_after))]
    TokenRateLimited {
        policy: Arc<str>,
        limit: String,
        retry_after: Duration,
        quota: Quota,
        /// Tokens left in the bucket (the request needed more).
        remaining: u64,
        /// What the request was estimated at, and how.
        estimate: String,
    },
    #[error("Concurrency limit '{policy}' exceeded: at most {limit} requests in flight. Retry when one finishes.")]
    ConcurrencyLimited { policy: Arc<str>, limit: u32 },
    #[error("The upstream API rate-limited this key; ezgate holds further requests until its Retry-After passes. Retry in {}.", secs(*retry_after))]
    UpstreamRateLimited { retry_after: Duration },
    /// `upstream.quota.mode = "enforce"`: the learned upstream quota cannot carry the request
    /// within its priority's `max_wait` (`retry_after`: when it will), or never can (`None`:
    /// the request alone is more than the quota allows its priority).
    #[error("{message}")]
    UpstreamQuotaExhausted {
        message: String,
        retry_after: Option<Duration>,
    },
    /// A `[[budgets]]` entry has not enough left for the request's maximum cost this period
    /// (`retry_after`: until the next period begins). Retrying sooner cannot help.
    #[error("{message}")]
    BudgetExceeded {
        budget: Arc<str>,
        message: String,
        retry_after: Duration,
    },
    /// A budget applies to the request and its model has no price (`[prices]`).
    #[error("Model '{model}' has no price, and budget '{budget}' applies to this request: no prices.models entry matches it and there is no prices.default. The operator can add a price for it.")]
    Unpriced { budget: Arc<str>, model: String },
    #[error(
        "No API key: send 'Authorization: Bearer <key>' with a key configured in [[clients]]."
    )]
    MissingApiKey,
    #[error("Invalid API key: the presented key matches no configured client. Check the key the application sends.")]
    InvalidApiKey,
    #[error("The admin listener's POST endpoints are off: set server.admin_token (e.g. \"${{EZGATE_ADMIN_TOKEN}}\") and reload to enable them.")]
    AdminTokenNotConfigured,
    #[error("Missing or wrong admin token: send 'Authorization: Bearer <server.admin_token>'.")]
    InvalidAdminToken,
    #[error("Model '{model}' is not allowed for client '{client}'. Allowed: {allowed}.")]
    ModelNotAllowed {
        client: Arc<str>,
        model: String,
        allowed: String,
        /// Where the request names that model (`model`, `session.model`, `tools[].model`).
        field: &'static str,
    },
    /// A client with an allow-list sent a request that names no model, on a route where the
    /// upstream then picks one itself (code `model_not_allowed`).
    #[error("{method} {path} names no model, so the upstream would choose one itself; client '{client}' may use only: {allowed}. Name the model in the request ('{field}'), or the operator can allow the route unchecked (clients.unchecked_routes).")]
    ModelMissing {
        client: Arc<str>,
        method: String,
        path: String,
        allowed: String,
        /// Where the request names its model (`model`, `session.model`).
        field: &'static str,
    },
    /// A client with an allow-list asked for a route whose model ezgate cannot read.
    #[error("{method} {path} is not allowed for client '{client}': the client has a model allow-list (clients.models) and {why}. The operator can allow this route for the client with clients.unchecked_routes.")]
    RouteNotAllowed {
        client: Arc<str>,
        method: String,
        path: String,
        why: &'static str,
    },
    #[error("Request body exceeds {limit} bytes (server.max_request_body). Send a smaller body or raise the limit.")]
    PayloadTooLarge { limit: u64 },
    #[error("Bad request: {0}")]
    BadRequest(String),
    #[error("Request headers too large: the request line and headers may take at most 64 KiB.")]
    HeadersTooLarge,
    #[error("Request target too long: send a shorter path and query.")]
    UriTooLong,
    #[error("The request body stalled: no byte arrived for {} (server.request_body_timeout). Send the body without pauses.", secs(*.0))]
    RequestTimeout(Duration),
    #[error("The request body took longer than {} in all (server.request_body_deadline). Send it faster, or raise the limit.", secs(*.0))]
    BodyDeadline(Duration),
    /// The client went away while its request body was being read: recorded as 499, and
    /// answered 400 should its connection still take an answer (499 is never sent).
    #[error("The client closed the connection before its request body was complete.")]
    ClientClosed,
    #[error("Method {0} is not supported by this gateway.")]
    MethodNotAllowed(String),
    #[error("Could not reach the upstream API: {0}. Check upstream.base_url and the network.")]
    UpstreamUnreachable(String),
    #[error("The upstream API sent an invalid response: {0}. Retrying may help.")]
    UpstreamBadResponse(String),
    #[error("{}", timeout_message(*.0, *.1))]
    UpstreamTimeout(TimeoutPhase, Duration),
    #[error(
        "The upstream stream was interrupted: {0}. The response is incomplete; retry the request."
    )]
    StreamInterrupted(String),
    #[error("ezgate is overloaded: {0}. Retry shortly.")]
    Overloaded(String),
    #[error("ezgate is shutting down and takes no new requests. Retry; another replica or the restarted gateway will answer.")]
    ShuttingDown,
    #[error("Internal gateway error: {0}. This is a bug in ezgate; please report it with the request id.")]
    Internal(String),
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn timeout_message(phase: TimeoutPhase, d: Duration) -> String {
    match phase {
        TimeoutPhase::Connect => format!(
            "No connection to the upstream API within {} (upstream.connect_timeout). Retrying may help.",
            secs(d)
        ),
        TimeoutPhase::Headers => format!(
            "The upstream API sent no response headers within {} (upstream.response_timeout). Retrying may help.",
            secs(d)
        ),
        TimeoutPhase::Body => format!(
            "The upstream API went silent for {} inside the response body (upstream.stream_idle_timeout).",
            secs(d)
        ),
    }
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::RateLimited { .. }
            | Self::TokenRateLimited { .. }
            | Self::ConcurrencyLimited { .. }
            | Self::UpstreamRateLimited { .. }
            | Self::UpstreamQuotaExhausted { .. }
            | Self::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::MissingApiKey | Self::InvalidApiKey | Self::InvalidAdminToken => {
                StatusCode::UNAUTHORIZED
            }
            Self::AdminTokenNotConfigured => StatusCode::FORBIDDEN,
            Self::ModelNotAllowed { .. }
            | Self::ModelMissing { .. }
            | Self::Unpriced { .. }
            | Self::RouteNotAllowed { .. } => StatusCode::FORBIDDEN,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::RequestTimeout(_) | Self::BodyDeadline(_) => StatusCode::REQUEST_TIMEOUT,
            // Recorded as nginx's 499 (`Outcome::client_left`); 499 is a log convention,
            // never a status on the wire.
            Self::ClientClosed => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::UpstreamUnreachable(_)
            | Self::UpstreamBadResponse(_)
            | Self::StreamInterrupted(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(..) => StatusCode::GATEWAY_TIMEOUT,
            Self::Overloaded(_) | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gateway error code: the bounded list of `docs/errors.md`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::RateLimited { .. } => "rate_limited",
            Self::TokenRateLimited { .. } => "token_rate_limited",
            Self::ConcurrencyLimited { .. } => "concurrency_limited",
            Self::UpstreamRateLimited { .. } => "upstream_rate_limited",
            Self::UpstreamQuotaExhausted { .. } => "upstream_quota_exhausted",
            Self::BudgetExceeded { .. } => "budget_exceeded",
            Self::MissingApiKey => "missing_api_key",
            Self::InvalidApiKey => "invalid_api_key",
            Self::AdminTokenNotConfigured => "admin_token_not_configured",
            Self::InvalidAdminToken => "invalid_admin_token",
            Self::ModelNotAllowed { .. } | Self::ModelMissing { .. } | Self::Unpriced { .. } => {
                "model_not_allowed"
            }
            Self::RouteNotAllowed { .. } => "route_not_allowed",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::BadRequest(_) => "bad_request",
            Self::HeadersTooLarge => "headers_too_large",
            Self::UriTooLong => "uri_too_long",
            Self::RequestTimeout(_) | Self::BodyDeadline(_) => "request_timeout",
            Self::ClientClosed => "client_closed_request",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::UpstreamUnreachable(_) => "upstream_unreachable",
            Self::UpstreamBadResponse(_) => "upstream_bad_response",
            Self::UpstreamTimeout(..) => "upstream_timeout",
            Self::StreamInterrupted(_) => "upstream_stream_interrupted",
            Self::Overloaded(_) => "overloaded",
            Self::ShuttingDown => "shutting_down",
            Self::Internal(_) => "internal_error",
        }
    }

    /// The rate-limit policy that refused the request, for a policy's refusal.
    pub fn policy(&self) -> Option<&Arc<str>> {
        match self {
            Self::RateLimited { policy, .. }
            | Self::TokenRateLimited { policy, .. }
            | Self::ConcurrencyLimited { policy, .. }
            | Self::BudgetExceeded { budget: policy, .. } => Some(policy),
            _ => None,
        }
    }

    /// When a retry can succeed, the earliest useful time.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. }
            | Self::TokenRateLimited { retry_after, .. }
            | Self::UpstreamRateLimited { retry_after } => Some(*retry_after),
            Self::UpstreamQuotaExhausted { retry_after, .. } => *retry_after,
            Self::BudgetExceeded { retry_after, .. } => Some(*retry_after),
            Self::ConcurrencyLimited { .. } | Self::Overloaded(_) | Self::ShuttingDown => {
                Some(Duration::from_secs(1))
            }
            _ => None,
        }
    }

    /// False for refusals that sending the same request again cannot fix.
    pub fn retryable(&self) -> bool {
        if let Self::UpstreamQuotaExhausted { retry_after, .. } = self {
            return retry_after.is_some();
        }
        !matches!(
            self,
            Self::MissingApiKey
                | Self::InvalidApiKey
                | Self::AdminTokenNotConfigured
                | Self::InvalidAdminToken
                | Self::ModelNotAllowed { .. }
                | Self::ModelMissing { .. }
                | Self::Unpriced { .. }
                | Self::BudgetExceeded { .. }
                | Self::RouteNotAllowed { .. }
                | Self::PayloadTooLarge { .. }
                | Self::BadRequest(_)
                | Self::HeadersTooLarge
                | Self::UriTooLong
                | Self::MethodNotAllowed(_)
        )
    }

    /// The `param` member: which request field the refusal is about.
    fn param(&self) -> Option<&'static str> {
        match self {
            Self::ModelNotAllowed { field, .. } | Self::ModelMissing { field, .. } => Some(field),
            Self::Unpriced { .. } => Some("model"),
            _ => None,
        }
    }

    pub fn body(&self, request_id: &str) -> ErrorBody {
        let status = self.status().as_u16();
        ErrorBody {
            message: self.to_string(),
            kind: type_for(status),
            code: Some(self.code().to_owned()),
            param: self.param().map(str::to_owned),
            status,
            source: Source::Gateway,
            request_id: request_id.to_owned(),
            retry_after_ms: self.retry_after().map(duration_ms),
            upstream_status: None,
        }
    }
}

impl GatewayError {
    /// What a failure of the client's request body means, by walking its sources to the
    /// `io::Error` hyper's body decoder gave: a body cut short (the client half-closed its
    /// side before the declared length or the last chunk) or malformed chunked framing is a
    /// 400; anything else (a reset connection, an HTTP/2 stream the client cancelled) is a
    /// client that went away.
    pub fn client_body(err: &(dyn std::error::Error + 'static)) -> GatewayError {
        let mut source = Some(err);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    std::io::ErrorKind::UnexpectedEof => {
                        return GatewayError::BadRequest(
                            "the request body ended before its declared length (Content-Length) or its last chunk: the client stopped sending mid-body".into(),
                        )
                    }
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
                        return GatewayError::BadRequest(format!(
                            "the request body's chunked framing is malformed ({io})"
                        ))
                    }
                    _ => {}
                }
            }
            source = e.source();
        }
        GatewayError::ClientClosed
    }
}

/// Who produced an error (and a response): ezgate itself, or the upstream API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Gateway,
    Upstream,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Gateway => "gateway",
            Source::Upstream => "upstream",
        }
    }
}

/// The `error` object of the schema (`docs/error.schema.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub code: Option<String>,
    pub param: Option<String>,
    pub status: u16,
    pub source: Source,
    pub request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: &'a ErrorBody,
}

impl ErrorBody {
    /// `{"error": {…}}` as JSON bytes.
    pub fn to_json(&self) -> Bytes {
        // Serializing a struct of strings and integers into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(&Envelope { error: self }).unwrap_or_default())
    }

    /// One SSE event carrying this error, for a stream that failed after it started.
    pub fn to_sse_event(&self, at_event_boundary: bool) -> Bytes {
        let json = self.to_json();
        let mut out = Vec::with_capacity(json.len() + 12);
        if !at_event_boundary {
            out.extend_from_slice(b"\n\n");
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&json);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    /// Status, headers and body of this error; `headers` carries what the caller keeps
    /// (for upstream errors: its `Retry-After`, `x-ratelimit-*`, …).
    pub fn into_parts(
        self,
        mut headers: HeaderMap,
        retryable: bool,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let body = self.to_json();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        if let Some(ms) = self.retry_after_ms {
            headers.insert(RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
            headers.insert("retry-after-ms", HeaderValue::from(ms));
        }
        if !retryable {
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if let Ok(v) = HeaderValue::from_str(&self.request_id) {
            headers.insert("x-request-id", v);
        }
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY);
        (status, headers, body)
    }
}

/// A gateway error as status, headers and body (`docs/errors.md`). Pure: logging and counting
/// happen once, from the request's outcome.
pub fn render(err: &GatewayError, request_id: &str) -> (StatusCode, HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    let (policy, retry, quota, unit, remaining) = match err {
        GatewayError::RateLimited {
            policy,
            retry_after,
            quota,
            ..
        } => (policy, retry_after, quota, "requests", 0),
        GatewayError::TokenRateLimited {
            policy,
            retry_after,
            quota,
            remaining,
            ..
        } => (policy, retry_after, quota, "tokens", *remaining),
        GatewayError::ConcurrencyLimited { policy, limit } => {
            // A concurrency limit has no window and nothing that resets at a time: no
            // `x-ratelimit-*-requests` (they describe a rate), only the draft's policy with
            // its `concurrent-requests` quota unit, all of it in use.
            let pairs = [
                (
                    "ratelimit-policy",
                    format!("\"{policy}\";q={limit};qu=\"concurrent-requests\""),
                ),
                ("ratelimit", format!("\"{policy}\";r=0;t=1")),
            ];
            for (name, value) in pairs {
                if let Ok(v) = HeaderValue::try_from(value) {
                    headers.insert(name, v);
                }
            }
            return err.body(request_id).into_parts(headers, err.retryable());
        }
        _ => return err.body(request_id).into_parts(headers, err.retryable()),
    };
    let reset = reset_text(*retry);
    let pairs = [
        (format!("x-ratelimit-limit-{unit}"), quota.count.to_string()),
        (
            format!("x-ratelimit-remaining-{unit}"),
            remaining.to_string(),
        ),
        (format!("x-ratelimit-reset-{unit}"), reset),
        (
            "ratelimit-policy".to_owned(),
            format!("\"{policy}\";q={};w={}", quota.count, quota.window),
        ),
        (
            "ratelimit".to_owned(),
            format!(
                "\"{policy}\";r={remaining};t={}",
                duration_ms(*retry).div_ceil(1000)
            ),
        ),
    ];
    for (name, value) in pairs {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::try_from(name),
            HeaderValue::try_from(value),
        ) {
            headers.insert(n, v);
        }
    }
    err.body(request_id).into_parts(headers, err.retryable())
}

/// OpenAI's reset format: `"350ms"`, `"1.2s"`, `"6m0s"`.
fn reset_text(d: Duration) -> String {
    let ms = duration_ms(d);
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000).div_ceil(1000))
    }
}

/// `type` follows from the status alone (`docs/errors.md`).
pub fn type_for(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        408 => "request_timeout",
        409 => "conflict",
        413 => "payload_too_large",
        422 => "unprocessable_entity",
        429 => "rate_limit_exceeded",
        500 => "internal_server_error",
        502 => "bad_gateway",
        503 => "service_unavailable",
        504 => "gateway_timeout",
        _ if status < 500 => "client_error",
        _ => "server_error",
    }
}

/// Milliseconds, rounded up so that a retry at that time is never early.
pub fn duration_ms(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;

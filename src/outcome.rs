//! What happened to one request, as plain data: filled in along the request path, then read
//! once by the metrics and the access log when the request ends (the path's
//! `exchange::Exchange` decides when). A request whose client went away before its response
//! finished is a `499` from the gateway, the nginx convention.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::errors::{FailureKind, GatewayError, Source};
use crate::route::Route;

/// Status recorded for a request whose client disconnected before the response finished.
pub const CLIENT_CLOSED: u16 = 499;

/// Who spent what, as a bounded label: never a key or a fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ClientLabel {
    /// A configured `[[clients]]` entry.
    Named(Arc<str>),
    /// No client is identified (no `[[clients]]` configured).
    #[default]
    Anonymous,
    /// Clients are configured, and this request matched none of them.
    Other,
}

impl ClientLabel {
    pub fn as_str(&self) -> &str {
        match self {
            ClientLabel::Named(n) => n,
            ClientLabel::Anonymous => "anonymous",
            ClientLabel::Other => "other",
        }
    }
}

/// Token usage reported by the upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    /// Prompt tokens the upstream read from its cache (part of `prompt`).
    pub cached: u64,
    /// Audio tokens of the prompt and of the completion (parts of `prompt` and
    /// `completion`), where the usage reports them.
    pub audio_in: u64,
    pub audio_out: u64,
}

impl Usage {
    pub fn new(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt,
            completion,
            ..Usage::default()
        }
    }

    /// Adds another report (a realtime session's responses).
    pub fn add(&mut self, other: Usage) {
        self.prompt += other.prompt;
        self.completion += other.completion;
        self.cached += other.cached;
        self.audio_in += other.audio_in;
        self.audio_out += other.audio_out;
    }
}

/// How a WebSocket session ended: the `end` label of `ezgate_websocket_sessions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client sent the first close frame, or left.
    ClientClosed,
    /// The upstream sent the first close frame, or its connection ended.
    UpstreamClosed,
    /// No frame either way for `upstream.stream_idle_timeout`.
    IdleTimeout,
    /// Still open when the drain's `server.shutdown_grace` was over.
    Shutdown,
    /// Open for `server.websocket_max_lifetime`.
    MaxLifetime,
    /// The client did not answer ezgate's ping within `server.websocket_pong_timeout`.
    PingTimeout,
}

impl SessionEnd {
    pub const ALL: [SessionEnd; 6] = [
        SessionEnd::ClientClosed,
        SessionEnd::UpstreamClosed,
        SessionEnd::IdleTimeout,
        SessionEnd::Shutdown,
        SessionEnd::MaxLifetime,
        SessionEnd::PingTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionEnd::ClientClosed => "client_closed",
            SessionEnd::UpstreamClosed => "upstream_closed",
            SessionEnd::IdleTimeout => "idle_timeout",
            SessionEnd::Shutdown => "shutdown",
            SessionEnd::MaxLifetime => "max_lifetime",
            SessionEnd::PingTimeout => "ping_timeout",
        }
    }
}

/// What a WebSocket session adds to its request's outcome (`bytes_out` holds what the
/// upstream sent through).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub end: SessionEnd,
    /// Bytes the client sent through.
    pub bytes_in: u64,
}

pub struct Outcome {
    pub started: Instant,
    pub request_id: String,
    pub method: &'static str,
    pub route: Route,
    pub status: u16,
    pub source: Source,
    /// The gateway error code, when ezgate produced or ended the response with an error.
    pub gateway_code: Option<&'static str>,
    /// The upstream's own error code, when it sent one.
    pub upstream_code: Option<String>,
    pub upstream_status: Option<u16>,
    pub upstream_failure: Option<FailureKind>,
    /// Time spent waiting for the upstream: response headers, and error bodies ezgate read.
    pub upstream_wait: Duration,
    /// Time waited for the upstream's quota (`upstream.quota.mode = "enforce"`): not
    /// ezgate's overhead either.
    pub queue_wait: Duration,
    /// When ezgate handed its response headers to the client.
    pub responded: Option<Instant>,
    pub header_wait: Option<Duration>,
    pub bytes_out: u64,
    pub caller: Option<Arc<str>>,
    /// The `client` label: a configured client's name, `anonymous` or `other`.
    pub client: ClientLabel,
    /// The configured client's `team`, when it has one.
    pub team: Option<Arc<str>>,
    /// What the request cost, in nano-units of `prices.currency`, from its reported usage
    /// (`None` without `[prices]`, without a usage, or for a model with no price).
    pub cost: Option<u64>,
    pub model: Option<String>,
    pub usage: Option<Usage>,
    /// The request's prompt, estimated before it was sent (model routes).
    pub prompt_estimate: u64,
    /// The request was sent upstream (not refused or abandoned before).
    pub forwarded: bool,
    /// The response's generated tokens, estimated from what streamed (for a response that
    /// ended without a usage report).
    pub output_estimate: u64,
    /// A successful response on a model route whose body ezgate could not read (the upstream
    /// compressed it though asked not to): its usage is unknown, so it is charged at least
    /// what was reserved for it.
    pub usage_unreadable: bool,
    /// Tokens the request was charged in the end, when a token policy covered it.
    pub charged: Option<u64>,
    /// Set once the response reached its end (or its final error event).
    pub finished: bool,
    /// When the first event with content (a stream) or the first body byte (any other
    /// response) reached ezgate on its way to the client.
    pub first_token: Option<Instant>,
    /// When the response's last byte was handed on.
    pub ended: Option<Instant>,
    /// The response was an event stream.
    pub streamed: bool,
    /// The model the response named (its body's `model`), when it named one.
    pub response_model: Option<String>,
    /// The rate-limit policy that refused the request.
    pub refused_by: Option<Arc<str>>,
    /// The request's trace id (32 hex digits), when its span is recorded.
    pub trace_id: Option<String>,
    /// A WebSocket session, once it ended.
    pub session: Option<Session>,
}

impl Outcome {
    pub fn new(request_id: String, method: &http::Method, route: Route) -> Outcome {
        Outcome {
            started: Instant::now(),
            request_id,
            method: method_label(method),
            route,
            status: 0,
            source: Source::Gateway,
            gateway_code: None,
            upstream_code: None,
            upstream_status: None,
            upstream_failure: None,
            upstream_wait: Duration::ZERO,
            queue_wait: Duration::ZERO,
            responded: None,
            header_wait: None,
            bytes_out: 0,
            caller: None,
            client: ClientLabel::Anonymous,
            team: None,
            cost: None,
            model: None,
            usage: None,
            prompt_estimate: 0,
            forwarded: false,
            output_estimate: 0,
            usage_unreadable: false,
            charged: None,
            finished: false,
            first_token: None,
            ended: None,
            streamed: false,
            response_model: None,
            refused_by: None,
            trace_id: None,
            session: None,
        }
    }

    /// Notes a gateway error as the response (or the end of a stream).
    pub fn gateway_error(&mut self, err: &GatewayError) {
        self.gateway_code = Some(err.code());
        self.refused_by = err.policy().cloned();
    }

    /// The tokens this request spent, as far as ezgate can tell (`docs/rate-limits.md`,
    /// "What a request is charged"): the reported usage; nothing when the upstream failed
    /// before sending a body or answered an error; else the prompt estimate and what
    /// streamed. A WebSocket session is charged its reports and what its unfinished
    /// responses streamed.
    pub fn tokens_spent(&self) -> u64 {
        let (prompt, completion) = self.tokens_used();
        prompt.saturating_add(completion)
    }

    /// The request's prompt and completion tokens: as reported, else as estimated.
    pub fn tokens_used(&self) -> (u64, u64) {
        // A WebSocket session: its `response.done` usages, and the estimate of what the
        // responses it left unfinished streamed.
        if self.session.is_some() {
            let (p, c) = self.usage.map_or((0, 0), |u| (u.prompt, u.completion));
            return (p, c.saturating_add(self.output_estimate));
        }
        if let Some(u) = self.usage {
            return (u.prompt, u.completion);
        }
        match self.upstream_status {
            // No response: the upstream failed (refunded) or the client left while it was
            // working on the prompt (a request the client left before it was sent, while
            // it waited for the upstream's quota, spent nothing).
            None if self.status == CLIENT_CLOSED && self.forwarded => (self.prompt_estimate, 0),
            None => (0, 0),
            Some(s) if !(200..300).contains(&s) => (0, 0),
            // The upstream broke before any body byte: nothing was generated.
            Some(_) if self.upstream_failure.is_some() && self.bytes_out == 0 => (0, 0),
            Some(_) => (self.prompt_estimate, self.output_estimate),
        }
    }

    /// Time to the first token: from the request's arrival to the first content of its
    /// response (model routes, successful responses).
    pub fn time_to_first_token(&self) -> Option<Duration> {
        if !self.route.carries_tokens() || !(200..300).contains(&self.status) {
            return None;
        }
        self.first_token
            .map(|t| t.saturating_duration_since(self.started))
    }

    /// Time per output token of a stream: (its end − the first token) ÷ (completion
    /// tokens − 1), from the reported usage.
    pub fn time_per_output_token(&self) -> Option<Duration> {
        let tokens = self.usage?.completion;
        if !self.streamed || tokens < 2 || !(200..300).contains(&self.status) {
            return None;
        }
        let span = self.ended?.checked_duration_since(self.first_token?)?;
        Some(span / u32::try_from(tokens - 1).unwrap_or(u32::MAX))
    }

    /// The client left before the response finished: the request ends as a 499.
    pub fn client_left(&mut self) {
        self.status = CLIENT_CLOSED;
        self.source = Source::Gateway;
        self.gateway_code = None;
    }

    /// The access log's `code`: the gateway's, else the upstream's.
    pub fn code(&self) -> &str {
        if self.status == CLIENT_CLOSED {
            "client_closed_request"
        } else {
            self.gateway_code
                .or(self.upstream_code.as_deref())
                .unwrap_or("")
        }
    }

    /// Time spent in ezgate itself, up to the response headers, not waiting on the upstream.
    pub fn overhead(&self) -> Duration {
        let until = self.responded.unwrap_or_else(Instant::now);
        until
            .saturating_duration_since(self.started)
            .saturating_sub(self.upstream_wait)
            .saturating_sub(self.queue_wait)
    }
}

/// The bounded `method` label.
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

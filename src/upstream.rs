//! The upstream side: where requests go (base URL and path prefix), the request body type,
//! the response timeout, and the one place where client errors are classified. The
//! connections themselves are in [`crate::pool`] (rustls, ALPN h2/http1.1).

use std::error::Error as StdError;
use std::fmt;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::config::{Http2, Settings, UpstreamConfig};
use crate::errors::{FailureKind, GatewayError, TimeoutPhase};
use crate::pool::{ConnectError, Pool, PoolConfig, UpstreamBody};

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// An upstream failure: what the client is told, and what the metrics count.
#[derive(Debug)]
pub struct Failure {
    pub error: GatewayError,
    pub kind: Option<FailureKind>,
}

/// The request body sent upstream: the client's body streamed through a size cap and an
/// inactivity deadline, or a body ezgate already holds.
pub struct RequestBody {
    inner: Inner,
    seen: u64,
    max: u64,
    /// Longest pause allowed between two frames of the client's body.
    idle: Duration,
    /// Armed at the first pending poll, reset by every frame.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

enum Inner {
    Stream(Incoming),
    /// A body ezgate holds, in up to three pieces sent in order (a body with a splice).
    Full {
        parts: [Bytes; 3],
        next: usize,
        left: u64,
    },
}

/// Largest frame of a body ezgate holds, as it is sent upstream.
const MAX_FRAME: usize = 64 * 1024;

/// The client's body went over `server.max_request_body` while streaming.
#[derive(Debug)]
pub struct BodyTooLarge(pub u64);

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request body exceeds {} bytes", self.0)
    }
}

impl StdError for BodyTooLarge {}

/// The client's body paused longer than `server.request_body_timeout`.
#[derive(Debug)]
pub struct BodyStalled(pub Duration);

impl fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the request body stalled for {:?}", self.0)
    }
}

impl StdError for BodyStalled {}

/// The client's body failed (the client went away mid-body): the client's fault, not the
/// upstream's.
#[derive(Debug)]
pub struct ClientBodyFailed(pub hyper::Error);

impl fmt::Display for ClientBodyFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the client's request body failed ({})", self.0)
    }
}

impl StdError for ClientBodyFailed {}

impl RequestBody {
    /// The client's body, streamed; refused past `max` bytes or a pause of `idle`.
    pub fn stream(body: Incoming, max: u64, idle: Duration) -> Self {
        RequestBody {
            inner: Inner::Stream(body),
            seen: 0,
            max,
            idle,
            stall: None,
        }
    }

    pub fn full(bytes: Bytes) -> Self {
        Self::pieces([bytes, Bytes::new(), Bytes::new()])
    }

    /// A body made of `parts`, sent one after the other.
    pub fn pieces(parts: [Bytes; 3]) -> Self {
        let left = parts.iter().map(|p| p.len() as u64).sum();
        RequestBody {
            inner: Inner::Full {
                parts,
                next: 0,
                left,
            },
            seen: 0,
            max: u64::MAX,
            idle: Duration::MAX,
            stall: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.inner {
            Inner::Full { parts, next, left } => {
                while let Some(part) = parts.get_mut(*next) {
                    if part.is_empty() {
                        *next += 1;
                        continue;
                    }
                    // In frames of at most 64 KiB (slices, not copies): hyper copies each
                    // frame into its write buffer, which it bounds only between frames.
                    let frame = part.split_to(part.len().min(MAX_FRAME));
                    *left -= frame.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(frame))));
                }
                Poll::Ready(None)
            }
            Inner::Stream(body) => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        this.seen += data.len() as u64;
                        if this.seen > this.max {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge(this.max)))));
                        }
                    }
                    if let Some(stall) = &mut this.stall {
                        stall
                            .as_mut()
                            .reset(tokio::time::Instant::now() + this.idle);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(ClientBodyFailed(e))))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => {
                    let idle = this.idle;
                    let stall = this
                        .stall
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    match stall.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(idle))))),
                        Poll::Pending => Poll::Pending,
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full { left, .. } => *left == 0,
            Inner::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full { left, .. } => SizeHint::with_exact(*left),
            Inner::Stream(body) => body.size_hint(),
        }
    }
}

/// The pooled upstream client and where it points.
pub struct Upstream {
    pool: Pool,
    /// A path prefix from `base_url` (e.g. `/openai`), without a trailing slash.
    prefix: String,
    response_timeout: Duration,
    connect_timeout: Duration,
}

impl Upstream {
    pub fn new(settings: &Settings) -> Result<Upstream, String> {
        let cfg: &UpstreamConfig = &settings.config.upstream;
        let uri = &settings.upstream_uri;
        let tls = tls_config(cfg)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout.0));
        http.set_keepalive(Some(Duration::from_secs(60)));
        // What ALPN offers over TLS; `always` also speaks HTTP/2 on plain connections.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let https = match cfg.http2 {
            Http2::Auto => https.enable_http1().enable_http2().wrap_connector(http),
            Http2::Always => https.enable_http2().wrap_connector(http),
            Http2::Never => https.enable_http1().wrap_connector(http),
        };
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or("upstream.base_url has no scheme")?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or("upstream.base_url has no host")?;
        let prefix = uri.path().trim_end_matches('/').to_owned();
        let pool = Pool::new(
            https,
            scheme,
            authority,
            PoolConfig {
                max_idle: cfg.pool_max_idle_per_host,
                idle_timeout: cfg.pool_idle_timeout.0,
                http2_only: cfg.http2 == Http2::Always,
                http2_offered: cfg.http2 != Http2::Never,
            },
        )?;
        Ok(Upstream {
            pool,
            prefix,
            response_timeout: cfg.response_timeout.0,
            connect_timeout: cfg.connect_timeout.0,
        })
    }

    /// The upstream path (base-URL prefix included) for a client's path and query;
    /// `normalized` is the path made canonical, when it was not. Only the path is taken:
    /// whatever authority the client named is ignored, and the pool only ever talks to the
    /// configured host (ezgate is never an open proxy).
    pub fn target(
        &self,
        path_and_query: Option<&PathAndQuery>,
        normalized: Option<&str>,
    ) -> Result<PathAndQuery, GatewayError> {
        let invalid = |_| GatewayError::BadRequest("the request target is not a valid path".into());
        match (path_and_query, normalized) {
            (Some(pq), None) if self.prefix.is_empty() => Ok(pq.clone()),
            (None, None) if self.prefix.is_empty() => Ok(PathAndQuery::from_static("/")),
            (pq, normalized) => {
                let path = normalized.unwrap_or_else(|| pq.map_or("/", PathAndQuery::path));
                let mut target = String::with_capacity(self.prefix.len() + path.len() + 64);
                target.push_str(&self.prefix);
                target.push_str(path);
                if let Some(q) = pq.and_then(PathAndQuery::query) {
                    target.push('?');
                    target.push_str(q);
                }
                PathAndQuery::try_from(target).map_err(invalid)
            }
        }
    }

    /// Sends the request for `path`; resolves when the upstream's response headers arrive.
    /// `sent` is when the caller started the exchange (the timeout counts from there).
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        path: PathAndQuery,
        sent: std::time::Instant,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let deadline = tokio::time::Instant::from_std(sent) + self.response_timeout;
        match tokio::time::timeout_at(deadline, self.pool.send(req, path)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(&*e, self.connect_timeout)),
            Err(_) => Err(Failure {
                error: GatewayError::UpstreamTimeout(TimeoutPhase::Headers, self.response_timeout),
                kind: Some(FailureKind::Timeout),
            }),
        }
    }
}

fn tls_config(cfg: &UpstreamConfig) -> Result<rustls::ClientConfig, String> {
    crate::tls::client_tls(cfg.ca_file.as_deref())
        .map_err(|e| e.replace("ca_file:", "upstream.ca_file:"))
}

/// The one place upstream client errors become a gateway error and a failure kind, by
/// walking the error's sources.
pub fn classify(err: &(dyn StdError + 'static), connect_timeout: Duration) -> Failure {
    let mut is_connect = false;
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    let mut detail = err.to_string();
    while let Some(e) = source {
        if let Some(too_large) = e.downcast_ref::<BodyTooLarge>() {
            return Failure {
                error: GatewayError::PayloadTooLarge { limit: too_large.0 },
                kind: None,
            };
        }
        // The client's body, not the upstream, failed: the client's fault.
        if let Some(stalled) = e.downcast_ref::<BodyStalled>() {
            return Failure {
                error: GatewayError::RequestTimeout(stalled.0),
                kind: None,
            };
        }
        if e.is::<ClientBodyFailed>() {
            return Failure {
                error: GatewayError::ClientClosed,
                kind: None,
            };
        }
        is_connect |= e.is::<ConnectError>();
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Failure {
                error: GatewayError::UpstreamUnreachable(format!("TLS handshake failed ({tls})")),
                kind: Some(FailureKind::Tls),
            };
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(tls) = rustls_inside(io) {
                return Failure {
                    error: GatewayError::UpstreamUnreachable(format!(
                        "TLS handshake failed ({tls})"
                    )),
                    kind: Some(FailureKind::Tls),
                };
            }
            if io.kind() == std::io::ErrorKind::TimedOut && is_connect {
                return Failure {
                    error: GatewayError::UpstreamTimeout(TimeoutPhase::Connect, connect_timeout),
                    kind: Some(FailureKind::Timeout),
                };
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() {
                return Failure {
                    error: GatewayError::UpstreamBadResponse(format!("malformed HTTP ({h})")),
                    kind: Some(FailureKind::Protocol),
                };
            }
            if h.is_timeout() {
                return Failure {
                    error: GatewayError::UpstreamTimeout(TimeoutPhase::Headers, connect_timeout),
                    kind: Some(FailureKind::Timeout),
                };
            }
        }
        detail = e.to_string();
        source = e.source();
    }
    if is_connect {
        let what =
            if detail.contains("dns") || detail.contains("resolve") || detail.contains("lookup") {
                format!("DNS lookup failed ({detail})")
            } else {
                format!("connection failed ({detail})")
            };
        return Failure {
            error: GatewayError::UpstreamUnreachable(what),
            kind: Some(FailureKind::Connect),
        };
    }
    Failure {
        error: GatewayError::UpstreamBadResponse(format!(
            "connection lost before a complete response ({detail})"
        )),
        kind: Some(FailureKind::Reset),
    }
}

/// The rustls error wrapped inside (possibly nested) `io::Error`s. `io::Error::source()` skips
/// the wrapped error itself, so the walk in [`classify`] alone would never see it.
fn rustls_inside(io: &std::io::Error) -> Option<&rustls::Error> {
    let mut inner: &(dyn StdError + 'static) = io.get_ref()?;
    loop {
        if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        inner = inner.downcast_ref::<std::io::Error>()?.get_ref()?;
    }
}

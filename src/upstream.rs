//! The upstream side: where requests go (base URL and path prefix), the response timeout,
//! and the one place where client errors are classified. The connections and the request
//! body sent on them are in [`crate::pool`] (rustls, ALPN h2/http1.1).

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;

use crate::config::{Http2, Settings, UpstreamConfig};
use crate::errors::{BoxError, FailureKind, GatewayError, TimeoutPhase};
use crate::pool::{
    within, BodyStalled, BodyTooLarge, BodyTooSlow, ClientBodyFailed, ConnectError, Malformed,
    Pool, PoolConfig, RequestBody, ResponseTimedOut, UpstreamBody,
};

/// A connector whose TLS offers only `http/1.1` by ALPN (hyper-rustls' own HTTP/1.1-only
/// connector offers no ALPN at all, which an HTTP/2-only upstream cannot refuse).
pub fn http1_connector(
    tls: &rustls::ClientConfig,
    http: HttpConnector,
) -> hyper_rustls::HttpsConnector<HttpConnector> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    hyper_rustls::HttpsConnector::from((http, tls))
}

/// With `upstream.http2 = "auto"` over TLS: requests in flight carried over HTTP/1.1
/// before HTTP/2 is offered. HTTP/1.1 costs about 8 % less CPU per request than hyper's
/// HTTP/2 client; HTTP/2 about 17 KiB less memory per open stream (13.8 KiB against 31
/// KiB). Up to 64 in flight, the cheaper CPU; beyond, HTTP/2: at 10,000 open streams the 64
/// HTTP/1.1 ones add 1.1 MiB, under 1 % of the memory (docs/performance.md, "The HTTP/2
/// client path").
const HTTP2_ABOVE: usize = 64;

/// An upstream failure: what the client is told, and what the metrics count.
#[derive(Debug)]
pub struct Failure {
    pub error: GatewayError,
    pub kind: Option<FailureKind>,
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
        // WebSocket handshakes, and `auto`'s connections while few requests are in flight:
        // HTTP/1.1 alone, offered by ALPN (so that an upstream that speaks only HTTP/2
        // refuses the handshake, and the pool offers it h2 instead).
        let upgrades = http1_connector(&tls, http.clone());
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
                http2_above: HTTP2_ABOVE,
            },
        )?
        .with_upgrades(upgrades);
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
    ///
    /// `send`, `upgrade` and [`Answer`] build their futures instead of being `async fn`s:
    /// each `async fn` layer keeps its own copy of the request and of the future it awaits,
    /// and every request carries and moves these bytes (the request path's future was
    /// 7.8 KiB, of which 3.9 KiB was this).
    pub fn send(
        &self,
        req: Request<RequestBody>,
        path: PathAndQuery,
        sent: std::time::Instant,
    ) -> Answer<'_, impl Future<Output = Result<Response<UpstreamBody>, BoxError>> + Send + '_>
    {
        let deadline = self.deadline(sent);
        Answer {
            exchange: self.pool.send(req, path, Some(deadline)),
            upstream: self,
        }
    }

    /// Sends a WebSocket handshake for `path` on a connection of its own (HTTP/1.1, never
    /// pooled); resolves with the response headers, within `upstream.response_timeout` of
    /// `sent`. A `101`'s connection is then the session's (`hyper::upgrade::on`).
    pub fn upgrade(
        &self,
        req: Request<RequestBody>,
        path: PathAndQuery,
        sent: std::time::Instant,
    ) -> Answer<'_, impl Future<Output = Result<Response<UpstreamBody>, BoxError>> + Send + '_>
    {
        let deadline = self.deadline(sent);
        Answer {
            exchange: within(Some(deadline), self.pool.upgrade(req, path)),
            upstream: self,
        }
    }

    /// When the response headers of an exchange started at `sent` are due.
    fn deadline(&self, sent: std::time::Instant) -> tokio::time::Instant {
        tokio::time::Instant::from_std(sent) + self.response_timeout
    }
}

pin_project_lite::pin_project! {
    /// The response headers of an exchange, within `upstream.response_timeout` of when it
    /// was sent (the exchange holds the deadline: an HTTP/1.1 exchange on its connection's
    /// timer); its failure classified.
    pub struct Answer<'a, F> {
        #[pin]
        exchange: F,
        upstream: &'a Upstream,
    }
}

impl<F> Future for Answer<'_, F>
where
    F: Future<Output = Result<Response<UpstreamBody>, BoxError>>,
{
    type Output = Result<Response<UpstreamBody>, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let up = *this.upstream;
        Poll::Ready(match std::task::ready!(this.exchange.poll(cx)) {
            Ok(resp) => Ok(resp),
            Err(e) if e.is::<ResponseTimedOut>() => Err(Failure {
                error: GatewayError::UpstreamTimeout(TimeoutPhase::Headers, up.response_timeout),
                kind: Some(FailureKind::Timeout),
            }),
            Err(e) => Err(classify(&*e, up.connect_timeout)),
        })
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
        if let Some(slow) = e.downcast_ref::<BodyTooSlow>() {
            return Failure {
                error: GatewayError::BodyDeadline(slow.0),
                kind: None,
            };
        }
        // Cut short or malformed (400), or the client went away (recorded as 499).
        if let Some(failed) = e.downcast_ref::<ClientBodyFailed>() {
            return Failure {
                error: GatewayError::client_body(&failed.0),
                kind: None,
            };
        }
        is_connect |= e.is::<ConnectError>();
        if let Some(tls) = crate::tls::rustls_error(e) {
            return Failure {
                error: GatewayError::UpstreamUnreachable(format!("TLS handshake failed ({tls})")),
                kind: Some(FailureKind::Tls),
            };
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // Out of file descriptors (EMFILE, ENFILE): ezgate's own overload, not EZLINK's.
            if out_of_fds(io) {
                return Failure {
                    error: GatewayError::Overloaded(format!(
                        "out of file descriptors for a new upstream connection ({io}); raise the open-file limit (LimitNOFILE, ulimit -n) or lower server.max_inflight"
                    )),
                    kind: None,
                };
            }
            if io.kind() == std::io::ErrorKind::TimedOut && is_connect {
                return Failure {
                    error: GatewayError::UpstreamTimeout(TimeoutPhase::Connect, connect_timeout),
                    kind: Some(FailureKind::Timeout),
                };
            }
        }
        if let Some(m) = e.downcast_ref::<Malformed>() {
            return Failure {
                error: GatewayError::UpstreamBadResponse(format!("malformed HTTP ({m})")),
                kind: Some(FailureKind::Protocol),
            };
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

/// `errno` of "too many open files" in this process (EMFILE) and in the system (ENFILE):
/// the same on Linux and the BSDs.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// Whether `io`, or an `io::Error` it wraps, is EMFILE or ENFILE.
fn out_of_fds(io: &std::io::Error) -> bool {
    let mut io = io;
    loop {
        if matches!(io.raw_os_error(), Some(EMFILE | ENFILE)) {
            return true;
        }
        match io
            .get_ref()
            .and_then(|e| e.downcast_ref::<std::io::Error>())
        {
            Some(inner) => io = inner,
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Error, ErrorKind};
    use std::time::Duration;

    use super::*;

    fn connect_failure(io: Error) -> Failure {
        classify(&ConnectError(Box::new(io)), Duration::from_secs(5))
    }

    #[test]
    fn out_of_file_descriptors_is_ezgates_overload_not_the_upstreams() {
        for io in [
            Error::from_raw_os_error(EMFILE),
            Error::from_raw_os_error(ENFILE),
            Error::other(Error::from_raw_os_error(EMFILE)),
        ] {
            let f = connect_failure(io);
            assert!(
                matches!(&f.error, GatewayError::Overloaded(m) if m.contains("file descriptors")),
                "{}",
                f.error
            );
            assert_eq!(f.error.status(), 503);
            assert_eq!(f.kind, None, "not counted as an upstream failure");
        }
        let refused = connect_failure(Error::from(ErrorKind::ConnectionRefused));
        assert!(matches!(
            refused.error,
            GatewayError::UpstreamUnreachable(_)
        ));
        assert_eq!(refused.kind, Some(FailureKind::Connect));
    }

    #[test]
    fn a_slow_client_body_is_the_clients_408() {
        let f = classify(&BodyTooSlow(Duration::from_secs(2)), Duration::from_secs(5));
        assert!(matches!(f.error, GatewayError::BodyDeadline(_)));
        assert_eq!((f.error.status().as_u16(), f.kind), (408, None));
    }
}

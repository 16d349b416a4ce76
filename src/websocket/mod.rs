//! WebSocket sessions through the gateway (the Realtime API, `GET /v1/realtime?model=…`).
//!
//! The handshake is a request like any other on the request path ([`crate::proxy`]): the
//! caller is identified, the `model` query parameter checked against the client's allow-list,
//! the policies admit it (request rates count the handshake; a concurrency permit is held
//! for the session's life; token policies are charged with the usage of each
//! `response.done` event as it passes, and with what the responses it leaves unfinished
//! streamed). A session holds one of `server.max_websocket_sessions` places from its
//! handshake to its end, and none of `server.max_inflight`. It is forwarded with its
//! upgrade headers on an HTTP/1.1 connection of its own
//! ([`crate::upstream::Upstream::upgrade`]); an upstream that refuses it answers
//! in the error schema as for any request. After the upstream's `101` the client gets its
//! `101` and `session::relay` copies the bytes both ways until the session ends; its
//! exchange is recorded once then: status 101, duration, bytes both ways, how it ended.
//!
//! Only HTTP/1.1 handshakes (RFC 6455) are taken: WebSockets over HTTP/2 (RFC 8441's
//! extended CONNECT) are not offered to clients, who then open an HTTP/1.1 connection for
//! them. Other upgrades (`h2c`) are not WebSockets: their `Upgrade` is removed as a
//! hop-by-hop header and the request is served as plain HTTP/1.1 (RFC 9110 §7.8).

mod frames;
mod session;
mod usage;

use std::sync::Arc;

use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, SEC_WEBSOCKET_EXTENSIONS, UPGRADE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::errors::{FailureKind, GatewayError};
use crate::exchange::Exchange;
use crate::gateway::SessionPlace;
use crate::outcome::{Session, SessionEnd};
pub use session::Timing;

/// A client's WebSocket handshake, accepted for forwarding.
pub struct Handshake {
    /// The `model` query parameter, percent-decoded.
    pub model: Option<String>,
    /// The client's connection, once hyper has written the `101`.
    client: OnUpgrade,
    /// Its place under `server.max_websocket_sessions`, taken before it is admitted.
    pub place: Option<SessionPlace>,
}

/// The timeouts of a session under `cfg`.
pub fn timing(cfg: &Config) -> Timing {
    Timing {
        idle: cfg.upstream.stream_idle_timeout.0,
        lifetime: cfg.server.websocket_max_lifetime.0,
        ping_every: cfg.server.websocket_ping_interval.0,
        pong_timeout: cfg.server.websocket_pong_timeout.0,
    }
}

/// Whether `req` asks for a WebSocket (RFC 6455 §4.1): a `GET` over HTTP/1.1 with
/// `Upgrade: websocket` and `Connection: upgrade` (tokens, case-insensitive).
pub fn is_handshake<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && has_token(req.headers(), &UPGRADE, "websocket")
        && has_token(req.headers(), &CONNECTION, "upgrade")
}

fn has_token(h: &HeaderMap, name: &http::header::HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// The handshake in `req`, when it is one: checked (version 13, a key, at most one
/// `model`) and its client connection taken for the session. A new session is refused
/// while the gateway drains: it would be cut at the end of the grace.
pub fn accept<B>(req: &mut Request<B>, draining: bool) -> Result<Option<Handshake>, GatewayError> {
    if !is_handshake(req) {
        return Ok(None);
    }
    if draining {
        return Err(GatewayError::ShuttingDown);
    }
    let h = req.headers();
    if h.get("sec-websocket-version")
        .is_none_or(|v| v.as_bytes().trim_ascii() != b"13")
    {
        return Err(GatewayError::BadRequest(
            "a WebSocket handshake needs 'Sec-WebSocket-Version: 13' (RFC 6455)".into(),
        ));
    }
    if h.get("sec-websocket-key")
        .is_none_or(|v| v.as_bytes().trim_ascii().is_empty())
    {
        return Err(GatewayError::BadRequest(
            "a WebSocket handshake needs a 'Sec-WebSocket-Key' (RFC 6455)".into(),
        ));
    }
    let model = query_model(req.uri().query())?;
    Ok(Some(Handshake {
        model,
        client: hyper::upgrade::on(req),
        place: None,
    }))
}

/// The `model` parameter of a query (names and values percent-decoded). Named twice, it
/// is refused: the allow-list and the upstream must see the same model.
fn query_model(query: Option<&str>) -> Result<Option<String>, GatewayError> {
    let mut found = None;
    for pair in query.unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode_str(name).decode_utf8_lossy() != "model" {
            continue;
        }
        if found.is_some() {
            return Err(GatewayError::BadRequest(
                "the query names 'model' more than once".into(),
            ));
        }
        found = Some(percent_decode_str(value).decode_utf8_lossy().into_owned());
    }
    Ok(found)
}

/// The headers of the handshake sent upstream: the upgrade headers back (the client's were
/// removed with the other hop-by-hop headers); `Sec-WebSocket-Key`, `-Version` and
/// `-Protocol` as the client sent them; no `Sec-WebSocket-Extensions`, so that no
/// extension (`permessage-deflate`) is negotiated and the upstream's events stay readable
/// for their usage, as a stream's body is asked for without compression.
pub fn upgrade_headers(h: &mut HeaderMap) {
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    h.remove(SEC_WEBSOCKET_EXTENSIONS);
}

/// What the upstream's `101` starts: the session, once the client has its own `101`.
/// Carried in the response's extensions from the request path to [`Start::run`].
#[derive(Clone)]
pub struct Start {
    client: OnUpgrade,
    upstream: OnUpgrade,
    timing: Timing,
    cut: CancellationToken,
    place: Option<Arc<SessionPlace>>,
}

/// The client's `101` for the upstream's: its headers (hop-by-hop removed already) get
/// the upgrade headers back; the session to start once it is sent.
pub fn switch(
    handshake: Handshake,
    upstream: OnUpgrade,
    headers: &mut HeaderMap,
    timing: Timing,
    cut: CancellationToken,
) -> Start {
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.remove(CONTENT_LENGTH);
    Start {
        client: handshake.client,
        upstream,
        timing,
        cut,
        place: handshake.place.map(Arc::new),
    }
}

/// The upstream's connection, once its `101` switched to the WebSocket a handshake
/// (`asked`) wanted; `None` for any other status. A `101` to anything else is a bad
/// response: nothing but a WebSocket was asked for.
pub fn upstream_side<B>(
    asked: bool,
    resp: &mut Response<B>,
) -> Result<Option<OnUpgrade>, GatewayError> {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(None);
    }
    if !asked || !has_token(resp.headers(), &UPGRADE, "websocket") {
        return Err(GatewayError::UpstreamBadResponse(
            "101 Switching Protocols to something else than the WebSocket asked for".into(),
        ));
    }
    Ok(Some(hyper::upgrade::on(resp)))
}

impl Start {
    /// Runs the session on a task of its own, holding `out` (its permit) and its place
    /// until it ends; the drain waits for it (it counts the places).
    pub fn run(self, mut out: Box<Exchange>) {
        tokio::spawn(async move {
            let place = self.place;
            let idle = self.timing.idle;
            // Both connections are handed over once hyper wrote the client's `101`.
            let both = async { (self.client.await, self.upstream.await) };
            let (client, upstream) = match tokio::time::timeout(idle, both).await {
                Ok((Ok(c), Ok(u))) => (c, u),
                // The client's connection failed before the session began (the upstream's
                // is closed with this task).
                failed => {
                    out.finished = true;
                    let end = match failed {
                        Ok((Ok(_), Err(_))) => SessionEnd::UpstreamClosed,
                        _ => SessionEnd::ClientClosed,
                    };
                    out.session = Some(Session { end, bytes_in: 0 });
                    return;
                }
            };
            // Token policies are charged as the upstream reports usage, not only at the end.
            let permit = &mut out.permit;
            let report = session::relay(
                TokioIo::new(client),
                TokioIo::new(upstream),
                self.timing,
                self.cut,
                |input, output| {
                    if let Some(p) = permit.as_mut() {
                        p.charge(input + output);
                    }
                },
            )
            .await;
            // Both connections are closed: the place is free before the session is counted,
            // so a client that saw it end may open the next one.
            drop(place);
            out.finished = true;
            out.bytes_out = report.bytes_out;
            out.session = Some(Session {
                end: report.end,
                bytes_in: report.bytes_in,
            });
            if let Some(usage) = report.usage {
                out.usage = Some(usage);
            }
            // Responses under way are charged what they streamed (settled with the
            // exchange, on top of the reports charged already), and never less than a
            // reservation no report settled: a response that started is not refunded.
            if let Some(streamed) = report.unfinished {
                let held = out.permit.as_ref().map_or(0, |p| p.reserved());
                out.output_estimate = streamed.max(held);
            }
            if report.interrupted {
                out.upstream_failure = Some(FailureKind::Reset);
                out.gateway_error(&GatewayError::StreamInterrupted(
                    "the upstream connection ended without a close frame".into(),
                ));
            } else if report.end == SessionEnd::Shutdown {
                out.gateway_error(&GatewayError::ShuttingDown);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const WS: [(&str, &str); 4] = [
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn only_websocket_upgrades_are_handshakes() {
        assert!(is_handshake(&handshake("/v1/realtime", &WS)));
        let h2c = [
            ("upgrade", "h2c"),
            ("connection", "Upgrade, HTTP2-Settings"),
        ];
        assert!(!is_handshake(&handshake("/v1/realtime", &h2c)));
        // `Upgrade: websocket` without `Connection: upgrade` is a plain request.
        assert!(!is_handshake(&handshake("/v1/realtime", &WS[..1])));
        let mut post = handshake("/v1/realtime", &WS);
        *post.method_mut() = Method::POST;
        assert!(!is_handshake(&post));
    }

    #[test]
    fn the_model_comes_from_the_query_once() {
        let mut req = handshake("/v1/realtime?model=gpt-4o-realtime%2Dpreview&x=1", &WS);
        let h = accept(&mut req, false).unwrap().unwrap();
        assert_eq!(h.model.as_deref(), Some("gpt-4o-realtime-preview"));
        let mut req = handshake("/v1/realtime?model=a&mod%65l=b", &WS);
        assert!(matches!(
            accept(&mut req, false),
            Err(GatewayError::BadRequest(_))
        ));
        let mut req = handshake("/v1/realtime", &WS);
        assert_eq!(accept(&mut req, false).unwrap().unwrap().model, None);
        let mut req = handshake("/v1/realtime", &WS);
        assert!(matches!(
            accept(&mut req, true),
            Err(GatewayError::ShuttingDown)
        ));
        let mut req = handshake("/v1/realtime", &WS[..3]);
        assert!(matches!(
            accept(&mut req, false),
            Err(GatewayError::BadRequest(_))
        ));
    }
}

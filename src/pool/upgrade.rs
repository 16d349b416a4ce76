//! The connection of a WebSocket handshake: HTTP/1.1 on a connection of its own, dialled
//! for it and never pooled (once upgraded it carries the session's bytes, not HTTP), over
//! the pool's TLS (ALPN offers only `http/1.1`, whatever the pool would use: WebSockets over
//! HTTP/2, RFC 8441, are optional for a server and not asked of the upstream).

use std::future::poll_fn;

use http::header::HOST;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use tower_service::Service;

use super::body::{Back, UpstreamBody};
use super::{BoxError, ConnectError, Pool, RequestBody, UpstreamIo};

impl Pool {
    /// Sends a WebSocket handshake for `path` on a new HTTP/1.1 connection; resolves with
    /// the response headers. On a `101 Switching Protocols`, `hyper::upgrade::on` of the
    /// response yields the connection's byte stream; any other answer is an ordinary
    /// response, whose connection closes when its body ends.
    pub async fn upgrade(
        &self,
        mut req: Request<RequestBody>,
        path: PathAndQuery,
    ) -> Result<Response<UpstreamBody>, BoxError> {
        let mut connector = self
            .upgrades
            .clone()
            .unwrap_or_else(|| self.connector.clone());
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(ConnectError)?;
        let io = connector
            .call(self.base.clone())
            .await
            .map_err(ConnectError)?;
        let io: UpstreamIo = Box::new(io);
        let (mut tx, conn) = self.h1.handshake(io).await?;
        tokio::spawn(async move {
            // An upgraded connection hands its stream over and ends here.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended");
            }
        });
        *req.uri_mut() = Uri::from(path);
        req.headers_mut().insert(HOST, self.host.clone());
        let resp = tx.send_request(req).await?;
        // The sender goes with this function: the connection serves this one exchange.
        Ok(resp.map(|b| UpstreamBody::new(b, Back::Done, None)))
    }
}

//! The admin listener: `/metrics` (Prometheus text), `/healthz` (alive), `/readyz` (ready to
//! take traffic; 503 while draining).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::errors::{ErrorBody, Source};
use crate::gateway::Gateway;
use crate::stream::ResponseBody;

pub async fn serve(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let (status, ctype, body): (StatusCode, &'static str, Bytes) = match (get, req.uri().path()) {
        (true, "/metrics") => {
            if let Some(n) = gw.state().fleet() {
                gw.metrics.fleet_gateways(n);
            }
            gw.metrics.buffered_request_bytes(gw.buffers.held());
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                Bytes::from(gw.metrics.render()),
            )
        }
        (true, "/healthz") => (
            StatusCode::OK,
            "application/json",
            Bytes::from_static(b"{\"status\":\"ok\"}\n"),
        ),
        (true, "/readyz") if gw.is_draining() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            Bytes::from_static(b"{\"status\":\"draining\"}\n"),
        ),
        (true, "/readyz") => (
            StatusCode::OK,
            "application/json",
            Bytes::from_static(b"{\"status\":\"ready\"}\n"),
        ),
        _ => {
            let body = ErrorBody {
                message: "The admin listener serves GET /metrics, /healthz and /readyz.".into(),
                kind: crate::errors::type_for(404),
                code: Some("not_found".into()),
                param: None,
                status: 404,
                source: Source::Gateway,
                request_id: crate::headers::new_request_id(),
                retry_after_ms: None,
                upstream_status: None,
            };
            (StatusCode::NOT_FOUND, "application/json", body.to_json())
        }
    };
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    Ok(resp)
}

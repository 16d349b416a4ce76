//! The admin listener: `/metrics` (Prometheus text), `/healthz` (alive), `/readyz` (ready to
//! take traffic; 503 while draining), `/status` (the running gateway as JSON, [`status`]),
//! and `POST /cooldowns/clear` (lifts upstream-429 cooldowns; needs `server.admin_token`).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::errors::{ErrorBody, GatewayError, Source};
use crate::gateway::Gateway;
use crate::status;
use crate::stream::ResponseBody;

const JSON: &str = "application/json";

pub async fn serve(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let post = *req.method() == Method::POST;
    let (status, ctype, body): (StatusCode, &'static str, Bytes) = match (get, req.uri().path()) {
        (true, "/metrics") => {
            let state = gw.state();
            if let Some(n) = state.fleet() {
                gw.metrics.fleet_gateways(n);
            }
            gw.metrics.buffered_request_bytes(gw.buffers.held());
            // The operator's gauges are read from the policies now, not kept per request.
            let used = state.limits.utilization();
            gw.metrics
                .status
                .utilization(state.limits.policy_names().zip(used));
            gw.metrics.status.cooldowns(state.limits.active_cooldowns());
            if let Some(learned) = &state.quota {
                crate::status::quota_metrics(learned, &gw.metrics);
            }
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                Bytes::from(gw.metrics.render()),
            )
        }
        (true, "/healthz") => (
            StatusCode::OK,
            JSON,
            Bytes::from_static(b"{\"status\":\"ok\"}\n"),
        ),
        (true, "/readyz") if gw.is_draining() => (
            StatusCode::SERVICE_UNAVAILABLE,
            JSON,
            Bytes::from_static(b"{\"status\":\"draining\"}\n"),
        ),
        (true, "/readyz") => (
            StatusCode::OK,
            JSON,
            Bytes::from_static(b"{\"status\":\"ready\"}\n"),
        ),
        (true, "/status") => match serde_json::to_vec_pretty(&status::status(&gw)) {
            Ok(mut body) => {
                body.push(b'\n');
                (StatusCode::OK, JSON, Bytes::from(body))
            }
            Err(e) => error(&GatewayError::Internal(format!("GET /status: {e}"))),
        },
        (false, "/cooldowns/clear") if post => {
            match clear_cooldowns(&gw, req.headers(), req.uri().query()) {
                Ok(body) => (StatusCode::OK, JSON, body),
                Err(e @ GatewayError::InvalidAdminToken) => {
                    let (status, ctype, body) = error(&e);
                    let mut resp = response(status, ctype, body);
                    resp.headers_mut()
                        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    return Ok(resp);
                }
                Err(e) => error(&e),
            }
        }
        (_, path @ ("/metrics" | "/healthz" | "/readyz" | "/status" | "/cooldowns/clear")) => {
            let allow = if path == "/cooldowns/clear" {
                "POST"
            } else {
                "GET, HEAD"
            };
            let (status, ctype, body) = error(&GatewayError::MethodNotAllowed(format!(
                "{} on the admin path {path} (it answers {allow})",
                req.method()
            )));
            let mut resp = response(status, ctype, body);
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
            return Ok(resp);
        }
        _ => {
            let body = ErrorBody {
                message: "The admin listener serves GET /metrics, /healthz, /readyz, /status and POST /cooldowns/clear.".into(),
                kind: crate::errors::type_for(404),
                code: Some("not_found".into()),
                param: None,
                status: 404,
                source: Source::Gateway,
                request_id: crate::headers::new_request_id(),
                retry_after_ms: None,
                upstream_status: None,
            };
            (StatusCode::NOT_FOUND, JSON, body.to_json())
        }
    };
    Ok(response(status, ctype, body))
}

fn response(status: StatusCode, ctype: &'static str, body: Bytes) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}

fn error(e: &GatewayError) -> (StatusCode, &'static str, Bytes) {
    (
        e.status(),
        JSON,
        e.body(&crate::headers::new_request_id()).to_json(),
    )
}

/// `POST /cooldowns/clear[?model=NAME]`: lifts the upstream cooldowns (of one model).
fn clear_cooldowns(
    gw: &Gateway,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Bytes, GatewayError> {
    let state = gw.state();
    authorize(state.admin_token.as_ref(), headers)?;
    let model = model_param(query)?;
    let lifted = state.limits.clear_cooldowns(model.as_deref());
    tracing::info!(
        lifted,
        model = model.as_deref().unwrap_or("*"),
        "admin: upstream cooldowns cleared"
    );
    let body = serde_json::json!({
        "cleared": lifted,
        "model": model,
    });
    let mut out = body.to_string().into_bytes();
    out.push(b'\n');
    Ok(Bytes::from(out))
}

/// `Authorization: Bearer <server.admin_token>`, compared by SHA-256 digest in constant
/// time. No token configured: the POST endpoints are off (403).
fn authorize(token: Option<&[u8; 32]>, headers: &HeaderMap) -> Result<(), GatewayError> {
    let Some(token) = token else {
        return Err(GatewayError::AdminTokenNotConfigured);
    };
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(GatewayError::InvalidAdminToken);
    };
    let bytes = value.as_bytes();
    let presented = match bytes.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => bytes[7..].trim_ascii(),
        _ => return Err(GatewayError::InvalidAdminToken),
    };
    if crate::clients::ct_eq(&crate::clients::sha256(presented), token) {
        Ok(())
    } else {
        Err(GatewayError::InvalidAdminToken)
    }
}

/// The optional `model` of the query, percent-decoded; any other parameter, a repeated or
/// empty `model`, or one that is not UTF-8 is a 400.
fn model_param(query: Option<&str>) -> Result<Option<String>, GatewayError> {
    let mut model = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "model" {
            return Err(GatewayError::BadRequest(
                "POST /cooldowns/clear takes only ?model=NAME".to_owned(),
            ));
        }
        let value = percent_encoding::percent_decode_str(&value.replace('+', " "))
            .decode_utf8()
            .map_err(|_| GatewayError::BadRequest("?model= is not UTF-8 once decoded".to_owned()))?
            .into_owned();
        if value.is_empty() || model.is_some() {
            return Err(GatewayError::BadRequest(
                "?model= must name one model, once".to_owned(),
            ));
        }
        model = Some(value);
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_tokens_are_checked_whole() {
        let token = crate::clients::sha256(b"admin-token-0123456789");
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            }
            authorize(Some(&token), &h).map_err(|e| e.code())
        };
        assert_eq!(with(&["Bearer admin-token-0123456789"]), Ok(()));
        assert_eq!(with(&["bearer admin-token-0123456789"]), Ok(()));
        for wrong in [
            &[][..],
            &["Bearer admin-token-012345678"],
            &["Bearer admin-token-01234567890"],
            &["Basic admin-token-0123456789"],
            &["admin-token-0123456789"],
            &["Bearer"],
            &[
                "Bearer admin-token-0123456789",
                "Bearer admin-token-0123456789",
            ],
        ] {
            assert_eq!(with(wrong), Err("invalid_admin_token"), "{wrong:?}");
        }
        assert_eq!(
            authorize(None, &HeaderMap::new()).map_err(|e| e.code()),
            Err("admin_token_not_configured")
        );
    }

    #[test]
    fn the_model_parameter() {
        assert_eq!(model_param(None).ok(), Some(None));
        assert_eq!(model_param(Some("")).ok(), Some(None));
        assert_eq!(
            model_param(Some("model=gpt-4o%2Dmini")).ok(),
            Some(Some("gpt-4o-mini".to_owned()))
        );
        for bad in ["model=", "model=a&model=b", "other=1", "model=%FF"] {
            assert!(model_param(Some(bad)).is_err(), "{bad}");
        }
    }
}

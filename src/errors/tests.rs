use super::*;

#[test]
fn type_follows_status() {
    for (status, kind) in [
        (400, "bad_request"),
        (401, "unauthorized"),
        (403, "forbidden"),
        (404, "not_found"),
        (408, "request_timeout"),
        (409, "conflict"),
        (413, "payload_too_large"),
        (418, "client_error"),
        (422, "unprocessable_entity"),
        (429, "rate_limit_exceeded"),
        (500, "internal_server_error"),
        (502, "bad_gateway"),
        (503, "service_unavailable"),
        (504, "gateway_timeout"),
        (520, "server_error"),
    ] {
        assert_eq!(type_for(status), kind, "{status}");
    }
}

#[test]
fn rate_limited_renders_every_retry_hint() {
    let err = GatewayError::RateLimited {
        policy: "per-client".into(),
        limit: "600 requests per minute".into(),
        retry_after: Duration::from_millis(1200),
        quota: Quota {
            count: 600,
            window: 60,
        },
    };
    let (status, headers, body) = render(&err, "req-1");
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(headers["retry-after-ms"], "1200");
    assert_eq!(headers["x-ratelimit-limit-requests"], "600");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(headers["x-ratelimit-reset-requests"], "1.2s");
    assert_eq!(headers["ratelimit-policy"], "\"per-client\";q=600;w=60");
    assert_eq!(headers["ratelimit"], "\"per-client\";r=0;t=2");
    assert_eq!(headers["content-length"], body.len().to_string().as_str());
    assert!(!headers.contains_key("x-should-retry"));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let e = &v["error"];
    assert_eq!(e["type"], "rate_limit_exceeded");
    assert_eq!(e["code"], "rate_limited");
    assert_eq!(e["status"], 429);
    assert_eq!(e["source"], "gateway");
    assert_eq!(e["request_id"], "req-1");
    assert_eq!(e["retry_after_ms"], 1200);
    assert!(e["param"].is_null());
    assert_eq!(
        e["message"],
        "Rate limit 'per-client' exceeded: 600 requests per minute. Retry in 1.2s."
    );
}

#[test]
fn unfixable_refusals_say_do_not_retry() {
    let (status, headers, _) = render(&GatewayError::InvalidApiKey, "r");
    assert_eq!(status, 401);
    assert_eq!(headers["x-should-retry"], "false");
    let (status, headers, _) = render(&GatewayError::ShuttingDown, "r");
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["retry-after-ms"], "1000");
}

#[test]
fn sse_event_closes_a_partial_event_first() {
    let body = GatewayError::StreamInterrupted("reset".into()).body("r");
    let whole = body.to_sse_event(true);
    assert!(whole.starts_with(b"data: {\"error\":"));
    assert!(whole.ends_with(b"\n\n"));
    assert!(body.to_sse_event(false).starts_with(b"\n\ndata: "));
}

#[test]
fn a_failed_request_body_is_400_or_a_client_that_left_never_499_on_the_wire() {
    use std::io::{Error, ErrorKind};
    let cut = Error::new(
        ErrorKind::UnexpectedEof,
        "end of file before message length reached",
    );
    let e = GatewayError::client_body(&cut);
    assert!(
        matches!(&e, GatewayError::BadRequest(m) if m.contains("mid-body")),
        "{e}"
    );
    assert_eq!(e.status(), 400);
    let framing = Error::new(ErrorKind::InvalidInput, "Invalid chunk size line");
    let e = GatewayError::client_body(&framing);
    assert!(
        matches!(&e, GatewayError::BadRequest(m) if m.contains("chunked")),
        "{e}"
    );
    // Anything else (a reset, a cancelled HTTP/2 stream): a client that went away.
    let wrapped = std::fmt::Error;
    assert!(matches!(
        GatewayError::client_body(&wrapped),
        GatewayError::ClientClosed
    ));
    let reset = Error::from(ErrorKind::ConnectionReset);
    let e = GatewayError::client_body(&reset);
    assert!(matches!(e, GatewayError::ClientClosed));
    // Recorded as 499 by the request path; what a connection could get is a 400.
    let (status, _, body) = render(&e, "r");
    assert_eq!(status, 400);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["status"], 400);
    assert_eq!(json["error"]["type"], "bad_request");
}

#[test]
fn the_body_deadline_is_a_408_naming_its_setting() {
    let e = GatewayError::BodyDeadline(Duration::from_secs(60));
    let (status, _, body) = render(&e, "r");
    assert_eq!(status, 408);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "request_timeout");
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("server.request_body_deadline"));
}

#[test]
fn concurrency_and_upstream_refusals_render_their_documented_headers() {
    let err = GatewayError::ConcurrencyLimited {
        policy: "in-flight".into(),
        limit: 4,
    };
    let (status, headers, _) = render(&err, "req-c");
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["retry-after-ms"], "1000");
    assert_eq!(
        headers["ratelimit-policy"],
        "\"in-flight\";q=4;qu=\"concurrent-requests\""
    );
    assert_eq!(headers["ratelimit"], "\"in-flight\";r=0;t=1");
    assert!(!headers
        .keys()
        .any(|k| k.as_str().starts_with("x-ratelimit-")));
    assert!(!headers.contains_key("x-should-retry"));

    let err = GatewayError::UpstreamRateLimited {
        retry_after: Duration::from_millis(2500),
    };
    let (status, headers, _) = render(&err, "req-u");
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "3");
    assert_eq!(headers["retry-after-ms"], "2500");
    assert!(!headers.contains_key("ratelimit"));
    assert!(!headers.contains_key("ratelimit-policy"));
    assert!(!headers
        .keys()
        .any(|k| k.as_str().starts_with("x-ratelimit-")));
    assert!(!headers.contains_key("x-should-retry"));
}

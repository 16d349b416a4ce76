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

/// One error of every variant.
fn one_of_each() -> Vec<GatewayError> {
    let quota = Quota {
        count: 1,
        window: 60,
    };
    let d = Duration::from_secs(1);
    vec![
        GatewayError::RateLimited {
            policy: "p".into(),
            limit: String::new(),
            retry_after: d,
            quota,
        },
        GatewayError::TokenRateLimited {
            policy: "p".into(),
            limit: String::new(),
            retry_after: d,
            quota,
            remaining: 0,
            estimate: String::new(),
        },
        GatewayError::ConcurrencyLimited {
            policy: "p".into(),
            limit: 1,
        },
        GatewayError::UpstreamRateLimited { retry_after: d },
        GatewayError::UpstreamQuotaExhausted {
            message: "m".into(),
            retry_after: Some(d),
        },
        GatewayError::UpstreamQuotaExhausted {
            message: "m".into(),
            retry_after: None,
        },
        GatewayError::BudgetExceeded {
            budget: "b".into(),
            message: "m".into(),
            retry_after: d,
        },
        GatewayError::Unpriced {
            budget: "b".into(),
            model: "m".into(),
        },
        GatewayError::MissingApiKey,
        GatewayError::InvalidApiKey,
        GatewayError::ModelNotAllowed {
            client: "c".into(),
            model: "m".into(),
            allowed: "a".into(),
            field: "model",
        },
        GatewayError::ModelMissing {
            client: "c".into(),
            method: "POST".into(),
            path: "/v1/responses".into(),
            allowed: "a".into(),
            field: "model",
        },
        GatewayError::RouteNotAllowed {
            client: "c".into(),
            method: "PUT".into(),
            path: "/v1/x".into(),
            why: "why",
        },
        GatewayError::PayloadTooLarge { limit: 1 },
        GatewayError::BadRequest("x".into()),
        GatewayError::HeadersTooLarge,
        GatewayError::UriTooLong,
        GatewayError::RequestTimeout(d),
        GatewayError::BodyDeadline(d),
        GatewayError::ClientClosed,
        GatewayError::MethodNotAllowed("CONNECT".into()),
        GatewayError::UpstreamUnreachable("x".into()),
        GatewayError::UpstreamBadResponse("x".into()),
        GatewayError::UpstreamTimeout(TimeoutPhase::Headers, d),
        GatewayError::StreamInterrupted("x".into()),
        GatewayError::Overloaded("x".into()),
        GatewayError::ShuttingDown,
        GatewayError::Internal("x".into()),
    ]
}

/// docs/errors.md's table of gateway codes says whether a retry helps; a "No" row is exactly
/// a code whose errors send `x-should-retry: false`, and every code of the binary is in it.
#[test]
fn x_should_retry_follows_the_codes_table_of_docs_errors_md() {
    let doc = include_str!("../../docs/errors.md");
    let section = doc
        .split("## Gateway codes")
        .nth(1)
        .expect("docs/errors.md has its table of gateway codes");
    let mut documented = std::collections::BTreeMap::new();
    for row in section
        .lines()
        .skip_while(|l| !l.starts_with("| code |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
    {
        let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
        let code = cells[0].trim_matches('`');
        let helps = cells[cells.len() - 1];
        documented.insert(code.to_owned(), helps.to_owned());
    }
    for err in one_of_each() {
        let code = err.code();
        let helps = documented
            .get(code)
            .unwrap_or_else(|| panic!("docs/errors.md lists {code}"));
        let (_, headers, _) = render(&err, "r");
        let refused = headers.get("x-should-retry").is_some_and(|v| v == "false");
        // A code whose retry depends on the case says so, and which header tells.
        if helps == "—" || helps.starts_with("Depends") {
            continue;
        }
        assert_eq!(
            refused,
            helps.starts_with("No"),
            "{code}: the docs say \"{helps}\"; x-should-retry: {:?}",
            headers.get("x-should-retry")
        );
    }
}

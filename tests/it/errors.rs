//! The error schema (docs/errors.md) for upstream errors: every body shape × status, through the real proxy.

use bytes::Bytes;
use http::Method;
use proptest::prelude::*;

use crate::harness::*;

const STATUSES: [u16; 14] = [
    400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504, 520,
];
const WORDS: &str = "emulated upstream failure";

/// (shape, encoding, expected code, whether the message carries the upstream's words)
const SHAPES: &[(&str, Option<&str>, Option<&str>, bool)] = &[
    ("openai", None, Some("emulated_error"), true),
    ("openai", Some("gzip"), Some("emulated_error"), true),
    ("openai", Some("deflate"), Some("emulated_error"), true),
    ("openai", Some("br"), Some("emulated_error"), true),
    ("error-string", None, None, true),
    ("detail", None, None, true),
    ("detail-list", None, None, true),
    ("detail-object", None, Some("emulated_error"), true),
    ("message", None, None, true),
    ("errors", Some("gzip"), Some("emulated_error"), true),
    ("html", None, None, true),
    ("html", Some("br"), None, true),
    ("text", None, None, true),
    ("empty", None, None, false),
    ("invalid-utf8", None, None, true),
    ("invalid-json", None, None, true),
    ("huge", None, None, true),
];

fn expected_type(status: u16) -> &'static str {
    ezgate::errors::type_for(status)
}

#[tokio::test]
async fn every_upstream_shape_and_status_becomes_the_schema() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let client = http1();
    for &status in &STATUSES {
        for &(shape, encoding, code, has_words) in SHAPES {
            let status_s = status.to_string();
            let mut headers = vec![
                ("x-emu-status", status_s.as_str()),
                ("x-emu-body", shape),
                ("accept-encoding", "gzip, br"),
            ];
            if let Some(enc) = encoding {
                headers.push(("x-emu-encoding", enc));
            }
            let r = send(
                &client,
                Method::GET,
                &gw.url("/v1/models"),
                &headers,
                Bytes::new(),
            )
            .await;
            let what = format!("{status} {shape} {encoding:?}");
            assert_eq!(r.status.as_u16(), status, "{what}: status kept");
            let e = r.error();
            assert_eq!(e["type"], expected_type(status), "{what}");
            assert_eq!(e["source"], "upstream", "{what}");
            assert_eq!(e["upstream_status"], status, "{what}");
            assert_eq!(e["code"].as_str(), code, "{what}: code");
            let message = e["message"].as_str().unwrap();
            if has_words {
                assert!(message.contains(WORDS), "{what}: message {message:?}");
            } else {
                assert!(
                    message.contains(&format!("({status})")) || message.contains("upstream API"),
                    "{what}: {message}"
                );
            }
            assert!(!message.contains('<'), "{what}: no markup: {message}");
            assert!(message.chars().count() <= 1100, "{what}: clipped");
            assert!(r.header("etag").is_none());
        }
    }
}

#[tokio::test]
async fn retry_after_and_ratelimit_headers_are_kept() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let r = gw
        .get_with(
            "/v1/models",
            &[
                ("x-emu-status", "429"),
                ("x-emu-retry-after", "7"),
                ("x-emu-ratelimit-headers", "1"),
                ("x-emu-code", "insufficient_quota"),
            ],
        )
        .await;
    assert_eq!(r.status, 429);
    let e = r.error();
    assert_eq!(e["code"], "insufficient_quota");
    assert_eq!(e["retry_after_ms"], 7000);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.header("retry-after-ms"), Some("7000"));
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("100"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
}

#[tokio::test]
async fn success_bodies_pass_byte_for_byte_even_when_encoded() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let direct = send(
        &http1(),
        Method::GET,
        &format!("{}/v1/models", emu.url()),
        &[("x-emu-encoding", "gzip")],
        Bytes::new(),
    )
    .await;
    let proxied = gw
        .get_with("/v1/models", &[("x-emu-encoding", "gzip")])
        .await;
    assert_eq!(proxied.status, 200);
    assert_eq!(proxied.header("content-encoding"), Some("gzip"));
    assert_eq!(proxied.body, direct.body, "2xx bodies are untouched");
}

fn any_encoding() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some("gzip".to_owned())),
        Just(Some("deflate".to_owned())),
        Just(Some("br".to_owned())),
        Just(Some("identity".to_owned())),
        "[a-z,; ]{0,12}".prop_map(Some),
    ]
}

fn any_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        "\\PC{0,300}".prop_map(|s| s.into_bytes()),
        "[{}\\[\\]\":, a-z0-9]{0,200}".prop_map(|s| s.into_bytes()),
        ("[a-z ]{0,40}", "[a-z_]{0,10}")
            .prop_map(
                |(m, c)| format!(r#"{{"error":{{"message":"{m}","code":"{c}"}}}}"#).into_bytes()
            ),
        "[<>a-z/ !]{0,200}".prop_map(|s| format!("<html><title>{s}</title></html>").into_bytes()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_upstream_error_becomes_valid_schema_json(
        status in 400u16..600,
        encoding in any_encoding(),
        ctype in prop_oneof![Just(None), Just(Some("text/html".to_owned())), Just(Some("application/json".to_owned())), "[ -~]{0,30}".prop_map(Some)],
        body in any_body(),
        truncated in any::<bool>(),
    ) {
        let out = ezgate::errors::upstream::normalize(status, encoding.as_deref(), ctype.as_deref(), &body, truncated, "rid");
        let (st, headers, bytes) = out.into_parts(http::HeaderMap::new(), true);
        prop_assert_eq!(st.as_u16(), status);
        prop_assert_eq!(headers["content-length"].to_str().unwrap(), bytes.len().to_string());
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        prop_assert!(crate::schema::validate(&v).is_ok(), "{}", v);
    }
}

proptest! {
    #[test]
    fn any_retry_after_header_is_read_safely(value in "[ -~]{0,40}") {
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            if let Some(d) = ezgate::proxy::parse_retry_after(&v) {
                prop_assert!(d <= std::time::Duration::from_secs(86_400));
            }
        }
    }
}

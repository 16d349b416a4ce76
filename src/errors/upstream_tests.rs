use std::io::Write;

use super::*;

fn norm(status: u16, enc: Option<&str>, ctype: Option<&str>, body: &[u8]) -> ErrorBody {
    normalize(status, enc, ctype, body, false, "rid")
}

#[test]
fn openai_shape_keeps_message_code_param() {
    let b = norm(
        429,
        None,
        Some("application/json"),
        br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":"model","code":"insufficient_quota"}}"#,
    );
    assert_eq!(b.message, "You exceeded your current quota");
    assert_eq!(b.code.as_deref(), Some("insufficient_quota"));
    assert_eq!(b.param.as_deref(), Some("model"));
    assert_eq!(b.kind, "rate_limit_exceeded");
    assert_eq!(b.source, Source::Upstream);
    assert_eq!(b.upstream_status, Some(429));
}

#[test]
fn other_json_shapes() {
    let cases: &[(&[u8], &str)] = &[
        (br#"{"error":"model overloaded"}"#, "model overloaded"),
        (br#"{"detail":"Not authenticated"}"#, "Not authenticated"),
        (
            br#"{"detail":[{"loc":["body","model"],"msg":"field required","type":"value_error"}]}"#,
            "body.model: field required",
        ),
        (
            br#"{"detail":{"message":"quota gone","code":"q"}}"#,
            "quota gone",
        ),
        (br#"{"message":"Internal failure"}"#, "Internal failure"),
        (br#"{"errors":[{"message":"a"},{"message":"b"}]}"#, "a; b"),
        (br#"["x","y"]"#, "x; y"),
    ];
    for (body, want) in cases {
        assert_eq!(
            norm(400, None, Some("application/json"), body).message,
            *want,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn html_pages_give_their_words_not_markup() {
    let page = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title><style>body{color:red}</style></head><body><h1>Bad Gateway</h1></body></html>";
    assert_eq!(
        norm(502, None, Some("text/html"), page).message,
        "502 Bad Gateway"
    );
    let no_title =
        b"<html><body><script>var x=1;</script><h1>Service &amp; Co down</h1></body></html>";
    assert_eq!(norm(503, None, None, no_title).message, "Service & Co down");
}

#[test]
fn empty_text_and_broken_bodies() {
    assert_eq!(norm(503, None, None, b"").message, meaning(503));
    assert_eq!(
        norm(500, None, Some("text/plain"), b"  upstream exploded \n").message,
        "upstream exploded"
    );
    let b = norm(500, None, Some("text/plain"), b"\xff\xfebad bytes\xc3\x28");
    assert!(b.message.contains("bad bytes"));
    assert_eq!(
        norm(
            500,
            None,
            Some("application/json"),
            br#"{"error": {"message": "cut"#
        )
        .message,
        r#"{"error": {"message": "cut"#
    );
}

#[test]
fn decodes_gzip_deflate_br() {
    let body = br#"{"error":{"message":"compressed words","code":"c"}}"#;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body).unwrap();
    let gz = gz.finish().unwrap();
    assert_eq!(
        norm(500, Some("gzip"), None, &gz).message,
        "compressed words"
    );
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(body).unwrap();
    assert_eq!(
        norm(500, Some("deflate"), None, &z.finish().unwrap()).message,
        "compressed words"
    );
    let mut br = Vec::new();
    {
        let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
        w.write_all(body).unwrap();
    }
    assert_eq!(norm(500, Some("br"), None, &br).message, "compressed words");
    let bad = norm(500, Some("gzip"), None, b"not gzip at all");
    assert!(
        bad.message.contains("could not be decoded"),
        "{}",
        bad.message
    );
    assert_eq!(
        norm(500, Some("zstd"), None, b"x").message,
        "(upstream error body could not be decoded: unsupported content-encoding 'zstd')"
    );
}

#[test]
fn decompression_is_capped() {
    let huge = vec![b'a'; 10 << 20];
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&huge).unwrap();
    let b = norm(500, Some("gzip"), Some("text/plain"), &gz.finish().unwrap());
    assert!(b.message.chars().count() <= 1001);
}

#[test]
fn long_messages_are_clipped() {
    let long = format!("{{\"message\":\"{}\"}}", "x".repeat(5000));
    let b = norm(500, None, None, long.as_bytes());
    assert_eq!(b.message.chars().count(), 1001);
    assert!(b.message.ends_with('…'));
}

#[test]
fn the_organizations_key_is_redacted_in_every_form_and_member() {
    use crate::errors::redact::{Redactor, REDACTED};
    let key = "sk-org-0123456789abcdef";
    let r = Redactor::new(key).unwrap();
    let redacted = |enc: Option<&str>, ctype: &str, body: &[u8], truncated: bool| {
        normalize_redacted(401, enc, Some(ctype), body, truncated, "rid", Some(&r))
    };
    // JSON-escaped in the body: found once decoded.
    let b = redacted(
        None,
        "application/json",
        br#"{"error":{"message":"Incorrect API key provided: \u0073k-org-0123456789abcdef.","type":"invalid_request_error","param":"sk-org-0123456789abcdef","code":"key sk-org-0123456789abcdef"}}"#,
        false,
    );
    assert_eq!(
        b.message,
        format!("Incorrect API key provided: {REDACTED}.")
    );
    assert_eq!(b.param.as_deref(), Some(REDACTED));
    assert_eq!(b.code.as_deref(), Some(format!("key {REDACTED}").as_str()));
    // In an HTML page, compressed.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(format!("<html><title>401 bad key {key}</title></html>").as_bytes())
        .unwrap();
    let b = redacted(Some("gzip"), "text/html", &gz.finish().unwrap(), false);
    assert_eq!(b.message, format!("401 bad key {REDACTED}"));
    // A body cut inside the key.
    let b = redacted(None, "text/plain", b"bad key sk-org-0123456789", true);
    assert_eq!(
        b.message,
        format!("bad key {REDACTED} (upstream body truncated)")
    );
    // A message clipped after the key keeps no part of it.
    let long = format!("{} {key}", "x".repeat(990));
    let b = redacted(None, "text/plain", long.as_bytes(), false);
    assert!(!b.message.contains("sk-org-0123"), "{}", b.message);
    // Without a key (direct mode) nothing changes.
    let b = normalize(401, None, Some("text/plain"), key.as_bytes(), false, "rid");
    assert_eq!(b.message, key);
}

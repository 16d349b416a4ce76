//! Forwarding: every method, path and query forwarded; bodies streamed; headers rewritten.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};

use crate::harness::*;

fn inspect_headers(r: &Resp) -> Vec<(String, String)> {
    r.json()["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_owned(),
                p[1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn chat_completion_passes_through() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let r = gw.chat(&[]).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let rid = r.header("x-request-id").expect("x-request-id is returned");
    assert_eq!(rid.len(), 36, "generated ids are UUIDs");
    let seen = emu.entry(rid).await.expect("upstream saw our request id");
    assert_eq!(seen["uri"], "/v1/chat/completions");
}

#[tokio::test]
async fn every_method_path_and_query_reaches_the_upstream() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let r = send(
            &http1(),
            m,
            &gw.url("/inspect/a%20b/c?x=1&y=%2F&z"),
            &[],
            Bytes::from_static(b"hi"),
        )
        .await;
        assert_eq!(r.status, 200, "{method}");
        let v = r.json();
        assert_eq!(v["method"], method);
        assert_eq!(v["uri"], "/inspect/a%20b/c?x=1&y=%2F&z");
    }
    let r = send(
        &http1(),
        Method::HEAD,
        &gw.url("/inspect"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn a_5_mib_body_passes_byte_identical_both_ways() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let body: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let r = gw
        .post(
            "/echo",
            &[("content-type", "application/octet-stream")],
            body.clone(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body, "echoed body differs");
    // Over h2c too.
    let r = send(
        &h2c(),
        Method::POST,
        &gw.url("/echo"),
        &[],
        Bytes::from(body.clone()),
    )
    .await;
    assert!(r.body == body);
}

#[tokio::test]
async fn sse_events_arrive_as_the_upstream_produces_them() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", "sse-first-event")
        .header("x-emu-stream-events", "5")
        .header("x-emu-stream-interval-ms", "400")
        .body(Full::new(Bytes::from(
            r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, http1().request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let first = first.into_data().unwrap();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    // The upstream is still producing: the first event did not wait for the whole stream.
    assert_eq!(
        emu.entry("sse-first-event").await.unwrap()["state"],
        "in_progress"
    );
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test]
async fn client_addresses_reach_the_upstream_only_with_forward_client_ip() {
    let emu = Emulator::start().await;
    let sent = [
        ("X-Forwarded-For", "10.9.8.7"),
        ("forwarded", "for=10.9.8.7;proto=https"),
        ("X-Real-IP", "10.9.8.7"),
    ];
    // Off (the default): neither the pod's address nor what the client wrote.
    let gw = Gateway::start(&emu.url(), "").await;
    for headers in [&sent[..], &[]] {
        let h = inspect_headers(&gw.get_with("/inspect", headers).await);
        for name in ["x-forwarded-for", "forwarded", "x-real-ip"] {
            assert_eq!(header(&h, name), None, "{name} must not reach the upstream");
        }
    }
    // On: the client's address appended to what earlier proxies wrote.
    let on = "[upstream]\nforward_client_ip = true\n";
    let gw = Gateway::start(&emu.url(), on).await;
    let h = inspect_headers(&gw.get_with("/inspect", &sent).await);
    assert_eq!(header(&h, "x-forwarded-for"), Some("10.9.8.7, 127.0.0.1"));
    assert_eq!(header(&h, "forwarded"), Some("for=10.9.8.7;proto=https"));
    let h = inspect_headers(&gw.get("/inspect").await);
    assert_eq!(header(&h, "x-forwarded-for"), Some("127.0.0.1"));
}

#[tokio::test]
async fn headers_are_rewritten_both_ways() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let r = gw
        .get_with(
            "/inspect",
            &[
                ("connection", "x-hop-secret"),
                ("x-hop-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-authorization", "Basic abc"),
                ("x-request-id", "client-id-123"),
                ("x-forwarded-for", "10.9.8.7"),
                ("authorization", "Bearer sk-passthrough"),
                ("host", "evil.example"),
            ],
        )
        .await;
    let h = inspect_headers(&r);
    for gone in [
        "x-hop-secret",
        "keep-alive",
        "proxy-authorization",
        "connection",
    ] {
        assert_eq!(header(&h, gone), None, "{gone} must not be forwarded");
    }
    assert_eq!(
        header(&h, "host"),
        Some(emu.addr.to_string().as_str()),
        "Host is the upstream's"
    );
    assert_eq!(header(&h, "x-request-id"), Some("client-id-123"));
    assert_eq!(
        header(&h, "x-forwarded-for"),
        None,
        "upstream.forward_client_ip is off by default"
    );
    assert_eq!(
        header(&h, "authorization"),
        Some("Bearer sk-passthrough"),
        "passthrough mode keeps the key"
    );
    assert_eq!(r.header("x-request-id"), Some("client-id-123"));
    assert_eq!(r.header("connection"), None);
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[server]\nmax_request_body = \"64KiB\"\n").await;
    let r = gw.post("/echo", &[], vec![b'x'; 64 * 1024 + 1]).await;
    assert_eq!(r.status, 413);
    let e = r.error();
    assert_eq!(e["code"], "payload_too_large");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    // A chunked body (no content-length) is cut off while streaming.
    let chunked = raw(
        gw.addr,
        &[
            // /inspect reads the whole body before answering (/echo would answer at once).
            b"POST /inspect HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".as_slice(),
            format!("{:x}\r\n", 70_000).as_bytes(),
            &vec![b'y'; 70_000],
            b"\r\n0\r\n\r\n",
        ]
        .concat(),
        DEADLINE,
    )
    .await;
    let text = String::from_utf8_lossy(&chunked);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    let r = gw.post("/echo", &[], vec![b'x'; 64 * 1024]).await;
    assert_eq!(r.status, 200, "exactly the limit passes");
}

#[tokio::test]
async fn never_an_open_proxy() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let out = raw(
        gw.addr,
        b"GET http://example.com/inspect?via=absolute HTTP/1.1\r\nhost: example.com\r\nconnection: close\r\n\r\n",
        DEADLINE,
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(&format!("[\"host\",\"{}\"]", emu.addr)),
        "only the configured upstream is contacted: {text}"
    );
    let out = raw(
        gw.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert!(text.contains("\"code\":\"method_not_allowed\""), "{text}");
}

#[tokio::test]
async fn bad_input_gets_4xx_or_a_closed_connection() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[server]\nheader_read_timeout = \"1s\"\n").await;
    let garbage = raw(
        gw.addr,
        b"\x16\x03\x01 not http at all\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&garbage);
    assert!(
        garbage.is_empty() || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );
    // Request heads over 64 KiB are refused however they arrive (one read or many).
    for kib in [65, 70, 100, 300] {
        let big = format!(
            "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
            "a".repeat(kib * 1024)
        );
        let text =
            String::from_utf8_lossy(&raw(gw.addr, big.as_bytes(), Duration::from_secs(5)).await)
                .to_string();
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 431"),
            "{kib} KiB: {text}"
        );
    }
    let bad_uri = raw(
        gw.addr,
        b"GET /a b c HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&bad_uri);
    assert!(
        bad_uri.is_empty() || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );
    // A slow client that never finishes its headers is cut off by header_read_timeout.
    let started = std::time::Instant::now();
    let slow = raw(gw.addr, b"GET / HTTP/1.1\r\nhost: x\r\n", DEADLINE).await;
    assert!(
        started.elapsed() < DEADLINE,
        "slow client was never cut off"
    );
    let text = String::from_utf8_lossy(&slow);
    assert!(
        slow.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    // And the gateway still serves.
    assert_eq!(gw.get("/v1/models").await.status, 200);
}

/// The listener tells HTTP/1.1 from h2c by the first bytes, however they are split.
#[tokio::test]
async fn first_bytes_pick_the_protocol_however_they_arrive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[server]\nheader_read_timeout = \"1s\"\n").await;
    let pause = || tokio::time::sleep(Duration::from_millis(100));

    // The HTTP/2 preface in two pieces, then the client's SETTINGS: the server's SETTINGS
    // frame (type 4) answers.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    pause().await;
    s.write_all(b"\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head[3], 4, "expected a SETTINGS frame, got {head:?}");

    // An HTTP/1.1 request whose first byte could begin the preface.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"P").await.unwrap();
    pause().await;
    s.write_all(
        b"UT /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 "), "{text}");

    // A client that connects and says nothing is let go after header_read_timeout.
    let started = std::time::Instant::now();
    let silent = raw(gw.addr, b"", DEADLINE).await;
    assert!(silent.is_empty());
    assert!(
        started.elapsed() < DEADLINE,
        "a silent client was never cut off"
    );
    assert_eq!(gw.get("/v1/models").await.status, 200);
}

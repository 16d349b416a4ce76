//! When the client goes away, the upstream request is dropped at once.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

async fn open_and_abandon(gw: &Gateway, request: String, read_first: bool) {
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    if read_first {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0 && buf.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    } else {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(s);
}

#[tokio::test]
async fn a_slow_request_is_cancelled_upstream_when_the_client_leaves() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let body = CHAT_BODY;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-request-id: slow-cancel\r\nx-emu-header-delay-ms: 30000\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    open_and_abandon(&gw, req, false).await;
    emu.wait_state("slow-cancel", "cancelled", Duration::from_secs(1))
        .await;
    let log = gw.access_log("slow-cancel").await;
    assert_eq!(log["status"], 499);
    assert_eq!(log["source"], "gateway");
    assert_eq!(gw.metric("ezgate_requests_total{method=\"POST\",route=\"/v1/chat/completions\",source=\"gateway\",status=\"499\"}").await, 1.0);
}

#[tokio::test]
async fn a_stream_is_cancelled_upstream_when_the_client_leaves() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-request-id: stream-cancel\r\nx-emu-stream-events: 1000\r\nx-emu-stream-interval-ms: 100\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    open_and_abandon(&gw, req, true).await;
    emu.wait_state("stream-cancel", "cancelled", Duration::from_secs(1))
        .await;
    let log = gw.access_log("stream-cancel").await;
    assert_eq!(log["status"], 499);
}

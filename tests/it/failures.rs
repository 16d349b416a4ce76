//! Every upstream failure answers with the schema and the right status; no hang, no panic.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};

use crate::harness::*;

#[tokio::test]
async fn refused_connection_is_502_upstream_unreachable() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = Gateway::start(&format!("http://127.0.0.1:{port}"), "").await;
    let r = gw.chat(&[]).await;
    assert_eq!(r.status, 502);
    let e = r.error();
    assert_eq!(e["code"], "upstream_unreachable");
    assert_eq!(e["source"], "gateway");
    assert_eq!(e["type"], "bad_gateway");
    assert!(
        e["message"].as_str().unwrap().contains("upstream.base_url"),
        "{e}"
    );
    assert_eq!(
        gw.metric("ezgate_upstream_failures_total{kind=\"connect\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn unknown_host_is_502() {
    let gw = Gateway::start(
        "http://ezgate-test-no-such-host.invalid",
        "[upstream]\nconnect_timeout = \"3s\"\n",
    )
    .await;
    let r = gw.chat(&[]).await;
    assert!(r.status == 502 || r.status == 504, "{}", r.status);
    let e = r.error();
    assert!(
        e["code"] == "upstream_unreachable" || e["code"] == "upstream_timeout",
        "{e}"
    );
}

#[tokio::test]
async fn slow_headers_are_504_upstream_timeout() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[upstream]\nresponse_timeout = \"300ms\"\n").await;
    let r = gw
        .chat(&[
            ("x-emu-header-delay-ms", "5000"),
            ("x-request-id", "slow-headers"),
        ])
        .await;
    assert_eq!(r.status, 504);
    let e = r.error();
    assert_eq!(e["code"], "upstream_timeout");
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains("upstream.response_timeout"));
    emu.wait_state("slow-headers", "cancelled", Duration::from_secs(2))
        .await;
}

#[tokio::test]
async fn reset_before_headers_is_502() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let r = gw.chat(&[("x-emu-reset", "headers")]).await;
    assert_eq!(r.status, 502);
    let e = r.error();
    assert_eq!(e["code"], "upstream_bad_response");
}

#[tokio::test]
async fn malformed_response_is_502() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let r = gw.chat(&[("x-emu-malformed", "1")]).await;
    assert_eq!(r.status, 502);
    let e = r.error();
    assert_eq!(e["code"], "upstream_bad_response");
    assert_eq!(
        gw.metric("ezgate_upstream_failures_total{kind=\"protocol\"}")
            .await,
        1.0
    );
}

async fn stream_body(gw: &Gateway, headers: &[(&str, &str)]) -> (http::StatusCode, String) {
    let mut req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(
            r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap();
    tokio::time::timeout(DEADLINE, async {
        let resp = http1().request(req).await.unwrap();
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("the stream ends cleanly")
            .to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    })
    .await
    .expect("stream must end, not hang")
}

fn last_event_error(text: &str) -> serde_json::Value {
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let json = last
        .strip_prefix("data: ")
        .unwrap_or_else(|| panic!("last event is not data: {text}"));
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    crate::schema::assert_valid(&v);
    v["error"].clone()
}

#[tokio::test]
async fn a_stream_cut_mid_way_ends_with_an_error_event() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let (status, text) = stream_body(
        &gw,
        &[("x-emu-stream-events", "10"), ("x-emu-cut-after", "3")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(text.matches("chat.completion.chunk").count(), 3, "{text}");
    let e = last_event_error(&text);
    assert_eq!(e["code"], "upstream_stream_interrupted");
    assert_eq!(e["source"], "gateway");
    assert_eq!(
        gw.metric("ezgate_gateway_errors_total{code=\"upstream_stream_interrupted\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_silent_stream_ends_with_a_timeout_event() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[upstream]\nstream_idle_timeout = \"500ms\"\n").await;
    let (status, text) = stream_body(
        &gw,
        &[
            ("x-emu-stream-events", "10"),
            ("x-emu-stall-after", "2"),
            ("x-request-id", "stall"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(text.matches("chat.completion.chunk").count(), 2);
    let e = last_event_error(&text);
    assert_eq!(e["code"], "upstream_timeout");
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains("upstream.stream_idle_timeout"));
    emu.wait_state("stall", "cancelled", Duration::from_secs(2))
        .await;
}

#[tokio::test]
async fn an_upstream_error_event_inside_a_stream_passes_through() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let (_, text) = stream_body(
        &gw,
        &[
            ("x-emu-stream-events", "2"),
            ("x-emu-stream-error-event", "1"),
        ],
    )
    .await;
    assert!(
        text.contains("event: error\ndata: {\"error\":{\"message\":\"emulated in-stream error\""),
        "{text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn a_plain_body_cut_mid_way_is_never_complete_looking() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let req = http::Request::get(gw.url("/v1/models"))
        .header("x-emu-reset", "body")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, http1().request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(DEADLINE, resp.into_body().collect())
        .await
        .unwrap();
    assert!(
        body.is_err(),
        "the client must see the body fail, not a short success"
    );
}

#[tokio::test]
async fn the_gateway_survives_every_fault_in_a_row() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[upstream]\nresponse_timeout = \"500ms\"\nstream_idle_timeout = \"500ms\"\n",
    )
    .await;
    let faults: &[(&str, &str)] = &[
        ("x-emu-reset", "headers"),
        ("x-emu-malformed", "1"),
        ("x-emu-header-delay-ms", "2000"),
        ("x-emu-status", "500"),
    ];
    for (k, v) in faults {
        let r = gw.get_with("/v1/models", &[(k, v)]).await;
        assert!(r.status.as_u16() >= 200, "{k}");
    }
    assert_eq!(gw.get("/v1/models").await.status, 200);
}

#[tokio::test]
async fn too_many_in_flight_is_503_overloaded() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[server]\nmax_inflight = 1\n").await;
    let url = gw.url("/v1/models");
    let slow = tokio::spawn(async move {
        send(
            &http1(),
            Method::GET,
            &url,
            &[
                ("x-emu-header-delay-ms", "30000"),
                ("x-request-id", "hold-the-place"),
            ],
            Bytes::new(),
        )
        .await
    });
    // Once the upstream holds the slow request, ezgate has exactly one in flight.
    emu.wait_state("hold-the-place", "in_progress", DEADLINE)
        .await;
    let r = gw.get("/v1/models").await;
    assert_eq!(r.status, 503);
    let e = r.error();
    assert_eq!(e["code"], "overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("retry-after-ms"), Some("1000"));
    assert_eq!(e["retry_after_ms"], 1000);
    // The client of the slow request leaves: its place is given back.
    slow.abort();
    let start = std::time::Instant::now();
    while gw.get("/v1/models").await.status != 200 {
        assert!(start.elapsed() < DEADLINE, "the place was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An upstream that reads each request (head and `content-length` body) and answers the
/// n-th, on whichever connection it comes, with `answers[n]`; returns its URL and the
/// connections it accepted.
async fn raw_upstream(
    answers: Vec<&'static [u8]>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let answers = Arc::new(Mutex::new(answers.into_iter()));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let answers = Arc::clone(&answers);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .map_or(0, |n| n.trim().parse::<usize>().unwrap());
                            if buf.len() >= i + 4 + len {
                                break i + 4 + len;
                            }
                        }
                        match tcp.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    };
                    buf.drain(..end);
                    let Some(answer) = answers.lock().unwrap().next() else {
                        return;
                    };
                    if tcp.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, accepted)
}

#[tokio::test]
async fn an_upstreams_ambiguous_framing_never_reaches_the_next_request() {
    // Both Transfer-Encoding and Content-Length: read as chunked (the 5 would cut the JSON),
    // and the connection is not used again, whatever followed on it.
    let ambiguous: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\nb\r\n{\"id\":\"a1\"}\r\n0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
    // Two lengths that disagree: which body is it? Neither: a 502.
    let conflicting: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}";
    let fine: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"id\":\"a3\"}";
    let (url, accepted) = raw_upstream(vec![ambiguous, conflicting, fine]).await;
    let gw = Gateway::start(&url, "").await;
    let r = gw.chat(&[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], "a1");
    let r = gw.chat(&[]).await;
    assert_eq!(r.status, 502);
    let e = r.error();
    assert_eq!(e["code"], "upstream_bad_response");
    assert!(
        e["message"].as_str().unwrap().contains("Content-Length"),
        "{e}"
    );
    assert_eq!(
        gw.metric("ezgate_upstream_failures_total{kind=\"protocol\"}")
            .await,
        1.0
    );
    let r = gw.chat(&[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], "a3");
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "neither the ambiguous nor the malformed answer's connection was reused"
    );
}

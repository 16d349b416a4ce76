//! CLI, config errors, graceful shutdown, reload.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::harness::*;

fn ezgate(args: &[&str], config: Option<&str>) -> std::process::Output {
    let mut cmd = std::process::Command::new(bin("ezgate"));
    if let Some(text) = config {
        let path = scratch_dir().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(path);
    }
    cmd.args(args)
        .env_remove("EZLINK_API_KEY")
        .env_remove("EZGATE_CONFIG");
    cmd.output().unwrap()
}

#[test]
fn bad_configs_exit_non_zero_naming_file_key_and_problem() {
    let cases = [
        ("[server]\nlisten = \"127.0.0.1:1\"\nport = 3\n", "server.port: unknown field `port`"),
        ("[upstream]\nconnect_timeout = 5\n", "upstream.connect_timeout: 5 is not a duration; write it with its unit, e.g. \"5s\""),
        ("[upstream]\nresponse_timeout = \"2 fortnights\"\n", "upstream.response_timeout: \"2 fortnights\" is not a duration"),
        ("[upstream]\napi_key = \"${EZGATE_TEST_SURELY_UNSET}\"\n", "upstream.api_key: environment variable EZGATE_TEST_SURELY_UNSET is not set"),
        ("[[limits]]\nname = \"x\"\nkey = \"global\"\nrequests = \"5/fortnight\"\n", "limits[0].requests: \"5/fortnight\" is not a rate"),
        (
            "[[limits]]\nname = \"x\"\nkey = \"global\"\nrequests = \"5/s\"\n[[limits]]\nname = \"x\"\nkey = \"ip\"\nrequests = \"5/s\"\n",
            "limits[1] (\"x\").name: duplicate policy name",
        ),
        ("this is not toml", "bad.toml"),
    ];
    for (text, want) in cases {
        let out = ezgate(
            &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            Some(text),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(
            err.contains("bad.toml: ") && err.contains(want),
            "{text}:\n{err}"
        );
        assert!(out.stdout.is_empty(), "nothing was bound or announced");
    }
}

#[test]
fn check_config_prints_the_effective_config_redacted() {
    let dir = scratch_dir();
    let path = dir.join("ezgate.toml");
    std::fs::write(
        &path,
        "[upstream]\napi_key = \"${EZGATE_TEST_KEY}\"\n\n[[limits]]\nname = \"p\"\nkey = \"client\"\nrequests = \"600/min\"\ntokens = \"20000/min\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("ezgate"))
        .args(["check-config", "--config"])
        .arg(&path)
        .env("EZGATE_TEST_KEY", "sk-check-config-secret")
        .env("EZGATE_UPSTREAM", "http://127.0.0.1:1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("base_url = \"http://127.0.0.1:1\""),
        "environment beats the file: {text}"
    );
    assert!(
        text.contains("api_key = \"<redacted>\"") && !text.contains("sk-check-config-secret"),
        "{text}"
    );
    // The effective defaults of every policy, written out.
    for line in [
        "store = \"local\"",
        "burst = 600",
        "default_tokens = 1000",
        "max_keys = 100000",
        "stream_usage = true",
    ] {
        assert!(text.contains(line), "{line} missing: {text}");
    }
    let shipped = std::process::Command::new(bin("ezgate"))
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/ezgate.toml"),
        ])
        .output()
        .unwrap();
    assert!(shipped.status.success(), "the shipped config is valid");
}

#[tokio::test]
async fn sigterm_drains_a_stream_in_flight_then_exits_zero() {
    let emu = Emulator::start().await;
    let mut gw = Gateway::start(&emu.url(), "[server]\nshutdown_grace = \"20s\"\n").await;
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-emu-stream-events", "8")
        .header("x-emu-stream-interval-ms", "150")
        .body(Full::new(Bytes::from(
            r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
        )))
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, http1().request(req))
        .await
        .unwrap()
        .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    gw.signal("TERM");
    // Readiness turns 503 while the stream is still running.
    let admin = format!("http://{}/readyz", gw.admin);
    let mut saw_draining = false;
    for _ in 0..50 {
        let r = send(&http1(), http::Method::GET, &admin, &[], Bytes::new()).await;
        if r.status == 503 {
            saw_draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_draining, "/readyz must turn 503 on SIGTERM");
    // New connections are refused.
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "listener must be closed"
    );
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(
        String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"),
        "the stream finished"
    );
    assert_eq!(gw.exit_code().await, Some(0));
}

#[tokio::test]
async fn sighup_applies_a_valid_config_and_refuses_an_invalid_one() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    assert_eq!(gw.chat(&[]).await.status, 200);
    // Valid: a limit of one request per hour, global.
    std::fs::write(
        &gw.config_path,
        "[[limits]]\nname = \"reloaded\"\nkey = \"global\"\nrequests = \"1/h\"\n",
    )
    .unwrap();
    gw.signal("HUP");
    let mut limited = false;
    for _ in 0..100 {
        if gw.chat(&[]).await.status == 429 {
            limited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(limited, "the reloaded limit applies to new requests");
    // Invalid: refused, logged, the previous config keeps serving.
    std::fs::write(
        &gw.config_path,
        "[[limits]]\nname = \"broken\"\nkey = \"nobody\"\n",
    )
    .unwrap();
    gw.signal("HUP");
    let start = std::time::Instant::now();
    while !gw.logs.text().contains("config reload refused") {
        assert!(
            start.elapsed() < DEADLINE,
            "no refusal logged:\n{}",
            gw.logs.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = gw.chat(&[]).await;
    assert_eq!(r.status, 429);
    assert!(r.error()["message"]
        .as_str()
        .unwrap()
        .contains("'reloaded'"));
}

/// Reads one response with a `content-length` body from a keep-alive connection.
async fn read_response(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn sigterm_loses_no_request_of_a_keep_alive_client() {
    use tokio::io::AsyncWriteExt;
    let emu = Emulator::start().await;
    let mut gw = Gateway::start(
        &emu.url(),
        "[server]\nshutdown_grace = \"20s\"\nheader_read_timeout = \"3s\"\n",
    )
    .await;
    let request = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(request).await.unwrap();
        assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
        clients.push(s);
    }
    gw.signal("TERM");
    let admin = format!("http://{}/readyz", gw.admin);
    while send(&http1(), http::Method::GET, &admin, &[], Bytes::new())
        .await
        .status
        != 503
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Each client's next request, on its old connection, is answered, and told to go.
    for s in &mut clients {
        s.write_all(request).await.unwrap();
        let text = read_response(s).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("connection: close"), "{text}");
    }
    assert_eq!(gw.exit_code().await, Some(0));
}

/// `server.header_read_timeout` times the wait for each request head of an HTTP/1.1
/// connection: from its start, and from the end of each response. A request served for
/// longer than that keeps its connection; a connection that then waits for a head, idle or
/// with half a head, is closed.
#[tokio::test]
async fn a_keep_alive_connection_waits_the_header_read_timeout_for_each_head() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[server]\nheader_read_timeout = \"1s\"\n").await;
    let chat = |extra: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{CHAT_BODY}",
            CHAT_BODY.len()
        )
    };
    let closed_without_a_byte = |mut s: tokio::net::TcpStream| async move {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the connection was never closed");
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    };

    // Answered after 2.5 s, more than twice the timeout: the connection serves it whole,
    // then the next request.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(chat("x-emu-header-delay-ms: 2500\r\n").as_bytes())
        .await
        .unwrap();
    let slow = read_response(&mut s).await;
    assert!(slow.starts_with("HTTP/1.1 200"), "{slow}");
    assert!(slow.contains("chat.completion"), "{slow}");
    s.write_all(chat("").as_bytes()).await.unwrap();
    let next = read_response(&mut s).await;
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");
    // Then idle: closed.
    closed_without_a_byte(s).await;

    // Half a head after a served request: closed, without an answer.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(chat("").as_bytes()).await.unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    closed_without_a_byte(s).await;

    assert_eq!(gw.get("/v1/models").await.status, 200);
}

#[tokio::test]
async fn a_stream_still_open_when_the_grace_ends_gets_the_shutting_down_event() {
    let emu = Emulator::start().await;
    let mut gw = Gateway::start(&emu.url(), "[server]\nshutdown_grace = \"1s\"\n").await;
    let mut streams = Vec::new();
    for client in [http1(), h2c()] {
        let req = http::Request::post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("x-emu-stream-events", "1000")
            .header("x-emu-stream-interval-ms", "100")
            .body(Full::new(Bytes::from(
                r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
            )))
            .unwrap();
        let resp = tokio::time::timeout(DEADLINE, client.request(req))
            .await
            .unwrap()
            .unwrap();
        let mut body = resp.into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        streams.push((client, body));
    }
    gw.signal("TERM");
    // The HTTP/2 connection gets GOAWAY: soon no new stream starts on it (the client
    // would need a new connection, and the listener is closed).
    let start = std::time::Instant::now();
    loop {
        let late = http::Request::get(gw.url("/v1/models"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if tokio::time::timeout(DEADLINE, streams[1].0.request(late))
            .await
            .unwrap()
            .is_err()
        {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the HTTP/2 connection never got GOAWAY"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (_, body) in streams {
        let rest = tokio::time::timeout(DEADLINE, body.collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        let text = String::from_utf8_lossy(&rest);
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        assert!(last.starts_with("data: {\"error\":"), "{last}");
        assert!(last.contains("\"code\":\"shutting_down\""), "{last}");
    }
    assert_eq!(gw.exit_code().await, Some(0));
}

/// Waits until the gateway logs that it applied a reload (the `n`th).
async fn reloaded(gw: &Gateway, n: usize) {
    let start = std::time::Instant::now();
    while gw.logs.text().matches("config reloaded").count() < n {
        assert!(start.elapsed() < DEADLINE, "no reload:\n{}", gw.logs.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_reload_keeps_what_did_not_change() {
    let emu = Emulator::start().await;
    let five = "[[limits]]\nname = \"five\"\nkey = \"global\"\nrequests = \"5/min\"\n";
    let mut gw = Gateway::start(&emu.url(), five).await;
    for i in 0..5 {
        assert_eq!(gw.get("/v1/models").await.status, 200, "request {i}");
    }
    assert_eq!(gw.get("/v1/models").await.status, 429);
    let connections = |emu: &Emulator| {
        let url = format!("http://{}/__emu/connections", emu.addr);
        async move {
            send(&http1(), http::Method::GET, &url, &[], Bytes::new())
                .await
                .json()["accepted"]
                .as_u64()
                .unwrap()
        }
    };
    let before = connections(&emu).await;
    // The same file again: the used-up policy stays used up, the upstream pool stays.
    gw.signal("HUP");
    reloaded(&gw, 1).await;
    let r = gw.get("/v1/models").await;
    assert_eq!(r.status, 429, "still refused after the reload");
    assert_eq!(r.error()["code"], "rate_limited");
    assert_eq!(gw.chat(&[]).await.status, 429);
    // A changed policy starts fresh.
    std::fs::write(&gw.config_path, five.replace("5/min", "6/min")).unwrap();
    gw.signal("HUP");
    reloaded(&gw, 2).await;
    assert_eq!(
        gw.get("/v1/models").await.status,
        200,
        "a changed policy starts fresh"
    );
    // One more: this question's own connection to the emulator.
    assert_eq!(
        connections(&emu).await,
        before + 1,
        "the upstream's pooled connection was kept across both reloads"
    );
    gw.signal("TERM");
    assert_eq!(gw.exit_code().await, Some(0));
}

#[tokio::test]
async fn a_reload_keeps_the_concurrency_count_of_streams_in_flight() {
    let emu = Emulator::start().await;
    let config = "[[limits]]\nname = \"two\"\nkey = \"global\"\nconcurrency = 2\n";
    let gw = Gateway::start(&emu.url(), config).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let req = http::Request::post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("x-emu-stream-events", "1000")
            .header("x-emu-stream-interval-ms", "100")
            .body(Full::new(Bytes::from(
                r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
            )))
            .unwrap();
        let client = http1();
        let resp = tokio::time::timeout(DEADLINE, client.request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        held.push((client, resp));
    }
    assert_eq!(gw.chat(&[]).await.status, 429);
    gw.signal("HUP");
    reloaded(&gw, 1).await;
    let r = gw.chat(&[]).await;
    assert_eq!(
        r.status, 429,
        "two streams still in flight after the reload"
    );
    assert_eq!(r.error()["code"], "concurrency_limited");
    // The streams end: their slots go back to the state they were taken from.
    drop(held);
    let start = std::time::Instant::now();
    while gw.chat(&[]).await.status != 200 {
        assert!(start.elapsed() < DEADLINE, "the slots never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.chat(&[]).await.status, 200);
}

//! What a hostile client tries against the real binary: switching a policy off with a
//! content type or a path spelling, escaping the upstream prefix, exhausting memory or
//! places with slow or huge bodies, abusing HTTP/2, and losing requests in a deploy.
//! docs/security.md lists what ezgate defends against; every attack there is driven here.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// Content types a client may send with a JSON body, none of which may skip inspection.
const CONTENT_TYPES: [Option<&str>; 6] = [
    Some("application/json"),
    Some("application/JSON"),
    Some("application/json; charset=utf-8"),
    None,
    Some("text/plain"),
    Some("application/x-www-form-urlencoded"),
];

fn with_type<'a>(ctype: Option<&'a str>, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h: Vec<(&str, &str)> = ctype.map(|c| ("content-type", c)).into_iter().collect();
    h.extend_from_slice(extra);
    h
}

#[tokio::test]
async fn no_content_type_switches_off_a_model_allow_list() {
    let emu = Emulator::start().await;
    let config = format!(
        "[upstream]\napi_key = \"${{ORG_KEY}}\"\n\n[[clients]]\nname = \"mini-only\"\nkey_sha256 = \"{}\"\nmodels = [\"gpt-4o-mini\"]\n",
        sha256_hex("key-mini")
    );
    let gw = Gateway::start_env(&emu.url(), &config, &[("ORG_KEY", "sk-org")]).await;
    let auth = ("authorization", "Bearer key-mini");
    for ctype in CONTENT_TYPES {
        let r = gw
            .post(
                "/v1/chat/completions",
                &with_type(ctype, &[auth]),
                r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}]}"#,
            )
            .await;
        assert_eq!(r.status, 403, "content type {ctype:?}");
        assert_eq!(r.error()["code"], "model_not_allowed");
        let r = gw
            .post(
                "/v1/chat/completions",
                &with_type(ctype, &[auth]),
                r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
            )
            .await;
        assert_eq!(r.status, 200, "content type {ctype:?}");
    }
    // A body the allow-list cannot read is refused, never waved through.
    for body in [
        "model=gpt-4.1",
        "",
        "[{\"model\":\"gpt-4o-mini\"}]",
        "{\"model\":\"gpt-4o-mini\"",
    ] {
        let r = gw
            .post(
                "/v1/chat/completions",
                &[("content-type", "application/x-www-form-urlencoded"), auth],
                body.to_owned(),
            )
            .await;
        assert_eq!(r.status, 400, "{body:?}");
        assert_eq!(r.error()["code"], "bad_request");
    }
    // Audio transcriptions name their model in a multipart form.
    let form = |model: &str| {
        format!("--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--b0undary--\r\n")
    };
    let multipart = ("content-type", "multipart/form-data; boundary=b0undary");
    let r = gw
        .post(
            "/v1/audio/transcriptions",
            &[multipart, auth],
            form("whisper-1"),
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error()["code"], "model_not_allowed");
    let r = gw
        .post(
            "/v1/audio/transcriptions",
            &[multipart, auth],
            form("gpt-4o-mini"),
        )
        .await;
    assert_eq!(r.status, 200, "forwarded");
    let r = gw
        .post(
            "/v1/audio/transcriptions",
            &[("content-type", "audio/wav"), auth],
            "RIFF",
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(
        emu.log()
            .await
            .iter()
            .all(|e| !e["headers"].to_string().contains("gpt-4.1")),
        "gpt-4.1 never reached the upstream"
    );
}

#[tokio::test]
async fn no_content_type_switches_off_a_model_or_token_policy() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[[limits]]\nname = \"one-per-model\"\nkey = \"model\"\nrequests = \"1/min\"\n\n[[limits]]\nname = \"tpm\"\nkey = \"global\"\ntokens = \"20000/min\"\nmatch = { models = [\"gpt-4o-mini\"] }\n",
    )
    .await;
    let mut admitted = 0;
    for ctype in CONTENT_TYPES {
        let r = gw
            .post(
                "/v1/chat/completions",
                &with_type(ctype, &[]),
                r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}]}"#,
            )
            .await;
        admitted += u32::from(r.status == 200);
    }
    assert_eq!(
        admitted, 1,
        "one request per minute for gpt-4.1, whatever the content type"
    );
    let mut admitted = 0;
    for (i, ctype) in CONTENT_TYPES.iter().cycle().take(10).enumerate() {
        let r = gw
            .post(
                "/v1/chat/completions",
                &with_type(*ctype, &[("x-emu-stream-events", "3")]),
                format!(r#"{{"model":"gpt-4o-mini","stream":true,"max_tokens":50000,"messages":[{{"role":"user","content":"{i}"}}]}}"#),
            )
            .await;
        admitted += u32::from(r.status == 200);
    }
    // The first 50k-token estimate drains the 20k bucket (a request larger than the bucket
    // is admitted when it is full); its small real use then leaves room for none of the rest.
    assert!(
        admitted <= 1 + 1,
        "{admitted} of ten 50k-token streams admitted"
    );
}

#[tokio::test]
async fn paths_are_routed_and_forwarded_in_their_canonical_form() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &format!("{}/prefix", emu.url()),
        "[[limits]]\nname = \"chat\"\nkey = \"global\"\nrequests = \"1/min\"\nmatch = { routes = [\"/v1/chat/completions\"] }\n",
    )
    .await;
    // Escapes from the upstream prefix never leave ezgate.
    for path in [
        "/../admin",
        "/v1/../../admin",
        "/%2e%2e/admin",
        "/v1/..%2f..%2fadmin",
        "/v1\\..\\admin",
        "/v1/%00",
    ] {
        let raw_req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let out = raw(gw.addr, raw_req.as_bytes(), DEADLINE).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400"), "{path}: {text}");
        assert!(text.contains("\"code\":\"bad_request\""), "{path}: {text}");
    }
    let out = raw(
        gw.addr,
        b"OPTIONS * HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        DEADLINE,
    )
    .await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"));
    assert!(
        emu.log().await.is_empty(),
        "nothing reached the upstream: {:?}",
        emu.log().await
    );
    // What is forwarded is the canonical path under the prefix.
    let r = gw
        .get_with(
            "//inspect/./x/../%61?q=%2e%2e",
            &[("x-request-id", "canon")],
        )
        .await;
    assert_eq!(
        r.status, 404,
        "the emulator serves /inspect at its root only"
    );
    assert_eq!(
        emu.entry("canon").await.unwrap()["uri"],
        "/prefix/inspect/a?q=%2e%2e"
    );
    // One request a minute to the chat route, however it is spelled.
    let mut statuses = Vec::new();
    for path in [
        "/v1/chat/completions",
        "//v1/chat/completions",
        "/v1/./chat/completions",
        "/v1/%63hat/completions",
        "/v1/chat//completions/",
    ] {
        statuses.push(
            gw.post(path, &[("content-type", "application/json")], CHAT_BODY)
                .await
                .status
                .as_u16(),
        );
    }
    assert_eq!(
        statuses,
        [404, 429, 429, 429, 429],
        "the first reaches the emulator under /prefix (404 there)"
    );
}

/// The peak resident memory of a process, from the kernel.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn bodies_at_the_limit_cost_memory_in_proportion() {
    const LIMIT: usize = 8 << 20;
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[server]\nmax_request_body = \"8MiB\"\n\n[[limits]]\nname = \"tpm\"\nkey = \"global\"\ntokens = \"100000000/min\"\n",
    )
    .await;
    let pid = gw.child.id().unwrap();
    let before = peak_rss(pid);
    // Streamed chat requests whose prompt fills the limit: read, inspected, spliced.
    let text = "word ".repeat((LIMIT - 200) / 5);
    let body = format!(
        r#"{{"model":"gpt-4o","stream":true,"messages":[{{"role":"user","content":"{text}"}}]}}"#
    );
    assert!(body.len() <= LIMIT);
    let body = Bytes::from(body);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = gw.url("/v1/chat/completions");
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            send(
                &http1(),
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                body,
            )
            .await
            .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let peak = peak_rss(pid);
    eprintln!("peak {} MiB, before {} MiB", peak >> 20, before >> 20);
    let margin = 48 << 20;
    assert!(
        peak < before.max(16 << 20) + 4 * LIMIT as u64 + margin,
        "four 8 MiB bodies at once peaked at {} MiB (started at {} MiB)",
        peak >> 20,
        before >> 20
    );
}

#[tokio::test]
async fn a_stalled_body_gets_408_and_its_place_back() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[server]\nmax_inflight = 4\nrequest_body_timeout = \"500ms\"\n\n[[limits]]\nname = \"tpm\"\nkey = \"global\"\ntokens = \"100000/min\"\n",
    )
    .await;
    // Buffered (a token policy reads chat bodies) and streamed (an upload) bodies alike.
    let mut stalled = Vec::new();
    for (i, path) in [
        "/v1/chat/completions",
        "/v1/files",
        "/v1/chat/completions",
        "/v1/audio/speech",
    ]
    .iter()
    .enumerate()
    {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-request-id: stall-{i}\r\ncontent-length: 1000\r\n\r\n{{\"model\":"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        stalled.push(s);
    }
    for (i, s) in stalled.iter_mut().enumerate() {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 408"), "stall-{i}: {text}");
        assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    }
    // A client that leaves in the middle of its body (its connection reset): a 499, the
    // client's. (One that only closes its side gets a 400: it may still read.)
    for (i, path) in ["/v1/chat/completions", "/v1/files"].iter().enumerate() {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nx-request-id: gone-{i}\r\ncontent-length: 1000\r\n\r\n{{\"model\":"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.set_zero_linger().unwrap();
        drop(s);
        assert_eq!(gw.access_log(&format!("gone-{i}")).await["status"], 499);
    }
    // Their places are free again, and nothing was blamed on the upstream.
    assert_eq!(gw.chat(&[]).await.status, 200);
    let m = gw.settled_metrics().await;
    for kind in ["connect", "tls", "timeout", "reset", "protocol"] {
        assert_eq!(
            metric_value(
                &m,
                &format!("ezgate_upstream_failures_total{{kind=\"{kind}\"}}")
            ),
            0.0,
            "{kind}"
        );
    }
    assert_eq!(
        metric_value(&m, "ezgate_gateway_errors_total{code=\"request_timeout\"}"),
        4.0
    );
}

#[tokio::test]
async fn heads_hyper_refuses_get_the_schema_and_are_counted() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let malformed = raw(
        gw.addr,
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n",
        DEADLINE,
    )
    .await;
    let big = format!(
        "GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let oversized = raw(gw.addr, big.as_bytes(), DEADLINE).await;
    for (out, status, code) in [
        (malformed, 400, "bad_request"),
        (oversized, 431, "headers_too_large"),
    ] {
        let text = String::from_utf8_lossy(&out).into_owned();
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        crate::schema::assert_valid(&v);
        assert_eq!(v["error"]["code"], code);
        assert_eq!(v["error"]["status"], status);
    }
    let m = gw.settled_metrics().await;
    for status in ["400", "431"] {
        assert_eq!(
            metric_value(&m, &format!("ezgate_requests_total{{method=\"other\",route=\"other\",source=\"gateway\",status=\"{status}\"}}")),
            1.0,
            "{status}"
        );
    }
}

/// An HTTP/2 client connection made with the h2 crate, its connection driven in a task.
async fn h2_client(
    addr: std::net::SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    (send, tokio::spawn(conn))
}

fn h2_request(path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut r = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(()).unwrap()
}

#[tokio::test]
async fn idle_http2_connections_are_closed_like_http1_ones() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[server]\nheader_read_timeout = \"1s\"\n").await;
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(h2_client(gw.addr).await);
    }
    // One does a request, then goes quiet too.
    let (send, _) = &mut conns[0];
    let mut send = send.clone().ready().await.unwrap();
    let (resp, mut body) = send
        .send_request(h2_request("/v1/chat/completions", &[]), false)
        .unwrap();
    body.send_data(Bytes::from_static(CHAT_BODY.as_bytes()), true)
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    for (_, conn) in conns {
        let closed = tokio::time::timeout(DEADLINE, conn).await;
        assert!(
            closed.is_ok(),
            "an idle HTTP/2 connection is closed by ezgate"
        );
    }
}

#[tokio::test]
async fn a_client_resetting_accepted_streams_loses_its_connection() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let (send, conn) = h2_client(gw.addr).await;
    let mut sent = 0;
    let mut refused = false;
    for i in 0..400 {
        let Ok(mut send) = send.clone().ready().await else {
            refused = true;
            break;
        };
        let rid = format!("reset-{i}");
        let Ok((resp, mut body)) = send.send_request(
            h2_request(
                "/v1/chat/completions",
                &[("x-emu-header-delay-ms", "10000"), ("x-request-id", &rid)],
            ),
            false,
        ) else {
            refused = true;
            break;
        };
        if body
            .send_data(Bytes::from_static(CHAT_BODY.as_bytes()), true)
            .is_err()
        {
            refused = true;
            break;
        }
        sent += 1;
        // Accepted: the emulator has the request. Then the client cancels it.
        let start = std::time::Instant::now();
        while emu.entry(&rid).await.is_none() && start.elapsed() < DEADLINE {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(resp);
        body.send_reset(h2::Reason::CANCEL);
    }
    assert!(
        refused,
        "the connection was closed after {sent} reset streams"
    );
    assert!(
        (150..=260).contains(&sent),
        "GOAWAY after about 200 resets, not {sent}"
    );
    assert!(tokio::time::timeout(DEADLINE, conn).await.is_ok());
    // The line is written as the GOAWAY goes out; it reaches the log reader a little later.
    let start = std::time::Instant::now();
    while !gw.logs.text().contains("reset too many streams") {
        assert!(start.elapsed() < DEADLINE, "{}", gw.logs.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn one_upstream_retry_after_holds_a_key_back_at_most_max_retry_after() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[upstream]\nmax_retry_after = \"1s\"\n").await;
    let r = gw
        .chat(&[("x-emu-status", "429"), ("x-emu-retry-after", "86400")])
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.header("retry-after"),
        Some("86400"),
        "the upstream's own header is kept"
    );
    let r = gw.chat(&[]).await;
    assert_eq!(r.status, 429);
    let e = r.error();
    assert_eq!(e["code"], "upstream_rate_limited");
    assert!(e["retry_after_ms"].as_u64().unwrap() <= 1000, "{e}");
    let start = std::time::Instant::now();
    while gw.chat(&[]).await.status != 200 {
        assert!(
            start.elapsed() < DEADLINE,
            "held back for longer than max_retry_after"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check_config(config: &str, env: &[(&str, &str)]) -> std::process::Output {
    let path = scratch_dir().join("ezgate.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = std::process::Command::new(bin("ezgate"));
    cmd.args(["check-config", "--config"]).arg(&path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn secrets_that_would_leak_are_refused_before_binding() {
    let out = check_config(
        "[upstream]\nbase_url = \"https://user:hunter2@api.example.com/v1\"\n",
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("upstream.base_url") && stderr.contains("credentials"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2") && !stderr.contains("user:"),
        "{stderr}"
    );
    let out = check_config(
        "[upstream]\napi_key = \"${EZ_TEST_KEY}\"\n",
        &[("EZ_TEST_KEY", "sk-abc\r\nx-injected: 1")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("upstream.api_key"), "{stderr}");
    assert!(
        !stderr.contains("sk-abc") && !stderr.contains("x-injected"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_idle_http2_client_that_never_answers_is_closed_at_the_header_read_timeout() {
    // A raw client: the preface and its SETTINGS, then it reads and never answers (no
    // SETTINGS ack, no PING answer). Without a bound of its own, the GOAWAY's PING waits
    // for ever and only the keep-alive (a ping after 20 s, 20 s to answer) closes it.
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[server]\nheader_read_timeout = \"1s\"\n").await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got)).await;
    assert!(
        closed.is_ok(),
        "an idle HTTP/2 connection is closed soon after server.header_read_timeout, not by the keep-alive"
    );
    // The frames ezgate sent: a GOAWAY (type 7) among them.
    let mut types = Vec::new();
    let mut at = 0;
    while let Some(head) = got.get(at..at + 9) {
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        types.push(head[3]);
        at += 9 + len;
    }
    assert!(
        types.contains(&7),
        "GOAWAY before the close; frames: {types:?}"
    );
}

/// An HTTP/2 connection from the loopback address `source` (127.0.0.1 and 127.0.0.2 are two
/// client addresses on Linux).
async fn h2_client_from(
    addr: std::net::SocketAddr,
    source: [u8; 4],
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    (send, tokio::spawn(conn))
}

const STREAMED_CHAT: &str =
    r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// The body of an HTTP/2 response, whole.
async fn h2_body(resp: http::Response<h2::RecvStream>) -> Vec<u8> {
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = tokio::time::timeout(DEADLINE, body.data()).await.unwrap() {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    out
}

/// Opens streams on one connection, 50 at a time, and resets each once its response head
/// shows that ezgate accepted it (and sent it upstream), until the connection takes no
/// more streams. Returns the streams reset and the streams refused with 503 `overloaded`.
async fn reset_until_refused(send: h2::client::SendRequest<Bytes>) -> (usize, usize) {
    let (mut reset, mut refused) = (0, 0);
    loop {
        let mut pending = Vec::new();
        for _ in 0..50 {
            let Ok(mut s) = send.clone().ready().await else {
                break;
            };
            let req = h2_request(
                "/v1/chat/completions",
                &[("x-emu-stream-interval-ms", "10000")],
            );
            let Ok((resp, mut body)) = s.send_request(req, false) else {
                break;
            };
            if body
                .send_data(Bytes::from_static(STREAMED_CHAT.as_bytes()), true)
                .is_err()
            {
                break;
            }
            pending.push((resp, body));
        }
        if pending.is_empty() {
            return (reset, refused);
        }
        for (resp, mut body) in pending {
            match tokio::time::timeout(DEADLINE, resp)
                .await
                .expect("ezgate answers every stream it accepted")
            {
                Ok(r) if r.status() == 200 => {
                    body.send_reset(h2::Reason::CANCEL);
                    reset += 1;
                }
                Ok(r) => {
                    assert_eq!(r.status(), 503);
                    let v: serde_json::Value = serde_json::from_slice(&h2_body(r).await).unwrap();
                    assert_eq!(v["error"]["code"], "overloaded", "{v}");
                    assert!(
                        v["error"]["message"]
                            .as_str()
                            .unwrap()
                            .contains("reset more than 1000 accepted HTTP/2 streams"),
                        "{v}"
                    );
                    refused += 1;
                }
                // Refused by the connection's GOAWAY before ezgate took it.
                Err(_) => {}
            }
        }
    }
}

/// A POST of `body` on a new connection from `source`: its status, or `None` when the
/// connection took no stream.
async fn h2_post_from(gw: &Gateway, source: [u8; 4], body: &'static str) -> Option<u16> {
    let (send, _conn) = h2_client_from(gw.addr, source).await;
    h2_post(&send, body).await
}

/// A POST of `body` on an open connection: its status, or `None` when it took no stream.
async fn h2_post(send: &h2::client::SendRequest<Bytes>, body: &'static str) -> Option<u16> {
    let mut send = send.clone().ready().await.ok()?;
    let (resp, mut stream) = send
        .send_request(h2_request("/v1/chat/completions", &[]), false)
        .ok()?;
    stream
        .send_data(Bytes::from_static(body.as_bytes()), true)
        .ok()?;
    let resp = tokio::time::timeout(DEADLINE, resp).await.unwrap().ok()?;
    let status = resp.status().as_u16();
    h2_body(resp).await;
    Some(status)
}

#[tokio::test]
async fn an_address_resetting_streams_over_many_connections_is_refused_for_a_while() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    // Another connection of the same address, kept open by a stream that stays open.
    let (bystander, _bystander_conn) = h2_client_from(gw.addr, [127, 0, 0, 1]).await;
    let mut send = bystander.clone().ready().await.unwrap();
    let (open, mut open_body) = send
        .send_request(
            h2_request(
                "/v1/chat/completions",
                &[("x-emu-stream-interval-ms", "60000")],
            ),
            false,
        )
        .unwrap();
    open_body
        .send_data(Bytes::from_static(STREAMED_CHAT.as_bytes()), true)
        .unwrap();
    let _open = tokio::time::timeout(DEADLINE, open).await.unwrap().unwrap();
    // Reconnecting after each GOAWAY, as the attack does.
    let flood = async {
        let (mut resets, mut refused, mut connections) = (0, 0, 0);
        while refused == 0 && connections < 30 {
            let (send, _conn) = h2_client_from(gw.addr, [127, 0, 0, 1]).await;
            let (r, x) = reset_until_refused(send).await;
            resets += r;
            refused += x;
            connections += 1;
        }
        (resets, refused, connections)
    };
    let (resets, refused, connections) = tokio::time::timeout(Duration::from_secs(180), flood)
        .await
        .expect("the flood ends");
    assert!(
        refused > 0,
        "after {resets} resets over {connections} connections the address's streams are refused"
    );
    assert!(
        connections > 1,
        "the count spans connections ({connections})"
    );
    // Every stream reset had gone upstream; past the limit, no more do.
    let upstream = emu.log().await.len();
    assert!(
        (1002..=1201).contains(&upstream),
        "{upstream} upstream requests for {resets} resets (and the bystander's)"
    );
    // The address's connection that was open all along refuses its new streams too.
    assert_eq!(h2_post(&bystander, CHAT_BODY).await, Some(503));
    // A new connection from the same address: refused, not sent upstream.
    let status = h2_post_from(&gw, [127, 0, 0, 1], CHAT_BODY).await;
    assert!(
        matches!(status, None | Some(503)),
        "a penalized address's stream: {status:?}"
    );
    assert_eq!(
        emu.log().await.len(),
        upstream,
        "nothing more went upstream"
    );
    // Another address is unaffected.
    assert_eq!(
        h2_post_from(&gw, [127, 0, 0, 2], CHAT_BODY).await,
        Some(200)
    );
    assert_eq!(emu.log().await.len(), upstream + 1);
    // One log line for the penalty, not one per stream.
    let line = "reset too many accepted streams over its connections";
    let start = std::time::Instant::now();
    while !gw.logs.text().contains(line) {
        assert!(start.elapsed() < DEADLINE, "{}", gw.logs.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.logs.text().matches(line).count(), 1);
}

#[tokio::test]
async fn the_organizations_key_echoed_by_the_upstream_never_leaves_ezgate() {
    const ORG_KEY: &str = "sk-org/Echo+key=0123456789";
    const ORG_KEY_URL: &str = "sk-org%2FEcho%2Bkey%3D0123456789";
    const REDACTED: &str = "[organization key redacted]";
    let emu = Emulator::start().await;
    let spans = crate::tracing::Receiver::start().await;
    let config = format!(
        "{}[upstream]\napi_key = \"${{ORG_KEY}}\"\n\n[[clients]]\nname = \"team-a\"\nkey_sha256 = \"{}\"\n",
        spans.config("1.0"),
        sha256_hex("client-key")
    );
    let gw = Gateway::start_env(&emu.url(), &config, &[("ORG_KEY", ORG_KEY)]).await;
    let leaks = |text: &str| text.contains(ORG_KEY) || text.contains(ORG_KEY_URL);
    for (shape, encoding) in [
        ("openai", None),
        ("errors", Some("gzip")),
        ("text", None),
        ("html", Some("br")),
        ("detail-object", None),
    ] {
        let rid = format!("echo-{shape}");
        let mut headers = vec![
            ("authorization", "Bearer client-key"),
            ("content-type", "application/json"),
            ("x-request-id", rid.as_str()),
            ("x-emu-status", "401"),
            ("x-emu-body", shape),
            ("x-emu-code", "invalid_api_key"),
            ("x-emu-echo-key", "1"),
        ];
        headers.extend(encoding.map(|e| ("x-emu-encoding", e)));
        let r = gw.post("/v1/chat/completions", &headers, CHAT_BODY).await;
        assert_eq!(r.status, 401, "{shape}");
        let e = r.error();
        let body = String::from_utf8_lossy(&r.body);
        assert!(!leaks(&body), "{shape}: {body}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains(&format!("Incorrect API key provided: {REDACTED}.")),
            "{shape}: {e}"
        );
        for (name, value) in &r.headers {
            assert!(!leaks(&String::from_utf8_lossy(value.as_bytes())), "{name}");
        }
        assert_eq!(
            r.header("x-emu-seen-key"),
            Some(format!("Bearer {REDACTED}").as_str())
        );
        let line = gw.access_log(&rid).await.to_string();
        assert!(!leaks(&line), "{shape}: {line}");
        let span = spans.span(&rid).await.to_string();
        assert!(!leaks(&span), "{shape}: {span}");
        // The upstream did receive the key it echoed.
        let entry = emu.entry(&rid).await.unwrap();
        assert_eq!(
            logged_header(&entry, "authorization"),
            Some(format!("Bearer {ORG_KEY}").as_str())
        );
    }
    // The access log's code is the upstream's, redacted.
    assert_eq!(
        gw.access_log("echo-openai").await["code"],
        format!("invalid_api_key {REDACTED}")
    );
    // A success that echoes it in a header and as its model: the header is redacted, the
    // body passes byte for byte (2xx), the model the log and the span show is redacted.
    let r = gw
        .chat(&[
            ("authorization", "Bearer client-key"),
            ("x-request-id", "echo-ok"),
            ("x-emu-echo-key", "1"),
        ])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-emu-seen-key"),
        Some(format!("Bearer {REDACTED}").as_str())
    );
    assert_eq!(r.json()["model"], ORG_KEY, "2xx bodies pass as they are");
    let span = spans.span("echo-ok").await;
    assert_eq!(span["attributes"]["gen_ai.response.model"], REDACTED);
    assert!(!leaks(&span.to_string()), "{span}");
    // Without a model in the request, the log's model is the response's.
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                ("authorization", "Bearer client-key"),
                ("content-type", "application/json"),
                ("x-request-id", "echo-no-model"),
                ("x-emu-echo-key", "1"),
            ],
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.access_log("echo-no-model").await["model"], REDACTED);
    assert!(!leaks(&gw.logs.text()), "{}", gw.logs.text());
}

/// The resident memory of a process now, from the kernel.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Waits until the bytes held by buffered request bodies satisfy `ok`; returns them.
async fn wait_buffered(gw: &Gateway, ok: impl Fn(f64) -> bool) -> f64 {
    let start = std::time::Instant::now();
    loop {
        let held = gw.metric("ezgate_buffered_request_bytes").await;
        if ok(held) {
            return held;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "ezgate_buffered_request_bytes stayed at {held}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A chat body of exactly `len` bytes.
fn chat_body(len: usize) -> String {
    let head = r#"{"model":"gpt-4o","messages":[{"role":"user","content":""#;
    let tail = r#""}]}"#;
    format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
}

/// A token policy: chat bodies are read whole.
const READS_BODIES: &str =
    "[[limits]]\nname = \"tpm\"\nkey = \"global\"\ntokens = \"100000000/min\"\n";

#[tokio::test]
async fn announced_lengths_cost_only_the_bytes_that_arrive() {
    const CONNS: usize = 200;
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), READS_BODIES).await;
    let pid = gw.child.id().unwrap();
    assert_eq!(gw.chat(&[]).await.status, 200);
    let before = rss(pid);
    // Each announces the largest body allowed (16 MiB) and sends 100 bytes of it.
    let first = &chat_body(200)[..100];
    let mut held = Vec::new();
    for i in 0..CONNS {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-request-id: big-{i}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{first}",
            16 << 20
        );
        s.write_all(req.as_bytes()).await.unwrap();
        held.push(s);
    }
    // Every one of them is being read: what they hold is what they sent.
    let buffered = wait_buffered(&gw, |b| b >= (CONNS * 100) as f64).await;
    assert!(
        buffered <= (CONNS * 200) as f64,
        "{buffered} bytes held for {CONNS} bodies of 100 bytes"
    );
    let now = rss(pid);
    eprintln!(
        "rss {} KiB before, {} KiB with {CONNS} announced 16 MiB bodies",
        before >> 10,
        now >> 10
    );
    assert!(
        now < before + (32 << 20),
        "{CONNS} bodies of 100 bytes announcing 16 MiB took {} MiB (from {} MiB)",
        now >> 20,
        before >> 20
    );
    // Legitimate requests pass meanwhile.
    let r = gw
        .post(
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            chat_body(4000),
        )
        .await;
    assert_eq!(r.status, 200);
    drop(held);
    wait_buffered(&gw, |b| b == 0.0).await;
}

#[tokio::test]
async fn bodies_past_max_buffered_bytes_get_503_until_memory_frees() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        &format!(
            "[server]\nmax_request_body = \"64KiB\"\nmax_buffered_bytes = \"100KiB\"\n\n{READS_BODIES}"
        ),
    )
    .await;
    // One body announces 60,000 bytes and sends 50,000 of them: it holds at least those.
    let body = chat_body(60_000);
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 60000\r\n\r\n";
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body.as_bytes()[..50_000]).await.unwrap();
    wait_buffered(&gw, |b| b >= 50_000.0).await;
    // Another whole one does not fit beside it: 503, with Retry-After, never an OOM kill.
    let whole = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-request-id: over-budget\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: 60000\r\n\r\n{body}"
    );
    let out = raw(gw.addr, whole.as_bytes(), DEADLINE).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    let lower = text.to_ascii_lowercase();
    assert!(lower.contains("\r\nretry-after: 1\r\n"), "{text}");
    assert!(lower.contains("\r\nretry-after-ms: 1000\r\n"), "{text}");
    assert!(text.contains("\"code\":\"overloaded\""), "{text}");
    assert!(text.contains("server.max_buffered_bytes"), "{text}");
    assert_eq!(gw.access_log("over-budget").await["status"], 503);
    assert_eq!(emu.entry("over-budget").await, None, "upstream not called");
    // A small body still fits.
    let small = gw
        .post(
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            chat_body(300),
        )
        .await;
    assert_eq!(small.status, 200);
    // Once the held body is gone, its memory is back and the large body passes.
    drop(slow);
    wait_buffered(&gw, |b| b == 0.0).await;
    let r = gw
        .post(
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    wait_buffered(&gw, |b| b == 0.0).await;
    // The 503's place under max_inflight was given back too.
    assert_eq!(
        gw.metric("ezgate_inflight_requests{route=\"/v1/chat/completions\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_trickled_body_meets_the_total_deadline() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        &format!(
            "[server]\nrequest_body_timeout = \"1500ms\"\nrequest_body_deadline = \"3s\"\n\n{READS_BODIES}"
        ),
    )
    .await;
    // Read whole (chat under a token policy) and streamed (an upload) alike.
    for (i, path) in ["/v1/chat/completions", "/v1/files"].iter().enumerate() {
        let s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nx-request-id: trickle-{i}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
        );
        wr.write_all(head.as_bytes()).await.unwrap();
        // A byte every 300 ms: never idle for 1.5 s, never done.
        let writer = tokio::spawn(async move {
            for _ in 0..100 {
                if wr.write_all(b" ").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        let mut out = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, async {
            let mut buf = [0u8; 4096];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        out.extend_from_slice(&buf[..n]);
                        if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}}") {
                            break;
                        }
                    }
                }
            }
        })
        .await;
        writer.abort();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 408"), "{path}: {text}");
        assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
        assert!(text.contains("server.request_body_deadline"), "{text}");
        assert_eq!(gw.access_log(&format!("trickle-{i}")).await["status"], 408);
    }
    let m = gw.settled_metrics().await;
    assert_eq!(
        metric_value(&m, "ezgate_upstream_failures_total{kind=\"timeout\"}"),
        0.0,
        "nothing blamed on the upstream"
    );
}

#[tokio::test]
async fn a_cut_short_or_malformed_body_gets_400_never_499_on_the_wire() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), READS_BODIES).await;
    let mut n = 0;
    for path in ["/v1/chat/completions", "/v1/files"] {
        // Malformed chunked framing.
        n += 1;
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nx-request-id: bad-chunk-{n}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{{\"model\":1}}\r\n0\r\n\r\n"
        );
        let out = raw(gw.addr, req.as_bytes(), DEADLINE).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400"), "{path}: {text}");
        assert!(text.contains("\"code\":\"bad_request\""), "{text}");
        assert!(text.contains("chunked"), "{text}");
        assert_eq!(
            gw.access_log(&format!("bad-chunk-{n}")).await["status"],
            400
        );
        // An upload whose client half-closes its side mid-body, and still reads.
        n += 1;
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nx-request-id: half-{n}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\":\"gpt-4o\","
        );
        s.write_all(req.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400"), "{path}: {text}");
        assert!(text.contains("\"code\":\"bad_request\""), "{text}");
        assert!(text.contains("mid-body"), "{text}");
        assert_eq!(gw.access_log(&format!("half-{n}")).await["status"], 400);
    }
    let m = gw.settled_metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "ezgate_requests_total{method=\"POST\",route=\"/v1/chat/completions\",source=\"gateway\",status=\"400\"}"
        ),
        2.0,
        "{m}"
    );
    assert!(!m.contains("status=\"499\""), "{m}");
    for kind in ["connect", "reset", "protocol"] {
        assert_eq!(
            metric_value(
                &m,
                &format!("ezgate_upstream_failures_total{{kind=\"{kind}\"}}")
            ),
            0.0
        );
    }
}

/// The lowest descriptor number a process has free (the next one it opens), once it has
/// no file open but devices, sockets and pipes and its descriptors stayed the same for
/// 300 ms: the files read at startup (trust roots) are closed, and so is anything opened
/// for a moment, so no hole opens below the number after it is read.
async fn next_fd(pid: u32) -> usize {
    let start = std::time::Instant::now();
    let (mut last, mut same) = (None, 0);
    loop {
        let open = quiet_fds(pid, start).await;
        if last.as_ref() == Some(&open) {
            same += 1;
        } else {
            same = 0;
        }
        if same == 3 {
            return (0..).find(|n| !open.contains(n)).unwrap();
        }
        last = Some(open);
        assert!(
            start.elapsed() < DEADLINE,
            "ezgate's descriptors kept changing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The descriptors a process has open, once none of them is a file but a device.
async fn quiet_fds(pid: u32, start: std::time::Instant) -> std::collections::BTreeSet<usize> {
    loop {
        let mut open = std::collections::BTreeSet::new();
        let mut reading_files = false;
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
            let Ok(entry) = entry else { continue };
            let Some(n) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            open.insert(n);
            // A descriptor gone between the listing and its link was a file opened for a
            // moment: listed, it would hide the hole it leaves.
            reading_files |= std::fs::read_link(entry.path()).map_or(true, |target| {
                target.is_absolute() && !target.starts_with("/dev")
            });
        }
        if !reading_files {
            return open;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "ezgate kept files open: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sets a process's soft limit of open files (the hard one stays: it can be raised again).
fn set_nofile(pid: u32, n: usize) {
    let ok = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={n}:"))
        .status()
        .expect("prlimit (util-linux)");
    assert!(ok.success(), "prlimit --nofile={n}:");
}

#[tokio::test]
async fn out_of_file_descriptors_is_ezgates_503_and_the_listener_survives() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let pid = gw.child.id().unwrap();
    // One descriptor left: for the client's connection, none for the upstream's.
    set_nofile(pid, next_fd(pid).await + 1);
    let mut first = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    first
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-request-id: no-fds\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = first.read(&mut buf).await {
            out.extend_from_slice(&buf[..n]);
            if n == 0 || out.ends_with(b"}}") {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("\"code\":\"overloaded\""), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"),
        "{text}"
    );
    assert!(text.contains("file descriptors"), "{text}");
    // The next connection cannot even be accepted: the listener backs off and waits.
    let second = tokio::spawn(raw(
        gw.addr,
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        DEADLINE,
    ));
    gw.wait_log("accepting connections failed").await;
    set_nofile(pid, 1024);
    let out = second.await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    gw.wait_log("accepting connections again").await;
    drop(first);
    assert_eq!(gw.access_log("no-fds").await["status"], 503);
    let m = gw.settled_metrics().await;
    assert_eq!(
        metric_value(&m, "ezgate_gateway_errors_total{code=\"overloaded\"}"),
        1.0
    );
    for kind in ["connect", "tls", "timeout", "reset", "protocol"] {
        assert_eq!(
            metric_value(
                &m,
                &format!("ezgate_upstream_failures_total{{kind=\"{kind}\"}}")
            ),
            0.0,
            "{kind}: EMFILE is not the upstream's failure"
        );
    }
    assert_eq!(gw.chat(&[]).await.status, 200);
}

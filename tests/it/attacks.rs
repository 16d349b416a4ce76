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
    // A client that leaves in the middle of its body: a 499, the client's.
    for (i, path) in ["/v1/chat/completions", "/v1/files"].iter().enumerate() {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nx-request-id: gone-{i}\r\ncontent-length: 1000\r\n\r\n{{\"model\":"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        drop(s);
        assert_eq!(gw.access_log(&format!("gone-{i}")).await["status"], 499);
    }
    // Their places are free again, and nothing was blamed on the upstream.
    assert_eq!(gw.chat(&[]).await.status, 200);
    let m = gw.metrics().await;
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
    let m = gw.metrics().await;
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
    assert!(gw.logs.text().contains("reset too many streams"));
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

//! WebSocket sessions through ezgate (the Realtime API, docs/websockets.md): a real client
//! (tokio-tungstenite; the openai SDK's realtime client too) against the emulator's
//! `/v1/realtime`.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderName, HeaderValue, Method};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::Response;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{client_async, WebSocketStream};

use crate::harness::*;

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// What a session runs on: TCP, or TLS over it.
pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Io for T {}

/// The headers of a handshake, for requests made without a WebSocket client.
const HANDSHAKE: [(&str, &str); 4] = [
    ("upgrade", "websocket"),
    ("connection", "Upgrade"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

const IDLE_REASON: &str = "no frame either way for upstream.stream_idle_timeout";

/// Opens a session through `addr`; the `101` response comes with it.
async fn connect(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, Response<Option<Vec<u8>>>), WsError> {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(DEADLINE, client_async(req, tcp))
        .await
        .expect("the handshake is answered")
}

pub(crate) async fn open(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Ws {
    let (mut ws, resp) = connect(gw.addr, path, headers)
        .await
        .unwrap_or_else(|e| panic!("handshake for {path} refused: {e:?}"));
    assert_eq!(resp.status(), 101);
    assert_eq!(recv(&mut ws).await["type"], "session.created");
    ws
}

/// The next event (text message, as JSON), skipping pings and pongs.
async fn recv<S: Io>(ws: &mut WebSocketStream<S>) -> Value {
    match next(ws).await {
        Some(Message::Text(t)) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn next<S: Io>(ws: &mut WebSocketStream<S>) -> Option<Message> {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(m)) => return Some(m),
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("a message or the end within the deadline")
}

pub(crate) async fn emit<S: Io>(ws: &mut WebSocketStream<S>, event: Value) {
    ws.send(Message::text(event.to_string())).await.unwrap();
}

/// Asks for a response and reads its events up to `response.done`, which it returns.
pub(crate) async fn respond<S: Io>(ws: &mut WebSocketStream<S>) -> (Vec<String>, Value) {
    emit(ws, json!({"type": "response.create"})).await;
    let mut types = Vec::new();
    loop {
        let e = recv(ws).await;
        let t = e["type"].as_str().unwrap().to_owned();
        types.push(t.clone());
        if t == "response.done" {
            return (types, e);
        }
    }
}

/// Reads up to the close frame ezgate (or the upstream) sent; returns its code and reason.
pub(crate) async fn close_of<S: Io>(ws: &mut WebSocketStream<S>) -> (u16, String) {
    loop {
        match next(ws).await {
            Some(Message::Close(Some(CloseFrame { code, reason }))) => {
                while next(ws).await.is_some() {}
                return (code.into(), reason.to_string());
            }
            Some(Message::Close(None)) => panic!("a close frame without a code"),
            Some(_) => {}
            None => panic!("the connection ended without a close frame"),
        }
    }
}

/// Waits until a sample of `/metrics` has the value `want`.
async fn wait_metric(gw: &Gateway, sample: &str, want: f64) {
    let start = std::time::Instant::now();
    loop {
        let text = gw.metrics().await;
        if metric_value(&text, sample) == want {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{sample} never became {want}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the emulator's log entry of `request_id` to leave `in_progress`.
async fn upstream_ended(emu: &Emulator, request_id: &str) -> Value {
    let start = std::time::Instant::now();
    loop {
        if let Some(e) = emu.entry(request_id).await {
            if e["state"] != "in_progress" {
                return e;
            }
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{request_id} never ended upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const SESSIONS: &str = "ezgate_websocket_sessions_total";

fn sessions(end: &str) -> String {
    format!("{SESSIONS}{{end=\"{end}\"}}")
}

const SWITCHED: &str = "ezgate_requests_total{method=\"GET\",route=\"/v1/realtime\",source=\"upstream\",status=\"101\"}";

#[tokio::test]
async fn a_session_end_to_end() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let (mut ws, resp) = connect(
        gw.addr,
        "/v1/realtime?model=gpt-4o-realtime-preview",
        &[
            ("x-request-id", "ws-e2e"),
            ("sec-websocket-protocol", "realtime"),
            ("sec-websocket-extensions", "permessage-deflate"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["x-request-id"], "ws-e2e");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "realtime");
    let created = recv(&mut ws).await;
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["session"]["model"], "gpt-4o-realtime-preview");
    let (types, done) = respond(&mut ws).await;
    assert_eq!(
        types,
        [
            "response.created",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.done"
        ]
    );
    assert_eq!(done["response"]["usage"]["output_tokens"], 5);
    // Whatever the size, both ways, text and binary.
    let big = "x".repeat(200_000);
    emit(&mut ws, json!({"type": "emu.echo", "payload": big})).await;
    assert_eq!(
        recv(&mut ws).await["payload"].as_str().unwrap().len(),
        200_000
    );
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(next(&mut ws).await, Some(Message::binary(vec![1u8, 2, 3])));
    // The client ends the session.
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .unwrap();
    while next(&mut ws).await.is_some() {}

    // The upstream got the handshake with its upgrade headers, and the client's close.
    let e = upstream_ended(&emu, "ws-e2e").await;
    assert_eq!(e["state"], "completed", "{e}");
    assert_eq!(e["ws_close"], json!({"code": 1000, "reason": "done"}));
    assert_eq!(logged_header(&e, "upgrade"), Some("websocket"));
    assert_eq!(logged_header(&e, "connection"), Some("upgrade"));
    assert_eq!(logged_header(&e, "sec-websocket-version"), Some("13"));
    assert!(logged_header(&e, "sec-websocket-key").is_some());
    assert_eq!(
        logged_header(&e, "sec-websocket-protocol"),
        Some("realtime")
    );
    assert_eq!(
        logged_header(&e, "sec-websocket-extensions"),
        None,
        "no compression: the events stay readable"
    );
    // Counted once, when it ended.
    wait_metric(&gw, &sessions("client_closed"), 1.0).await;
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, SWITCHED), 1.0);
    assert_eq!(metric_value(&m, &sessions("upstream_closed")), 0.0);
    let bytes_in = metric_value(
        &m,
        "ezgate_websocket_bytes_total{direction=\"to_upstream\"}",
    );
    let bytes_out = metric_value(&m, "ezgate_websocket_bytes_total{direction=\"to_client\"}");
    assert_eq!(
        metric_value(&m, "ezgate_inflight_requests{route=\"/v1/realtime\"}"),
        0.0
    );
    let log = gw.access_log("ws-e2e").await;
    assert_eq!(log["status"], 101);
    assert_eq!(log["route"], "/v1/realtime");
    assert_eq!(log["session_end"], "client_closed");
    assert_eq!(log["prompt_tokens"], 10);
    assert_eq!(log["completion_tokens"], 5);
    assert!(log["bytes_in"].as_u64().unwrap() > 200_000, "{log}");
    assert!(log["bytes"].as_u64().unwrap() > 200_000, "{log}");
    assert_eq!(log["bytes_in"].as_u64().unwrap() as f64, bytes_in);
    assert_eq!(log["bytes"].as_u64().unwrap() as f64, bytes_out);
}

#[tokio::test]
async fn a_session_over_a_tls_upstream() {
    let pki = crate::tls::make_pki();
    let emu = Emulator::start_tls(&pki.cert, &pki.key).await;
    let config = format!("[upstream]\nca_file = {:?}\n", pki.ca.display().to_string());
    let gw = Gateway::start(&emu.url(), &config).await;
    let mut ws = open(&gw, "/v1/realtime?model=gpt-realtime", &[]).await;
    let (_, done) = respond(&mut ws).await;
    assert_eq!(done["response"]["usage"]["input_tokens"], 10);
    emit(
        &mut ws,
        json!({"type": "emu.close", "code": 1000, "reason": "bye"}),
    )
    .await;
    assert_eq!(close_of(&mut ws).await, (1000, "bye".into()));
    wait_metric(&gw, &sessions("upstream_closed"), 1.0).await;
}

#[tokio::test]
async fn a_session_over_the_tls_listener() {
    let pki = crate::tls::make_pki();
    let emu = Emulator::start_tls(&pki.cert, &pki.key).await;
    let config = format!(
        "[server]\ntls = {{ cert = {:?}, key = {:?} }}\n\n[upstream]\nca_file = {:?}\n",
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
        pki.ca.display().to_string()
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    // wss:// as a WebSocket client does it: TLS with ALPN http/1.1, then the handshake.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(pki.ca_der.clone()))
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let url = format!(
        "wss://localhost:{}/v1/realtime?model=gpt-realtime",
        gw.addr.port()
    );
    let (mut ws, resp) = tokio::time::timeout(DEADLINE, client_async(url, stream))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(recv(&mut ws).await["type"], "session.created");
    let (_, done) = respond(&mut ws).await;
    assert_eq!(done["response"]["usage"]["output_tokens"], 5);
    ws.close(None).await.unwrap();
    while next(&mut ws).await.is_some() {}
    wait_metric(&gw, &sessions("client_closed"), 1.0).await;
}

#[tokio::test]
async fn managed_mode_injects_the_key_and_checks_client_and_model() {
    let emu = Emulator::start().await;
    let hash: String = ezgate::clients::sha256(b"key-voice")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let config = format!(
        "[upstream]\napi_key = \"${{EZLINK_API_KEY}}\"\n\n[[clients]]\nname = \"voice\"\nkey_sha256 = \"{hash}\"\nmodels = [\"gpt-realtime*\"]\n"
    );
    let gw = Gateway::start_env(&emu.url(), &config, &[("EZLINK_API_KEY", "sk-org-key")]).await;
    let auth = ("authorization", "Bearer key-voice");
    let mut ws = open(
        &gw,
        "/v1/realtime?model=gpt-realtime",
        &[auth, ("x-request-id", "ws-managed")],
    )
    .await;
    ws.close(None).await.unwrap();
    while next(&mut ws).await.is_some() {}
    let e = upstream_ended(&emu, "ws-managed").await;
    assert_eq!(
        logged_header(&e, "authorization"),
        Some("Bearer sk-org-key")
    );

    // Refusals come before the upstream, in the error schema.
    let get = |headers: Vec<(&'static str, &'static str)>, path: &'static str| {
        let gw = &gw;
        async move {
            let mut h = HANDSHAKE.to_vec();
            h.extend(headers);
            gw.get_with(path, &h).await
        }
    };
    let r = get(vec![], "/v1/realtime?model=gpt-realtime").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error()["code"], "missing_api_key");
    let r = get(
        vec![("authorization", "Bearer key-other")],
        "/v1/realtime?model=gpt-realtime",
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error()["code"], "invalid_api_key");
    let r = get(vec![auth], "/v1/realtime?model=gpt-4o").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error()["code"], "model_not_allowed");
    // No model is no model on the allow-list either.
    let r = get(vec![auth], "/v1/realtime").await;
    assert_eq!(r.status, 403);
    assert_eq!(
        emu.log().await.len(),
        1,
        "only the allowed session reached the upstream"
    );
}

#[tokio::test]
async fn an_upstream_refusal_is_an_error_in_the_schema_and_a_429_holds_the_key_back() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let mut h = HANDSHAKE.to_vec();
    h.extend([("x-emu-status", "401"), ("x-emu-code", "invalid_api_key")]);
    let r = gw.get_with("/v1/realtime?model=gpt-realtime", &h).await;
    assert_eq!(r.status, 401);
    let e = r.error();
    assert_eq!(e["source"], "upstream");
    assert_eq!(e["code"], "invalid_api_key");
    assert_eq!(e["upstream_status"], 401);
    // Through a WebSocket client: the handshake fails with that status.
    let Err(WsError::Http(resp)) = connect(
        gw.addr,
        "/v1/realtime?model=gpt-realtime",
        &[("x-emu-status", "404")],
    )
    .await
    else {
        panic!("a refused handshake is no session")
    };
    assert_eq!(resp.status(), 404);

    // A 429 with Retry-After holds the key and model back: ezgate answers the next one.
    let mut h = HANDSHAKE.to_vec();
    h.extend([("x-emu-status", "429"), ("x-emu-retry-after", "30")]);
    let r = gw.get_with("/v1/realtime?model=gpt-realtime", &h).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error()["source"], "upstream");
    let before = emu.log().await.len();
    let r = gw
        .get_with("/v1/realtime?model=gpt-realtime", &HANDSHAKE)
        .await;
    assert_eq!(r.status, 429);
    let e = r.error();
    assert_eq!(e["code"], "upstream_rate_limited");
    assert_eq!(e["source"], "gateway");
    assert_eq!(emu.log().await.len(), before, "the upstream was not asked");
    assert_eq!(metric_value(&gw.metrics().await, SWITCHED), 0.0);
}

#[tokio::test]
async fn the_handshake_counts_against_request_rates_and_the_session_holds_its_concurrency_permit() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[[limits]]\nname = \"one-at-a-time\"\nkey = \"global\"\nconcurrency = 1\n\n[[limits]]\nname = \"two-per-hour\"\nkey = \"global\"\nrequests = \"2/h\"\n",
    )
    .await;
    let path = "/v1/realtime?model=gpt-realtime";
    let mut first = open(&gw, path, &[]).await;
    // The first session is open: a second is refused, however long the first lasts.
    for _ in 0..2 {
        let r = gw.get_with(path, &HANDSHAKE).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.error()["code"], "concurrency_limited");
        let _ = respond(&mut first).await;
    }
    first.close(None).await.unwrap();
    while next(&mut first).await.is_some() {}
    wait_metric(&gw, &sessions("client_closed"), 1.0).await;
    // Its permit is back: the next session opens, and is the second request of the hour.
    let mut second = open(&gw, path, &[]).await;
    second.close(None).await.unwrap();
    while next(&mut second).await.is_some() {}
    wait_metric(&gw, &sessions("client_closed"), 2.0).await;
    let r = gw.get_with(path, &HANDSHAKE).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error()["code"], "rate_limited");
}

#[tokio::test]
async fn token_policies_are_charged_as_response_done_reports_usage() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[[limits]]\nname = \"tpd\"\nkey = \"global\"\ntokens = \"2000/day\"\ndefault_tokens = 100\n",
    )
    .await;
    let path = "/v1/realtime?model=gpt-realtime";
    // The bucket's balance, from the `RateLimit` header of a handshake's 101.
    let remaining = |resp: &Response<Option<Vec<u8>>>| -> u64 {
        let h = resp.headers()["ratelimit"].to_str().unwrap();
        h.split(";r=")
            .nth(1)
            .and_then(|t| t.split(';').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{h}"))
    };
    let (mut ws, resp) = connect(gw.addr, path, &[("x-request-id", "ws-tokens")])
        .await
        .unwrap();
    assert_eq!(remaining(&resp), 1900, "default_tokens reserved");
    assert_eq!(recv(&mut ws).await["type"], "session.created");
    let _ = respond(&mut ws).await;
    // The first report settled the reservation at its 15 tokens, while the session goes on.
    let (mut other, resp) = connect(gw.addr, path, &[]).await.unwrap();
    assert_eq!(remaining(&resp), 2000 - 15 - 100);
    other.close(None).await.unwrap();
    while next(&mut other).await.is_some() {}
    let _ = respond(&mut ws).await;
    ws.close(None).await.unwrap();
    while next(&mut ws).await.is_some() {}
    let log = gw.access_log("ws-tokens").await;
    assert_eq!(log["charged_tokens"], 30);
    wait_metric(&gw, &sessions("client_closed"), 2.0).await;
    let (_, resp) = connect(gw.addr, path, &[]).await.unwrap();
    assert_eq!(remaining(&resp), 2000 - 30 - 100);
}

#[tokio::test]
async fn an_idle_session_is_closed_with_1001_on_both_sides() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[upstream]\nstream_idle_timeout = \"1s\"\n").await;
    let mut ws = open(&gw, "/v1/realtime", &[("x-request-id", "ws-idle")]).await;
    // Nothing either way: ezgate closes.
    assert_eq!(close_of(&mut ws).await, (1001, IDLE_REASON.into()));
    let e = upstream_ended(&emu, "ws-idle").await;
    assert_eq!(e["ws_close"], json!({"code": 1001, "reason": IDLE_REASON}));
    assert_eq!(
        e["state"], "completed",
        "the upstream answered the close: {e}"
    );
    assert_eq!(
        gw.access_log("ws-idle").await["session_end"],
        "idle_timeout"
    );

    // An upstream that stalls (answers nothing, not even the close) is closed all the same.
    let mut ws = open(&gw, "/v1/realtime", &[("x-request-id", "ws-stall")]).await;
    emit(&mut ws, json!({"type": "emu.stall"})).await;
    assert_eq!(close_of(&mut ws).await, (1001, IDLE_REASON.into()));
    let e = upstream_ended(&emu, "ws-stall").await;
    assert_eq!(e["state"], "cancelled", "{e}");
    wait_metric(&gw, &sessions("idle_timeout"), 2.0).await;
}

#[tokio::test]
async fn sigterm_lets_sessions_run_through_the_grace_then_closes_them_with_1001() {
    let emu = Emulator::start().await;
    let mut gw = Gateway::start(&emu.url(), "[server]\nshutdown_grace = \"3s\"\n").await;
    let mut ws = open(&gw, "/v1/realtime", &[("x-request-id", "ws-drain")]).await;
    gw.signal("TERM");
    // Still served while the grace lasts.
    let (_, done) = respond(&mut ws).await;
    assert_eq!(done["type"], "response.done");
    let reason = "ezgate is shutting down";
    assert_eq!(close_of(&mut ws).await, (1001, reason.into()));
    let e = upstream_ended(&emu, "ws-drain").await;
    assert_eq!(e["ws_close"], json!({"code": 1001, "reason": reason}));
    assert_eq!(gw.exit_code().await, Some(0));
    let log = gw.access_log("ws-drain").await;
    assert_eq!(log["session_end"], "shutdown");
    assert_eq!(log["status"], 101);
}

#[tokio::test]
async fn a_client_leaving_mid_session_is_told_to_the_upstream() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let mut ws = open(
        &gw,
        "/v1/realtime",
        &[
            ("x-request-id", "ws-leaves"),
            ("x-emu-stream-events", "50"),
            ("x-emu-stream-interval-ms", "50"),
        ],
    )
    .await;
    emit(&mut ws, json!({"type": "response.create"})).await;
    assert_eq!(recv(&mut ws).await["type"], "response.created");
    // The client vanishes: no close frame, the TCP connection just ends.
    drop(ws);
    let e = upstream_ended(&emu, "ws-leaves").await;
    assert_eq!(
        e["ws_close"],
        json!({"code": 1001, "reason": "the client went away"})
    );
    wait_metric(&gw, &sessions("client_closed"), 1.0).await;
    let log = gw.access_log("ws-leaves").await;
    assert_eq!(log["status"], 101, "a session that ran is no 499");
    assert_eq!(log["session_end"], "client_closed");
}

#[tokio::test]
async fn an_upstream_reset_mid_session_closes_the_client_with_1011() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let mut ws = open(&gw, "/v1/realtime", &[("x-request-id", "ws-reset")]).await;
    emit(&mut ws, json!({"type": "emu.reset"})).await;
    assert_eq!(
        close_of(&mut ws).await,
        (1011, "the upstream connection was lost".into())
    );
    wait_metric(&gw, &sessions("upstream_closed"), 1.0).await;
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "ezgate_gateway_errors_total{code=\"upstream_stream_interrupted\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(&m, "ezgate_upstream_failures_total{kind=\"reset\"}"),
        1.0
    );
    assert_eq!(
        gw.access_log("ws-reset").await["code"],
        "upstream_stream_interrupted"
    );
}

#[tokio::test]
async fn other_upgrades_are_not_switched() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let upgrade_h2c = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings, close\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\nx-request-id: h2c-{}\r\n\r\n",
            path.len()
        )
    };
    // Served as plain HTTP/1.1: the upgrade is not passed on.
    let out = raw(gw.addr, upgrade_h2c("/v1/models").as_bytes(), DEADLINE).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    let e = emu.entry("h2c-10").await.unwrap();
    assert_eq!(logged_header(&e, "upgrade"), None);
    assert_eq!(logged_header(&e, "http2-settings"), None);
    // On the realtime route that is the upstream's refusal, in the error schema.
    let out = raw(gw.addr, upgrade_h2c("/v1/realtime").as_bytes(), DEADLINE).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    crate::schema::assert_valid(&body);
    assert_eq!(body["error"]["source"], "upstream");
    assert_eq!(metric_value(&gw.metrics().await, SWITCHED), 0.0);
    // Over HTTP/2 there is no handshake (RFC 8441's extended CONNECT is not offered): the
    // request is a plain GET, which the upstream refuses.
    let r = send(
        &h2c(),
        Method::GET,
        &gw.url("/v1/realtime"),
        &HANDSHAKE[2..],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 400, "the upstream's answer to a plain GET");
}

/// The official openai Python SDK's realtime client, through ezgate.
#[tokio::test]
async fn the_openai_sdk_realtime_client_works_through_ezgate() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let v = run_python("sdk_realtime.py", &gw.url("/v1")).await;
    assert_eq!(v["model"], "gpt-realtime");
    assert_eq!(v["text"], "tok0 tok1 tok2 tok3 tok4 ");
    assert_eq!(v["output_tokens"], 5);
    let e = &emu.log().await[0];
    assert_eq!(logged_header(e, "authorization"), Some("Bearer sk-test"));
    assert!(
        logged_header(e, "sec-websocket-extensions").is_none(),
        "the client's permessage-deflate offer is not passed on"
    );
    wait_metric(&gw, &sessions("client_closed"), 1.0).await;
}

#[tokio::test]
async fn a_client_that_leaves_before_response_done_is_charged_what_streamed() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[[limits]]\nname = \"tph\"\nkey = \"global\"\ntokens = \"300/h\"\ndefault_tokens = 50\n",
    )
    .await;
    let path = "/v1/realtime?model=gpt-realtime";
    // 200 deltas, then no `response.done`: the client leaves in between.
    let headers = [("x-request-id", "ws-cut"), ("x-emu-stream-events", "200")];
    let mut ws = open(&gw, path, &headers).await;
    emit(
        &mut ws,
        json!({"type": "response.create", "emu_hold": true}),
    )
    .await;
    let mut text = String::new();
    assert_eq!(recv(&mut ws).await["type"], "response.created");
    for _ in 0..200 {
        let e = recv(&mut ws).await;
        assert_eq!(e["type"], "response.output_text.delta");
        text.push_str(e["delta"].as_str().unwrap());
    }
    ws.close(None).await.unwrap();
    while next(&mut ws).await.is_some() {}
    // Charged what its deltas carried (nothing reported it), not refunded.
    let streamed = ezgate::limits::estimate::text_tokens(text.as_bytes());
    assert!(streamed > 300, "{streamed} tokens streamed");
    let log = gw.access_log("ws-cut").await;
    assert_eq!(log["charged_tokens"], streamed, "{log}");
    assert_eq!(log["session_end"], "client_closed");
    // No usage was reported: ezgate_tokens_total counts reports only (as for streams).
    assert_eq!(
        metric_value(
            &gw.metrics().await,
            "ezgate_tokens_total{client=\"anonymous\",kind=\"completion\",model=\"gpt-realtime\"}"
        ),
        0.0
    );
    // The bucket is in debt: the next handshake is refused, and the upstream never sees it.
    let r = gw
        .get_with(
            path,
            &[HANDSHAKE.as_slice(), &[("x-request-id", "ws-after-cut")]].concat(),
        )
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error()["code"], "token_rate_limited");
    assert!(emu.entry("ws-after-cut").await.is_none());
}

#[tokio::test]
async fn a_session_past_its_lifetime_is_closed_with_1008_on_both_sides() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[server]\nwebsocket_max_lifetime = \"1s\"\n").await;
    let mut ws = open(&gw, "/v1/realtime", &[("x-request-id", "ws-life")]).await;
    let reason = "the session reached server.websocket_max_lifetime";
    assert_eq!(close_of(&mut ws).await, (1008, reason.into()));
    let e = upstream_ended(&emu, "ws-life").await;
    assert_eq!(e["ws_close"], json!({"code": 1008, "reason": reason}));
    assert_eq!(e["state"], "completed", "{e}");
    assert_eq!(
        gw.access_log("ws-life").await["session_end"],
        "max_lifetime"
    );
    wait_metric(&gw, &sessions("max_lifetime"), 1.0).await;
}

#[tokio::test]
async fn a_client_that_does_not_answer_pings_is_closed_and_one_that_does_is_kept() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[server]\nwebsocket_ping_interval = \"1s\"\nwebsocket_pong_timeout = \"3s\"\n",
    )
    .await;
    // This client reads nothing after the handshake: it answers no ping.
    let (mut deaf, resp) = connect(gw.addr, "/v1/realtime", &[("x-request-id", "ws-deaf")])
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    // This one reads all along (tungstenite answers pings as it reads).
    let mut polite = open(&gw, "/v1/realtime", &[("x-request-id", "ws-polite")]).await;
    let ping_timeouts = sessions("ping_timeout");
    tokio::select! {
        () = wait_metric(&gw, &ping_timeouts, 1.0) => {}
        m = next(&mut polite) => panic!("the reading client got {m:?}"),
    }
    let reason = "no pong to ezgate's ping within server.websocket_pong_timeout";
    let e = upstream_ended(&emu, "ws-deaf").await;
    assert_eq!(e["ws_close"], json!({"code": 1001, "reason": reason}));
    assert_eq!(
        gw.access_log("ws-deaf").await["session_end"],
        "ping_timeout"
    );
    // The deaf client's socket holds what ezgate sent: `session.created`, pings, then the
    // close frame.
    let mut pings = 0;
    let close = loop {
        match tokio::time::timeout(DEADLINE, deaf.next()).await.unwrap() {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Text(_))) => {}
            Some(Ok(Message::Close(Some(f)))) => break f,
            other => panic!("{other:?}"),
        }
    };
    assert!(pings >= 1);
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1001, reason)
    );
    // The reading client's session goes on.
    emit(&mut polite, json!({"type": "emu.echo", "n": 1})).await;
    assert_eq!(recv(&mut polite).await["n"], 1);
    assert_eq!(
        emu.entry("ws-polite").await.unwrap()["state"],
        "in_progress"
    );
}

#[tokio::test]
async fn sessions_have_their_own_cap_and_leave_max_inflight_to_requests() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[server]\nmax_inflight = 2\nmax_websocket_sessions = 3\n",
    )
    .await;
    let mut open_sessions = Vec::new();
    for _ in 0..3 {
        open_sessions.push(open(&gw, "/v1/realtime", &[]).await);
    }
    // Three idle sessions, more than max_inflight: requests are served all the same.
    for _ in 0..3 {
        assert_eq!(gw.chat(&[]).await.status, 200);
    }
    // A fourth session is past the sessions' cap: 503 in the schema, with Retry-After,
    // and the upstream never sees it.
    let r = gw
        .get_with(
            "/v1/realtime",
            &[HANDSHAKE.as_slice(), &[("x-request-id", "ws-over")]].concat(),
        )
        .await;
    assert_eq!(r.status, 503);
    let err = r.error();
    assert_eq!(err["code"], "overloaded");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("server.max_websocket_sessions"),
        "{err}"
    );
    assert!(r.header("retry-after").is_some());
    assert!(emu.entry("ws-over").await.is_none());
    // One ends: its place is free again.
    let mut first = open_sessions.remove(0);
    first.close(None).await.unwrap();
    while next(&mut first).await.is_some() {}
    wait_metric(&gw, &sessions("client_closed"), 1.0).await;
    let _again = open(&gw, "/v1/realtime", &[]).await;
}

#[tokio::test]
async fn a_response_that_started_keeps_the_reservation_it_streamed_less_than() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[[limits]]\nname = \"tph\"\nkey = \"global\"\ntokens = \"1000/h\"\ndefault_tokens = 200\n",
    )
    .await;
    let path = "/v1/realtime?model=gpt-realtime";
    let headers = [("x-request-id", "ws-started"), ("x-emu-stream-events", "1")];
    let mut ws = open(&gw, path, &headers).await;
    emit(
        &mut ws,
        json!({"type": "response.create", "emu_hold": true}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "response.created");
    assert_eq!(recv(&mut ws).await["type"], "response.output_text.delta");
    // One short delta streamed (2 tokens), no report: the reservation is not given back.
    drop(ws);
    let log = gw.access_log("ws-started").await;
    assert_eq!(log["charged_tokens"], 200, "{log}");
    // A session in which nothing started gives its reservation back.
    let mut quiet = open(&gw, path, &[("x-request-id", "ws-quiet")]).await;
    quiet.close(None).await.unwrap();
    while next(&mut quiet).await.is_some() {}
    assert_eq!(gw.access_log("ws-quiet").await["charged_tokens"], 0);
    let (_, resp) = connect(gw.addr, path, &[]).await.unwrap();
    let balance = resp.headers()["ratelimit"].to_str().unwrap().to_owned();
    assert!(
        balance.contains(";r=600"),
        "1000 - 200 charged - 200 reserved: {balance}"
    );
}

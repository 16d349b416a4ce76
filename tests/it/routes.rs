//! A client with a model allow-list on every route that can spend a model: the JSON routes
//! and the multipart forms are read and checked, a route whose model ezgate cannot read
//! answers 403 `route_not_allowed` unless the operator allowed it for the client
//! (`clients[].unchecked_routes`), and clients without an allow-list are unaffected. In
//! managed mode the application cannot pick the billed organization or project.
//! docs/security.md has the table of routes these tests drive.

use bytes::Bytes;
use http::Method;

use crate::harness::*;

const MINI: &str = "Bearer key-mini";
const BATCH: &str = "Bearer key-batch";
const OPEN: &str = "Bearer key-open";

/// Three clients: allowed only gpt-4o-mini; the same with batches and threads allowed
/// unchecked; and one without an allow-list.
async fn start() -> (Emulator, Gateway) {
    let emu = Emulator::start().await;
    let config = format!(
        r#"[upstream]
api_key = "${{ORG_KEY}}"

[[clients]]
name = "mini-only"
key_sha256 = "{}"
models = ["gpt-4o-mini"]

[[clients]]
name = "mini-batch"
key_sha256 = "{}"
models = ["gpt-4o-mini"]
unchecked_routes = ["/v1/batches", "/v1/threads/*"]

[[clients]]
name = "open"
key_sha256 = "{}"
"#,
        sha256_hex("key-mini"),
        sha256_hex("key-batch"),
        sha256_hex("key-open"),
    );
    let gw = Gateway::start_env(&emu.url(), &config, &[("ORG_KEY", "sk-org")]).await;
    (emu, gw)
}

const BOUNDARY: &str = "multipart/form-data; boundary=f0rm";

/// A multipart form with an image file and `fields` (name, value).
fn form(fields: &[(&str, &str)]) -> String {
    let mut b = String::from("--f0rm\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\u{89}PNG\r\n");
    for (name, value) in fields {
        b.push_str(&format!(
            "--f0rm\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    b.push_str("--f0rm--\r\n");
    b
}

/// Sends one request as the client with key `auth`, tagged with `id`.
async fn ask(
    gw: &Gateway,
    auth: &str,
    method: Method,
    path: &str,
    content_type: &str,
    body: impl Into<Bytes>,
    id: &str,
) -> Resp {
    let headers = [
        ("authorization", auth),
        ("content-type", content_type),
        ("x-request-id", id),
    ];
    send(&http1(), method, &gw.url(path), &headers, body.into()).await
}

async fn post_json(gw: &Gateway, auth: &str, path: &str, body: &str, id: &str) -> Resp {
    ask(
        gw,
        auth,
        Method::POST,
        path,
        "application/json",
        body.to_owned(),
        id,
    )
    .await
}

/// 403 with `code`, and the upstream never saw the request.
async fn assert_refused(emu: &Emulator, r: &Resp, code: &str, id: &str) -> String {
    assert_eq!(
        r.status,
        403,
        "{id}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    let e = r.error();
    assert_eq!(e["code"], code, "{id}: {e}");
    assert_eq!(e["source"], "gateway");
    assert_eq!(r.header("x-should-retry"), Some("false"), "{id}");
    assert!(emu.entry(id).await.is_none(), "{id} reached the upstream");
    e["message"].as_str().unwrap().to_owned()
}

/// 200 from the upstream, which read `model` (or none) in the request.
async fn assert_served(emu: &Emulator, r: &Resp, id: &str, model: Option<&str>) {
    assert_eq!(
        r.status,
        200,
        "{id}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    let entry = emu.entry(id).await.unwrap();
    assert_eq!(entry["model"].as_str(), model, "{id}: {entry}");
    assert_eq!(
        logged_header(&entry, "authorization"),
        Some("Bearer sk-org")
    );
}

/// Forwarded: the upstream saw the request (whatever it answered).
async fn assert_forwarded(emu: &Emulator, r: &Resp, id: &str) {
    assert_ne!(
        r.status,
        403,
        "{id}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(
        emu.entry(id).await.is_some(),
        "{id} did not reach the upstream"
    );
}

#[tokio::test]
async fn multipart_routes_have_their_model_field_checked() {
    let (emu, gw) = start().await;
    for path in [
        "/v1/audio/translations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/audio/transcriptions",
    ] {
        let id = format!("{path}-other");
        let r = ask(
            &gw,
            MINI,
            Method::POST,
            path,
            BOUNDARY,
            form(&[("model", "gpt-4o")]),
            &id,
        )
        .await;
        let message = assert_refused(&emu, &r, "model_not_allowed", &id).await;
        assert!(message.contains("'gpt-4o'"), "{message}");
        assert_eq!(r.error()["param"], "model");

        let id = format!("{path}-mini");
        let body = form(&[("prompt", "a cat"), ("model", "gpt-4o-mini")]);
        let r = ask(&gw, MINI, Method::POST, path, BOUNDARY, body, &id).await;
        assert_served(&emu, &r, &id, Some("gpt-4o-mini")).await;

        // The upstream keeps the last of two fields: which one would the check have read?
        let smuggled = [
            form(&[("model", "gpt-4o-mini"), ("model", "gpt-4o")]),
            form(&[("model", "gpt-4o-mini"), ("MODEL", "gpt-4o")]),
            form(&[("prompt", "no model named")]),
            "--f0rm\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-mini".into(),
            "--f0rm\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m\"\r\n\r\ngpt-4o-mini\r\n--f0rm--\r\n".into(),
            "--f0rm\r\nContent-Disposition: form-data; name=\"model\"\r\nContent-Transfer-Encoding: base64\r\n\r\nZ3B0LTRv\r\n--f0rm--\r\n".into(),
            // A second `name` in one disposition: parsers take the first or the last.
            "--f0rm\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-mini\r\n--f0rm\r\nContent-Disposition: form-data; name=\"x\"; name=\"model\"\r\n\r\ngpt-4o\r\n--f0rm--\r\n".into(),
            // RFC 2231's `name*`, which some parsers decode to `name`.
            "--f0rm\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-mini\r\n--f0rm\r\nContent-Disposition: form-data; name*=UTF-8''model\r\n\r\ngpt-4o\r\n--f0rm--\r\n".into(),
        ];
        for (i, body) in smuggled.into_iter().enumerate() {
            let id = format!("{path}-smuggled-{i}");
            let r = ask(&gw, MINI, Method::POST, path, BOUNDARY, body, &id).await;
            assert_eq!(r.status, 400, "{id}");
            assert_eq!(r.error()["code"], "bad_request");
            assert!(emu.entry(&id).await.is_none(), "{id} reached the upstream");
        }
    }
    // Image edits also come as JSON (images by URL): read as JSON then.
    let path = "/v1/images/edits";
    let r = post_json(
        &gw,
        MINI,
        path,
        r#"{"model":"gpt-4o","prompt":"x"}"#,
        "edit-json-other",
    )
    .await;
    assert_refused(&emu, &r, "model_not_allowed", "edit-json-other").await;
    let r = post_json(
        &gw,
        MINI,
        path,
        r#"{"model":"gpt-4o-mini","prompt":"x"}"#,
        "edit-json",
    )
    .await;
    assert_served(&emu, &r, "edit-json", Some("gpt-4o-mini")).await;
    // A form sent as something else is not waved through.
    let r = ask(
        &gw,
        MINI,
        Method::POST,
        path,
        "text/plain",
        form(&[("model", "gpt-4o")]),
        "edit-text",
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(emu.entry("edit-text").await.is_none());
}

#[tokio::test]
async fn json_routes_that_spend_a_model_have_it_checked() {
    let (emu, gw) = start().await;
    for (path, extra) in [
        ("/v1/realtime/sessions", r#""modalities":["text"]"#),
        ("/v1/assistants", r#""instructions":"help""#),
        ("/v1/threads/runs", r#""assistant_id":"asst_1""#),
        ("/v1/threads/thread_1/runs", r#""assistant_id":"asst_1""#),
        ("/v1/fine_tuning/jobs", r#""training_file":"file-1""#),
        ("/v1/images/generations", r#""prompt":"a cat""#),
        ("/v1/assistants/asst_1", r#""name":"renamed""#),
    ] {
        let id = format!("{path}-other");
        let body = format!(r#"{{{extra},"model":"gpt-4o"}}"#);
        let r = post_json(&gw, MINI, path, &body, &id).await;
        assert_refused(&emu, &r, "model_not_allowed", &id).await;

        let id = format!("{path}-mini");
        let body = format!(r#"{{{extra},"model":"gpt-4o-mini"}}"#);
        let r = post_json(&gw, MINI, path, &body, &id).await;
        assert_served(&emu, &r, &id, Some("gpt-4o-mini")).await;
    }
    // The realtime session's ephemeral key goes only to a session of an allowed model.
    let r = post_json(
        &gw,
        MINI,
        "/v1/realtime/sessions",
        r#"{"model":"gpt-4o-mini"}"#,
        "sess",
    )
    .await;
    assert!(r.json()["client_secret"]["value"]
        .as_str()
        .unwrap()
        .starts_with("ek_"));

    // Without `model` a run takes its assistant's, a session the upstream's default: refused.
    for path in [
        "/v1/threads/runs",
        "/v1/threads/thread_1/runs",
        "/v1/realtime/sessions",
        "/v1/images/generations",
    ] {
        let id = format!("{path}-none");
        let r = post_json(
            &gw,
            MINI,
            path,
            r#"{"assistant_id":"asst_1","prompt":"x"}"#,
            &id,
        )
        .await;
        let message = assert_refused(&emu, &r, "model_not_allowed", &id).await;
        assert!(
            message.contains(&format!("POST {path} names no model"))
                && message.contains("gpt-4o-mini"),
            "{message}"
        );
    }
    // Changing an assistant without naming a model changes no model.
    let r = post_json(
        &gw,
        MINI,
        "/v1/assistants/asst_1",
        r#"{"name":"x"}"#,
        "modify",
    )
    .await;
    assert_served(&emu, &r, "modify", None).await;
    // Spelled differently, checked the same.
    let r = post_json(
        &gw,
        MINI,
        "//v1/threads/./thread_1/runs/",
        r#"{"model":"gpt-4o"}"#,
        "spelled",
    )
    .await;
    assert_refused(&emu, &r, "model_not_allowed", "spelled").await;
}

#[tokio::test]
async fn realtime_client_secrets_without_the_allowed_model_are_refused() {
    let (emu, gw) = start().await;
    let path = "/v1/realtime/client_secrets";
    for (i, body) in [
        r#"{"session":{"type":"realtime","model":"gpt-realtime"}}"#,
        r#"{"session":{"type":"realtime"}}"#,
        r#"{"expires_after":{"anchor":"created_at","seconds":600}}"#,
        // The body's own `model` is not the session's: it proves nothing.
        r#"{"model":"gpt-4o-mini","session":{"type":"realtime","model":"gpt-realtime"}}"#,
        r#"{"model":"gpt-4o-mini","session":{"type":"realtime"}}"#,
        // A transcription's model is not the session's, and it spends too.
        r#"{"session":{"type":"realtime","audio":{"input":{"transcription":{"model":"gpt-4o-mini"}}}}}"#,
        r#"{"session":{"type":"realtime","model":"gpt-4o-mini","audio":{"input":{"transcription":{"model":"gpt-4o-transcribe"}}}}}"#,
        r#"{"session":{"type":"realtime","model":"gpt-4o-mini","input_audio_transcription":{"model":"whisper-1"}}}"#,
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("secret-{i}");
        let r = post_json(&gw, MINI, path, body, &id).await;
        assert_refused(&emu, &r, "model_not_allowed", &id).await;
        assert_eq!(r.error()["param"], "session.model", "{id}");
    }
    // A realtime session's own body names its transcription model at the top level.
    let r = post_json(
        &gw,
        MINI,
        "/v1/realtime/sessions",
        r#"{"model":"gpt-4o-mini","input_audio_transcription":{"model":"gpt-4o-transcribe"}}"#,
        "session-transcribe",
    )
    .await;
    assert_refused(&emu, &r, "model_not_allowed", "session-transcribe").await;
    // Unaffected without an allow-list: the emulator hands out its ephemeral key.
    let body = r#"{"session":{"type":"realtime","model":"gpt-realtime"}}"#;
    let r = post_json(&gw, OPEN, path, body, "open").await;
    assert_served(&emu, &r, "open", Some("gpt-realtime")).await;
    assert!(r.json()["value"].as_str().unwrap().starts_with("ek_"));
}

/// Nested models (a client secret's `session.model`, the models of Responses tools) are read
/// by the JSON scanner and checked next to the body's `model`: `check_named`'s `nested`.
/// Until the scanner reads them, a client secret is refused whatever it names.
#[tokio::test]
async fn nested_models_are_checked_like_the_body_model() {
    let (emu, gw) = start().await;
    let path = "/v1/realtime/client_secrets";
    let body = r#"{"session":{"type":"realtime","model":"gpt-4o-mini"}}"#;
    let r = post_json(&gw, MINI, path, body, "secret").await;
    assert_served(&emu, &r, "secret", Some("gpt-4o-mini")).await;

    let path = "/v1/responses";
    for (i, tool) in [
        r#"{"type":"image_generation","model":"gpt-image-1"}"#,
        r#"{"type":"image_generation"}"#,
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("tool-{i}");
        let body = format!(r#"{{"model":"gpt-4o-mini","input":"draw a cat","tools":[{tool}]}}"#);
        let r = post_json(&gw, MINI, path, &body, &id).await;
        assert_refused(&emu, &r, "model_not_allowed", &id).await;
    }
    let body = r#"{"model":"gpt-4o-mini","input":"draw","tools":[{"type":"image_generation","model":"gpt-4o-mini"}]}"#;
    let r = post_json(&gw, MINI, path, body, "tool-mini").await;
    assert_eq!(r.status, 200);
    assert!(emu.entry("tool-mini").await.is_some());
}

#[tokio::test]
async fn routes_whose_model_cannot_be_read_answer_route_not_allowed() {
    let (emu, gw) = start().await;
    let batch =
        r#"{"input_file_id":"file-1","endpoint":"/v1/chat/completions","completion_window":"24h"}"#;
    let r = post_json(&gw, MINI, "/v1/batches", batch, "batch").await;
    let message = assert_refused(&emu, &r, "route_not_allowed", "batch").await;
    assert!(
        message.contains("POST /v1/batches is not allowed for client 'mini-only'")
            && message.contains("uploaded input file")
            && message.contains("clients.unchecked_routes"),
        "{message}"
    );
    assert_eq!(r.error()["param"], serde_json::Value::Null);
    for (i, (method, path)) in [
        (Method::POST, "//v1/batches"),
        (Method::POST, "/v1/./batches/"),
        (Method::POST, "/v1/%62atches"),
        (Method::POST, "/v1/threads/t/runs/r/submit_tool_outputs"),
        (Method::POST, "/v1/fine_tuning/jobs/j/resume"),
        (Method::POST, "/v1/vector_stores"),
        (Method::POST, "/v1/realtime/transcription_sessions"),
        (Method::PATCH, "/v1/chat/completions"),
        (Method::PUT, "/v1/assistants"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("unreadable-{i}");
        let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
        let r = ask(&gw, MINI, method, path, "application/json", body, &id).await;
        assert_refused(&emu, &r, "route_not_allowed", &id).await;
    }
    // A WebSocket session names its model in the query only on /v1/realtime.
    let handshake = |path: &'static str, id: &'static str| {
        let gw = &gw;
        async move {
            let h = [
                ("authorization", MINI),
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                ("sec-websocket-version", "13"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("x-request-id", id),
            ];
            gw.get_with(path, &h).await
        }
    };
    let r = handshake("/v1/responses?model=gpt-4o-mini", "ws-responses").await;
    assert_refused(&emu, &r, "route_not_allowed", "ws-responses").await;
    let r = handshake("/v1/realtime?model=gpt-4o", "ws-other").await;
    assert_refused(&emu, &r, "model_not_allowed", "ws-other").await;

    // Requests that spend no model pass.
    let r = ask(
        &gw,
        MINI,
        Method::GET,
        "/v1/models",
        "application/json",
        "",
        "models",
    )
    .await;
    assert_eq!(r.status, 200);
    for (i, (method, path, content_type, body)) in [
        (
            Method::POST,
            "/v1/files",
            BOUNDARY,
            form(&[("purpose", "batch")]),
        ),
        (
            Method::POST,
            "/v1/batches/batch_1/cancel",
            "application/json",
            String::new(),
        ),
        (
            Method::POST,
            "/v1/threads",
            "application/json",
            r#"{"messages":[]}"#.into(),
        ),
        (
            Method::DELETE,
            "/v1/assistants/asst_1",
            "application/json",
            String::new(),
        ),
        (
            Method::GET,
            "/v1/batches",
            "application/json",
            String::new(),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("free-{i}");
        let r = ask(&gw, MINI, method, path, content_type, body, &id).await;
        assert_forwarded(&emu, &r, &id).await;
    }

    // The operator allowed batches and threads for "mini-batch": unread, let through.
    let r = post_json(&gw, BATCH, "/v1/batches", batch, "batch-allowed").await;
    assert_served(&emu, &r, "batch-allowed", None).await;
    let r = post_json(
        &gw,
        BATCH,
        "/v1/threads/runs",
        r#"{"assistant_id":"asst_1"}"#,
        "run-allowed",
    )
    .await;
    assert_served(&emu, &r, "run-allowed", None).await;
    let r = post_json(
        &gw,
        BATCH,
        "/v1/threads/t/runs/r/submit_tool_outputs",
        "{}",
        "tools-allowed",
    )
    .await;
    assert_forwarded(&emu, &r, "tools-allowed").await;
    // What ezgate can read is still checked there; other routes stay refused.
    let r = post_json(
        &gw,
        BATCH,
        "/v1/threads/runs",
        r#"{"assistant_id":"a","model":"gpt-4o"}"#,
        "run-other",
    )
    .await;
    assert_refused(&emu, &r, "model_not_allowed", "run-other").await;
    let r = post_json(&gw, BATCH, "/v1/vector_stores", "{}", "vs").await;
    assert_refused(&emu, &r, "route_not_allowed", "vs").await;

    let metrics = gw.settled_metrics().await;
    assert!(
        metric_value(
            &metrics,
            r#"ezgate_gateway_errors_total{code="route_not_allowed"}"#
        ) >= 12.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn clients_without_an_allow_list_are_unaffected() {
    let (emu, gw) = start().await;
    let batch =
        r#"{"input_file_id":"file-1","endpoint":"/v1/chat/completions","completion_window":"24h"}"#;
    let r = post_json(&gw, OPEN, "/v1/batches", batch, "batch").await;
    assert_served(&emu, &r, "batch", None).await;
    let r = post_json(
        &gw,
        OPEN,
        "/v1/threads/runs",
        r#"{"assistant_id":"asst_1"}"#,
        "run",
    )
    .await;
    assert_served(&emu, &r, "run", None).await;
    let r = ask(
        &gw,
        OPEN,
        Method::POST,
        "/v1/images/edits",
        BOUNDARY,
        form(&[("model", "gpt-4o")]),
        "edit",
    )
    .await;
    assert_served(&emu, &r, "edit", Some("gpt-4o")).await;
    for (i, (method, path)) in [
        (Method::POST, "/v1/vector_stores"),
        (Method::PATCH, "/v1/chat/completions"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("other-{i}");
        let r = ask(&gw, OPEN, method, path, "application/json", "{}", &id).await;
        assert_forwarded(&emu, &r, &id).await;
    }
}

#[tokio::test]
async fn the_application_cannot_choose_the_billed_organization_or_project() {
    let emu = Emulator::start().await;
    let spoofed = [
        ("OpenAI-Organization", "org-someone-else"),
        ("openai-project", "proj_expensive"),
        ("x-request-id", "spoof"),
    ];
    let managed = Gateway::start_env(
        &emu.url(),
        "[upstream]\napi_key = \"${K}\"\n",
        &[("K", "sk-org")],
    )
    .await;
    let r = managed.chat(&spoofed).await;
    assert_eq!(r.status, 200);
    let entry = emu.entry("spoof").await.unwrap();
    assert_eq!(
        logged_header(&entry, "openai-organization"),
        None,
        "{entry}"
    );
    assert_eq!(logged_header(&entry, "openai-project"), None, "{entry}");
    assert_eq!(
        logged_header(&entry, "authorization"),
        Some("Bearer sk-org")
    );
    drop(managed);

    // Passthrough: the key is the application's own, and so is the choice.
    let emu = Emulator::start().await;
    let passthrough = Gateway::start(&emu.url(), "").await;
    let mut h = spoofed.to_vec();
    h.push(("authorization", "Bearer sk-app"));
    let r = passthrough.chat(&h).await;
    assert_eq!(r.status, 200);
    let entry = emu.entry("spoof").await.unwrap();
    assert_eq!(
        logged_header(&entry, "openai-organization"),
        Some("org-someone-else")
    );
    assert_eq!(
        logged_header(&entry, "openai-project"),
        Some("proj_expensive")
    );
}

//! OpenTelemetry traces end to end: ezgate exports one server span per request to a real
//! OTLP/HTTP receiver (tests/py/otlp_receiver.py, protobuf), continues the client's
//! `traceparent`, hands its own span on to the upstream, and never lets a collector that
//! is away slow a request down.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const ORG_KEY: &str = "sk-org-never-exported";
const CLIENT_KEY: &str = "sk-client-never-exported";
const PROMPT: &str = "a-prompt-that-stays-private";

/// The OTLP receiver, as a process; the spans it received, one JSON object each.
pub(crate) struct Receiver {
    _child: Child,
    port: u16,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    pub(crate) async fn start() -> Receiver {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/otlp_receiver.py");
        let mut child = Command::new(python())
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(PYTHON_DEADLINE, lines.next_line())
            .await
            .expect("the receiver starts")
            .unwrap()
            .expect("the receiver prints its port");
        let port = first
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("receiver said {first:?}"));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&spans);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
            }
        });
        Receiver {
            _child: child,
            port,
            spans,
        }
    }

    pub(crate) fn config(&self, ratio: &str) -> String {
        format!(
            "[tracing]\notlp_endpoint = \"http://127.0.0.1:{}\"\nsample_ratio = {ratio}\nservice_name = \"ezgate-test\"\n",
            self.port
        )
    }

    fn all(&self) -> Vec<Value> {
        self.spans.lock().unwrap().clone()
    }

    /// The span of a request, by its `ezgate.request_id`, waiting for it to arrive.
    pub(crate) async fn span(&self, request_id: &str) -> Value {
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = self.find(request_id) {
                return s;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no span for {request_id}; received {:?}",
                self.all()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn find(&self, request_id: &str) -> Option<Value> {
        self.all()
            .into_iter()
            .find(|s| s["attributes"]["ezgate.request_id"] == request_id)
    }
}

/// A header the upstream received with a request, by the request's id.
async fn upstream_header(emu: &Emulator, request_id: &str, name: &str) -> Option<String> {
    let entry = emu.entry(request_id).await.expect("the upstream saw it");
    logged_header(&entry, name).map(str::to_owned)
}

fn chat(stream: bool) -> String {
    format!(
        r#"{{"model":"gpt-4o","stream":{stream},"messages":[{{"role":"user","content":"{PROMPT}"}}]}}"#
    )
}

#[tokio::test]
async fn spans_continue_the_clients_trace_and_reach_the_upstream() {
    let receiver = Receiver::start().await;
    let emu = Emulator::start().await;
    let config = format!(
        "{}[upstream]\napi_key = \"${{ORG_KEY}}\"\n\n[[clients]]\nname = \"team-a\"\nkey_sha256 = \"{}\"\n\n[log]\nformat = \"json\"\n",
        receiver.config("1.0"),
        sha256_hex(CLIENT_KEY)
    );
    let mut gw = Gateway::start_env(&emu.url(), &config, &[("ORG_KEY", ORG_KEY)]).await;
    let bearer = format!("Bearer {CLIENT_KEY}");
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let auth = ("authorization", bearer.as_str());
    let json = ("content-type", "application/json");

    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                auth,
                json,
                ("x-request-id", "traced-stream"),
                ("traceparent", &traceparent),
                ("tracestate", "vendor=opaque"),
            ],
            chat(true),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = gw
        .get_with("/v1/models", &[auth, ("x-request-id", "fresh-root")])
        .await;
    assert_eq!(r.status, 200);
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                auth,
                json,
                ("x-request-id", "upstream-fails"),
                ("x-emu-status", "500"),
            ],
            chat(false),
        )
        .await;
    assert_eq!(r.status, 500);
    let r = gw
        .get_with("/v1/models", &[("x-request-id", "no-key")])
        .await;
    assert_eq!(r.status, 401);

    // The client's trace, continued: ezgate's span is the child of the client's.
    let s = receiver.span("traced-stream").await;
    assert_eq!(s["trace_id"], TRACE);
    assert_eq!(s["parent_span_id"], PARENT);
    assert_eq!(s["trace_state"], "vendor=opaque");
    assert_eq!(s["name"], "POST /v1/chat/completions");
    assert_eq!(s["kind"], 2, "SPAN_KIND_SERVER");
    assert_eq!(s["scope"], "ezgate");
    assert_eq!(s["resource"]["service.name"], "ezgate-test");
    assert_eq!(s["content_type"], "application/x-protobuf");
    let a = &s["attributes"];
    assert_eq!(a["http.request.method"], "POST");
    assert_eq!(a["http.route"], "/v1/chat/completions");
    assert_eq!(a["http.response.status_code"], 200);
    assert_eq!(a["gen_ai.operation.name"], "chat");
    assert_eq!(a["gen_ai.provider.name"], "ezlink");
    assert_eq!(a["gen_ai.request.model"], "gpt-4o");
    assert_eq!(a["gen_ai.response.model"], "gpt-4o");
    assert_eq!(a["gen_ai.usage.output_tokens"], 5);
    assert!(a["gen_ai.usage.input_tokens"].as_i64().unwrap() > 0, "{a}");
    assert!(a["gen_ai.server.time_to_first_token"].as_f64().unwrap() > 0.0);
    assert_eq!(a["ezgate.client"], "team-a");
    assert_eq!(a["ezgate.source"], "upstream");
    assert_eq!(a["ezgate.upstream.status_code"], 200);
    assert!(a.get("error.type").is_none(), "{a}");
    assert_eq!(s["events"], serde_json::json!(["first_token"]));
    assert_eq!(s["status_code"], 0, "unset");

    // The upstream is told that ezgate's span is its parent, with the client's tracestate.
    let sent = upstream_header(&emu, "traced-stream", "traceparent")
        .await
        .expect("traceparent forwarded");
    assert_eq!(
        sent,
        format!("00-{TRACE}-{}-01", s["span_id"].as_str().unwrap())
    );
    assert_eq!(
        upstream_header(&emu, "traced-stream", "tracestate")
            .await
            .as_deref(),
        Some("vendor=opaque")
    );

    // A request without a parent starts a trace of its own.
    let s = receiver.span("fresh-root").await;
    assert_ne!(s["trace_id"], TRACE);
    assert_eq!(s["trace_id"].as_str().unwrap().len(), 32);
    assert_eq!(s["parent_span_id"], "");
    assert_eq!(s["name"], "GET /v1/models");
    assert!(s["attributes"].get("gen_ai.operation.name").is_none());
    let sent = upstream_header(&emu, "fresh-root", "traceparent")
        .await
        .expect("traceparent sent");
    assert!(
        sent.starts_with(&format!("00-{}-", s["trace_id"].as_str().unwrap())),
        "{sent}"
    );
    assert_eq!(
        upstream_header(&emu, "fresh-root", "tracestate").await,
        None
    );
    let line = gw.access_log("fresh-root").await;
    assert_eq!(line["trace_id"], s["trace_id"]);

    // Failures: an upstream 5xx is an error span, a gateway refusal names its code.
    let s = receiver.span("upstream-fails").await;
    assert_eq!(s["status_code"], 2, "STATUS_CODE_ERROR");
    assert_eq!(s["attributes"]["error.type"], "500");
    assert_eq!(s["attributes"]["http.response.status_code"], 500);
    let s = receiver.span("no-key").await;
    assert_eq!(s["attributes"]["error.type"], "missing_api_key");
    assert_eq!(s["attributes"]["ezgate.source"], "gateway");
    assert_eq!(s["attributes"]["ezgate.client"], "other");
    assert_eq!(
        s["status_code"], 0,
        "a 4xx is the client's error, not the server's"
    );

    // Counted when the collector answered, a little after it had the spans.
    gw.wait_metric("ezgate_trace_spans_exported_total", |v| v >= 4.0)
        .await;
    gw.signal("TERM");
    assert_eq!(gw.exit_code().await, Some(0));

    // No secret and no prompt in what was exported.
    for s in receiver.all() {
        let raw = String::from_utf8_lossy(&hex_decode(s["raw"].as_str().unwrap())).into_owned();
        for secret in [ORG_KEY, CLIENT_KEY, PROMPT, &sha256_hex(CLIENT_KEY)] {
            assert!(!raw.contains(secret), "{secret} was exported");
        }
    }
}

#[tokio::test]
async fn sample_ratio_zero_records_only_sampled_parents() {
    let receiver = Receiver::start().await;
    let emu = Emulator::start().await;
    let mut gw = Gateway::start(&emu.url(), &receiver.config("0")).await;
    let unsampled = format!("00-{TRACE}-{PARENT}-00");
    let sampled = format!("00-{TRACE}-{PARENT}-01");
    for (rid, parent) in [
        ("no-parent", None),
        ("unsampled-parent", Some(unsampled.as_str())),
        ("sampled-parent", Some(sampled.as_str())),
    ] {
        let mut h = vec![("x-request-id", rid)];
        if let Some(p) = parent {
            h.push(("traceparent", p));
        }
        assert_eq!(gw.get_with("/v1/models", &h).await.status, 200);
    }
    // Shutdown exports every span that ended; then the receiver has all there will be.
    gw.signal("TERM");
    assert_eq!(gw.exit_code().await, Some(0));
    let s = receiver.span("sampled-parent").await;
    assert_eq!(s["trace_id"], TRACE);
    assert_eq!(s["parent_span_id"], PARENT);
    assert!(receiver.find("no-parent").is_none());
    assert!(receiver.find("unsampled-parent").is_none());
    assert_eq!(receiver.all().len(), 1, "{:?}", receiver.all());
    // Not recorded: the client's own context passes to the upstream unchanged.
    assert_eq!(
        upstream_header(&emu, "no-parent", "traceparent").await,
        None
    );
    assert_eq!(
        upstream_header(&emu, "unsampled-parent", "traceparent").await,
        Some(unsampled)
    );
}

#[tokio::test]
async fn a_collector_that_is_away_costs_requests_nothing() {
    // A port that nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let emu = Emulator::start().await;
    let config = format!("[tracing]\notlp_endpoint = \"http://127.0.0.1:{port}\"\n");
    let gw = Gateway::start(&emu.url(), &config).await;
    for i in 0..5 {
        let rid = format!("away-{i}");
        assert_eq!(
            gw.get_with("/v1/models", &[("x-request-id", &rid)])
                .await
                .status,
            200
        );
    }
    let failed = "ezgate_trace_spans_dropped_total{reason=\"export_failed\"}";
    let start = std::time::Instant::now();
    while gw.metric(failed).await < 5.0 {
        assert!(
            start.elapsed() < DEADLINE,
            "spans not counted as failed:\n{}",
            gw.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gw.metric("ezgate_trace_spans_exported_total").await, 0.0);
    assert_eq!(
        gw.metric("ezgate_trace_spans_dropped_total{reason=\"queue_full\"}")
            .await,
        0.0
    );
    // Logged just after the failure was counted: wait for the line, then count them.
    gw.wait_log("the collector cannot be reached").await;
    let warned = gw
        .logs
        .all()
        .iter()
        .filter(|l| l.contains("the collector cannot be reached"))
        .count();
    assert_eq!(warned, 1, "logged once per outage:\n{}", gw.logs.text());
}

#[test]
fn check_config_reports_every_tracing_mistake() {
    let dir = scratch_dir();
    let path = dir.join("ezgate.toml");
    std::fs::write(
        &path,
        "[tracing]\notlp_endpoint = \"http://user:secret@collector:4318\"\nsample_ratio = 1.5\nservice_name = \"\"\n",
    )
    .unwrap();
    let (code, err) = check_config(&path);
    assert_eq!(code, Some(2), "{err}");
    for want in [
        "tracing.otlp_endpoint",
        "tracing.sample_ratio",
        "tracing.service_name",
    ] {
        assert!(err.contains(want), "{want} missing from:\n{err}");
    }
    assert!(err.contains("carries credentials"), "{err}");
    assert!(!err.contains("secret"), "{err}");
    std::fs::write(
        &path,
        "[tracing]\notlp_endpoint = \"grpc://collector:4317\"\n",
    )
    .unwrap();
    let (code, err) = check_config(&path);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("must start with http:// or https://"), "{err}");
}

/// `ezgate check-config` of a file: its exit code and what it printed on stderr.
fn check_config(path: &std::path::Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(bin("ezgate"))
        .arg("check-config")
        .arg("--config")
        .arg(path)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

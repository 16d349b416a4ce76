//! Test harness: runs the real `ezgate` and `ezlink-emulator` binaries on port 0, and a small
//! HTTP client. Every wait has a deadline, so a broken gateway fails a test instead of hanging it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Longest any single step may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A fresh scratch directory for one test.
pub fn scratch_dir() -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ezgate-it-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Collected stderr lines of a child process.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    pub fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

async fn spawn_listening(mut cmd: Command, want: usize) -> (Child, Vec<SocketAddr>, Lines) {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn test binary");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = Lines::default();
    let sink = lines.clone();
    tokio::spawn(async move {
        let mut r = BufReader::new(stderr).lines();
        while let Ok(Some(l)) = r.next_line().await {
            sink.0.lock().unwrap().push(l);
        }
    });
    let mut out = BufReader::new(stdout).lines();
    let mut addrs = Vec::new();
    let found = tokio::time::timeout(DEADLINE, async {
        while addrs.len() < want {
            match out.next_line().await {
                Ok(Some(l)) => {
                    if let Some(a) = listening_addr(&l) {
                        addrs.push(a);
                    }
                }
                _ => break,
            }
        }
    })
    .await;
    if found.is_err() || addrs.len() < want {
        let _ = child.kill().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        panic!("process did not start listening; stderr:\n{}", lines.text());
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    (child, addrs, lines)
}

pub fn bin(name: &str) -> &'static str {
    match name {
        "ezgate" => env!("CARGO_BIN_EXE_ezgate"),
        _ => env!("CARGO_BIN_EXE_ezlink-emulator"),
    }
}

/// The upstream emulator, as a process.
pub struct Emulator {
    /// Killed when the emulator is dropped.
    _child: Child,
    pub addr: SocketAddr,
    pub tls: bool,
}

impl Emulator {
    pub async fn start() -> Emulator {
        let mut cmd = Command::new(bin("emulator"));
        cmd.args(["--listen", "127.0.0.1:0"]);
        let (child, addrs, _) = spawn_listening(cmd, 1).await;
        Emulator {
            _child: child,
            addr: addrs[0],
            tls: false,
        }
    }

    pub async fn start_tls(cert: &Path, key: &Path) -> Emulator {
        let mut cmd = Command::new(bin("emulator"));
        cmd.args(["--listen", "127.0.0.1:0", "--tls-cert"])
            .arg(cert)
            .arg("--tls-key")
            .arg(key);
        let (child, addrs, _) = spawn_listening(cmd, 1).await;
        Emulator {
            _child: child,
            addr: addrs[0],
            tls: true,
        }
    }

    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// The emulator's request log (plain HTTP only).
    pub async fn log(&self) -> Vec<Value> {
        let r = send(
            &http1(),
            Method::GET,
            &format!("http://{}/__emu/log", self.addr),
            &[],
            Bytes::new(),
        )
        .await;
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        v["requests"].as_array().cloned().unwrap_or_default()
    }

    /// The log entry of one request, by its `x-request-id`.
    pub async fn entry(&self, request_id: &str) -> Option<Value> {
        self.log()
            .await
            .into_iter()
            .find(|e| e["request_id"] == request_id)
    }

    /// Waits until the request's state is `state`, failing after `within`.
    pub async fn wait_state(&self, request_id: &str, state: &str, within: Duration) -> Duration {
        let start = std::time::Instant::now();
        loop {
            if let Some(e) = self.entry(request_id).await {
                if e["state"] == state {
                    return start.elapsed();
                }
            }
            if start.elapsed() > within {
                panic!(
                    "request {request_id} not {state} within {within:?}: {:?}",
                    self.entry(request_id).await
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A running ezgate.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub logs: Lines,
    pub config_path: PathBuf,
}

impl Gateway {
    /// Starts ezgate with `config` (TOML) pointed at `upstream`.
    pub async fn start(upstream: &str, config: &str) -> Gateway {
        Self::start_env(upstream, config, &[]).await
    }

    pub async fn start_env(upstream: &str, config: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = scratch_dir();
        let config_path = dir.join("ezgate.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(bin("ezgate"));
        cmd.arg("--config").arg(&config_path).args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            upstream,
        ]);
        cmd.env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (child, addrs, logs) = spawn_listening(cmd, 2).await;
        Gateway {
            child,
            addr: addrs[0],
            admin: addrs[1],
            logs,
            config_path,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> Resp {
        send(&http1(), Method::GET, &self.url(path), &[], Bytes::new()).await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        send(
            &http1(),
            Method::GET,
            &self.url(path),
            headers,
            Bytes::new(),
        )
        .await
    }

    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Resp {
        send(
            &http1(),
            Method::POST,
            &self.url(path),
            headers,
            body.into(),
        )
        .await
    }

    pub async fn chat(&self, headers: &[(&str, &str)]) -> Resp {
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(headers);
        self.post("/v1/chat/completions", &h, CHAT_BODY).await
    }

    pub async fn metrics(&self) -> String {
        let r = send(
            &http1(),
            Method::GET,
            &format!("http://{}/metrics", self.admin),
            &[],
            Bytes::new(),
        )
        .await;
        String::from_utf8(r.body.to_vec()).unwrap()
    }

    /// The value of one sample line of `/metrics`, e.g. `ezgate_requests_total{…}`.
    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        metric_value(&self.metrics().await, name_and_labels)
    }

    /// Waits for the process to exit (it was told to) and returns its exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the gateway exits")
            .expect("the gateway's exit status")
            .code()
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("gateway running").to_string();
        let ok = std::process::Command::new("kill")
            .args(["-s", sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {sig} failed");
    }

    /// Waits for the access-log line of a request id and returns it as JSON.
    pub async fn access_log(&self, request_id: &str) -> Value {
        let start = std::time::Instant::now();
        loop {
            for l in self.logs.all() {
                if l.contains("ezgate::access") && l.contains(request_id) {
                    return serde_json::from_str(&l).unwrap();
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no access log for {request_id}:\n{}",
                self.logs.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The interpreter of the test virtualenv that `.ci/test` makes.
pub fn python() -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run .ci/test once (it makes the venv from tests/requirements.txt)",
        p.display()
    );
    p
}

/// A client key's digest as `key_sha256` takes it.
pub fn sha256_hex(key: &str) -> String {
    ezgate::clients::sha256(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Longest a `tests/py` script may run (interpreter start and SDK imports included).
pub const PYTHON_DEADLINE: Duration = Duration::from_secs(90);

/// Runs `tests/py/<script> <arg>` in the test venv and returns the JSON it printed; fails
/// the test when the script fails.
pub async fn run_python(script: &str, arg: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    // Importing the SDKs alone takes seconds of CPU, many on a machine busy compiling: the
    // script gets a longer bound than a single step, and is killed when it is over.
    let out = tokio::time::timeout(
        PYTHON_DEADLINE,
        Command::new(python())
            .arg(&script)
            .arg(arg)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} did not finish within {PYTHON_DEADLINE:?}",
            script.display()
        )
    })
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

/// A header of a request in the emulator's log (`Emulator::log`), by name (any case).
pub fn logged_header<'a>(entry: &'a Value, name: &str) -> Option<&'a str> {
    entry["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .and_then(|h| h[1].as_str())
}

/// A sample's value from Prometheus text, labels in the exposition's (sorted) order; 0 when absent.
pub fn metric_value(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

pub const CHAT_BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello to the gateway tests."}]}"#;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

pub fn h2c() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A complete response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The error object, after checking the body against `docs/error.schema.json`.
    pub fn error(&self) -> Value {
        assert_eq!(
            self.headers["content-type"], "application/json",
            "error content-type"
        );
        let v = self.json();
        crate::schema::assert_valid(&v);
        assert_eq!(
            v["error"]["status"],
            self.status.as_u16(),
            "status member equals HTTP status"
        );
        assert_eq!(
            self.headers
                .get("content-length")
                .map(|h| h.to_str().unwrap().to_owned()),
            Some(self.body.len().to_string()),
            "content-length describes the new body"
        );
        assert!(
            self.headers.get("content-encoding").is_none(),
            "error bodies are not encoded"
        );
        v["error"].clone()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

pub async fn send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Resp {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).unwrap();
    tokio::time::timeout(DEADLINE, async {
        let resp = client
            .request(req)
            .await
            .unwrap_or_else(|e| panic!("request to {url} failed: {e:?}"));
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_else(|e| panic!("body of {url}: {e:?}"));
        Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    })
    .await
    .unwrap_or_else(|_| panic!("request to {url} took longer than {DEADLINE:?}"))
}

/// Sends raw bytes on a new connection and returns everything read until the server closes
/// it (or `wait` passes).
pub async fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    out
}

/// The address of a `listening on ADDR` / `admin listening on ADDR` line, written as text or
/// (`log.format = "json"`) as a JSON log line with its `addr`.
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    if line.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(line).ok()?;
        if !v["message"].as_str()?.contains("listening on ") {
            return None;
        }
        return Some(
            v["addr"]
                .as_str()?
                .parse()
                .expect("a listening line's addr"),
        );
    }
    let (_, addr) = line.split_once("listening on ")?;
    Some(addr.trim().parse().expect("a listening line's address"))
}

impl Gateway {
    /// Waits until the sample `name_and_labels` of `/metrics` satisfies `want`, and returns
    /// its value. A request is counted when its response ends on the gateway's side, which
    /// may be just after the client read the last byte: read counters through this (or
    /// [`Gateway::settled_metrics`]), never once right after a response.
    pub async fn wait_metric(&self, name_and_labels: &str, want: impl Fn(f64) -> bool) -> f64 {
        let start = std::time::Instant::now();
        loop {
            let text = self.metrics().await;
            let v = metric_value(&text, name_and_labels);
            if want(v) {
                return v;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{name_and_labels} is {v}, never what the test waits for:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `/metrics` once no request is in flight (every `ezgate_inflight_requests` sample is
    /// 0): a request leaves the gauge only after it was counted, so every finished request
    /// is in this text. Only for tests that hold no request open.
    pub async fn settled_metrics(&self) -> String {
        let start = std::time::Instant::now();
        loop {
            let text = self.metrics().await;
            let busy: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("ezgate_inflight_requests{"))
                .filter(|l| !l.ends_with(" 0"))
                .collect();
            if busy.is_empty() {
                return text;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "requests still in flight: {busy:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a line of the gateway's log that contains `needle`, and returns it. Read a
    /// line logged after an event through this: the line reaches the reader a little later.
    pub async fn wait_log(&self, needle: &str) -> String {
        let start = std::time::Instant::now();
        loop {
            if let Some(l) = self.logs.all().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no log line with {needle:?}:\n{}",
                self.logs.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The admin listener.
impl Gateway {
    /// A request to the admin listener.
    pub async fn admin(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Resp {
        let url = format!("http://{}{path_and_query}", self.admin);
        send(&http1(), method, &url, headers, Bytes::new()).await
    }

    /// `GET /status`, as JSON (the raw body is `Resp::body`).
    pub async fn status(&self) -> (Value, String) {
        let r = self.admin(Method::GET, "/status", &[]).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let text = String::from_utf8(r.body.to_vec()).unwrap();
        (serde_json::from_str(&text).unwrap(), text)
    }

    /// Waits until the gateway's log holds `needle` `n` times.
    pub async fn wait_logs(&self, needle: &str, n: usize) {
        let start = std::time::Instant::now();
        while self.logs.text().matches(needle).count() < n {
            assert!(
                start.elapsed() < DEADLINE,
                "no {n}× {needle:?} in the log:\n{}",
                self.logs.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `fp:` and the first 12 hex digits of a value's SHA-256, as ezgate shows keys.
pub fn fingerprint_of(value: &str) -> String {
    format!("fp:{}", &sha256_hex(value)[..12])
}

/// The emulator's quota mode (`/__emu/quota`).
impl Emulator {
    /// `PUT /__emu/quota` with `spec` (e.g. `{"requests": {"limit": 20, "per": "2s"}}`):
    /// quota mode on, or changed at once. Returns the `GET` document.
    pub async fn set_quota(&self, spec: Value) -> Value {
        let r = send(
            &http1(),
            Method::PUT,
            &format!("http://{}/__emu/quota", self.addr),
            &[("content-type", "application/json")],
            Bytes::from(spec.to_string()),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        r.json()
    }

    /// `GET /__emu/quota`: the quota, and the `admitted`, `limited` and `admitted_tokens`
    /// counters.
    pub async fn quota(&self) -> Value {
        let r = send(
            &http1(),
            Method::GET,
            &format!("http://{}/__emu/quota", self.addr),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        r.json()
    }
}

//! What the docs promise, the binary does: the headers of each 429 code (the table of
//! docs/errors.md, read here), and JSON log lines from startup to shutdown.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::*;

/// The table "The headers of ezgate's 429s" of docs/errors.md: for each code, every header
/// the table names and whether the code sends it.
fn documented_429_headers() -> BTreeMap<String, Vec<(String, bool)>> {
    let doc = include_str!("../../docs/errors.md");
    let section = doc
        .split("### The headers of ezgate's 429s")
        .nth(1)
        .expect("docs/errors.md has the section of the 429 headers");
    let mut rows = section
        .lines()
        .skip_while(|l| !l.starts_with("| code |"))
        .take_while(|l| l.starts_with('|'));
    let cells = |l: &str| -> Vec<String> {
        l.trim()
            .trim_matches('|')
            .split(" | ")
            .map(|c| c.trim().to_owned())
            .collect()
    };
    let ticked = |c: &str| -> Vec<String> {
        c.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_ascii_lowercase)
            .collect()
    };
    let head = cells(rows.next().expect("the table's head"));
    let columns: Vec<Vec<String>> = head[1..].iter().map(|c| ticked(c)).collect();
    let mut table = BTreeMap::new();
    for row in rows.skip(1) {
        let c = cells(row);
        assert_eq!(c.len(), head.len(), "a row of the 429 table: {row}");
        let code = ticked(&c[0]).remove(0);
        let mut headers = Vec::new();
        for (names, cell) in columns.iter().zip(&c[1..]) {
            let sent = cell.starts_with("yes");
            assert!(sent || cell == "—", "a cell is \"yes…\" or \"—\": {cell}");
            headers.extend(names.iter().map(|n| (n.clone(), sent)));
        }
        table.insert(code, headers);
    }
    table
}

fn assert_documented(table: &BTreeMap<String, Vec<(String, bool)>>, code: &str, r: &Resp) {
    assert_eq!(
        r.status,
        429,
        "{code}: {}",
        String::from_utf8_lossy(&r.body)
    );
    let e = r.error();
    assert_eq!(e["code"], code);
    let headers = table
        .get(code)
        .unwrap_or_else(|| panic!("docs/errors.md documents the headers of {code}"));
    for (name, sent) in headers {
        assert_eq!(
            r.header(name).is_some(),
            *sent,
            "{code}: docs/errors.md says {name} is {}sent; got {:?}",
            if *sent { "" } else { "not " },
            r.headers
        );
    }
    // What the headers say agrees with the body.
    let ms = e["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert_eq!(r.header("retry-after-ms"), Some(ms.to_string().as_str()));
    assert_eq!(
        r.header("retry-after"),
        Some(ms.div_ceil(1000).to_string().as_str())
    );
}

#[tokio::test]
async fn every_429_code_sends_the_headers_docs_errors_md_promises() {
    let table = documented_429_headers();
    assert_eq!(
        table.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "concurrency_limited",
            "rate_limited",
            "token_rate_limited",
            "upstream_quota_exhausted",
            "upstream_rate_limited"
        ],
        "the table covers every 429 code of ezgate"
    );
    let emu = Emulator::start().await;
    let config = r#"
[[limits]]
name = "rpm"
key = "global"
requests = "1/min"
match = { routes = ["/v1/models"] }

[[limits]]
name = "tpm"
key = "global"
tokens = "10/min"
match = { routes = ["/v1/embeddings"], models = ["text-embedding-3-small"] }

[[limits]]
name = "one-at-a-time"
key = "global"
concurrency = 1
match = { routes = ["/v1/chat/completions"] }
"#;
    let gw = Gateway::start(&emu.url(), config).await;

    // rate_limited: the second listing within the minute.
    assert_eq!(gw.get("/v1/models").await.status, 200);
    let r = gw.get("/v1/models").await;
    assert_documented(&table, "rate_limited", &r);
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("1"));
    assert_eq!(r.header("ratelimit-policy"), Some("\"rpm\";q=1;w=60"));

    // token_rate_limited: a first embedding larger than the bucket is admitted into debt;
    // the next one does not fit.
    let input = "word ".repeat(200);
    let body = format!(r#"{{"model":"text-embedding-3-small","input":"{input}"}}"#);
    let json = [("content-type", "application/json")];
    assert_eq!(
        gw.post("/v1/embeddings", &json, body.clone()).await.status,
        200
    );
    let r = gw.post("/v1/embeddings", &json, body).await;
    assert_documented(&table, "token_rate_limited", &r);
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("10"));

    // upstream_rate_limited: the upstream's 429 with Retry-After holds the next request.
    let key = ("authorization", "Bearer sk-held");
    let embed = Bytes::from(r#"{"model":"text-embedding-3-large","input":"x"}"#);
    let first = send(
        &http1(),
        Method::POST,
        &gw.url("/v1/embeddings"),
        &[
            key,
            json[0],
            ("x-emu-status", "429"),
            ("x-emu-retry-after", "30"),
        ],
        embed.clone(),
    )
    .await;
    assert_eq!(first.status, 429);
    assert_eq!(first.error()["source"], "upstream");
    let r = send(
        &http1(),
        Method::POST,
        &gw.url("/v1/embeddings"),
        &[key, json[0]],
        embed,
    )
    .await;
    assert_documented(&table, "upstream_rate_limited", &r);

    // concurrency_limited: an open stream holds the only slot.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-emu-stream-events: 1000\r\nx-emu-stream-interval-ms: 50\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("the stream starts")
        .unwrap();
    assert!(n > 0, "the stream started");
    let r = gw.chat(&[]).await;
    assert_documented(&table, "concurrency_limited", &r);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"one-at-a-time\";q=1;qu=\"concurrent-requests\"")
    );
    assert_eq!(r.header("ratelimit"), Some("\"one-at-a-time\";r=0;t=1"));
    drop(s);

    // upstream_quota_exhausted: pacing on a learned quota of two requests a minute, with no
    // patience. The first answer teaches the quota; the next request would wait for it.
    let emu = Emulator::start().await;
    emu.set_quota(serde_json::json!({"requests": {"limit": 2, "per": "1m"}}))
        .await;
    let paced = "[upstream.quota]\nmode = \"enforce\"\nmax_wait = { interactive = \"1ms\" }\n";
    let gw = Gateway::start(&emu.url(), paced).await;
    assert_eq!(gw.chat(&[]).await.status, 200);
    let r = gw.chat(&[]).await;
    assert_documented(&table, "upstream_quota_exhausted", &r);

    // budget_exceeded: a global budget smaller than any request's maximum cost.
    let budgeted = "[prices]\ncurrency = \"USD\"\nmodels = [{ model = \"gpt-4o\", input = 2.5, output = 10 }]\n\n[[budgets]]\nname = \"tiny\"\nkey = \"global\"\namount = 0.000001\nperiod = \"month\"\ntimezone = \"UTC\"\n";
    let gw = Gateway::start(&emu.url(), budgeted).await;
    let r = gw.chat(&[("x-request-id", "over-budget")]).await;
    assert_budget_exceeded(&table, &r);
    assert!(emu.entry("over-budget").await.is_none());
}

/// `budget_exceeded`, "a 429 of another kind" (docs/errors.md, after the table): no window
/// and no rate, so none of the table's rate-limit headers; `Retry-After` and
/// `retry-after-ms` until the next period, and always `x-should-retry: false`.
fn assert_budget_exceeded(table: &BTreeMap<String, Vec<(String, bool)>>, r: &Resp) {
    let sent = ["retry-after", "retry-after-ms", "x-should-retry"];
    let mut table = table.clone();
    let headers = table
        .values()
        .flatten()
        .map(|(name, _)| (name.clone(), sent.contains(&name.as_str())))
        .collect::<std::collections::BTreeSet<_>>();
    assert!(
        sent.iter().all(|s| headers.iter().any(|(n, _)| n == s)),
        "the table names every header: {headers:?}"
    );
    table.insert("budget_exceeded".to_owned(), headers.into_iter().collect());
    assert_documented(&table, "budget_exceeded", r);
    assert_eq!(r.header("x-should-retry"), Some("false"));
}

/// Lines of a child's stream, collected until it closes.
fn collect(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> (Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let task = tokio::spawn(async move {
        let mut r = BufReader::new(stream).lines();
        while let Ok(Some(l)) = r.next_line().await {
            sink.lock().unwrap().push(l);
        }
    });
    (lines, task)
}

/// Waits until some line satisfies `pred`, within the deadline.
async fn wait_line(lines: &Mutex<Vec<String>>, what: &str, pred: impl Fn(&str) -> bool) {
    let found = tokio::time::timeout(DEADLINE, async {
        loop {
            if lines.lock().unwrap().iter().any(|l| pred(l)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "no line {what}:\n{}",
        lines.lock().unwrap().join("\n")
    );
}

#[tokio::test]
async fn with_json_logs_every_line_ezgate_prints_is_json() {
    let emu = Emulator::start().await;
    let dir = scratch_dir();
    let config_path = dir.join("ezgate.toml");
    std::fs::write(
        &config_path,
        "[log]\nformat = \"json\"\nlevel = \"debug\"\n",
    )
    .unwrap();
    let mut child = tokio::process::Command::new(bin("ezgate"))
        .arg("--config")
        .arg(&config_path)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
        ])
        .arg(emu.url())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (out, out_done) = collect(child.stdout.take().unwrap());
    let (err, err_done) = collect(child.stderr.take().unwrap());

    // Startup: both addresses, from JSON lines.
    wait_line(&out, "announcing the admin listener", |l| {
        l.contains("admin listening on")
    })
    .await;
    let addrs: Vec<_> = out
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| listening_addr(l))
        .collect();
    assert_eq!(addrs.len(), 2, "{:?}", out.lock().unwrap());
    let first: Value = serde_json::from_str(&out.lock().unwrap()[0]).unwrap();
    assert_eq!(first["message"], format!("listening on {}", addrs[0]));
    assert_eq!(first["listener"], "proxy");
    assert_eq!(first["level"], "INFO");
    assert!(
        first["timestamp"].as_str().unwrap().ends_with('Z'),
        "{first}"
    );

    // A request (its access line), and a refused one.
    let url = format!("http://{}/v1/chat/completions", addrs[0]);
    let ok = send(
        &http1(),
        Method::POST,
        &url,
        &[
            ("content-type", "application/json"),
            ("x-request-id", "json-1"),
        ],
        Bytes::from(CHAT_BODY),
    )
    .await;
    assert_eq!(ok.status, 200);
    wait_line(&err, "of the request's access log", |l| {
        l.contains("json-1")
    })
    .await;

    // A reload, then a SIGTERM shutdown.
    let pid = child.id().unwrap().to_string();
    let kill = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args(["-s", sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    kill("HUP");
    wait_line(&err, "saying the config reloaded", |l| {
        l.contains("config reloaded")
    })
    .await;
    kill("TERM");
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("ezgate exits after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    tokio::time::timeout(DEADLINE, async {
        out_done.await.unwrap();
        err_done.await.unwrap();
    })
    .await
    .expect("stdout and stderr close");

    let out = out.lock().unwrap().clone();
    let err = err.lock().unwrap().clone();
    assert!(err.iter().any(|l| l.contains("SIGTERM")), "{err:?}");
    for (stream, lines) in [("stdout", &out), ("stderr", &err)] {
        assert!(!lines.is_empty(), "{stream} printed nothing");
        for l in lines {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("a {stream} line is not JSON ({e}): {l}"));
            assert!(v.is_object(), "{stream}: {l}");
            assert!(
                v["timestamp"].is_string(),
                "{stream} line without timestamp: {l}"
            );
            assert!(v["level"].is_string(), "{stream} line without level: {l}");
        }
    }
}

/// docs/rate-limits.md ("Clients"): the openai SDK waits through ezgate's 429s by default,
/// and `max_retries=0` (on the client or per request) gets the 429 at once.
#[tokio::test]
async fn the_openai_sdk_waits_through_429s_unless_told_not_to() {
    let emu = Emulator::start().await;
    let config = r#"
[[limits]]
name = "fast"
key = "global"
requests = "2/s"
burst = 1
match = { routes = ["/v1/models"] }

[[limits]]
name = "slow"
key = "global"
requests = "1/min"
match = { routes = ["/v1/files"] }
"#;
    let gw = Gateway::start(&emu.url(), config).await;
    let v = run_python("sdk_retries.py", &gw.url("/v1")).await;
    assert_eq!(v["default_max_retries"], 2, "{v}");
    let retries: Vec<u64> = v["default_retries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_u64().unwrap())
        .collect();
    assert!(
        retries.iter().any(|&r| r > 0),
        "the SDK retried a 429 and then succeeded: {v}"
    );
    for rid in ["sdk-per-request", "sdk-client"] {
        assert_eq!(v[rid]["status"], 429, "{v}");
        assert_eq!(v[rid]["code"], "rate_limited", "{v}");
    }
    // Each opted-out call reached ezgate once: no retry followed. A later request's access
    // line proves the earlier ones are all written (one writer, in order).
    gw.get_with("/v1/marker", &[("x-request-id", "sdk-marker")])
        .await;
    gw.access_log("sdk-marker").await;
    let logs = gw.logs.all();
    for rid in ["sdk-first", "sdk-per-request", "sdk-client"] {
        let needle = format!("\"request_id\":\"{rid}\"");
        let n = logs
            .iter()
            .filter(|l| l.contains("ezgate::access") && l.contains(&needle))
            .count();
        assert_eq!(n, 1, "{rid} reached ezgate {n} times");
    }
}

/// A failure once logging is set up (here: the listen address is taken) is a JSON line too;
/// with text logs it stays `ezgate: …`.
#[test]
fn a_bind_failure_is_a_json_line_with_json_logs() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for format in ["json", "text"] {
        let dir = scratch_dir();
        let config_path = dir.join("ezgate.toml");
        std::fs::write(&config_path, format!("[log]\nformat = \"{format}\"\n")).unwrap();
        let out = std::process::Command::new(bin("ezgate"))
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", &addr, "--admin-listen", "127.0.0.1:0"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(out.stdout.is_empty(), "nothing was announced: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.contains(&addr), "{format}: {stderr}");
        if format == "json" {
            for l in stderr.lines() {
                let v: Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("a stderr line is not JSON ({e}): {l}"));
                assert!(v["timestamp"].is_string(), "{l}");
            }
            let v: Value = serde_json::from_str(last).unwrap();
            assert_eq!(v["level"], "ERROR", "{last}");
        } else {
            assert!(last.starts_with("ezgate: "), "{last}");
        }
    }
    drop(taken);
}

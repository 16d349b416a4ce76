//! Metrics (docs/metrics.md): per-status counts, bounded labels, valid exposition — checked with the real
//! `promtool` and a real Prometheus server (installed by `.ci/test`).

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::Method;

use crate::harness::*;

fn tool(name: &str) -> String {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    assert!(!path.is_empty(), "`{name}` is not installed: run .ci/test (it installs Debian's prometheus package) or `apt-get install prometheus`");
    path
}

#[tokio::test]
async fn statuses_are_counted_exactly_by_source() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[[limits]]\nname = \"two\"\nkey = \"global\"\nrequests = \"2/h\"\nmatch = { routes = [\"/v1/embeddings\"] }\n").await;
    for _ in 0..3 {
        assert_eq!(gw.chat(&[]).await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(gw.chat(&[("x-emu-status", "404")]).await.status, 404);
    }
    assert_eq!(
        gw.chat(&[("x-emu-status", "500"), ("x-emu-body", "html")])
            .await
            .status,
        500
    );
    for _ in 0..3 {
        gw.post(
            "/v1/embeddings",
            &[("content-type", "application/json")],
            r#"{"model":"text-embedding-3-small","input":"a"}"#,
        )
        .await;
    }
    let m = gw.settled_metrics().await;
    let count = |labels: &str| metric_value(&m, &format!("ezgate_requests_total{{{labels}}}"));
    assert_eq!(
        count("method=\"POST\",route=\"/v1/chat/completions\",source=\"upstream\",status=\"200\""),
        3.0
    );
    assert_eq!(
        count("method=\"POST\",route=\"/v1/chat/completions\",source=\"upstream\",status=\"404\""),
        2.0
    );
    assert_eq!(
        count("method=\"POST\",route=\"/v1/chat/completions\",source=\"upstream\",status=\"500\""),
        1.0
    );
    assert_eq!(
        count("method=\"POST\",route=\"/v1/embeddings\",source=\"upstream\",status=\"200\""),
        2.0
    );
    assert_eq!(
        count("method=\"POST\",route=\"/v1/embeddings\",source=\"gateway\",status=\"429\""),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "ezgate_upstream_responses_total{model=\"gpt-4o\",status=\"404\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &m,
            "ezgate_upstream_responses_total{model=\"text-embedding-3-small\",status=\"200\"}"
        ),
        2.0,
        "the refused embedding never reached the upstream"
    );
    // No [redis]: the shared store's series do not exist (not a misleading 0 or 1).
    assert!(!m.contains("ezgate_ratelimit_store_up"), "{m}");
    assert!(
        !m.contains("ezgate_ratelimit_store_check_duration_seconds"),
        "{m}"
    );
    assert_eq!(metric_value(&m, "ezgate_request_duration_seconds_count{route=\"/v1/chat/completions\",status_class=\"2xx\"}"), 3.0);
    assert_eq!(
        metric_value(
            &m,
            "ezgate_upstream_header_duration_seconds_count{route=\"/v1/chat/completions\"}"
        ),
        6.0
    );
    assert_eq!(
        metric_value(
            &m,
            "ezgate_overhead_seconds_count{route=\"/v1/embeddings\"}"
        ),
        3.0
    );
    assert_eq!(
        metric_value(
            &m,
            "ezgate_ratelimit_decisions_total{decision=\"allowed\",policy=\"two\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &m,
            "ezgate_inflight_requests{route=\"/v1/chat/completions\"}"
        ),
        0.0
    );
    assert!(
        m.contains("\nezgate_build_info{"),
        "build info (its labels: startup.rs)"
    );
    assert!(
        m.contains("process_resident_memory_bytes"),
        "the process collector is registered"
    );
    // Tokens from JSON usage (chat) and from the final SSE chunk.
    let before = metric_value(
        &m,
        "ezgate_tokens_total{client=\"anonymous\",kind=\"completion\",model=\"gpt-4o\"}",
    );
    assert_eq!(before, 21.0, "3 chats × 7 completion tokens");
    gw.post(
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-emu-stream-events", "4"),
        ],
        r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
    )
    .await;
    assert_eq!(
        gw.wait_metric(
            "ezgate_tokens_total{client=\"anonymous\",kind=\"completion\",model=\"gpt-4o\"}",
            |v| v >= 25.0
        )
        .await,
        25.0
    );
}

#[tokio::test]
async fn labels_stay_bounded_under_random_paths_and_models() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let client = http1();
    let series = |m: &str| m.lines().filter(|l| l.starts_with("ezgate_")).count();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut before = 0;
    let mut tasks = Vec::new();
    for i in 0..10_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let path = if i % 2 == 0 {
            format!("/v1/{x:x}/{i}?q={x}")
        } else {
            "/v1/chat/completions".to_owned()
        };
        let body = format!(r#"{{"model":"model-{x:x}","messages":[]}}"#);
        let c = client.clone();
        let url = gw.url(&path);
        tasks.push(async move {
            send(
                &c,
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                Bytes::from(body),
            )
            .await
            .status
        });
        if tasks.len() == 64 {
            futures_join(std::mem::take(&mut tasks)).await;
            if i == 127 {
                before = series(&gw.settled_metrics().await);
            }
        }
    }
    futures_join(tasks).await;
    let m = gw.settled_metrics().await;
    let after = series(&m);
    assert_eq!(
        after, before,
        "series grew from {before} to {after} with random paths and models"
    );
    assert!(after < 1000, "{after} series");
    for line in m.lines().filter(|l| l.starts_with("ezgate_")) {
        assert!(!line.contains("model-"), "raw model in a label: {line}");
        assert!(!line.contains("?q="), "raw path in a label: {line}");
    }
    assert_eq!(metric_value(&m, "ezgate_requests_total{method=\"POST\",route=\"other\",source=\"upstream\",status=\"404\"}"), 5000.0);
    assert!(
        metric_value(
            &m,
            "ezgate_tokens_total{client=\"anonymous\",kind=\"prompt\",model=\"other\"}"
        ) > 0.0
    );
    let upstream_other: f64 = m
        .lines()
        .filter(|l| l.starts_with("ezgate_upstream_responses_total{model=\"other\","))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        upstream_other, 10000.0,
        "every request naming an unknown model is counted under model=\"other\":\n{m}"
    );
}

async fn futures_join(
    tasks: Vec<impl std::future::Future<Output = http::StatusCode> + Send + 'static>,
) {
    let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    for h in handles {
        h.await.unwrap();
    }
}

#[tokio::test]
async fn promtool_accepts_the_live_exposition() {
    let promtool = tool("promtool");
    let emu = Emulator::start().await;
    let gw = Gateway::start(
        &emu.url(),
        "[[limits]]\nname = \"p\"\nkey = \"ip\"\nrequests = \"1/h\"\n",
    )
    .await;
    gw.chat(&[]).await;
    gw.chat(&[]).await;
    gw.chat(&[("x-emu-status", "503")]).await;
    let text = gw.metrics().await;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_real_prometheus_sees_exactly_the_provoked_counts() {
    let prometheus = tool("prometheus");
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "[[limits]]\nname = \"one\"\nkey = \"global\"\nrequests = \"1/h\"\nmatch = { routes = [\"/v1/embeddings\"] }\n").await;
    let dir = scratch_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ezgate\n    static_configs:\n      - targets: ['{}']\n", gw.admin),
    )
    .unwrap();
    let mut prom = tokio::process::Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Provoke known counts: 3×200, 2×404 (upstream), 1×429 gateway, 1×429 upstream, 2×502.
    for _ in 0..3 {
        assert_eq!(gw.get("/v1/models").await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(
            gw.get_with("/v1/models", &[("x-emu-status", "404")])
                .await
                .status,
            404
        );
    }
    let embed = r#"{"model":"text-embedding-3-small","input":"a"}"#;
    assert_eq!(
        gw.post(
            "/v1/embeddings",
            &[("content-type", "application/json")],
            embed
        )
        .await
        .status,
        200
    );
    assert_eq!(
        gw.post(
            "/v1/embeddings",
            &[("content-type", "application/json")],
            embed
        )
        .await
        .status,
        429
    );
    assert_eq!(
        gw.get_with("/v1/models", &[("x-emu-status", "429")])
            .await
            .status,
        429
    );
    for _ in 0..2 {
        assert_eq!(
            gw.get_with("/v1/models", &[("x-emu-malformed", "1")])
                .await
                .status,
            502
        );
    }
    let want = [
        ("200", "upstream", 4.0),
        ("404", "upstream", 2.0),
        ("429", "gateway", 1.0),
        ("429", "upstream", 1.0),
        ("502", "gateway", 2.0),
    ];
    let query = format!("http://127.0.0.1:{port}/api/v1/query?query=sum%20by%20(status%2Csource)%20(ezgate_requests_total)");
    let start = std::time::Instant::now();
    let mut last = String::new();
    loop {
        if let Ok(Ok(resp)) = tokio::time::timeout(
            Duration::from_secs(2),
            http1().request(
                http::Request::get(&query)
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap(),
            ),
        )
        .await
        {
            use http_body_util::BodyExt;
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let got: Vec<(String, String, f64)> = v["data"]["result"]
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .map(|r| {
                            (
                                r["metric"]["status"].as_str().unwrap_or("").to_owned(),
                                r["metric"]["source"].as_str().unwrap_or("").to_owned(),
                                r["value"][1].as_str().unwrap_or("0").parse().unwrap_or(0.0),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let matches = want.iter().all(|(s, src, n)| {
                got.iter()
                    .any(|(gs, gsrc, gn)| gs == s && gsrc == src && gn == n)
            }) && got.len() == want.len();
            if matches {
                break;
            }
            last = format!("{got:?}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "Prometheus never showed the provoked counts; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = prom.kill().await;
}

/// The sum and count of a histogram series (`name` without `_sum`/`_count`, `labels` inside `{}`).
fn histogram(m: &str, name: &str, labels: &str) -> (f64, f64) {
    (
        metric_value(m, &format!("{name}_sum{{{labels}}}")),
        metric_value(m, &format!("{name}_count{{{labels}}}")),
    )
}

#[tokio::test]
async fn streams_report_time_to_first_token_and_per_output_token() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), "").await;
    let stream = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    // The first token after at least 300 ms; then 5 more events 100 ms apart.
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-emu-header-delay-ms", "300"),
                ("x-emu-stream-events", "6"),
                ("x-emu-stream-interval-ms", "100"),
                ("x-request-id", "ttft-stream"),
            ],
            stream,
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("[DONE]"));
    // A plain JSON answer: its first body byte is its first token; it has no per-token time.
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-emu-header-delay-ms", "200"),
            ],
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    // Errors have no first token.
    let r = gw
        .post(
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-emu-status", "500"),
            ],
            stream,
        )
        .await;
    assert_eq!(r.status, 500);

    let m = gw.settled_metrics().await;
    let ttft = "ezgate_time_to_first_token_seconds";
    let (sum, count) = histogram(&m, ttft, "model=\"gpt-4o\",route=\"/v1/chat/completions\"");
    assert_eq!(count, 1.0, "one successful stream of gpt-4o:\n{m}");
    assert!(
        (0.3..30.0).contains(&sum),
        "time to first token {sum}s: at least the upstream's 300 ms"
    );
    let (sum, count) = histogram(
        &m,
        ttft,
        "model=\"gpt-4o-mini\",route=\"/v1/chat/completions\"",
    );
    assert_eq!(count, 1.0);
    assert!((0.2..30.0).contains(&sum), "first body byte after {sum}s");

    let tpot = "ezgate_time_per_output_token_seconds";
    let (sum, count) = histogram(&m, tpot, "model=\"gpt-4o\"");
    assert_eq!(count, 1.0, "one stream with usage:\n{m}");
    // 5 gaps of 100 ms over the completion tokens the emulator reported after the first.
    let logged = emu.entry("ttft-stream").await.unwrap();
    let completion = logged["usage"]["completion_tokens"].as_u64().unwrap();
    let floor = 0.5 / (completion.max(2) - 1) as f64;
    assert!(
        sum >= floor * 0.9 && sum < 5.0,
        "time per output token {sum}s (floor {floor}s, {completion} tokens)"
    );
    assert!(!m.contains("ezgate_time_per_output_token_seconds_count{model=\"gpt-4o-mini\"}"));
}

#[tokio::test]
async fn requests_are_counted_by_client_and_status() {
    let emu = Emulator::start().await;
    let digest = sha256_hex("key-team-a");
    let config = format!(
        "[upstream]\napi_key = \"${{ORG_KEY}}\"\n\n[[clients]]\nname = \"team-a\"\nkey_sha256 = \"{digest}\"\n"
    );
    let gw = Gateway::start_env(&emu.url(), &config, &[("ORG_KEY", "sk-org")]).await;
    let team = ("authorization", "Bearer key-team-a");
    for _ in 0..3 {
        assert_eq!(gw.chat(&[team]).await.status, 200);
    }
    assert_eq!(gw.chat(&[team, ("x-emu-status", "429")]).await.status, 429);
    assert_eq!(gw.chat(&[team, ("x-emu-status", "418")]).await.status, 418);
    // Unknown or missing keys match no client: `other`, never the key.
    assert_eq!(
        gw.chat(&[("authorization", "Bearer sk-stolen")])
            .await
            .status,
        401
    );
    assert_eq!(gw.chat(&[]).await.status, 401);

    let m = gw.settled_metrics().await;
    let count =
        |labels: &str| metric_value(&m, &format!("ezgate_client_requests_total{{{labels}}}"));
    assert_eq!(count("client=\"team-a\",status=\"200\""), 3.0);
    assert_eq!(count("client=\"team-a\",status=\"429\""), 1.0);
    assert_eq!(count("client=\"team-a\",status=\"418\""), 1.0);
    assert_eq!(count("client=\"other\",status=\"401\""), 2.0);
    assert!(!m.contains("sk-stolen") && !m.contains("key-team-a"));
    assert!(
        !m.contains("client=\"anonymous\""),
        "clients are configured:\n{m}"
    );

    // Without [[clients]] every request is `anonymous`.
    let gw = Gateway::start(&emu.url(), "").await;
    assert_eq!(gw.chat(&[]).await.status, 200);
    assert_eq!(
        gw.wait_metric(
            "ezgate_client_requests_total{client=\"anonymous\",status=\"200\"}",
            |v| v >= 1.0
        )
        .await,
        1.0
    );
}

/// Polls `/metrics` until `sample` reads `want`, within [`DEADLINE`].
async fn wait_metric(gw: &Gateway, sample: &str, want: f64) {
    let start = std::time::Instant::now();
    loop {
        let m = gw.metrics().await;
        let present = m.lines().any(|l| l.starts_with(&format!("{sample} ")));
        if present && metric_value(&m, sample) == want {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{sample} never read {want}:\n{m}\n{}",
            gw.logs.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_shared_store_reports_its_health_and_check_time() {
    use crate::redis_servers::Redis;
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    let config = format!(
        "[redis]\nurl = \"redis://127.0.0.1:{}\"\ntimeout = \"200ms\"\n\n[[limits]]\nname = \"shared\"\nkey = \"global\"\nrequests = \"100000/min\"\nstore = \"redis\"\n",
        redis.port
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    // Up with no traffic at all: the fleet heartbeat got an answer.
    wait_metric(&gw, "ezgate_ratelimit_store_up", 1.0).await;
    let checks = "ezgate_ratelimit_store_check_duration_seconds_count";
    assert_eq!(gw.metric(checks).await, 0.0, "no check without a request");
    for _ in 0..5 {
        assert_eq!(gw.get("/v1/models").await.status, 200);
    }
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, checks), 5.0, "one Redis check per request");
    assert_eq!(
        metric_value(
            &m,
            "ezgate_ratelimit_store_check_duration_seconds_bucket{le=\"5\"}"
        ),
        5.0
    );
    // Redis goes away while nobody sends a request: the heartbeat notices.
    let port = redis.stop().await;
    wait_metric(&gw, "ezgate_ratelimit_store_up", 0.0).await;
    gw.wait_log("redis unavailable").await;
    // A check that gets no answer is timed too (about redis.timeout).
    assert_eq!(gw.get("/v1/models").await.status, 200);
    assert_eq!(gw.metric(checks).await, 6.0);
    // Back on the same port, still without traffic: up again.
    let _redis = Redis::start_on(port).await;
    wait_metric(&gw, "ezgate_ratelimit_store_up", 1.0).await;
    gw.wait_log("redis reachable again").await;
    // A reload that drops [redis] drops the store's series: no stale 1 (or 0) is left.
    std::fs::write(&gw.config_path, "").unwrap();
    gw.signal("HUP");
    let start = std::time::Instant::now();
    loop {
        let m = gw.metrics().await;
        let left: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("ezgate_ratelimit_store_up ") || l.starts_with(checks))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "still exported after the reload: {left:?}\n{}",
            gw.logs.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

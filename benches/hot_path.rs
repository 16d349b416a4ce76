#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark setup: a failed unwrap is a broken benchmark"
)]

//! The per-request pieces of ezgate's hot path, one by one:
//! header rewriting, one rate-limit check at 10,000 live keys, metrics recording,
//! error normalization. Run with `cargo bench --bench hot_path`.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use criterion::{criterion_group, criterion_main, Criterion};

use ezgate::config::{LimitConfig, Rate};
use ezgate::errors::upstream::normalize;
use ezgate::exchange::Exchange;
use ezgate::limits::{LimitRequest, Limits};
use ezgate::metrics::Metrics;
use ezgate::route::Route;
use http::HeaderMap;

/// Polls a future that completes without waiting (an admitted limit check) once.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the check was expected to complete at once"),
    }
}

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "127.0.0.1:8080"),
        ("user-agent", "OpenAI/Python 1.54.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("content-length", "1024"),
        (
            "authorization",
            "Bearer sk-0123456789abcdef0123456789abcdef",
        ),
        ("connection", "keep-alive"),
        ("x-stainless-lang", "python"),
        ("x-stainless-retry-count", "0"),
    ] {
        h.insert(k, v.parse().unwrap());
    }
    h
}

fn headers(c: &mut Criterion) {
    let base = request_headers();
    c.bench_function("headers/strip_hop_by_hop+request_id+forwarded", |b| {
        b.iter(|| {
            let mut h = base.clone();
            ezgate::headers::strip_hop_by_hop(&mut h);
            let id = ezgate::headers::new_request_id();
            h.insert("x-request-id", id.parse().unwrap());
            ezgate::headers::append_forwarded_for(&mut h, "127.0.0.1".parse().unwrap());
            black_box(h)
        })
    });
}

fn policy(name: &str, key: &str) -> LimitConfig {
    LimitConfig {
        requests: Some(Rate {
            count: 1_000_000,
            per: std::time::Duration::from_secs(1),
        }),
        ..LimitConfig::new(name, key)
    }
}

fn limiter(c: &mut Criterion) {
    let limits = Limits::with_clock(
        &[policy("per-key", "api_key")],
        governor::clock::DefaultClock::default(),
    );
    let headers = HeaderMap::new();
    let callers: Vec<Arc<str>> = (0..10_000)
        .map(|i| Arc::from(format!("fp:{i:012x}")))
        .collect();
    let req = |fingerprint| LimitRequest {
        client: None,
        fingerprint: Some(fingerprint),
        route: Route::ChatCompletions,
        model: Some("gpt-4o"),
        prompt_tokens: 10,
        max_tokens: Some(100),
        post: true,
        ip: "127.0.0.1".parse().unwrap(),
        headers: &headers,
        managed: false,
    };
    for caller in &callers {
        assert!(now(limits.check(&req(caller))).result.is_ok());
    }
    let mut i = 0;
    c.bench_function("limits/check one requests policy at 10k live keys", |b| {
        b.iter(|| {
            i = (i + 7919) % callers.len();
            black_box(now(limits.check(&req(&callers[i]))).result.is_ok())
        })
    });
}

/// The 1 KB chat request of `benches/proxy.sh`, read the way a token policy reads it.
fn request_scan(c: &mut Criterion) {
    let body = format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":64,"temperature":0.2,"messages":[{{"role":"system","content":"You are a concise assistant for an internal support tool."}},{{"role":"user","content":"{}"}}]}}"#,
        "please summarise the following ticket and suggest the next step ".repeat(13)
    );
    c.bench_function("limits/inspect a 1 KB chat request body", |b| {
        b.iter(|| ezgate::limits::tokens::inspect(std::hint::black_box(body.as_bytes())))
    });
}

fn metrics(c: &mut Criterion) {
    let metrics = Arc::new(Metrics::new(Vec::new()).unwrap());
    let method = http::Method::POST;
    c.bench_function("metrics/start+record one request", |b| {
        b.iter(|| {
            let mut o = Exchange::start(
                Arc::clone(&metrics),
                false,
                String::new(),
                &method,
                Route::ChatCompletions,
            );
            o.status = 200;
            o.source = ezgate::errors::Source::Upstream;
            o.upstream_status = Some(200);
            o.finished = true;
            o.responded = Some(std::time::Instant::now());
            drop(black_box(o));
        })
    });
}

fn errors(c: &mut Criterion) {
    let json = br#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    c.bench_function("errors/normalize OpenAI JSON 429", |b| {
        b.iter(|| {
            black_box(normalize(429, None, Some("application/json"), json, false, "rid").to_json())
        })
    });
    let html = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>";
    c.bench_function("errors/normalize HTML 502", |b| {
        b.iter(|| black_box(normalize(502, None, Some("text/html"), html, false, "rid").to_json()))
    });
    let err = ezgate::errors::GatewayError::UpstreamUnreachable("connection refused".into());
    c.bench_function("errors/render gateway 502", |b| {
        b.iter(|| black_box(ezgate::errors::render(&err, "rid")))
    });
}

criterion_group!(benches, headers, limiter, request_scan, metrics, errors);
criterion_main!(benches);

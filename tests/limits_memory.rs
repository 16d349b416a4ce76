//! A million distinct keys through one policy keep resident memory bounded. Its own test
//! binary, so no other test's allocations blur the measurement.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::sync::Arc;
use std::time::Duration;

use ezgate::config::{LimitConfig, Rate};
use ezgate::limits::{LimitRequest, Limits};
use ezgate::route::Route;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_million_distinct_keys_keep_memory_bounded() {
    let rate = |count, secs| {
        Some(Rate {
            count,
            per: Duration::from_secs(secs),
        })
    };
    let policy = LimitConfig {
        requests: rate(100, 1),
        tokens: rate(1000, 60),
        concurrency: Some(4),
        max_keys: Some(10_000),
        ..LimitConfig::new("cap", "api_key")
    };
    let limits = Limits::with_clock(&[policy], governor::clock::DefaultClock::default());
    let headers = http::HeaderMap::new();
    let before = rss_kib();
    for i in 0..1_000_000u32 {
        let fingerprint: Arc<str> = Arc::from(format!("fp:{i:012x}"));
        let req = LimitRequest {
            client: None,
            fingerprint: Some(&fingerprint),
            route: Route::ChatCompletions,
            model: Some("gpt-4o"),
            prompt_tokens: 10,
            max_tokens: Some(10),
            post: true,
            ip: "127.0.0.1".parse().unwrap(),
            headers: &headers,
            managed: false,
        };
        let _ = limits.check(&req).await;
    }
    // What the `ezgate_ratelimit_keys` gauge shows.
    let keys = limits.maintain()[0];
    assert!(
        keys <= 10_001,
        "{keys} keys tracked; the cap is 10,000 plus the overflow key"
    );
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 48,
        "resident memory grew by {grown_mib} MiB for 1,000,000 keys"
    );
}

//! `[[budgets]] store = "redis"` (docs/budgets.md, "Across the fleet"): gateways that share
//! one Redis spend one budget exactly — standalone, Cluster and Sentinel; while Redis is
//! frozen each admits only its share of what was left, and what it charged reaches Redis
//! when it returns; a gateway killed with a request in flight holds the budget no longer
//! than the lease.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::Value;

use crate::harness::*;
use crate::redis_servers::*;

/// Every request asks for and is answered 100 completion tokens, at 10.123457 per million
/// (prompts are free): its maximum cost is its cost, 1_012_346 nano-units (1_012_345_700
/// pico-units, rounded half up), so a refusal never depends on a settlement's timing.
const COST: u64 = 1_012_346;
const BODY: &str =
    r#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"hello"}]}"#;

/// `amount` as the config writes it (nano-units are exact in 9 decimals).
fn decimal(nanos: u64) -> String {
    format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
}

fn config(redis: &str, amount: u64) -> String {
    format!(
        r#"[log]
access_log = false

[prices]
currency = "USD"
models = [{{ model = "gpt-4o*", input = 0.0, output = 10.123457 }}]

[[budgets]]
name = "fleet"
key = "global"
amount = {}
period = "month"
warn_at = [0.5]
store = "redis"

[redis]
{redis}timeout = "300ms"
concurrency_lease = "3s"
"#,
        decimal(amount)
    )
}

fn standalone(port: u16) -> String {
    format!("url = \"redis://127.0.0.1:{port}\"\n")
}

async fn chat(gw: &Gateway) -> Resp {
    gw.post(
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-emu-completion-tokens", "100"),
        ],
        BODY,
    )
    .await
}

/// A 429 `budget_exceeded` that the SDKs do not retry.
fn assert_exceeded(r: &Resp) {
    assert_eq!(r.status, 429, "{:?}", r.body);
    let e = r.error();
    assert_eq!(e["code"], "budget_exceeded", "{e}");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert!(r.header("retry-after").is_some());
}

/// What the budget's hashes on `nodes` hold: the sum of the gateways' spend (`s:`) and of
/// their reservations (`q:`).
async fn in_redis(nodes: &[&Redis]) -> (u64, u64) {
    let (mut spent, mut reserved) = (0, 0);
    for n in nodes {
        for key in n.cli(&["keys", "ezgate:budget:*"]).await.lines() {
            if key.trim().is_empty() {
                continue;
            }
            let all = n.cli(&["hgetall", key.trim()]).await;
            let lines: Vec<&str> = all.lines().collect();
            for pair in lines.chunks(2) {
                let v: u64 = pair.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
                if pair[0].starts_with("s:") {
                    spent += v;
                } else if pair[0].starts_with("q:") {
                    reserved += v;
                }
            }
        }
    }
    (spent, reserved)
}

/// Waits until Redis holds `spent` and no reservation.
async fn settled_in_redis(nodes: &[&Redis], spent: u64) {
    eventually(
        &format!("Redis holds a spend of {spent} and no reservation"),
        || async { in_redis(nodes).await == (spent, 0) },
    )
    .await;
}

/// The budget's first account as the gateway's `/status` mirrors it.
async fn mirrored(gw: &Gateway) -> Value {
    let (status, _) = gw.status().await;
    let b = &status["budgets"]["list"][0];
    assert_eq!(b["view"], "mirror", "{b}");
    assert_eq!(b["store"], "redis", "{b}");
    b["top"][0].clone()
}

/// Two gateways offered twice the budget at once, half each: exactly `n` are served, the
/// rest refused, and Redis holds exactly what the served ones cost.
async fn two_gateways_spend_exactly(redis: &str, nodes: &[&Redis], what: &str) {
    let emu = Emulator::start().await;
    let n = 6;
    let config = config(redis, n * COST);
    let (a, b) = (
        Gateway::start(&emu.url(), &config).await,
        Gateway::start(&emu.url(), &config).await,
    );
    let mut tasks = Vec::new();
    for i in 0..2 * n {
        let gw = if i % 2 == 0 { a.url("") } else { b.url("") };
        tasks.push(tokio::spawn(async move {
            send(
                &http1(),
                Method::POST,
                &format!("{gw}/v1/chat/completions"),
                &[
                    ("content-type", "application/json"),
                    ("x-emu-completion-tokens", "100"),
                ],
                Bytes::from_static(BODY.as_bytes()),
            )
            .await
        }));
    }
    let mut served = 0;
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 200 {
            assert_eq!(r.json()["usage"]["completion_tokens"], 100);
            served += 1;
        } else {
            assert_exceeded(&r);
        }
    }
    assert_eq!(served, n, "{what}: exactly the budget's worth is served");
    assert_eq!(
        emu.log().await.len() as u64,
        n,
        "{what}: refusals never reach the upstream"
    );
    settled_in_redis(nodes, n * COST).await;
    // Spent: the next request anywhere is refused, and the refusal says what is left.
    let r = chat(&a).await;
    assert_exceeded(&r);
    assert!(
        r.error()["message"]
            .as_str()
            .unwrap()
            .contains("has 0 USD left"),
        "{:?}",
        r.body
    );
    assert_exceeded(&chat(&b).await);
    // The write that crossed half the budget logged it, on one gateway of the two.
    let warning = "budget warning: spend crossed a warn_at share";
    eventually("a gateway logs the warn_at share", || async {
        a.logs.text().contains(warning) || b.logs.text().contains(warning)
    })
    .await;
    let told = [&a, &b].map(|gw| gw.logs.all().iter().filter(|l| l.contains(warning)).count());
    assert_eq!(told[0] + told[1], 1, "{what}: {told:?}");
    // Each gateway's metric reads its mirror, which catches up with the fleet's spend.
    for gw in [&a, &b] {
        gw.wait_metric(r#"ezgate_budget_spent{budget="fleet",key="global"}"#, |v| {
            v == shown(n * COST)
        })
        .await;
    }
}

/// A nano-unit amount as the float the metric shows.
fn shown(nanos: u64) -> f64 {
    decimal(nanos).parse().unwrap()
}

#[tokio::test]
async fn two_gateways_share_one_budget_in_redis_exactly() {
    let redis = Redis::start().await;
    two_gateways_spend_exactly(&standalone(redis.port), &[&redis], "standalone").await;
}

#[tokio::test]
async fn a_fleet_budget_lives_in_a_redis_cluster_too() {
    let cluster = Cluster::start(3).await;
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("{u:?}")).collect();
    let redis = format!("mode = \"cluster\"\nnodes = [{}]\n", urls[..3].join(", "));
    let nodes: Vec<&Redis> = cluster.nodes.iter().collect();
    two_gateways_spend_exactly(&redis, &nodes, "cluster").await;
    // The account is one hash, on one primary.
    let mut holders = 0;
    for n in &cluster.nodes {
        if n.cli(&["role"]).await.starts_with("master")
            && !n.cli(&["keys", "ezgate:budget:*"]).await.trim().is_empty()
        {
            holders += 1;
        }
    }
    assert_eq!(holders, 1, "one primary holds the account");
}

#[tokio::test]
async fn a_fleet_budget_lives_behind_sentinels_too() {
    let sentinels = Sentinels::start().await;
    let urls: Vec<String> = sentinels.urls().iter().map(|u| format!("{u:?}")).collect();
    let redis = format!(
        "mode = \"sentinel\"\nnodes = [{}]\nmaster_name = \"{}\"\n",
        urls.join(", "),
        sentinels.master_name
    );
    let primary = sentinels.primary.as_ref().expect("the primary runs");
    two_gateways_spend_exactly(&redis, &[primary], "sentinel").await;
}

#[tokio::test]
async fn without_redis_each_gateway_spends_its_share_of_what_was_left() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    // Two replicas, a budget of 10 requests: 5 spent before the outage, so each gateway
    // may spend 2.5 requests' worth (2) while Redis is frozen; a fresh budget would be 10.
    let config = config(
        &format!("{}replicas = 2\n", standalone(redis.port)),
        10 * COST,
    );
    let (a, b) = (
        Gateway::start(&emu.url(), &config).await,
        Gateway::start(&emu.url(), &config).await,
    );
    for gw in [&a, &a, &a, &b, &b] {
        assert_eq!(chat(gw).await.status, 200);
    }
    settled_in_redis(&[&redis], 5 * COST).await;
    // Each gateway's mirror catches up with the other's spend (the refresh re-reads it).
    for gw in [&a, &b] {
        let spent = shown(5 * COST);
        eventually("the mirror shows the fleet's spend", || async {
            mirrored(gw).await["spent"].as_f64() == Some(spent)
        })
        .await;
    }
    redis.pause();
    for gw in [&a, &b] {
        assert_eq!(chat(gw).await.status, 200);
        assert_eq!(chat(gw).await.status, 200);
        let r = chat(gw).await;
        assert_exceeded(&r);
    }
    redis.resume();
    // The outage's charges reach Redis: 5 + 2 + 2.
    settled_in_redis(&[&redis], 9 * COST).await;
    assert_eq!(chat(&a).await.status, 200, "one request's worth is left");
    assert_exceeded(&chat(&b).await);
    assert_exceeded(&chat(&a).await);
    settled_in_redis(&[&redis], 10 * COST).await;
}

#[tokio::test]
async fn charges_made_without_redis_reach_it_even_from_a_gateway_stopped_at_once() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    let config = config(&standalone(redis.port), 10 * COST);
    let mut gw = Gateway::start(&emu.url(), &config).await;
    assert_eq!(chat(&gw).await.status, 200);
    settled_in_redis(&[&redis], COST).await;
    // Redis refuses the scripts at once (a frozen Redis would run them when it thaws).
    redis
        .cli(&["acl", "setuser", "default", "-eval", "-evalsha"])
        .await;
    assert_eq!(chat(&gw).await.status, 200);
    assert_eq!(chat(&gw).await.status, 200);
    assert_eq!(in_redis(&[&redis]).await.0, COST);
    redis.cli(&["acl", "setuser", "default", "+@all"]).await;
    // Stopped before its refresh may have run: the charges go after the drain.
    gw.signal("TERM");
    assert_eq!(gw.exit_code().await, Some(0));
    eventually("the outage's charges are in Redis", || async {
        in_redis(&[&redis]).await.0 == 3 * COST
    })
    .await;
}

#[tokio::test]
async fn an_account_never_seen_is_refused_during_an_outage_with_on_failure_deny() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    let config = config(
        &format!("{}on_failure = \"deny\"\n", standalone(redis.port)),
        10 * COST,
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    redis.pause();
    let r = chat(&gw).await;
    redis.resume();
    assert_eq!(r.status, 503, "{:?}", r.body);
    let message = r.error()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("budget 'fleet'") && message.contains("redis.on_failure"),
        "{message}"
    );
    assert!(emu.log().await.is_empty(), "the upstream never saw it");
    // Once Redis answers, the account is Redis's again.
    assert_eq!(chat(&gw).await.status, 200);
}

#[tokio::test]
async fn a_killed_gateways_reservation_ends_with_its_lease() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    // Two requests' worth; a stream of 100 events, one every 100 ms, holds one.
    let config = config(&standalone(redis.port), 2 * COST);
    let mut a = Gateway::start(&emu.url(), &config).await;
    let b = Gateway::start(&emu.url(), &config).await;
    let url = a.url("/v1/chat/completions");
    let stream = tokio::spawn(async move {
        send(
            &http1(),
            Method::POST,
            &url,
            &[
                ("content-type", "application/json"),
                ("x-request-id", "held-by-a"),
                ("x-emu-stream-events", "100"),
                ("x-emu-stream-interval-ms", "100"),
            ],
            Bytes::from_static(
                br#"{"model":"gpt-4o","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hello"}]}"#,
            ),
        )
        .await
    });
    emu.wait_state("held-by-a", "in_progress", Duration::from_secs(10))
        .await;
    assert_eq!(
        in_redis(&[&redis]).await,
        (0, COST),
        "a holds one request's worth"
    );
    a.signal("KILL");
    let _ = a.exit_code().await;
    let _ = stream.await;
    // One request's worth is left beside a's reservation; a second fits once a's lease
    // (3 s) has run out — never sooner than the reservation's end, never for the period.
    assert_eq!(chat(&b).await.status, 200);
    eventually("a's reservation is dropped after its lease", || async {
        let r = chat(&b).await;
        if r.status != 200 {
            assert_exceeded(&r);
        }
        r.status == 200
    })
    .await;
    assert_exceeded(&chat(&b).await);
    settled_in_redis(&[&redis], 2 * COST).await;
}

#[tokio::test]
async fn amounts_near_the_cap_compare_to_the_nano_unit() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    let amount = 999_999_999_000_000_000; // 999 999 999 units: beyond a double's 2^53
    let config = config(&standalone(redis.port), amount);
    let gw = Gateway::start_env(
        &emu.url(),
        &config,
        &[("EZGATE_BUDGET_CLOCK", "2026-06-15T12:00:00Z")],
    )
    .await;
    let key = "ezgate:budget:{fleet|2026-06|global}";
    // Another gateway's spend leaves one nano-unit less than a request costs: refused.
    let seed = (amount - COST + 1).to_string();
    redis.cli(&["hset", key, "s:other", &seed]).await;
    assert_exceeded(&chat(&gw).await);
    // Exactly what it costs: served, and the budget is spent to the nano-unit.
    let seed = (amount - COST).to_string();
    redis.cli(&["hset", key, "s:other", &seed]).await;
    let r = chat(&gw).await;
    assert_eq!(
        r.status,
        200,
        "{:?} {}",
        r.body,
        redis.cli(&["hgetall", key]).await
    );
    settled_in_redis(&[&redis], amount).await;
    assert_exceeded(&chat(&gw).await);
}

#[tokio::test]
async fn a_new_period_is_a_new_account_in_redis() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    let config = config(&standalone(redis.port), COST);
    // The budgets' clock starts three seconds before July.
    let gw = Gateway::start_env(
        &emu.url(),
        &config,
        &[("EZGATE_BUDGET_CLOCK", "2026-06-30T23:59:57Z")],
    )
    .await;
    assert_eq!(chat(&gw).await.status, 200);
    let r = chat(&gw).await;
    assert_exceeded(&r);
    assert!(r.error()["message"]
        .as_str()
        .unwrap()
        .contains("until 2026-07-01T00:00:00Z"));
    eventually("July's budget admits a request", || async {
        chat(&gw).await.status == 200
    })
    .await;
    assert_exceeded(&chat(&gw).await);
    for month in ["2026-06", "2026-07"] {
        let key = format!("ezgate:budget:{{fleet|{month}|global}}");
        eventually(&format!("{key} holds one request's cost"), || async {
            let all = redis.cli(&["hgetall", &key]).await;
            let lines: Vec<&str> = all.lines().collect();
            let spent: u64 = lines
                .chunks(2)
                .filter(|p| p[0].starts_with("s:"))
                .filter_map(|p| p.get(1)?.parse::<u64>().ok())
                .sum();
            spent == COST
        })
        .await;
    }
}

#[tokio::test]
async fn a_shadow_fleet_budget_serves_and_counts_what_it_would_refuse() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    let config = config(&standalone(redis.port), COST).replace(
        "store = \"redis\"\n",
        "store = \"redis\"\nmode = \"shadow\"\n",
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    for _ in 0..3 {
        assert_eq!(chat(&gw).await.status, 200);
    }
    settled_in_redis(&[&redis], 3 * COST).await;
    let (status, _) = gw.status().await;
    assert_eq!(status["budgets"]["list"][0]["would_refuse"], 2, "{status}");
}

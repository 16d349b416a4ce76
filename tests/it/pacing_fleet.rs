//! `[upstream.quota] store = "redis"`: a fleet of gateways paces on one picture of the
//! upstream's quota in Redis, against an emulator that enforces the quota as the upstream
//! does; and when Redis is away, each gateway paces on its share of the last picture.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use serde_json::Value;

use crate::harness::*;
use crate::redis_servers::*;

const ORG_KEY: &str = "sk-org-fleet";
const BODY: &str =
    r#"{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"hello there"}]}"#;

/// Sets the emulator's quota (`PUT /__emu/quota`).
async fn set_quota(emu: &Emulator, quota: &str) {
    let r = send(
        &http1(),
        Method::PUT,
        &format!("http://{}/__emu/quota", emu.addr),
        &[("content-type", "application/json")],
        Bytes::from(quota.to_owned()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// The emulator's quota counters (`GET /__emu/quota`).
async fn counters(emu: &Emulator) -> (u64, u64) {
    let r = send(
        &http1(),
        Method::GET,
        &format!("http://{}/__emu/quota", emu.addr),
        &[],
        Bytes::new(),
    )
    .await;
    let v: Value = r.json();
    (
        v["admitted"].as_u64().unwrap(),
        v["limited"].as_u64().unwrap(),
    )
}

fn config(redis_port: u16, extra: &str) -> String {
    format!(
        "[log]\naccess_log = false\n[upstream]\napi_key = \"${{ORG_KEY}}\"\n[upstream.quota]\nmode = \"enforce\"\nstore = \"redis\"\n[redis]\nurl = \"redis://127.0.0.1:{redis_port}\"\ntimeout = \"200ms\"\n{extra}"
    )
}

async fn gateway(emu: &Emulator, config: &str) -> Gateway {
    Gateway::start_env(&emu.url(), config, &[("ORG_KEY", ORG_KEY)]).await
}

/// Offers `per_second` chat requests to each gateway for `during`, each in its own task
/// (an open loop: the offer does not slow down when answers do); returns every status.
async fn offer(gws: &[&Gateway], per_second: u32, during: Duration) -> Vec<u16> {
    let client = http1();
    let mut tasks = Vec::new();
    let every = Duration::from_secs(1) / per_second;
    let start = Instant::now();
    let mut tick = tokio::time::interval(every);
    while start.elapsed() < during {
        tick.tick().await;
        for gw in gws {
            let (c, url) = (client.clone(), gw.url("/v1/chat/completions"));
            tasks.push(tokio::spawn(async move {
                send(
                    &c,
                    Method::POST,
                    &url,
                    &[("content-type", "application/json")],
                    Bytes::from_static(BODY.as_bytes()),
                )
                .await
                .status
                .as_u16()
            }));
        }
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn three_gateways_pace_on_one_picture_in_redis() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    // 20 requests per 2 s: 10 a second.
    set_quota(&emu, r#"{"requests":{"limit":20,"per":"2s"}}"#).await;
    let config = config(redis.port, "");
    let (a, b, c) = (
        gateway(&emu, &config).await,
        gateway(&emu, &config).await,
        gateway(&emu, &config).await,
    );
    // The first answer teaches the fleet's picture.
    assert_eq!(a.chat(&[]).await.status, 200);
    let (before, _) = counters(&emu).await;
    // Together twice the quota: 3 × 7 a second against 10.
    let during = Duration::from_secs(6);
    let start = Instant::now();
    let statuses = offer(&[&a, &b, &c], 7, during).await;
    let elapsed = start.elapsed();
    let (admitted, limited) = counters(&emu).await;
    let admitted = admitted - before;
    let forwarded = admitted + limited;
    eprintln!("fleet: admitted {admitted}, upstream 429s {limited}, in {elapsed:?}");
    assert!(
        limited * 100 < forwarded * 3,
        "{limited} of {forwarded} forwarded requests came back 429 from the upstream"
    );
    // What the quota allowed over the run: the bucket once (20) plus 10 a second.
    let allowed = 20.0 + 10.0 * elapsed.as_secs_f64();
    assert!(
        admitted as f64 >= 0.8 * allowed,
        "used {admitted} of the {allowed:.0} the quota allowed"
    );
    let ok = statuses.iter().filter(|s| **s == 200).count() as u64;
    assert_eq!(ok, admitted, "every admitted request was answered 200");
    // The rest waited and was refused by ezgate, in the schema, never cut.
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn without_redis_each_gateway_paces_on_its_share() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    set_quota(&emu, r#"{"requests":{"limit":30,"per":"3s"}}"#).await;
    let config = config(redis.port, "");
    let (a, b, c) = (
        gateway(&emu, &config).await,
        gateway(&emu, &config).await,
        gateway(&emu, &config).await,
    );
    // Each knows the fleet (the heartbeat) and the picture (one answer each).
    for gw in [&a, &b, &c] {
        gw.wait_metric("ezgate_fleet_gateways", |v| v == 3.0).await;
        assert_eq!(gw.chat(&[]).await.status, 200);
    }
    redis.pause();
    let (before_admitted, before_limited) = counters(&emu).await;
    // Each offers what the whole quota would carry: alone, each would take all of it.
    let statuses = offer(&[&a, &b, &c], 10, Duration::from_secs(5)).await;
    redis.resume();
    let (admitted, limited) = counters(&emu).await;
    let (admitted, limited) = (admitted - before_admitted, limited - before_limited);
    let forwarded = admitted + limited;
    eprintln!("without Redis: admitted {admitted}, upstream 429s {limited}");
    assert!(
        limited * 100 < forwarded * 10,
        "{limited} of {forwarded} came back 429: the gateways paced on more than their share"
    );
    assert!(admitted > 0, "the fleet kept serving without Redis");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
}

/// Two gateways sharing the picture through `redis` (a `[redis]` section's body), together
/// offering twice a 20 / 2 s quota for 4 s: few upstream 429s, most of the quota used.
async fn two_gateways_pace_through(redis: &str, what: &str) {
    let emu = Emulator::start().await;
    set_quota(&emu, r#"{"requests":{"limit":20,"per":"2s"}}"#).await;
    let config = format!(
        "[log]\naccess_log = false\n[upstream]\napi_key = \"${{ORG_KEY}}\"\n[upstream.quota]\nmode = \"enforce\"\nstore = \"redis\"\n[redis]\n{redis}timeout = \"1s\"\n"
    );
    let (a, b) = (gateway(&emu, &config).await, gateway(&emu, &config).await);
    assert_eq!(a.chat(&[]).await.status, 200);
    let (before, _) = counters(&emu).await;
    let start = Instant::now();
    let statuses = offer(&[&a, &b], 10, Duration::from_secs(4)).await;
    let elapsed = start.elapsed();
    let (admitted, limited) = counters(&emu).await;
    let admitted = admitted - before;
    let forwarded = admitted + limited;
    eprintln!("{what}: admitted {admitted}, upstream 429s {limited}, in {elapsed:?}");
    assert!(
        limited * 100 < forwarded * 3,
        "{what}: {limited} of {forwarded} forwarded requests came back 429 from the upstream"
    );
    let allowed = 20.0 + 10.0 * elapsed.as_secs_f64();
    assert!(
        admitted as f64 >= 0.75 * allowed,
        "{what}: used {admitted} of the {allowed:.0} the quota allowed"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn the_fleets_picture_lives_in_a_redis_cluster_too() {
    let cluster = Cluster::start(3).await;
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("{u:?}")).collect();
    let redis = format!("mode = \"cluster\"\nnodes = [{}]\n", nodes[..3].join(", "));
    two_gateways_pace_through(&redis, "cluster").await;
    // The picture is one hash, on the primary that owns its slot.
    let mut holders = 0;
    for n in &cluster.nodes {
        if n.cli(&["role"]).await.starts_with("master")
            && !n.cli(&["keys", "ezgate:{quota:*"]).await.trim().is_empty()
        {
            holders += 1;
        }
    }
    assert_eq!(holders, 1, "one primary holds the picture");
}

#[tokio::test]
async fn the_fleets_picture_lives_behind_sentinels_too() {
    let sentinels = Sentinels::start().await;
    let nodes: Vec<String> = sentinels.urls().iter().map(|u| format!("{u:?}")).collect();
    let redis = format!(
        "mode = \"sentinel\"\nnodes = [{}]\nmaster_name = \"{}\"\n",
        nodes.join(", "),
        sentinels.master_name
    );
    two_gateways_pace_through(&redis, "sentinel").await;
    let primary = sentinels.primary.as_ref().expect("the primary runs");
    assert!(
        !primary
            .cli(&["keys", "ezgate:{quota:*"])
            .await
            .trim()
            .is_empty(),
        "the primary the sentinels name holds the picture"
    );
}

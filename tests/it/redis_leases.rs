//! Concurrency slots held in Redis through outages: a release that failed while Redis was
//! silent is retried until it answers, slots lost with Redis's data come back from the
//! renewal, a running request keeps its slot past the lease, and a gateway killed while
//! holding slots loses them within the lease. After each, the limit still holds.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;
use crate::redis_servers::*;

/// One request at a time per `x-user`, held in Redis.
fn config(redis: &str, lease: &str) -> String {
    format!(
        "[log]\naccess_log = false\n\n[redis]\n{redis}timeout = \"200ms\"\nconcurrency_lease = \"{lease}\"\n\n\
         [[limits]]\nname = \"conc\"\nkey = \"header:x-user\"\nconcurrency = 1\nstore = \"redis\"\n"
    )
}

fn standalone(port: u16) -> String {
    format!("url = \"redis://127.0.0.1:{port}\"\n")
}

/// The sorted set of `user`'s slots.
fn slots_key(user: &str) -> String {
    format!("ezgate:{{conc:{user}}}:conc")
}

/// A streamed chat request of `user` that the emulator stalls after its first event: it
/// holds its slot until the returned connection is dropped.
async fn hold(gw: &Gateway, user: &str, request_id: &str) -> TcpStream {
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-user: {user}\r\nx-request-id: {request_id}\r\nx-emu-stall-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        n > 0 && buf.starts_with(b"HTTP/1.1 200"),
        "{user}'s request is admitted: {:?}\n{}",
        String::from_utf8_lossy(&buf[..n]),
        gw.logs.text()
    );
    s
}

/// Ends a held request (the client leaves) and waits until the upstream request is gone.
async fn end(emu: &Emulator, held: TcpStream, request_id: &str) {
    drop(held);
    emu.wait_state(request_id, "cancelled", DEADLINE).await;
}

async fn probe(gw: &Gateway, user: &str) -> u16 {
    gw.get_with("/v1/models", &[("x-user", user)])
        .await
        .status
        .as_u16()
}

async fn fallbacks(gw: &Gateway) -> f64 {
    gw.metric("ezgate_ratelimit_store_fallbacks_total{policy=\"conc\"}")
        .await
}

/// `user`'s next request is refused by Redis (no fallback): its one slot is taken.
async fn refused_by_redis(gw: &Gateway, user: &str) {
    let before = fallbacks(gw).await;
    assert_eq!(probe(gw, user).await, 429, "{}", gw.logs.text());
    assert_eq!(
        fallbacks(gw).await,
        before,
        "the refusal came from Redis, not from the local fallback:\n{}",
        gw.logs.text()
    );
}

/// Waits until the gateway tells that Redis answers its checks again (checks of other
/// users drive it).
async fn reachable_again(gw: &Gateway) {
    eventually("Redis answers checks again", || async {
        probe(gw, "other").await;
        gw.logs.text().contains("redis reachable again")
    })
    .await;
}

async fn zcard(port: u16, key: &str) -> String {
    cli(port, &["zcard", key]).await.trim().to_owned()
}

/// Redis stops answering (frozen, connections open) while a request ends: its release fails,
/// is told once, retried, and lands when Redis answers again. The lease is long, so only
/// the retried release can free the slot.
#[tokio::test]
async fn a_release_that_failed_while_redis_was_silent_is_retried() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), &config(&standalone(redis.port), "10m")).await;
    let key = slots_key("u");

    let held = hold(&gw, "u", "silent-a").await;
    refused_by_redis(&gw, "u").await;
    assert_eq!(redis.cli(&["zcard", &key]).await.trim(), "1");

    redis.pause();
    end(&emu, held, "silent-a").await;
    eventually("the failed release is told", || async {
        gw.logs
            .text()
            .contains("concurrency slot releases failed; retrying")
    })
    .await;
    // Other requests meanwhile: answered by the fallback, without waiting for Redis.
    assert_eq!(probe(&gw, "other").await, 200);
    redis.resume();

    eventually("the slot is released in Redis", || async {
        redis.cli(&["zcard", &key]).await.trim() == "0"
    })
    .await;
    eventually("the waiting releases are done", || async {
        gw.logs
            .text()
            .contains("concurrency slot releases that waited are done")
    })
    .await;
    reachable_again(&gw).await;

    // The key is usable again, and still limited to one.
    let held = hold(&gw, "u", "silent-b").await;
    refused_by_redis(&gw, "u").await;
    end(&emu, held, "silent-b").await;
    eventually("the slot is released", || async {
        redis.cli(&["zcard", &key]).await.trim() == "0"
    })
    .await;
    let lines = gw.logs.all();
    let count = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
    assert_eq!(
        count("concurrency slot releases failed"),
        1,
        "told once per outage, not per request or retry:\n{}",
        gw.logs.text()
    );
}

/// Redis restarts empty while a request runs: the renewal puts its slot back, so the key
/// stays limited; when the request ends its slot goes.
#[tokio::test]
async fn slots_lost_with_redis_data_come_back_from_the_renewal() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    let gw = Gateway::start(&emu.url(), &config(&standalone(redis.port), "3s")).await;
    let key = slots_key("u");

    let held = hold(&gw, "u", "empty-a").await;
    refused_by_redis(&gw, "u").await;
    let port = redis.stop().await;
    let redis = Redis::start_on(port).await;
    assert_eq!(redis.cli(&["zcard", &key]).await.trim(), "0");
    eventually(
        "the renewal puts the running request's slot back",
        || async { redis.cli(&["zcard", &key]).await.trim() == "1" },
    )
    .await;
    refused_by_redis(&gw, "u").await;

    end(&emu, held, "empty-a").await;
    eventually("the ended request's slot goes", || async {
        redis.cli(&["zcard", &key]).await.trim() == "0"
    })
    .await;
    assert_eq!(probe(&gw, "u").await, 200);
}

/// A request that runs longer than the lease keeps its slot (renewed); the gateway holding
/// it is killed (no release is ever sent) and another gateway admits the key again once the
/// lease has run out — and still only one at a time.
#[tokio::test]
async fn a_running_slot_outlives_its_lease_and_a_killed_gateways_slot_expires() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    let config = config(&standalone(redis.port), "3s");
    let mut doomed = Gateway::start(&emu.url(), &config).await;
    let other = Gateway::start(&emu.url(), &config).await;
    let key = slots_key("u");

    let _held = hold(&doomed, "u", "kill-a").await;
    let first = redis.cli(&["zrange", &key, "0", "-1", "withscores"]).await;
    let expiry: u64 = first
        .lines()
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("one slot with its expiry: {first:?}"));
    eventually("Redis's clock is past the first lease", || async {
        let t = redis.cli(&["time"]).await;
        let mut parts = t.lines().map(|l| l.trim().parse::<u64>().unwrap());
        let (s, us) = (parts.next().unwrap(), parts.next().unwrap());
        s * 1000 + us / 1000 > expiry + 500
    })
    .await;
    refused_by_redis(&other, "u").await;

    let _ = doomed.child.kill().await;
    eventually("the killed gateway's slot expires", || async {
        probe(&other, "u").await == 200
    })
    .await;
    // The probe held the slot while it ran; its release reaches Redis just after its response.
    eventually("the probe's slot is released", || async {
        zcard(redis.port, &key).await == "0"
    })
    .await;
    let _held = hold(&other, "u", "kill-b").await;
    refused_by_redis(&other, "u").await;
    assert_eq!(zcard(redis.port, &key).await, "1");
}

/// Sentinel fails over while one request of `u1` ends (its release fails, then lands on the
/// promoted replica) and one of `u2` runs (the promoted replica lost its slot: the renewal
/// puts it back). Afterwards `u1` is admitted and `u2` still refused.
#[tokio::test]
async fn across_a_sentinel_failover_slots_equal_requests_in_flight() {
    let mut sentinels = Sentinels::start().await;
    let emu = Emulator::start().await;
    let nodes: Vec<String> = sentinels.urls().iter().map(|u| format!("{u:?}")).collect();
    let redis = format!(
        "mode = \"sentinel\"\nnodes = [{}]\nmaster_name = \"{}\"\n",
        nodes.join(", "),
        sentinels.master_name
    );
    let gw = Gateway::start(&emu.url(), &config(&redis, "3s")).await;
    let (k1, k2) = (slots_key("u1"), slots_key("u2"));

    let ends = hold(&gw, "u1", "failover-1").await;
    let _runs = hold(&gw, "u2", "failover-2").await;
    refused_by_redis(&gw, "u1").await;
    refused_by_redis(&gw, "u2").await;
    let replica = sentinels.replica.port;
    eventually("the replica has both slots", || async {
        zcard(replica, &k1).await == "1" && zcard(replica, &k2).await == "1"
    })
    .await;

    let primary = sentinels.primary.take().unwrap();
    primary.stop().await;
    end(&emu, ends, "failover-1").await;
    eventually("the failed release is told", || async {
        gw.logs
            .text()
            .contains("concurrency slot releases failed; retrying")
    })
    .await;
    eventually("the sentinels promote the replica", || async {
        cli(replica, &["role"]).await.starts_with("master")
            && cli(
                sentinels.sentinels[0].port,
                &["sentinel", "get-master-addr-by-name", sentinels.master_name],
            )
            .await
            .contains(&replica.to_string())
    })
    .await;
    // As if the promoted replica had missed the last writes: u2's slot is gone.
    cli(replica, &["del", &k2]).await;

    eventually("slots equal the requests in flight", || async {
        zcard(replica, &k1).await == "0" && zcard(replica, &k2).await == "1"
    })
    .await;
    let before = fallbacks(&gw).await;
    assert_eq!(probe(&gw, "u1").await, 200, "{}", gw.logs.text());
    assert_eq!(fallbacks(&gw).await, before);
    refused_by_redis(&gw, "u2").await;
}

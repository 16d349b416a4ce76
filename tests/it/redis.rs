//! Shared limits in a real Redis (installed by `.ci/test`): accuracy across replicas, and
//! what happens when Redis goes away and comes back.

use std::time::Duration;

use crate::harness::*;
use crate::redis_servers::*;

#[tokio::test]
async fn three_replicas_share_one_quota() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    let config = format!(
        "[log]\naccess_log = false\n[redis]\nurl = \"redis://127.0.0.1:{}\"\nreplicas = 3\ntimeout = \"2s\"\n\n[[limits]]\nname = \"org\"\nkey = \"global\"\nrequests = \"300/h\"\nstore = \"redis\"\n",
        redis.port
    );
    let gws = [
        Gateway::start(&emu.url(), &config).await,
        Gateway::start(&emu.url(), &config).await,
        Gateway::start(&emu.url(), &config).await,
    ];
    let client = http1();
    let mut tasks = Vec::new();
    for round in 0..150 {
        for gw in &gws {
            let c = client.clone();
            let url = gw.url("/v1/models");
            tasks.push(tokio::spawn(async move {
                send(&c, http::Method::GET, &url, &[], bytes::Bytes::new())
                    .await
                    .status
            }));
        }
        if round % 10 == 9 {
            for t in tasks.drain(..) {
                t.await.unwrap();
            }
        }
    }
    let mut admitted = 0;
    let mut limited = 0;
    for gw in &gws {
        let m = gw.settled_metrics().await;
        admitted += metric_value(&m, "ezgate_requests_total{method=\"GET\",route=\"/v1/models\",source=\"upstream\",status=\"200\"}") as u32;
        limited += metric_value(&m, "ezgate_requests_total{method=\"GET\",route=\"/v1/models\",source=\"gateway\",status=\"429\"}") as u32;
        assert_eq!(
            metric_value(&m, "ezgate_ratelimit_store_fallbacks_total{policy=\"org\"}"),
            0.0,
            "Redis answered every check"
        );
    }
    assert_eq!(admitted + limited, 450);
    assert!(
        (297..=303).contains(&admitted),
        "admitted {admitted} of a shared quota of 300 (±1%), not 3 × 300"
    );
    assert_eq!(
        emu.log().await.len() as u32,
        admitted,
        "the upstream saw exactly the admitted requests"
    );
}

/// The requests of `user` that `gw` admits out of 30 in a row (each answered 200 or 429).
async fn admitted_of_30(gw: &Gateway, user: &str) -> usize {
    let mut admitted = 0;
    for _ in 0..30 {
        let r = gw.get_with("/v1/models", &[("x-user", user)]).await;
        assert!(r.status == 200 || r.status == 429, "{}", r.status);
        admitted += usize::from(r.status == 200);
    }
    admitted
}

/// Whether every gateway's `ezgate_fleet_gateways` shows `n`.
async fn fleet_shows(gws: &[&Gateway], n: f64) -> bool {
    for gw in gws {
        if gw.metric("ezgate_fleet_gateways").await != n {
            return false;
        }
    }
    true
}

/// Without `redis.replicas`, each gateway counts the live gateways by their heartbeats and
/// sizes its local fallback by them: three share 30 requests per user, so while Redis is
/// away each admits 10 of a user's; one stops (killed: it cannot say goodbye), and once its
/// membership has expired the other two count 2 and admit 15.
#[tokio::test]
async fn the_fallback_share_follows_the_fleet() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    let config = format!(
        "[log]\naccess_log = false\n[redis]\nurl = \"redis://127.0.0.1:{}\"\n\n[[limits]]\nname = \"org\"\nkey = \"header:x-user\"\nrequests = \"30/h\"\nstore = \"redis\"\n",
        redis.port
    );
    let (a, b, mut c) = (
        Gateway::start(&emu.url(), &config).await,
        Gateway::start(&emu.url(), &config).await,
        Gateway::start(&emu.url(), &config).await,
    );
    eventually("every gateway counts three", || async {
        fleet_shows(&[&a, &b, &c], 3.0).await
    })
    .await;
    let port = redis.stop().await;
    assert_eq!(admitted_of_30(&a, "first").await, 10, "a third of 30");

    // Redis returns empty; the heartbeats fill the fleet again. Once all three are members
    // and each gateway has counted them, one stops.
    let redis = Redis::start_on(port).await;
    eventually("every gateway counts three again", || async {
        redis.cli(&["zcard", "ezgate:{fleet}:members"]).await.trim() == "3"
            && fleet_shows(&[&a, &b, &c], 3.0).await
    })
    .await;
    let _ = c.child.kill().await;
    eventually("the other two count two", || async {
        fleet_shows(&[&a, &b], 2.0).await
    })
    .await;
    assert_eq!(
        redis.cli(&["zcard", "ezgate:{fleet}:members"]).await.trim(),
        "2"
    );
    redis.stop().await;
    assert_eq!(admitted_of_30(&a, "second").await, 15, "half of 30");
    assert_eq!(admitted_of_30(&b, "second").await, 15, "half of 30");
}

#[tokio::test]
async fn tls_with_a_user_a_password_and_a_database() {
    let pki = crate::tls::make_pki();
    let port = free_port();
    let (cert, key, ca) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
        pki.ca.display().to_string(),
    );
    let redis = Redis::start_with(
        port,
        &[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
            "--user",
            "default",
            "off",
            "--user",
            "app",
            "on",
            ">p@ss:word",
            "~*",
            "&*",
            "+@all",
        ],
    )
    .await;
    let emu = Emulator::start().await;
    // The password percent-encoded, as a URL must carry it. A TLS handshake, AUTH and
    // SELECT by a debug build on a busy machine may take longer than the 500 ms default.
    let config = format!(
        "[redis]\nurl = \"rediss://app:p%40ss%3Aword@localhost:{port}/3\"\nca_file = {ca:?}\ntimeout = \"2s\"\nconnect_timeout = \"10s\"\n\n[[limits]]\nname = \"org\"\nkey = \"global\"\nrequests = \"3/h\"\nstore = \"redis\"\n"
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(gw.get("/v1/models").await.status.as_u16());
        }
        v
    };
    assert_eq!(statuses, [200, 200, 200, 429, 429], "{}", gw.logs.text());
    assert_eq!(
        gw.metric("ezgate_ratelimit_store_fallbacks_total{policy=\"org\"}")
            .await,
        0.0,
        "Redis answered every check over TLS:\n{}",
        gw.logs.text()
    );
    let tls = [
        "--tls",
        "--cacert",
        ca.as_str(),
        "--user",
        "app",
        "--pass",
        "p@ss:word",
        "--no-auth-warning",
    ];
    let in_db = |db: &'static str| {
        let mut args = tls.to_vec();
        args.extend(["-n", db, "exists", "ezgate:{org:}:requests"]);
        let redis = &redis;
        async move { redis.cli(&args).await.trim().to_owned() }
    };
    assert_eq!(in_db("3").await, "1", "the limit is held in database 3");
    assert_eq!(in_db("0").await, "0");
}

#[tokio::test]
async fn redis_outage_falls_back_locally_and_recovers() {
    let redis = Redis::start().await;
    let emu = Emulator::start().await;
    let config = format!(
        "[redis]\nurl = \"redis://127.0.0.1:{}\"\ntimeout = \"50ms\"\n\n[[limits]]\nname = \"shared\"\nkey = \"global\"\nrequests = \"100000/min\"\nstore = \"redis\"\n",
        redis.port
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    for _ in 0..20 {
        assert_eq!(gw.get("/v1/models").await.status, 200);
    }
    let port = redis.stop().await;
    // Under the outage: no hang, no error, the local fallback admits.
    for _ in 0..50 {
        let r = gw.get("/v1/models").await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    }
    assert!(
        gw.metric("ezgate_ratelimit_store_fallbacks_total{policy=\"shared\"}")
            .await
            >= 50.0
    );
    let outage_lines = gw
        .logs
        .all()
        .iter()
        .filter(|l| l.contains("redis unavailable"))
        .count();
    assert_eq!(
        outage_lines,
        1,
        "the outage is logged once, not per request:\n{}",
        gw.logs.text()
    );
    // Redis returns on the same port: shared checks resume by themselves.
    let _redis = Redis::start_on(port).await;
    let start = std::time::Instant::now();
    loop {
        assert_eq!(gw.get("/v1/models").await.status, 200);
        if gw.logs.text().contains("redis reachable again") {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "never recovered:\n{}",
            gw.logs.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fallbacks = gw
        .metric("ezgate_ratelimit_store_fallbacks_total{policy=\"shared\"}")
        .await;
    for _ in 0..10 {
        assert_eq!(gw.get("/v1/models").await.status, 200);
    }
    assert_eq!(
        gw.metric("ezgate_ratelimit_store_fallbacks_total{policy=\"shared\"}")
            .await,
        fallbacks,
        "no fallbacks after recovery"
    );
}

#[tokio::test]
async fn fail_closed_refuses_while_redis_is_away() {
    let port = free_port();
    let emu = Emulator::start().await;
    let config = format!(
        "[redis]\nurl = \"redis://127.0.0.1:{port}\"\non_failure = \"deny\"\n\n[[limits]]\nname = \"strict\"\nkey = \"global\"\nrequests = \"10/s\"\nstore = \"redis\"\n"
    );
    let gw = Gateway::start(&emu.url(), &config).await;
    let r = gw.get("/v1/models").await;
    assert_eq!(r.status, 503);
    let e = r.error();
    assert_eq!(e["code"], "overloaded");
    assert!(
        e["message"].as_str().unwrap().contains("redis.on_failure"),
        "{e}"
    );
    assert!(emu.log().await.is_empty());
}

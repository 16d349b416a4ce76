//! Shared limits on highly available Redis: a Redis Cluster of three primaries with a
//! replica each, and a primary with a replica watched by three Sentinels. Three gateways
//! share one quota over keys on every node; then a primary is killed while requests flow,
//! its replica is promoted, and the gateways move to it by themselves: every request is
//! answered (the local fallback covers the gap), and the outage is told once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::harness::*;
use crate::redis_servers::*;

/// Users (limit keys): enough that every primary's slots hold some.
const USERS: usize = 60;
/// The quota of each user per hour: the gateways together admit USERS × PER_USER.
const PER_USER: u32 = 5;

/// Three gateways' config: a tight quota on `GET /v1/models`, a loose one on chat (the load
/// during the failover), both keyed by user and held in Redis.
fn config(redis: &str) -> String {
    format!(
        "[log]\naccess_log = false\n\n[redis]\n{redis}timeout = \"500ms\"\nreplicas = 3\n\n\
         [[limits]]\nname = \"quota\"\nkey = \"header:x-user\"\nrequests = \"{PER_USER}/h\"\n\
         match = {{ routes = [\"/v1/models\"] }}\nstore = \"redis\"\n\n\
         [[limits]]\nname = \"bulk\"\nkey = \"header:x-user\"\nrequests = \"1000000/h\"\n\
         match = {{ routes = [\"/v1/chat/completions\"] }}\nstore = \"redis\"\n"
    )
}

async fn three_gateways(emu: &Emulator, config: &str) -> Vec<Gateway> {
    vec![
        Gateway::start(&emu.url(), config).await,
        Gateway::start(&emu.url(), config).await,
        Gateway::start(&emu.url(), config).await,
    ]
}

fn user(i: usize) -> String {
    format!("user-{i}")
}

/// Every user asks twice its quota, spread over the gateways: together they admit the
/// quota (±1 %), with Redis answering every check.
async fn shared_quota_holds(gws: &[Gateway], emu: &Emulator) {
    let client = http1();
    let mut tasks = Vec::new();
    for round in 0..PER_USER as usize * 2 {
        for u in 0..USERS {
            let c = client.clone();
            let url = gws[(u + round) % gws.len()].url("/v1/models");
            tasks.push(tokio::spawn(async move {
                send(
                    &c,
                    http::Method::GET,
                    &url,
                    &[("x-user", &user(u))],
                    bytes::Bytes::new(),
                )
                .await
                .status
            }));
        }
        for t in tasks.drain(..) {
            t.await.unwrap();
        }
    }
    let (mut admitted, mut limited) = (0, 0);
    for gw in gws {
        let m = gw.settled_metrics().await;
        admitted += metric_value(&m, "ezgate_requests_total{method=\"GET\",route=\"/v1/models\",source=\"upstream\",status=\"200\"}") as usize;
        limited += metric_value(&m, "ezgate_requests_total{method=\"GET\",route=\"/v1/models\",source=\"gateway\",status=\"429\"}") as usize;
        assert_eq!(
            metric_value(
                &m,
                "ezgate_ratelimit_store_fallbacks_total{policy=\"quota\"}"
            ),
            0.0,
            "Redis answered every check:\n{}",
            gw.logs.text()
        );
    }
    let quota = USERS * PER_USER as usize;
    assert_eq!(admitted + limited, quota * 2);
    assert!(
        (quota * 99 / 100..=quota * 101 / 100).contains(&admitted),
        "admitted {admitted} of a shared quota of {quota} (±1 %), not 3 × {quota}"
    );
    assert_eq!(
        emu.log().await.len(),
        admitted,
        "the upstream saw exactly the admitted requests"
    );
}

/// Chat requests from every user, one stream per gateway, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    statuses: Arc<Mutex<Vec<u16>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gws: &[Gateway], prefix: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let client = http1();
        let tasks = gws
            .iter()
            .enumerate()
            .map(|(g, gw)| {
                let (stop, statuses, c) =
                    (Arc::clone(&stop), Arc::clone(&statuses), client.clone());
                let url = gw.url("/v1/chat/completions");
                let prefix = prefix.to_owned();
                tokio::spawn(async move {
                    let mut i = g;
                    while !stop.load(Ordering::Relaxed) {
                        let who = format!("{prefix}-{}", i % USERS);
                        let r = send(
                            &c,
                            http::Method::POST,
                            &url,
                            &[("content-type", "application/json"), ("x-user", &who)],
                            bytes::Bytes::from_static(CHAT_BODY.as_bytes()),
                        )
                        .await;
                        statuses.lock().unwrap().push(r.status.as_u16());
                        i += 1;
                    }
                })
            })
            .collect();
        Load {
            stop,
            statuses,
            tasks,
        }
    }

    fn answered(&self) -> usize {
        self.statuses.lock().unwrap().len()
    }

    /// Waits until `n` more requests were answered.
    async fn more(&self, n: usize) {
        let from = self.answered();
        eventually(&format!("{n} more requests are answered"), || async {
            self.answered() >= from + n
        })
        .await;
    }

    async fn finish(self) -> Vec<u16> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let s = self.statuses.lock().unwrap().clone();
        s
    }
}

/// One quota request for each of USERS new users ("late-N"), over the gateways: all
/// admitted, by Redis.
async fn late_users(gws: &[Gateway]) {
    for u in 0..USERS {
        let gw = &gws[u % gws.len()];
        let r = gw
            .get_with("/v1/models", &[("x-user", &format!("late-{u}"))])
            .await;
        assert_eq!(r.status, 200);
    }
    for gw in gws {
        assert_eq!(
            gw.metric("ezgate_ratelimit_store_fallbacks_total{policy=\"quota\"}")
                .await,
            0.0
        );
    }
}

async fn bulk_fallbacks(gw: &Gateway) -> f64 {
    gw.metric("ezgate_ratelimit_store_fallbacks_total{policy=\"bulk\"}")
        .await
}

/// After the primary was killed under `load` (and its replica promoted): every request got
/// an answer, the fallback answered some, each gateway told the outage once and its end
/// once, and checks are answered by Redis again.
async fn rode_out_the_failover(gws: &[Gateway], load: Load) {
    for gw in gws {
        eventually("every gateway says Redis is reachable again", || async {
            gw.logs.text().contains("redis reachable again")
        })
        .await;
    }
    load.more(60).await;
    let statuses = load.finish().await;
    let failed: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "every request under the failover is admitted (by Redis or the local fallback): {} of {} were not: {failed:?}",
        failed.len(),
        statuses.len()
    );
    let mut fallbacks = Vec::new();
    for gw in gws {
        let lines = gw.logs.all();
        let count = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
        assert_eq!(
            (count("redis unavailable"), count("redis reachable again")),
            (1, 1),
            "the outage is logged once when it starts and once when it ends, not per request:\n{}",
            gw.logs.text()
        );
        fallbacks.push(bulk_fallbacks(gw).await);
    }
    assert!(
        fallbacks.iter().sum::<f64>() > 0.0,
        "the local fallback answered checks while the primary was away"
    );
    // Moved: with Redis answering again, no check falls back.
    let client = http1();
    for (g, gw) in gws.iter().enumerate() {
        for u in 0..USERS {
            let r = send(
                &client,
                http::Method::POST,
                &gw.url("/v1/chat/completions"),
                &[
                    ("content-type", "application/json"),
                    ("x-user", &format!("after-{u}")),
                ],
                bytes::Bytes::from_static(CHAT_BODY.as_bytes()),
            )
            .await;
            assert_eq!(r.status, 200);
        }
        assert_eq!(
            bulk_fallbacks(gw).await,
            fallbacks[g],
            "after the failover Redis answers every check:\n{}",
            gw.logs.text()
        );
    }
}

#[tokio::test]
async fn cluster_shares_one_quota_and_rides_out_a_failover() {
    let mut cluster = Cluster::start(3).await;
    let emu = Emulator::start().await;
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("{u:?}")).collect();
    let config = config(&format!(
        "mode = \"cluster\"\nnodes = [{}]\n",
        nodes[..3].join(", ")
    ));
    let gws = three_gateways(&emu, &config).await;
    shared_quota_holds(&gws, &emu).await;
    // The quota's keys are on every primary: the gateways followed the slot map.
    for n in &cluster.nodes {
        if n.cli(&["role"]).await.starts_with("master") {
            let keys: u64 = n.cli(&["dbsize"]).await.trim().parse().unwrap();
            assert!(keys > 0, "no key on the primary on port {}", n.port);
        }
    }

    let load = Load::start(&gws, "load");
    load.more(60).await;
    let (primary, replica) = cluster.owner_of(0).await;
    cluster.kill(primary).await;
    // The replica takes over by itself once the primary has been silent for
    // cluster-node-timeout.
    eventually("the replica is promoted", || async {
        cluster
            .node(replica)
            .cli(&["role"])
            .await
            .starts_with("master")
    })
    .await;
    rode_out_the_failover(&gws, load).await;
    let late = || async {
        cluster
            .node(replica)
            .cli(&["keys", "ezgate:{quota:late-*"])
            .await
    };
    assert_eq!(late().await.trim(), "");
    late_users(&gws).await;
    assert!(
        late().await.lines().count() > 0,
        "new keys of the failed primary's slots are written on the promoted replica"
    );
}

#[tokio::test]
async fn sentinel_follows_a_failover_without_a_restart() {
    let mut sentinels = Sentinels::start().await;
    let emu = Emulator::start().await;
    let nodes: Vec<String> = sentinels.urls().iter().map(|u| format!("{u:?}")).collect();
    let config = config(&format!(
        "mode = \"sentinel\"\nnodes = [{}]\nmaster_name = \"{}\"\n",
        nodes.join(", "),
        sentinels.master_name
    ));
    let gws = three_gateways(&emu, &config).await;
    shared_quota_holds(&gws, &emu).await;

    let load = Load::start(&gws, "load");
    load.more(60).await;
    let replica = sentinels.replica.port;
    let primary = sentinels.primary.take().unwrap();
    let primary_port = primary.stop().await;
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
    rode_out_the_failover(&gws, load).await;
    late_users(&gws).await;
    let keys = cli(replica, &["keys", "ezgate:{quota:late-*"]).await;
    assert_eq!(
        keys.lines().count(),
        USERS,
        "the checks after the failover are held on the promoted replica (the old primary on {primary_port} is gone)"
    );
}

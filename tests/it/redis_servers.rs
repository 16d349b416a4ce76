//! Real Redis deployments for the tests, from the OS packages' `redis-server` and `redis-cli`
//! (`.ci/test` installs them): one server, a Redis Cluster of primaries with replicas, and a
//! primary with a replica watched by Sentinels. Every server listens on a free loopback port,
//! keeps its files in a scratch directory, and is killed with its handle (`kill_on_drop`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::harness::*;

fn installed(bin: &str) -> String {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    assert!(
        !path.is_empty(),
        "`{bin}` is not installed: run .ci/test (it installs Debian's redis-server, which brings redis-cli) or `apt-get install redis-server`"
    );
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port for a cluster node: its bus port, 10,000 higher, must be free too (and at most
/// 65535: Redis refuses a node port above 55535).
pub fn free_cluster_port() -> u16 {
    for _ in 0..1000 {
        let port = free_port();
        if port <= 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
    panic!("no free pair of ports (p, p + 10000) on 127.0.0.1 for a cluster node");
}

/// Runs `redis-cli -p PORT ARGS…` and returns its output (bounded in time).
pub async fn cli(port: u16, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        DEADLINE,
        Command::new(installed("redis-cli"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("redis-cli -p {port} {args:?} did not return"))
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Polls `check` until it holds, failing the test after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One `redis-server` (or a Sentinel: `redis-server CONF --sentinel`).
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub async fn start() -> Redis {
        Self::start_on(free_port()).await
    }

    /// A plain server on `port` (also used to bring one back on the port it had).
    pub async fn start_on(port: u16) -> Redis {
        Self::start_with(port, &[]).await
    }

    /// A server on `port` with extra `--directive value…` arguments.
    pub async fn start_with(port: u16, extra: &[&str]) -> Redis {
        let dir = scratch_dir();
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(dir.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let redis = Self::spawn(&args, port);
        redis.wait_ready().await;
        redis
    }

    /// A server started from a config file, with `extra` arguments after it.
    pub async fn start_conf(conf: &Path, port: u16, extra: &[&str]) -> Redis {
        let mut args = vec![conf.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let redis = Self::spawn(&args, port);
        redis.wait_ready().await;
        redis
    }

    fn spawn(args: &[String], port: u16) -> Redis {
        let child = Command::new(installed("redis-server"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Redis { child, port }
    }

    async fn wait_ready(&self) {
        let start = std::time::Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                start.elapsed() < DEADLINE,
                "redis-server on {} did not start",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args).await
    }

    /// Kills the server (as a crash would) and waits for it to be gone; returns its port.
    pub async fn stop(mut self) -> u16 {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
        self.port
    }

    /// Freezes the server (`SIGSTOP`): connections stay open, nothing is answered, as on a
    /// host that stopped responding. [`Redis::resume`] thaws it.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("redis-server running").to_string();
        let ok = std::process::Command::new("kill")
            .args(["-s", sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {sig} {pid} failed");
    }
}

/// A Redis Cluster: `primaries` primaries with one replica each, slots spread evenly,
/// failover after one second without the primary (`cluster-node-timeout 1000`).
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    pub async fn start(primaries: usize) -> Cluster {
        let mut nodes = Vec::new();
        for _ in 0..primaries * 2 {
            let port = free_cluster_port();
            let dir = scratch_dir();
            let conf = dir.join("nodes.conf").display().to_string();
            nodes.push(
                Redis::start_with(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf,
                        "--cluster-node-timeout",
                        "1000",
                        // A replica may take over at once, however old its last contact.
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                )
                .await,
            );
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = cli(nodes[0].port, &args).await;
        assert!(
            out.contains("[OK] All 16384 slots covered"),
            "cluster create failed:\n{out}"
        );
        let cluster = Cluster { nodes };
        for n in &cluster.nodes {
            eventually("every node says cluster_state:ok", || async {
                n.cli(&["cluster", "info"])
                    .await
                    .contains("cluster_state:ok")
            })
            .await;
        }
        // Replicas in sync, so a failover has somewhere to go.
        for n in &cluster.nodes {
            if n.cli(&["role"]).await.starts_with("slave") {
                eventually("every replica is in sync", || async {
                    n.cli(&["info", "replication"])
                        .await
                        .contains("master_link_status:up")
                })
                .await;
            }
        }
        cluster
    }

    /// `redis://` URLs of every node, as the `nodes` of a `[redis]` section.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The port of the primary serving `slot`, and of its replica.
    pub async fn owner_of(&self, slot: u16) -> (u16, u16) {
        let text = self.nodes[0].cli(&["cluster", "nodes"]).await;
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
        let port_of = |f: &[&str]| -> u16 {
            f[1].split('@')
                .next()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let primary = lines
            .iter()
            .find(|f| {
                f.len() > 8
                    && f[2].contains("master")
                    && f[8..].iter().any(|r| {
                        let (a, b) = r.split_once('-').unwrap_or((r, r));
                        matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
                    })
            })
            .unwrap_or_else(|| panic!("no primary serves slot {slot}:\n{text}"));
        let replica = lines
            .iter()
            .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == primary[0])
            .unwrap_or_else(|| panic!("the primary of slot {slot} has no replica:\n{text}"));
        (port_of(primary), port_of(replica))
    }

    /// Kills the node on `port` (as a crash would).
    pub async fn kill(&mut self, port: u16) {
        let at = self.nodes.iter().position(|n| n.port == port).unwrap();
        self.nodes.remove(at).stop().await;
    }

    pub fn node(&self, port: u16) -> &Redis {
        self.nodes.iter().find(|n| n.port == port).unwrap()
    }
}

/// A primary and its replica, watched by three Sentinels (quorum 2) that fail over after
/// one second without the primary.
pub struct Sentinels {
    pub primary: Option<Redis>,
    pub replica: Redis,
    pub sentinels: Vec<Redis>,
    pub master_name: &'static str,
}

impl Sentinels {
    pub async fn start() -> Sentinels {
        let master_name = "ezgate-test";
        let primary = Redis::start().await;
        let replica = Redis::start_with(
            free_port(),
            &["--replicaof", "127.0.0.1", &primary.port.to_string()],
        )
        .await;
        eventually("the replica is in sync", || async {
            replica
                .cli(&["info", "replication"])
                .await
                .contains("master_link_status:up")
        })
        .await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let dir = scratch_dir();
            let conf: PathBuf = dir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {master_name} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {master_name} 1000\n\
                     sentinel failover-timeout {master_name} 3000\n\
                     sentinel parallel-syncs {master_name} 1\n",
                    dir = dir.display(),
                    primary = primary.port,
                ),
            )
            .unwrap();
            sentinels.push(Redis::start_conf(&conf, port, &["--sentinel"]).await);
        }
        for s in &sentinels {
            eventually(
                "every sentinel knows the others and the replica",
                || async {
                    s.cli(&["sentinel", "ckquorum", master_name])
                        .await
                        .contains("OK 3 usable Sentinels")
                        && s.cli(&["sentinel", "replicas", master_name])
                            .await
                            .contains(&replica.port.to_string())
                },
            )
            .await;
        }
        Sentinels {
            primary: Some(primary),
            replica,
            sentinels,
            master_name,
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect()
    }
}

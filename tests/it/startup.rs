//! What a newcomer meets first: which build runs, the emulator's help, config mistakes
//! reported whole, and the startup warning for an upstream that does not resolve.

use std::process::{Command, Output};

use crate::harness::*;

fn run(bin_name: &str, args: &[&str]) -> Output {
    Command::new(bin(bin_name))
        .args(args)
        .env_remove("EZGATE_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// The commit the binaries were built from, found independently of build.rs.
fn expected_commit() -> String {
    if let Ok(c) = std::env::var("EZGATE_BUILD_COMMIT") {
        return c;
    }
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn expected_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

#[test]
fn version_names_the_commit_and_the_profile() {
    let want = format!(
        "{} (commit {}, {} build)",
        env!("CARGO_PKG_VERSION"),
        expected_commit(),
        expected_profile()
    );
    for name in ["ezgate", "ezlink-emulator"] {
        let out = run(name, &["--version"]);
        assert!(out.status.success(), "{name} --version");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{name} {want}")
        );
    }
}

#[tokio::test]
async fn build_info_carries_version_commit_and_profile() {
    let gw = Gateway::start("http://127.0.0.1:1", "").await;
    let sample = format!(
        "ezgate_build_info{{commit=\"{}\",profile=\"{}\",version=\"{}\"}}",
        expected_commit(),
        expected_profile(),
        env!("CARGO_PKG_VERSION")
    );
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, &sample), 1.0, "{sample} in:\n{m}");
}

#[test]
fn emulator_help_lists_every_fault_header() {
    let out = run("ezlink-emulator", &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    // Every `"x-emu-…"` literal the emulator's code reads.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/bin/ezlink-emulator");
    let mut names = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for (at, _) in text.match_indices("\"x-emu-") {
            let name: String = text[at + 1..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                .collect();
            names.insert(name);
        }
    }
    assert!(names.len() >= 16, "found only {names:?}");
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !help.contains(&format!("`{n}")))
        .collect();
    assert!(
        missing.is_empty(),
        "--help does not describe {missing:?}:\n{help}"
    );
}

#[test]
fn the_readme_config_error_is_what_ezgate_prints() {
    // The README shows the error for a rate with an unknown unit in limits[2], line 31 of
    // config/ezgate.toml: write that file and compare the output verbatim.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == "ezgate: invalid configuration")
        .expect("the README shows a config error");
    let shown = format!("{}\n{}\n", lines[at], lines[at + 1]);
    let bad = shown
        .split("limits[2].requests: \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the README's example is about limits[2].requests");
    let mut config = String::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        config += &format!("[[limits]]\nname = \"{name}\"\nkey = \"global\"\n");
        if i < 2 {
            config += "requests = \"10/s\"\n\n";
        }
    }
    while config.lines().count() < 30 {
        config += "#\n";
    }
    config += &format!("requests = \"{bad}\"\n");
    let dir = scratch_dir();
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(dir.join("config/ezgate.toml"), config).unwrap();
    let out = Command::new(bin("ezgate"))
        .args(["check-config", "--config", "config/ezgate.toml"])
        .current_dir(&dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr), shown);
}

#[test]
fn host_names_and_unknown_levels_are_refused_before_binding() {
    let out = run(
        "ezgate",
        &[
            "--listen",
            "localhost:8080",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("\"localhost:8080\" is not an IP address and port; write e.g. 127.0.0.1:8080"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "nothing was bound");

    let out = Command::new(bin("ezgate"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env_remove("EZGATE_CONFIG")
        .env("RUST_LOG", "warning")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "RUST_LOG: \"warning\" is not a level; use trace, debug, info, warn, error or off"
        ),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "nothing was bound");
}

#[tokio::test]
async fn an_upstream_that_does_not_resolve_is_one_warning_not_unreadiness() {
    let gw = Gateway::start("http://no-such-host.invalid:1", "").await;
    let line = gw.wait_log("upstream host does not resolve").await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "WARN");
    assert_eq!(v["host"], "no-such-host.invalid");
    let r = send(
        &http1(),
        http::Method::GET,
        &format!("http://{}/readyz", gw.admin),
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "ready all the same");
    // Requests still get the normal error, and the warning is not repeated per request.
    let r = gw.get("/v1/models").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error()["code"], "upstream_unreachable");
    let warnings = gw
        .logs
        .all()
        .iter()
        .filter(|l| l.contains("upstream host does not resolve"))
        .count();
    assert_eq!(warnings, 1, "{}", gw.logs.text());
}

#[tokio::test]
async fn an_upstream_that_resolves_gets_no_warning() {
    let emu = Emulator::start().await;
    let gw = Gateway::start(&format!("http://localhost:{}", emu.addr.port()), "").await;
    gw.wait_log("upstream host resolves").await;
    assert!(
        !gw.logs.text().contains("does not resolve"),
        "{}",
        gw.logs.text()
    );
}

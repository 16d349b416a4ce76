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

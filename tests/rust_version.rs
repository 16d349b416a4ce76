#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test setup: a failed unwrap is a broken checkout or toolchain"
)]

//! `rust-version` in `Cargo.toml` is the true minimum Rust of the locked dependency graph,
//! and the README's Prerequisites say the same.
//!
//! The graph is what `cargo metadata --locked` resolves for the host target
//! (`--filter-platform`): every package built for it, dev-dependencies included since the
//! tests build them, build-dependencies included since they are compiled by the same
//! toolchain. Packages only built for other platforms (`windows-*`, `wasm-bindgen`, …) are
//! left out: ezgate runs on Linux (systemd unit, container image), and including them would
//! make the claim depend on crates no supported build compiles. `--offline` works once the
//! build has fetched the registry (the test runs after building), so no network is needed.
//!
//! The check is two-sided: `rust-version` must be at least every package's (else a newcomer's
//! older toolchain fails deep in a dependency) and equal to the highest one (else it claims
//! more than is needed; raise it only with the dependency that needs it).

use std::cmp::Ordering;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// A `rust-version`, as (major, minor, patch); an absent patch is 0.
fn parse(v: &str) -> (u64, u64, u64) {
    let mut parts = v.trim().split('.').map(|p| {
        p.parse::<u64>()
            .unwrap_or_else(|_| panic!("rust-version {v:?} is not N.N or N.N.N"))
    });
    let major = parts.next().unwrap();
    let minor = parts.next().unwrap_or(0);
    let patch = parts.next().unwrap_or(0);
    assert!(
        parts.next().is_none(),
        "rust-version {v:?} has too many parts"
    );
    (major, minor, patch)
}

fn show((major, minor, patch): (u64, u64, u64)) -> String {
    if patch == 0 {
        format!("{major}.{minor}")
    } else {
        format!("{major}.{minor}.{patch}")
    }
}

fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .expect("run rustc -vV");
    assert!(out.status.success(), "rustc -vV failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .trim()
        .to_owned()
}

/// `cargo metadata` of the locked graph built for the host.
fn metadata() -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "metadata",
            "--locked",
            "--offline",
            "--format-version",
            "1",
            "--filter-platform",
        ])
        .arg(host_triple())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata --locked --offline failed (build once first so the registry is fetched):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The Rust versions of the README's Prerequisites line, "**Rust 1.NN or newer**".
fn readme_versions() -> Vec<(u64, u64, u64)> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    readme
        .match_indices("Rust ")
        .filter_map(|(at, m)| {
            let rest = &readme[at + m.len()..];
            let version: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let version = version.trim_end_matches('.');
            (rest[version.len()..].starts_with(" or newer") && version.contains('.'))
                .then(|| parse(version))
        })
        .collect()
}

#[test]
fn rust_version_is_the_true_minimum_of_the_locked_graph() {
    let meta = metadata();
    let root_id = meta["resolve"]["root"].as_str().expect("a root package");
    let built: Vec<&str> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    let packages = meta["packages"].as_array().unwrap();
    let ours = packages
        .iter()
        .find(|p| p["id"] == root_id)
        .expect("ezgate in the metadata");
    let claimed = parse(
        ours["rust_version"]
            .as_str()
            .expect("Cargo.toml sets rust-version"),
    );

    let mut needed = (0, 0, 0);
    let mut by = Vec::new();
    for p in packages {
        let id = p["id"].as_str().unwrap();
        if id == root_id || !built.contains(&id) {
            continue;
        }
        let Some(v) = p["rust_version"].as_str() else {
            continue;
        };
        let v = parse(v);
        let name = format!(
            "{} {}",
            p["name"].as_str().unwrap(),
            p["version"].as_str().unwrap()
        );
        match v.cmp(&needed) {
            Ordering::Greater => {
                needed = v;
                by = vec![name];
            }
            Ordering::Equal => by.push(name),
            Ordering::Less => {}
        }
    }
    assert!(
        needed > (1, 0, 0),
        "no package of the graph states a rust-version"
    );
    assert!(
        claimed >= needed,
        "Cargo.toml claims rust-version {} but {} {} Rust {}: raise rust-version (and the README's Prerequisites) to {}",
        show(claimed),
        by.join(", "),
        if by.len() == 1 { "needs" } else { "need" },
        show(needed),
        show(needed)
    );
    assert_eq!(
        claimed,
        needed,
        "Cargo.toml claims rust-version {} but the locked graph needs only Rust {} ({}): lower it to the true minimum",
        show(claimed),
        show(needed),
        by.join(", ")
    );

    let readme = readme_versions();
    assert!(
        !readme.is_empty(),
        "README.md names no \"Rust N.N or newer\" in its Prerequisites"
    );
    for v in readme {
        assert_eq!(
            v,
            claimed,
            "README.md says Rust {} or newer; Cargo.toml's rust-version is {}",
            show(v),
            show(claimed)
        );
    }
}

#[test]
fn versions_compare_by_number_not_text() {
    assert!(parse("1.89") > parse("1.9"));
    assert_eq!(parse("1.88"), parse("1.88.0"));
    assert!(parse("1.88.1") > parse("1.88"));
    assert_eq!(show(parse("1.89.0")), "1.89");
    assert_eq!(show(parse("1.74.1")), "1.74.1");
}

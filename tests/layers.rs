//! The floors of `src/`, kept: every module imports only from floors below its own (or, where
//! the table says so, beside it), and no module imports another in a loop. It reads the
//! `crate::…` paths of the non-test code of every file under `src/` (and the `ezgate::…`
//! paths of `main.rs`), so a new upward import or loop fails CI with the file, the import
//! and the rule it breaks. The floors are drawn in `src/lib.rs` and the README.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Floors, bottom to top, and their modules. A module may import any module of a lower
/// floor; beside itself only what [`SIDEWAYS`] allows.
const FLOORS: &[(&str, &[&str])] = &[
    ("base", &["errors", "headers", "route", "tls", "buffers"]),
    ("config", &["config"]),
    (
        "domain",
        &[
            "clients", "limits", "upstream", "pool", "quota", "cost", "budget",
        ],
    ),
    ("recording", &["outcome", "metrics", "access_log", "traces"]),
    (
        "path",
        &["gateway", "exchange", "proxy", "stream", "websocket"],
    ),
    ("entry", &["server", "admin", "status", "lib", "main"]),
];

/// Imports between modules of one floor that are one concern.
const SIDEWAYS: &[(&str, &str)] = &[
    // The upstream side and its connection pool.
    ("upstream", "pool"),
    // The learned quota's shared picture lives in the shared limits' Redis.
    ("quota", "limits"),
    // Budgets count money as costs price it, and share it through the shared limits' Redis.
    ("budget", "cost"),
    ("budget", "limits"),
    // Budgets show a header's value as a key is shown: its fingerprint.
    ("budget", "clients"),
    // Recording reads the outcome.
    ("metrics", "outcome"),
    ("access_log", "outcome"),
    ("traces", "outcome"),
    // The path: the request path, its response body, the exchange both hold, the state.
    ("proxy", "stream"),
    ("proxy", "exchange"),
    ("proxy", "gateway"),
    ("stream", "exchange"),
    ("exchange", "gateway"),
    // A WebSocket session: started by the request path, holding its exchange.
    ("proxy", "websocket"),
    ("websocket", "exchange"),
    ("websocket", "gateway"),
    // Entry: the library runs the listeners; the binary runs the library.
    ("lib", "server"),
    ("lib", "admin"),
    ("server", "admin"),
    // The admin listener serves the status view.
    ("admin", "status"),
    ("main", "lib"),
    ("main", "server"),
];

/// Floors that sit side by side and must not import each other at all: the domain and
/// recording meet only in the path.
const APART: &[(&str, &str)] = &[("domain", "recording"), ("recording", "domain")];

fn floor_of(module: &str) -> Option<(usize, &'static str)> {
    FLOORS
        .iter()
        .enumerate()
        .find(|(_, (_, mods))| mods.contains(&module))
        .map(|(i, (name, _))| (i, *name))
}

/// The rank used for "below": the domain and recording share one.
fn rank(floor: usize) -> usize {
    match floor {
        0 => 0,
        1 => 1,
        2 | 3 => 2,
        4 => 3,
        _ => 4,
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "bin") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/limits/check.rs` → `limits`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// The non-test code of a file: test files are skipped, an inline `#[cfg(test)] mod` ends
/// the code, comments are dropped.
fn code_of(file: &Path, text: &str) -> String {
    let name = file.file_name().unwrap().to_string_lossy();
    if name == "tests.rs" || name.ends_with("_tests.rs") {
        return String::new();
    }
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]")
            && lines
                .peek()
                .is_some_and(|n| n.trim_start().starts_with("mod "))
        {
            break;
        }
        // Comments are blanked, not dropped, so that line numbers stay the file's.
        if !t.starts_with("//") {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Every module named after `prefix::` in `code`, and the line it is on.
fn imports(code: &str, prefix: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().next_back();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let module: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !module.is_empty() {
                found.push((module, n + 1));
            }
        }
        // `use crate::{a, b::c}`: each member.
        if let Some(i) = line.find(&format!("{prefix}{{")) {
            let inner = &line[i + prefix.len() + 1..];
            for part in inner.split(',') {
                let m: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !m.is_empty() && m != "self" {
                    found.push((m, n + 1));
                }
            }
        }
    }
    found
}

#[test]
fn every_module_imports_only_downward_and_none_in_a_loop() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        let shown = file.strip_prefix(root).unwrap().display().to_string();
        let Some((from_floor, from_name)) = floor_of(&from) else {
            problems.push(format!("{shown}: module `{from}` is on no floor; add it to FLOORS in tests/layers.rs and to the module map in src/lib.rs"));
            continue;
        };
        let code = code_of(file, &std::fs::read_to_string(file).unwrap());
        let prefix = if from == "main" {
            "ezgate::"
        } else {
            "crate::"
        };
        for (to, line) in imports(&code, prefix) {
            let to = if prefix == "ezgate::" && floor_of(&to).is_none() {
                "lib".to_owned()
            } else {
                to
            };
            if to == from {
                continue;
            }
            let Some((to_floor, to_name)) = floor_of(&to) else {
                // `crate::SomeItem` re-exported by lib.rs.
                graph
                    .entry(from.clone())
                    .or_default()
                    .insert("lib".to_owned());
                if from_floor < FLOORS.len() - 1 {
                    problems.push(format!("{shown}:{line}: imports `{prefix}{to}` from lib.rs (entry): the {from_name} floor may only import from below"));
                }
                continue;
            };
            graph.entry(from.clone()).or_default().insert(to.clone());
            let sideways = SIDEWAYS.contains(&(from.as_str(), to.as_str()));
            let apart = APART.contains(&(from_name, to_name));
            if apart {
                problems.push(format!("{shown}:{line}: `{from}` ({from_name}) imports `{to}` ({to_name}): the domain and recording meet only in the path"));
            } else if rank(to_floor) > rank(from_floor) {
                problems.push(format!("{shown}:{line}: `{from}` ({from_name}) imports `{to}` ({to_name}), a floor above: imports go down the floors"));
            } else if rank(to_floor) == rank(from_floor) && !sideways {
                problems.push(format!("{shown}:{line}: `{from}` imports `{to}` beside it on the {from_name} floor; only the pairs in SIDEWAYS (one concern) may"));
            }
        }
    }
    // No loops, whatever the floors say.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        loops: &mut Vec<String>,
    ) {
        if let Some(i) = path.iter().position(|p| p == n) {
            loops.push(format!("{} -> {n}", path[i..].join(" -> ")));
            return;
        }
        if done.contains(n) {
            return;
        }
        path.push(n.to_owned());
        for next in graph.get(n).into_iter().flatten() {
            visit(next, graph, path, done, loops);
        }
        path.pop();
        done.insert(n.to_owned());
    }
    let mut loops = Vec::new();
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        visit(n, &graph, &mut Vec::new(), &mut done, &mut loops);
    }
    for l in loops {
        problems.push(format!("import loop: {l}"));
    }
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn no_file_holds_more_than_600_lines_of_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut big = Vec::new();
    for file in files {
        let code = code_of(&file, &std::fs::read_to_string(&file).unwrap());
        let lines = code.lines().filter(|l| !l.trim().is_empty()).count();
        if lines > 600 {
            big.push(format!(
                "{}: {lines} lines of non-test code",
                file.strip_prefix(root).unwrap().display()
            ));
        }
    }
    assert!(
        big.is_empty(),
        "split these by concern:\n{}",
        big.join("\n")
    );
}

#[test]
fn the_check_sees_an_upward_import() {
    // The reader itself: an import in a `use` list and a path in code are both found.
    let code = "use crate::{errors, proxy::serve};\nfn f() { crate::metrics::x(); }\n";
    let found: Vec<String> = imports(code, "crate::")
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    for m in ["errors", "proxy", "metrics"] {
        assert!(found.contains(&m.to_owned()), "{found:?}");
    }
    assert_eq!(floor_of("limits"), Some((2, "domain")));
    assert!(rank(floor_of("proxy").unwrap().0) > rank(floor_of("limits").unwrap().0));
}

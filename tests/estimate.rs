#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test setup: a failed unwrap is a broken corpus"
)]

//! The prompt estimate against the real tokenizers, on the prompts of `tests/corpus/`.
//!
//! For every script (one corpus file each) the estimated prompt tokens must be within
//! ±25 % of what `o200k_base` counts for the same text, in total, and every single prompt
//! within ±50 %. `cl100k_base` (GPT-4, GPT-3.5) is measured for reference only.
//! `cargo test --test estimate -- --nocapture` prints the table of `docs/rate-limits.md`.
//! tiktoken-rs embeds its BPE ranks, so nothing is downloaded.

use std::path::Path;
use std::sync::LazyLock;

use ezgate::limits::estimate::Counts;
use ezgate::limits::tokens::inspect;
use serde_json::Value;

/// The limit on each script's total error.
const SCRIPT_LIMIT: f64 = 0.25;
/// The limit on each single prompt's error.
const PROMPT_LIMIT: f64 = 0.50;

/// The scripts the corpus must hold (its README lists them).
const SCRIPTS: [&str; 10] = [
    "english",
    "code",
    "json",
    "mixed-code",
    "chinese",
    "japanese",
    "korean",
    "mixed-cjk",
    "european",
    "other",
];

/// The prompt text of a request body as ezgate reads it: every string under `messages`,
/// `prompt` and `input`, except the values of `role` and `type` members.
fn texts<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| texts(x, out)),
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| *k != "role" && *k != "type")
            .for_each(|(_, x)| texts(x, out)),
        _ => {}
    }
}

struct Prompt {
    estimate: u64,
    /// Characters / 4, the estimate before weights by class.
    quarter: u64,
    o200k: u64,
    cl100k: u64,
}

/// Every script's prompts, read and counted once for all tests.
static CORPUS: LazyLock<Vec<(&'static str, Vec<Prompt>)>> = LazyLock::new(corpus);

fn corpus() -> Vec<(&'static str, Vec<Prompt>)> {
    let o200k = tiktoken_rs::o200k_base().unwrap();
    let cl100k = tiktoken_rs::cl100k_base().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    SCRIPTS
        .iter()
        .map(|&script| {
            let file = dir.join(format!("{script}.jsonl"));
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let prompts = text
                .lines()
                .enumerate()
                .map(|(n, line)| {
                    let body: Value = serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("{}:{}: {e}", file.display(), n + 1));
                    let mut strings = Vec::new();
                    for key in ["messages", "prompt", "input"] {
                        if let Some(v) = body.get(key) {
                            texts(v, &mut strings);
                        }
                    }
                    assert!(
                        !strings.is_empty(),
                        "{}:{}: no prompt",
                        file.display(),
                        n + 1
                    );
                    // The plain-text estimate of the same strings is the request's estimate.
                    let mut counts = Counts::default();
                    strings.iter().for_each(|s| counts.add_utf8(s.as_bytes()));
                    let estimate = inspect(line.as_bytes()).prompt_tokens;
                    assert_eq!(
                        estimate,
                        counts.tokens().max(1),
                        "{}:{}",
                        file.display(),
                        n + 1
                    );
                    let tokens = |bpe: &tiktoken_rs::CoreBPE| {
                        strings
                            .iter()
                            .map(|s| bpe.encode_ordinary(s).len() as u64)
                            .sum()
                    };
                    Prompt {
                        estimate,
                        quarter: (counts.chars() as u64).div_ceil(4).max(1),
                        o200k: tokens(&o200k),
                        cl100k: tokens(&cl100k),
                    }
                })
                .collect();
            (script, prompts)
        })
        .collect()
}

/// Error of `est` against `real`: +0.10 is 10 % over.
fn error(est: u64, real: u64) -> f64 {
    est as f64 / real as f64 - 1.0
}

/// Total, mean and worst (largest in size) error of one estimate against one tokenizer.
fn spread(ps: &[Prompt], est: fn(&Prompt) -> u64, real: fn(&Prompt) -> u64) -> [f64; 3] {
    let total = error(ps.iter().map(est).sum(), ps.iter().map(real).sum());
    let errors: Vec<f64> = ps.iter().map(|p| error(est(p), real(p))).collect();
    let mean = errors.iter().sum::<f64>() / errors.len() as f64;
    let worst = errors
        .iter()
        .copied()
        .fold(0.0, |w: f64, e| if e.abs() > w.abs() { e } else { w });
    [total, mean, worst]
}

fn pct([total, mean, worst]: [f64; 3]) -> String {
    format!(
        "{:+.0} % | {:+.0} % | {:+.0} %",
        total * 100.0,
        mean * 100.0,
        worst * 100.0
    )
}

/// Prints one table (markdown) of an estimate's error against both tokenizers.
fn table(title: &str, est: fn(&Prompt) -> u64) {
    println!("\n{title}\n");
    println!("| script | prompts | o200k tokens | vs o200k: total | mean | worst | cl100k tokens | vs cl100k: total | mean | worst |");
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (script, ps) in CORPUS.iter() {
        println!(
            "| {script} | {} | {} | {} | {} | {} |",
            ps.len(),
            ps.iter().map(|p| p.o200k).sum::<u64>(),
            pct(spread(ps, est, |p| p.o200k)),
            ps.iter().map(|p| p.cl100k).sum::<u64>(),
            pct(spread(ps, est, |p| p.cl100k)),
        );
    }
}

#[test]
fn estimate_is_within_a_quarter_of_o200k_on_every_script() {
    table("Estimate (weights by class)", |p| p.estimate);
    table("Characters / 4 (before)", |p| p.quarter);
    let mut failures = Vec::new();
    for (script, ps) in CORPUS.iter() {
        let [total, _, _] = spread(ps, |p| p.estimate, |p| p.o200k);
        if total.abs() > SCRIPT_LIMIT {
            failures.push(format!("{script}: total {:+.1} %", total * 100.0));
        }
        for (n, p) in ps.iter().enumerate() {
            let e = error(p.estimate, p.o200k);
            if e.abs() > PROMPT_LIMIT {
                failures.push(format!(
                    "{script}.jsonl line {}: estimated {} tokens, o200k_base counts {} ({:+.0} %)",
                    n + 1,
                    p.estimate,
                    p.o200k,
                    e * 100.0
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "estimate out of bounds:\n{}",
        failures.join("\n")
    );
}

/// The old estimate fails the same bound: the test can fail.
#[test]
fn characters_over_four_would_fail() {
    let (_, chinese) = CORPUS.iter().find(|(s, _)| *s == "chinese").unwrap();
    let [total, _, _] = spread(chinese, |p| p.quarter, |p| p.o200k);
    assert!(total < -SCRIPT_LIMIT, "{total}");
}

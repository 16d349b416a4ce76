//! What a budget keeps: its spend in `server.state_dir` across SIGTERM and SIGKILL, a state
//! file that cannot be read or written stopping startup, `check-config`'s word on budgets,
//! a new period at midnight in the budget's zone (on the clock `EZGATE_BUDGET_CLOCK` sets),
//! and the spend a reload keeps.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::*;

/// Runs ezgate with `config` and `env`, expecting it to stop by itself during startup:
/// its exit code and everything it wrote to stderr.
async fn start_fails(config: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = scratch_dir();
    let path = dir.join("ezgate.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = tokio::process::Command::new(bin("ezgate"));
    cmd.arg("--config")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .expect("ezgate stops at startup")
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What `budgets.json` in `dir` says budget `name`'s account `key` spent (nano-units).
fn saved(dir: &Path, name: &str, key: &str) -> Option<u64> {
    let text = std::fs::read(dir.join("budgets.json")).ok()?;
    let v: Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(v["version"], 1, "{v}");
    v["budgets"][name]["accounts"]
        .as_array()?
        .iter()
        .find(|a| a[0] == key)
        .and_then(|a| a[1].as_u64())
}

/// Sends `n` chats as the search team, and returns what they cost.
async fn spend(gw: &Gateway, emu: &Emulator, rid: &str, n: u64) -> u64 {
    let mut cost = 0;
    for i in 0..n {
        let rid = format!("{rid}-{i}");
        let completion = (i * 13 + 5).to_string();
        let extra = [("x-emu-completion-tokens", completion.as_str())];
        let r = post(gw, SEARCH, &rid, &extra, &chat(Some(200), false)).await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        let (p, c) = usage(emu, &rid).await;
        cost += nanos(GPT_4O, p, 0, c);
    }
    cost
}

#[tokio::test]
async fn spend_survives_a_sigterm_and_a_sigkill() {
    let emu = Emulator::start().await;
    let dir = scratch_dir();
    let cfg = config(
        Some(&dir),
        &budget("team-monthly", "team", "10", "month", ""),
    );
    let mut gw = Gateway::start(&emu.url(), &cfg).await;
    let first = spend(&gw, &emu, "before-term", 3).await;
    // SIGTERM: the drain writes the spend down.
    gw.signal("TERM");
    assert_eq!(gw.exit_code().await, Some(0));
    assert_eq!(saved(&dir, "team-monthly", "search"), Some(first));
    let mut gw = Gateway::start(&emu.url(), &cfg).await;
    assert_eq!(spent(&gw, "team-monthly", "search").await, shown(first));
    // SIGKILL: what was written within the 2 s since is all there is, and it is enough.
    let second = first + spend(&gw, &emu, "before-kill", 2).await;
    let start = std::time::Instant::now();
    while saved(&dir, "team-monthly", "search") != Some(second) {
        assert!(
            start.elapsed() < DEADLINE,
            "budgets.json never held {second}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.signal("KILL");
    assert_eq!(gw.exit_code().await, None, "killed");
    let gw = Gateway::start(&emu.url(), &cfg).await;
    assert_eq!(spent(&gw, "team-monthly", "search").await, shown(second));
    // And the restored spend counts against the amount: a request that does not fit what
    // is left is refused.
    let left = 10_000_000_000 - second;
    let max_tokens = left / 10_000 + 1;
    let r = post(&gw, SEARCH, "over", &[], &chat(Some(max_tokens), false)).await;
    assert_exceeded(&r, "team-monthly");
}

#[tokio::test]
async fn a_request_in_flight_at_sigterm_is_charged_before_the_last_write() {
    let emu = Emulator::start().await;
    let dir = scratch_dir();
    let cfg = config(
        Some(&dir),
        &budget("team-monthly", "team", "10", "month", ""),
    );
    let mut gw = Gateway::start(&emu.url(), &cfg).await;
    let h = headers(
        SEARCH,
        "draining",
        &[
            ("x-emu-stream-events", "4"),
            ("x-emu-stream-interval-ms", "500"),
        ],
    );
    let url = gw.url("/v1/chat/completions");
    let stream = tokio::spawn(async move {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        send(
            &http1(),
            http::Method::POST,
            &url,
            &h,
            chat(Some(100), true).into(),
        )
        .await
    });
    emu.wait_state("draining", "in_progress", DEADLINE).await;
    gw.signal("TERM");
    let r = stream.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(
        String::from_utf8_lossy(&r.body).contains("[DONE]"),
        "the drain let it finish"
    );
    assert_eq!(gw.exit_code().await, Some(0));
    let (p, c) = usage(&emu, "draining").await;
    let cost = nanos(GPT_4O, p, 0, c);
    assert_eq!(saved(&dir, "team-monthly", "search"), Some(cost));
    let gw = Gateway::start(&emu.url(), &cfg).await;
    assert_eq!(spent(&gw, "team-monthly", "search").await, shown(cost));
}

#[tokio::test]
async fn a_corrupt_state_file_or_an_unwritable_state_dir_stops_startup() {
    let dir = scratch_dir();
    let file = dir.join("budgets.json");
    std::fs::write(&file, b"{\"version\": 1, \"budgets\": {\"team-monthly\": ").unwrap();
    let cfg = config(
        Some(&dir),
        &budget("team-monthly", "team", "10", "month", ""),
    );
    let (code, err) = start_fails(&cfg, &[]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&file.display().to_string()),
        "names the file: {err}"
    );
    assert!(err.contains("not readable"), "{err}");
    // Of a version this ezgate does not read: refused too, not started from zero.
    std::fs::write(&file, b"{\"version\": 9, \"budgets\": {}}").unwrap();
    let (code, err) = start_fails(&cfg, &[]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&file.display().to_string()) && err.contains("version 9"),
        "{err}"
    );
    // A directory where nothing can be created (the tests run as root, whom file modes do
    // not stop: /proc takes no new files).
    let cfg = config(
        Some(Path::new("/proc")),
        &budget("team-monthly", "team", "10", "month", ""),
    );
    let (code, err) = start_fails(&cfg, &[]).await;
    assert_eq!(code, Some(1), "{err}");
    // Named by its file or its directory (startup may probe the directory first).
    assert!(err.contains("/proc"), "names where: {err}");
    assert!(
        err.contains("budgets.json") || err.contains("state_dir"),
        "{err}"
    );
}

#[test]
fn check_config_warns_of_a_budget_in_memory_and_refuses_budgets_without_prices() {
    let dir = scratch_dir();
    let path = dir.join("ezgate.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(bin("ezgate"))
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let rest = budget("team-monthly", "team", "10", "month", "");
    let (code, out, err) = check(&config(None, &rest));
    assert_eq!(code, Some(0), "{err}");
    let warning = out
        .lines()
        .find(|l| l.starts_with("# warning: "))
        .unwrap_or_else(|| panic!("a warning: {out}"));
    assert!(
        warning.contains("budgets[0]") && warning.contains("without server.state_dir"),
        "{warning}"
    );
    // With a state_dir, no warning.
    let (code, out, err) = check(&config(Some(&dir), &rest));
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.contains("# warning"), "{out}");
    // Budgets with no prices to count them in: refused.
    let (code, _, err) = check(&rest);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("budgets") && err.contains("[prices]"), "{err}");
}

/// Europe/Paris: the day of 2026-12-31 ends at 2026-12-31T23:00:00Z.
const PARIS_DAY_END: &str = "2026-12-31T23:00:00Z";

fn paris_daily(amount: u64, state_dir: Option<&Path>) -> String {
    let rest = budget("paris-daily", "team", &decimal(amount), "day", "")
        .replace("timezone = \"UTC\"", "timezone = \"Europe/Paris\"");
    config(state_dir, &rest)
}

#[tokio::test]
async fn a_new_period_starts_from_zero_at_midnight_in_the_budgets_zone() {
    let emu = Emulator::start().await;
    let body = chat(Some(100), false);
    // Room for one request; the clock starts 12 s before midnight in Paris
    // (time enough for a start on a busy machine; the test then waits for the rest).
    let cfg = paris_daily(max_cost(&body, 100), None);
    let clock = [("EZGATE_BUDGET_CLOCK", "2026-12-31T22:59:48Z")];
    let gw = Gateway::start_env(&emu.url(), &cfg, &clock).await;
    assert_eq!(post(&gw, SEARCH, "old-1", &[], &body).await.status, 200);
    let r = post(&gw, SEARCH, "old-2", &[], &body).await;
    let message = assert_exceeded(&r, "paris-daily");
    assert!(
        message.contains(&format!("until {PARIS_DAY_END}")),
        "{message}"
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=12).contains(&retry),
        "Retry-After {retry}: the seconds to midnight in Paris"
    );
    let v = view(&gw, "paris-daily").await;
    assert_eq!(v["period_start"], "2026-12-30T23:00:00Z", "{v}");
    assert_eq!(v["period_end"], PARIS_DAY_END, "{v}");
    // The next period: no account, and the request fits again.
    let v = wait_view(&gw, "paris-daily", Duration::from_secs(30), |v| {
        v["period_start"] == PARIS_DAY_END
    })
    .await;
    assert_eq!(v["period_end"], "2027-01-01T23:00:00Z", "{v}");
    assert_eq!(
        (&v["accounts"], &v["top"]),
        (&Value::from(0), &Value::Array(vec![])),
        "{v}"
    );
    assert_eq!(post(&gw, SEARCH, "new-1", &[], &body).await.status, 200);
    let (p, c) = usage(&emu, "new-1").await;
    assert_eq!(
        spent(&gw, "paris-daily", "search").await,
        shown(nanos(GPT_4O, p, 0, c))
    );
    let metrics = gw.settled_metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "ezgate_budget_spent{budget=\"paris-daily\",key=\"search\"}"
        ),
        shown(nanos(GPT_4O, p, 0, c))
    );
}

#[tokio::test]
async fn a_restart_across_the_period_end_restores_nothing_of_the_old_period() {
    let emu = Emulator::start().await;
    let dir = scratch_dir();
    let cfg = paris_daily(1_000_000_000, Some(&dir));
    let at = |t| [("EZGATE_BUDGET_CLOCK", t)];
    let mut gw = Gateway::start_env(&emu.url(), &cfg, &at("2026-12-31T12:00:00Z")).await;
    let cost = spend(&gw, &emu, "old", 2).await;
    gw.signal("TERM");
    assert_eq!(gw.exit_code().await, Some(0));
    // Later the same Paris day: restored.
    let mut gw = Gateway::start_env(&emu.url(), &cfg, &at("2026-12-31T22:59:00Z")).await;
    assert_eq!(spent(&gw, "paris-daily", "search").await, shown(cost));
    gw.signal("TERM");
    assert_eq!(gw.exit_code().await, Some(0));
    // After midnight in Paris: a new period, nothing restored, and the file says so.
    let gw = Gateway::start_env(&emu.url(), &cfg, &at("2026-12-31T23:00:01Z")).await;
    let v = view(&gw, "paris-daily").await;
    assert_eq!(v["period_start"], PARIS_DAY_END, "{v}");
    assert_eq!(v["accounts"], 0, "{v}");
    assert_eq!(saved(&dir, "paris-daily", "search"), None);
}

#[tokio::test]
async fn a_reload_keeps_the_spend_of_budgets_whose_period_is_unchanged() {
    let emu = Emulator::start().await;
    let dir = scratch_dir();
    let budgets = |resized: &str, period: &str| {
        [
            budget("same", "team", "1", "month", ""),
            budget("resized", "team", resized, "month", "warn_at = [0.5]"),
            budget("reperiod", "team", "1", period, ""),
        ]
        .concat()
    };
    let mut gw = Gateway::start(&emu.url(), &config(Some(&dir), &budgets("1", "month"))).await;
    let cost = spend(&gw, &emu, "before", 2).await;
    for name in ["same", "resized", "reperiod"] {
        assert_eq!(spent(&gw, name, "search").await, shown(cost), "{name}");
    }
    std::fs::write(&gw.config_path, config(Some(&dir), &budgets("2.5", "day"))).unwrap();
    gw.signal("HUP");
    gw.wait_metric("ezgate_config_reloads_total{result=\"applied\"}", |v| {
        v == 1.0
    })
    .await;
    assert_eq!(spent(&gw, "same", "search").await, shown(cost));
    let v = view(&gw, "resized").await;
    assert_eq!(
        (&v["amount"], &v["top"][0]["spent"]),
        (&Value::from(2.5), &Value::from(shown(cost))),
        "{v}"
    );
    let metrics = gw.settled_metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "ezgate_budget_limit{budget=\"resized\",key=\"search\"}"
        ),
        2.5
    );
    let v = view(&gw, "reperiod").await;
    assert_eq!(
        (&v["period"], &v["accounts"]),
        (&Value::from("day"), &Value::from(0)),
        "{v}"
    );
    // Spend goes on adding up where it was kept.
    let more = spend(&gw, &emu, "after", 1).await;
    assert_eq!(spent(&gw, "same", "search").await, shown(cost + more));
    assert_eq!(spent(&gw, "reperiod", "search").await, shown(more));
    // And a restart reads what the reloaded budgets wrote.
    gw.signal("TERM");
    assert_eq!(gw.exit_code().await, Some(0));
    let gw = Gateway::start(&emu.url(), &config(Some(&dir), &budgets("2.5", "day"))).await;
    assert_eq!(spent(&gw, "resized", "search").await, shown(cost + more));
    assert_eq!(spent(&gw, "reperiod", "search").await, shown(more));
}

#[tokio::test]
async fn a_budget_whose_key_changed_restores_nothing_of_the_old_keys() {
    let emu = Emulator::start().await;
    let dir = scratch_dir();
    let keyed = |key: &str| config(Some(&dir), &budget("spend", key, "10", "month", ""));
    let mut gw = Gateway::start(&emu.url(), &keyed("team")).await;
    let cost = spend(&gw, &emu, "by-team", 2).await;
    assert_eq!(spent(&gw, "spend", "search").await, shown(cost));
    let start = std::time::Instant::now();
    while saved(&dir, "spend", "search") != Some(cost) {
        assert!(start.elapsed() < DEADLINE, "budgets.json never held {cost}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Reloaded as a per-client budget: the teams' spend says nothing of any client's.
    std::fs::write(&gw.config_path, keyed("client")).unwrap();
    gw.signal("HUP");
    gw.wait_metric("ezgate_config_reloads_total{result=\"applied\"}", |v| {
        v == 1.0
    })
    .await;
    let v = view(&gw, "spend").await;
    assert_eq!(
        (&v["key"], &v["accounts"]),
        (&Value::from("client"), &Value::from(0)),
        "{v}"
    );
    let more = spend(&gw, &emu, "by-client", 1).await;
    assert_eq!(spent(&gw, "spend", "search-app").await, shown(more));
    gw.signal("TERM");
    assert_eq!(gw.exit_code().await, Some(0));
    // Restarted as a global budget: the clients' spend is not restored either.
    let gw = Gateway::start(&emu.url(), &keyed("global")).await;
    let v = view(&gw, "spend").await;
    assert_eq!(
        (&v["key"], &v["accounts"]),
        (&Value::from("global"), &Value::from(0)),
        "{v}"
    );
}

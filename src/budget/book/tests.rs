use super::*;

const DOLLAR: u64 = 1_000_000_000;

impl Budgets {
    /// The local path never awaits: admitted on a runtime of the moment.
    fn admit_now(
        &self,
        ask: &Ask<'_>,
        max_cost: u64,
        now: Timestamp,
    ) -> Result<Option<Hold>, Refused> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(self.admit(ask, max_cost, now))
    }
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn budget(text: &str) -> BudgetConfig {
    toml_edit::de::from_str(text).unwrap()
}

fn ask<'a>(team: Option<&'a Arc<str>>, model: &'a str, headers: &'a HeaderMap) -> Ask<'a> {
    Ask {
        route: Route::ChatCompletions,
        spends: true,
        model: Some(model),
        team,
        client: None,
        clients_configured: true,
        fingerprint: None,
        headers,
    }
}

#[test]
fn every_covering_budget_must_admit_and_a_refusal_gives_the_others_back() {
    let now = ts("2026-12-07T10:00:00Z");
    let configs = [
        budget("name = \"team\"\nkey = \"team\"\namount = 10.0\nperiod = \"month\""),
        budget("name = \"all\"\nkey = \"global\"\namount = 4.0\nperiod = \"day\"\nmatch = { models = [\"gpt-4o*\"] }"),
    ];
    let b = Budgets::new(&configs, None, None, None, now).unwrap();
    let h = HeaderMap::new();
    let search: Arc<str> = Arc::from("search");
    let hold = b
        .admit_now(&ask(Some(&search), "gpt-4o", &h), 3 * DOLLAR, now)
        .unwrap()
        .unwrap();
    assert_eq!(hold.budgets().count(), 2);
    // The global budget has 1 left: refused, and the team's reservation is given back.
    let refused = b
        .admit_now(&ask(Some(&search), "gpt-4o", &h), 2 * DOLLAR, now)
        .err()
        .unwrap();
    assert_eq!(&*refused.budget, "all");
    // Another model is not covered by the global budget.
    let other = b
        .admit_now(&ask(Some(&search), "o1", &h), 7 * DOLLAR, now)
        .unwrap()
        .unwrap();
    assert_eq!(other.budgets().collect::<Vec<_>>(), [&Arc::from("team")]);
    assert!(hold.settle(DOLLAR, now).is_empty());
    drop(other.settle(0, now));
    let views = b.views(5, now);
    assert_eq!(views[0].top[0].1.spent, DOLLAR);
    assert_eq!(views[0].top[0].1.reserved, 0);
    assert_eq!(views[1].top[0].1.spent, DOLLAR);
    // No team: a team budget does not cover the caller.
    let none = b.admit_now(&ask(None, "o1", &h), DOLLAR, now).unwrap();
    assert!(none.is_none());
}

#[test]
fn shadow_counts_what_it_would_refuse_and_a_reload_keeps_the_spend() {
    let now = ts("2026-12-07T10:00:00Z");
    let shadow = budget(
        "name = \"s\"\nkey = \"header:x-user\"\namount = 1.0\nperiod = \"week\"\nmode = \"shadow\"",
    );
    let b = Budgets::new(std::slice::from_ref(&shadow), None, None, None, now).unwrap();
    let mut h = HeaderMap::new();
    h.insert("x-user", "alice@example.com".parse().unwrap());
    for _ in 0..3 {
        let hold = b
            .admit_now(&ask(None, "m", &h), DOLLAR / 2, now)
            .unwrap()
            .unwrap();
        drop(hold.settle(DOLLAR / 2, now));
    }
    let v = &b.views(5, now)[0];
    assert_eq!(v.would_refuse, 1);
    assert_eq!(v.top[0].1.spent, 3 * DOLLAR / 2);
    // The header's value is kept only as a fingerprint.
    assert!(v.top[0].0.starts_with("fp:"), "{}", v.top[0].0);
    // A new amount keeps the accounts; a new period (day) starts from zero.
    let mut more = shadow.clone();
    more.amount = 5.0;
    let kept = Budgets::new(std::slice::from_ref(&more), Some(&b), None, None, now).unwrap();
    assert_eq!(kept.views(5, now)[0].top[0].1.spent, 3 * DOLLAR / 2);
    assert_eq!(kept.views(5, now)[0].amount, 5 * DOLLAR);
    let mut daily = shadow;
    daily.period = Period::Day;
    let fresh = Budgets::new(&[daily], Some(&b), None, None, now).unwrap();
    assert!(fresh.views(5, now)[0].top.is_empty());
}

#[test]
fn local_spend_survives_in_the_state_file_and_a_corrupt_file_is_named() {
    let dir = std::env::temp_dir().join(format!("ezgate-book-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let now = ts("2026-12-07T10:00:00Z");
    let c = [budget(
        "name = \"g\"\nkey = \"global\"\namount = 10.0\nperiod = \"month\"",
    )];
    let b = Budgets::new(&c, None, Some(&dir), None, now).unwrap();
    let h = HeaderMap::new();
    let hold = b
        .admit_now(&ask(None, "m", &h), DOLLAR, now)
        .unwrap()
        .unwrap();
    drop(hold.settle(DOLLAR / 4, now));
    b.flush(false).unwrap();
    let again = Budgets::new(&c, None, Some(&dir), None, super::super::clock::now()).unwrap();
    let spent = again.views(1, now)[0].top.first().map(|t| t.1.spent);
    // The wall clock's month: restored when it is still December 2026 there.
    if super::super::clock::now() < ts("2027-01-01T00:00:00Z") {
        assert_eq!(spent, Some(DOLLAR / 4));
    }
    std::fs::write(dir.join("budgets.json"), b"{not json").unwrap();
    let e = Budgets::new(&c, None, Some(&dir), None, now).err().unwrap();
    assert!(e.contains("budgets.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A shared store whose Redis never answers (nothing listens on port 1).
fn unreachable_redis(extra: &str) -> Arc<RedisStore> {
    let cfg: crate::config::RedisConfig = toml_edit::de::from_str(&format!(
        "url = \"redis://127.0.0.1:1\"\ntimeout = \"50ms\"\n{extra}"
    ))
    .unwrap();
    let metrics = crate::limits::shared::StoreMetrics {
        up: prometheus::IntGauge::new("up", "test").unwrap(),
        check_duration: prometheus::Histogram::with_opts(prometheus::HistogramOpts::new(
            "d", "test",
        ))
        .unwrap(),
    };
    Arc::new(RedisStore::new(&cfg, Box::new(|_| {}), metrics).unwrap())
}

#[tokio::test]
async fn a_reload_keeps_a_fleet_budgets_mirror_while_it_and_its_redis_stay_the_same() {
    let now = ts("2026-12-07T10:00:00Z");
    let store = unreachable_redis("");
    let c = budget(
        "name = \"f\"\nkey = \"team\"\namount = 10.0\nperiod = \"month\"\nstore = \"redis\"",
    );
    let fleet = |b: &Budgets| Arc::clone(b.list[0].fleet.as_ref().unwrap());
    let b = Budgets::new(std::slice::from_ref(&c), None, None, Some(&store), now).unwrap();
    let mut more = c.clone();
    more.amount = 20.0;
    let kept = Budgets::new(&[more], Some(&b), None, Some(&store), now).unwrap();
    assert!(Arc::ptr_eq(&fleet(&b), &fleet(&kept)));
    assert!(kept.views(1, now)[0].mirror);
    let other = unreachable_redis("");
    let moved = Budgets::new(
        std::slice::from_ref(&c),
        Some(&kept),
        None,
        Some(&other),
        now,
    )
    .unwrap();
    assert!(!Arc::ptr_eq(&fleet(&kept), &fleet(&moved)));
    let mut daily = c.clone();
    daily.period = Period::Day;
    let fresh = Budgets::new(&[daily], Some(&kept), None, Some(&store), now).unwrap();
    assert!(!Arc::ptr_eq(&fleet(&kept), &fleet(&fresh)));
    let e = Budgets::new(&[c], None, None, None, now).err().unwrap();
    assert!(e.contains("needs a [redis] section"), "{e}");
}

#[tokio::test]
async fn without_redis_an_account_never_seen_follows_on_failure() {
    let now = ts("2026-12-07T10:00:00Z");
    let c = [budget(
        "name = \"f\"\nkey = \"global\"\namount = 10.0\nperiod = \"month\"\nstore = \"redis\"",
    )];
    let h = HeaderMap::new();
    // deny: refused, naming why.
    let deny = Budgets::new(
        &c,
        None,
        None,
        Some(&unreachable_redis("on_failure = \"deny\"")),
        now,
    )
    .unwrap();
    let e = deny
        .admit(&ask(None, "m", &h), DOLLAR, now)
        .await
        .err()
        .unwrap();
    assert!(matches!(e.refusal, Refusal::Unshared { .. }), "{e:?}");
    // local: the amount ÷ the fleet (two replicas): 5 of 10 here.
    let local = Budgets::new(
        &c,
        None,
        None,
        Some(&unreachable_redis("replicas = 2")),
        now,
    )
    .unwrap();
    let hold = local
        .admit(&ask(None, "m", &h), 3 * DOLLAR, now)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(hold.parts[0].2, Some(Place::Local)));
    let e = local
        .admit(&ask(None, "m", &h), 3 * DOLLAR, now)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(e.refusal, Refusal::Exceeded { left, .. } if left == 2 * DOLLAR),
        "{e:?}"
    );
    // What was charged counts against the share until Redis takes it.
    drop(hold.settle(DOLLAR, now));
    assert!(local
        .admit(&ask(None, "m", &h), 4 * DOLLAR, now)
        .await
        .unwrap()
        .is_some());
    assert!(local.admit(&ask(None, "m", &h), 1, now).await.is_err());
    assert_eq!(local.views(1, now)[0].top[0].1.spent, DOLLAR);
}

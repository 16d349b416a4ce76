//! The budgets of the running config: which of them cover a request, the admission that
//! reserves its maximum cost in each ([`Budgets::admit`]), the [`Hold`] that settles it, and
//! what `/status`, the metrics and the state file read.
//!
//! Every budget that covers a request must admit it; a refusal by one gives back what the
//! others reserved. A budget in `shadow` mode reserves whatever happens and counts what it
//! would have refused. A reload keeps the accounts of every budget whose name, key,
//! period, zone and store stay the same (its amount, warnings, mode and match may change).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use http::HeaderMap;
use jiff::Timestamp;
use wildmatch::WildMatch;

use super::ledger::{Account, Crossed, Ledger, Refusal, Reservation, Saved};
use super::shared::{Crossing, Fleet, Place};
use super::state;
use crate::clients::{fingerprint, sha256};
use crate::config::{nanos, zone, BudgetConfig, BudgetKey, BudgetMode, BudgetStore, Period};
use crate::limits::shared::RedisStore;
use crate::route::Route;

/// A request, as the budgets see it.
pub struct Ask<'a> {
    pub route: Route,
    /// A `POST` on a model route, or a realtime session: a request that spends.
    pub spends: bool,
    pub model: Option<&'a str>,
    pub team: Option<&'a Arc<str>>,
    /// A configured client's name; `None` for a caller that is not one.
    pub client: Option<&'a Arc<str>>,
    /// Whether `[[clients]]` are configured (an unidentified caller is then `other`).
    pub clients_configured: bool,
    /// The fingerprint of the presented key.
    pub fingerprint: Option<&'a Arc<str>>,
    pub headers: &'a HeaderMap,
}

/// One `[[budgets]]` entry, compiled.
pub struct Budget {
    pub name: Arc<str>,
    config: BudgetConfig,
    key: BudgetKey,
    pub mode: BudgetMode,
    models: Vec<WildMatch>,
    routes: Vec<Route>,
    /// The accounts (`store = "local"`); the amount and periods (every budget).
    ledger: Arc<Mutex<Ledger>>,
    /// `store = "redis"`: the accounts are in Redis, this gateway keeps a mirror.
    fleet: Option<Arc<Fleet>>,
    /// Spend settled since the state file was last written.
    dirty: Arc<AtomicBool>,
    /// Requests a `shadow` budget would have refused, this process.
    would_refuse: Arc<AtomicU64>,
}

/// Why a request was refused: the first budget that had not enough left.
#[derive(Debug)]
pub struct Refused {
    pub budget: Arc<str>,
    pub refusal: Refusal,
    pub max_cost: u64,
    pub amount: u64,
}

/// What an admitted request holds in each budget that covers it, until it is settled.
#[must_use = "a hold is settled with what the request cost"]
pub struct Hold {
    /// `Some`: held in a `store = "redis"` budget (in Redis, or in this gateway's share).
    parts: Vec<(Arc<Budget>, Reservation, Option<Place>)>,
}

/// A `warn_at` share crossed by a settlement: logged by whoever settles.
pub struct Warning {
    pub budget: Arc<str>,
    pub crossed: Crossed,
    pub amount: u64,
}

/// One budget as `/status` and the metrics show it.
pub struct BudgetView {
    pub name: Arc<str>,
    /// As configured: `team`, `client`, `api_key`, `header:<name>`, `global`.
    pub key: String,
    /// Whether its accounts are named in the metrics (team, client, global).
    pub named_keys: bool,
    pub mode: BudgetMode,
    pub store: BudgetStore,
    pub period: Period,
    pub amount: u64,
    pub period_start: Timestamp,
    pub period_end: Timestamp,
    pub accounts: usize,
    /// The accounts that spent most, most first.
    pub top: Vec<(Arc<str>, Account)>,
    pub warn_at: Vec<f64>,
    pub would_refuse: u64,
    /// `store = "redis"`: `accounts` and `top` are this gateway's mirror (the accounts it
    /// saw, with what Redis last said of them).
    pub mirror: bool,
}

/// The budgets of one config.
#[derive(Default)]
pub struct Budgets {
    list: Vec<Arc<Budget>>,
    /// `server.state_dir`/budgets.json, when local budgets are written down.
    state_file: Option<PathBuf>,
    words: Words,
}

/// The account names every request may use, made once.
struct Words {
    global: Arc<str>,
    none: Arc<str>,
    anonymous: Arc<str>,
    other: Arc<str>,
}

impl Default for Words {
    fn default() -> Words {
        Words {
            global: Arc::from("global"),
            none: Arc::from("none"),
            anonymous: Arc::from("anonymous"),
            other: Arc::from("other"),
        }
    }
}

impl Budget {
    fn covers(&self, ask: &Ask<'_>) -> bool {
        ask.spends
            && (ask.route.carries_tokens() || ask.route == Route::Realtime)
            && (self.routes.is_empty() || self.routes.contains(&ask.route))
            && (self.models.is_empty()
                || ask
                    .model
                    .is_some_and(|m| self.models.iter().any(|g| g.matches(m))))
    }

    /// Whether the budget's key applies to `ask` (what [`Budget::account`] says, without
    /// making the account's name).
    fn charges(&self, ask: &Ask<'_>) -> bool {
        !matches!(self.key, BudgetKey::Team) || ask.team.is_some()
    }

    /// The account `ask` is charged to; `None` when the budget's key does not apply (a team
    /// budget and a caller with no team).
    fn account(&self, ask: &Ask<'_>, words: &Words) -> Option<Arc<str>> {
        Some(match &self.key {
            BudgetKey::Team => Arc::clone(ask.team?),
            BudgetKey::Client => match ask.client {
                Some(name) => Arc::clone(name),
                None if ask.clients_configured => Arc::clone(&words.other),
                None => Arc::clone(&words.anonymous),
            },
            BudgetKey::ApiKey => ask
                .fingerprint
                .map_or_else(|| Arc::clone(&words.none), Arc::clone),
            // A header's value may be personal: only its fingerprint is kept and shown.
            BudgetKey::Header(name) => match ask.headers.get(name) {
                Some(v) => Arc::from(fingerprint(&sha256(v.as_bytes()))),
                None => Arc::clone(&words.none),
            },
            BudgetKey::Global => Arc::clone(&words.global),
        })
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A panic while the lock was held leaves whole numbers behind: go on with them.
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts and logs a request a `shadow` budget would have refused.
    fn would_refuse(&self, key: &str, max_cost: u64) {
        self.would_refuse.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            budget = %self.name,
            key = %key,
            max_cost = %crate::cost::Nanos(max_cost),
            "budget in shadow mode would have refused this request"
        );
    }

    /// Reserves in the local ledger (shadow: whatever happens).
    fn reserve_local(
        &self,
        key: &Arc<str>,
        max_cost: u64,
        now: Timestamp,
    ) -> Result<Reservation, (Refusal, u64)> {
        let mut ledger = self.ledger();
        match self.mode {
            BudgetMode::Enforce => ledger
                .reserve(key, max_cost, now)
                .map_err(|r| (r, ledger.amount())),
            BudgetMode::Shadow => {
                let (r, would) = ledger.force(key, max_cost, now);
                drop(ledger);
                if would.is_some() {
                    self.would_refuse(key, max_cost);
                }
                Ok(r)
            }
        }
    }

    /// Reserves in Redis, or in this gateway's share while Redis does not answer.
    async fn reserve_shared(
        &self,
        fleet: &Fleet,
        key: Arc<str>,
        max_cost: u64,
        now: Timestamp,
    ) -> Result<(Reservation, Place), (Refusal, u64)> {
        let (window, amount) = {
            let mut ledger = self.ledger();
            (ledger.window(now).clone(), ledger.amount())
        };
        let shadow = self.mode == BudgetMode::Shadow;
        match fleet.reserve(&key, &window, max_cost, shadow, now).await {
            Ok((place, would)) => {
                if would {
                    self.would_refuse(&key, max_cost);
                }
                let r = Reservation {
                    key,
                    window: window.id,
                    amount: max_cost,
                };
                Ok((r, place))
            }
            Err(refusal) => Err((refusal, amount)),
        }
    }

    /// Whether a reload may keep this budget's accounts for `c`.
    fn same_accounts(&self, c: &BudgetConfig) -> bool {
        let a = &self.config;
        a.name == c.name
            && a.key == c.key
            && a.period == c.period
            && a.timezone == c.timezone
            && a.store == c.store
    }
}

impl Budgets {
    /// The budgets of `configs`. After a reload, `previous` lends its accounts to the
    /// budgets that keep them; the others start from the state file in `state_dir` (local
    /// budgets), else from zero. An unreadable state file is an error naming it.
    pub fn new(
        configs: &[BudgetConfig],
        previous: Option<&Budgets>,
        state_dir: Option<&Path>,
        redis: Option<&Arc<RedisStore>>,
        now: Timestamp,
    ) -> Result<Budgets, String> {
        let state_file = state_dir.map(state::path);
        let mut saved: Option<state::State> = None;
        let mut list = Vec::with_capacity(configs.len());
        for c in configs {
            let key = BudgetKey::parse(&c.key)
                .ok_or_else(|| format!("budget \"{}\": key \"{}\" is not known", c.name, c.key))?;
            let kept_budget = previous.and_then(|p| p.list.iter().find(|b| b.same_accounts(c)));
            let kept = kept_budget.map(|b| {
                (
                    Arc::clone(&b.ledger),
                    Arc::clone(&b.dirty),
                    Arc::clone(&b.would_refuse),
                )
            });
            let fleet = match (c.store, redis) {
                (BudgetStore::Local, _) => None,
                (BudgetStore::Redis, None) => {
                    return Err(format!(
                        "budget \"{}\": store \"redis\" needs a [redis] section",
                        c.name
                    ))
                }
                // The mirror is kept while the budget and its Redis stay the same.
                (BudgetStore::Redis, Some(store)) => Some(
                    match kept_budget
                        .and_then(|b| b.fleet.as_ref())
                        .filter(|f| f.same_store(store))
                    {
                        Some(f) => {
                            f.configure(nanos(c.amount), c.warn_at.clone());
                            Arc::clone(f)
                        }
                        None => Fleet::new(
                            Arc::from(c.name.as_str()),
                            Arc::clone(store),
                            nanos(c.amount),
                            c.warn_at.clone(),
                            log_crossing,
                        ),
                    },
                ),
            };
            let (ledger, dirty, would_refuse) = match kept {
                Some((ledger, dirty, would_refuse)) => {
                    ledger
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .configure(nanos(c.amount), c.warn_at.clone());
                    (ledger, dirty, would_refuse)
                }
                None => {
                    let tz = zone(&c.timezone)?;
                    let mut ledger =
                        Ledger::new(nanos(c.amount), c.warn_at.clone(), c.period, tz, now)?;
                    if let (BudgetStore::Local, Some(file)) = (c.store, &state_file) {
                        if saved.is_none() {
                            saved = Some(state::load(file)?);
                        }
                        // The accounts of the same budget under another key (a team's
                        // spend, read as a client's) mean nothing: not restored.
                        if let Some(s) = saved
                            .as_ref()
                            .and_then(|s| s.budgets.get(&c.name))
                            .filter(|s| s.key.as_ref().is_none_or(|k| *k == c.key))
                        {
                            ledger.restore(s, now);
                        }
                    }
                    (
                        Arc::new(Mutex::new(ledger)),
                        Arc::new(AtomicBool::new(false)),
                        Arc::new(AtomicU64::new(0)),
                    )
                }
            };
            list.push(Arc::new(Budget {
                name: Arc::from(c.name.as_str()),
                config: c.clone(),
                key,
                mode: c.mode,
                models: c.matches.models.iter().map(|m| WildMatch::new(m)).collect(),
                routes: c
                    .matches
                    .routes
                    .iter()
                    .filter_map(|r| Route::from_template(r))
                    .collect(),
                ledger,
                fleet,
                dirty,
                would_refuse,
            }));
        }
        Ok(Budgets {
            list,
            state_file,
            words: Words::default(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Whether any budget may cover requests of `route` (their body is then read for the
    /// model and the prompt).
    pub fn may_cover(&self, route: Route) -> bool {
        !self.list.is_empty() && (route.carries_tokens() || route == Route::Realtime)
    }

    /// Whether any budget covers `ask` and charges it to an account: the first enforcing
    /// one (the budget a refusal for the request's price names), else the first in shadow
    /// mode, which never refuses.
    pub fn applies(&self, ask: &Ask<'_>) -> Option<(&Arc<str>, BudgetMode)> {
        let mut covering = self.list.iter().filter(|b| b.covers(ask) && b.charges(ask));
        let first = covering.next()?;
        let enforcing = std::iter::once(first)
            .chain(covering)
            .find(|b| b.mode == BudgetMode::Enforce);
        let b = enforcing.unwrap_or(first);
        Some((&b.name, b.mode))
    }

    /// Counts and logs, in every shadow budget that covers `ask`, a request it would have
    /// refused for `why` (its model has no price); the request goes on, held in none.
    pub fn shadow_refused(&self, ask: &Ask<'_>, why: &dyn std::fmt::Display) {
        for b in &self.list {
            if b.mode != BudgetMode::Shadow || !b.covers(ask) {
                continue;
            }
            let Some(key) = b.account(ask, &self.words) else {
                continue;
            };
            b.would_refuse.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                budget = %b.name,
                key = %key,
                reason = %why,
                "budget in shadow mode would have refused this request"
            );
        }
    }

    /// Reserves `max_cost` (nano-units) in every budget that covers `ask`, or refuses it
    /// with the first enforcing budget that has not enough left (what the others reserved
    /// is given back). `Ok(None)`: no budget covers it. Only a `store = "redis"` budget
    /// awaits (its round trip to Redis).
    pub async fn admit(
        &self,
        ask: &Ask<'_>,
        max_cost: u64,
        now: Timestamp,
    ) -> Result<Option<Hold>, Refused> {
        let mut parts = Vec::new();
        for b in &self.list {
            if !b.covers(ask) {
                continue;
            }
            let Some(key) = b.account(ask, &self.words) else {
                continue;
            };
            let reserved = match &b.fleet {
                None => b.reserve_local(&key, max_cost, now).map(|r| (r, None)),
                Some(fleet) => b
                    .reserve_shared(fleet, key, max_cost, now)
                    .await
                    .map(|(r, place)| (r, Some(place))),
            };
            match reserved {
                Ok((r, place)) => parts.push((Arc::clone(b), r, place)),
                Err((refusal, amount)) => {
                    let _ = Hold { parts }.settle(0, now);
                    return Err(Refused {
                        budget: Arc::clone(&b.name),
                        refusal,
                        max_cost,
                        amount,
                    });
                }
            }
        }
        Ok((!parts.is_empty()).then_some(Hold { parts }))
    }

    /// Writes the spend of the local budgets to the state file when any changed since the
    /// last write (`force`: whatever changed). Blocking (the file is flushed to disk).
    pub fn flush(&self, force: bool) -> Result<(), String> {
        let Some(file) = &self.state_file else {
            return Ok(());
        };
        let local = || {
            self.list
                .iter()
                .filter(|b| b.fleet.is_none() && b.config.store == BudgetStore::Local)
        };
        // Every flag is taken down (no short circuit): one write covers them all.
        let changed = local()
            .map(|b| b.dirty.swap(false, Ordering::AcqRel))
            .fold(false, |any, one| any | one);
        if !(changed || force) || local().next().is_none() {
            return Ok(());
        }
        let now = super::clock::now();
        let all: BTreeMap<String, Saved> = local()
            .map(|b| {
                let mut saved = b.ledger().save(now);
                saved.key = Some(b.config.key.clone());
                (b.name.to_string(), saved)
            })
            .collect();
        state::save(file, all).inspect_err(|_| {
            // Written again at the next flush.
            for b in local() {
                b.dirty.store(true, Ordering::Release);
            }
        })
    }

    /// Writes to Redis what the `store = "redis"` budgets charged and Redis has not taken
    /// (after the drain); logs what could not be.
    pub async fn push(&self) {
        for fleet in self.list.iter().filter_map(|b| b.fleet.as_ref()) {
            let left = fleet.push().await;
            if left > 0 {
                tracing::error!(
                    budget = %fleet.name(),
                    unwritten = %crate::cost::Nanos(left),
                    "Redis did not take this gateway's last charges before it stopped; the fleet's budget misses them"
                );
            }
        }
    }

    /// Every budget as `/status` and the metrics show it, with its `top` spenders.
    pub fn views(&self, top: usize, now: Timestamp) -> Vec<BudgetView> {
        self.list
            .iter()
            .map(|b| {
                let mut ledger = b.ledger();
                let window = ledger.window(now).clone();
                let (accounts, top) = match &b.fleet {
                    None => (ledger.len(now), ledger.top(top, now)),
                    Some(fleet) => {
                        let mut all = fleet.mirror(&window.id);
                        all.sort_by(|a, b| b.1.spent.cmp(&a.1.spent).then_with(|| a.0.cmp(&b.0)));
                        let n = all.len();
                        all.truncate(top);
                        (n, all)
                    }
                };
                BudgetView {
                    name: Arc::clone(&b.name),
                    key: b.config.key.clone(),
                    named_keys: matches!(
                        b.key,
                        BudgetKey::Team | BudgetKey::Client | BudgetKey::Global
                    ),
                    mode: b.mode,
                    store: b.config.store,
                    period: b.config.period,
                    amount: ledger.amount(),
                    period_start: window.start,
                    period_end: window.end,
                    accounts,
                    top,
                    warn_at: b.config.warn_at.clone(),
                    would_refuse: b.would_refuse.load(Ordering::Relaxed),
                    mirror: b.fleet.is_some(),
                }
            })
            .collect()
    }
}

impl Hold {
    /// Replaces every reservation by `actual` (nano-units): what the request cost, 0 when
    /// the upstream failed or answered an error. Returns the warnings it crossed.
    pub fn settle(self, actual: u64, now: Timestamp) -> Vec<Warning> {
        let mut warnings = Vec::new();
        for (b, r, place) in self.parts {
            if let (Some(fleet), Some(place)) = (&b.fleet, place) {
                // Written to Redis by a task, which logs the warnings it crosses.
                fleet.settle(&r.key, &r.window, place, r.amount, actual);
                continue;
            }
            let mut ledger = b.ledger();
            let crossed = ledger.settle(r, actual, now);
            let amount = ledger.amount();
            drop(ledger);
            if actual > 0 {
                b.dirty.store(true, Ordering::Release);
            }
            warnings.extend(crossed.into_iter().map(|crossed| Warning {
                budget: Arc::clone(&b.name),
                crossed,
                amount,
            }));
        }
        warnings
    }

    /// The most the request was let spend (the same in every budget it is held in).
    pub fn reserved(&self) -> u64 {
        self.parts
            .iter()
            .map(|(_, r, _)| r.amount)
            .max()
            .unwrap_or(0)
    }

    /// The budgets the request is held in.
    pub fn budgets(&self) -> impl Iterator<Item = &Arc<str>> {
        self.parts.iter().map(|(b, _, _)| &b.name)
    }
}

impl Warning {
    /// The log line of a crossed share.
    pub fn log(&self) {
        warn(
            &self.budget,
            &self.crossed.key,
            self.crossed.share,
            self.crossed.spent,
            self.amount,
        );
    }
}

/// The log line of a `warn_at` share crossed in a `store = "redis"` budget.
fn log_crossing(budget: &str, c: &Crossing) {
    warn(budget, &c.account, c.share, c.spent, c.amount);
}

fn warn(budget: &str, key: &str, share: f64, spent: u64, amount: u64) {
    tracing::warn!(
        budget = %budget,
        key = %key,
        share = share,
        spent = %crate::cost::Nanos(spent),
        amount = %crate::cost::Nanos(amount),
        "budget warning: spend crossed a warn_at share of the period's amount"
    );
}

#[cfg(test)]
mod tests;

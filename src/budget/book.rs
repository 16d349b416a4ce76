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
use super::state;
use crate::config::{nanos, zone, BudgetConfig, BudgetKey, BudgetMode, BudgetStore, Period};
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
    ledger: Arc<Mutex<Ledger>>,
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
    parts: Vec<(Arc<Budget>, Reservation)>,
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
                Some(v) => Arc::from(fingerprint(v.as_bytes())),
                None => Arc::clone(&words.none),
            },
            BudgetKey::Global => Arc::clone(&words.global),
        })
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A panic while the lock was held leaves whole numbers behind: go on with them.
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
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

/// `fp:` and the first 12 hex digits of the SHA-256 of `value`, as key fingerprints are
/// shown everywhere.
fn fingerprint(value: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, value);
    let mut s = String::with_capacity(15);
    s.push_str("fp:");
    for b in &digest.as_ref()[..6] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl Budgets {
    /// The budgets of `configs`. After a reload, `previous` lends its accounts to the
    /// budgets that keep them; the others start from the state file in `state_dir` (local
    /// budgets), else from zero. An unreadable state file is an error naming it.
    pub fn new(
        configs: &[BudgetConfig],
        previous: Option<&Budgets>,
        state_dir: Option<&Path>,
        now: Timestamp,
    ) -> Result<Budgets, String> {
        let state_file = state_dir.map(state::path);
        let mut saved: Option<state::State> = None;
        let mut list = Vec::with_capacity(configs.len());
        for c in configs {
            let key = BudgetKey::parse(&c.key)
                .ok_or_else(|| format!("budget \"{}\": key \"{}\" is not known", c.name, c.key))?;
            let kept = previous
                .and_then(|p| p.list.iter().find(|b| b.same_accounts(c)))
                .map(|b| {
                    (
                        Arc::clone(&b.ledger),
                        Arc::clone(&b.dirty),
                        Arc::clone(&b.would_refuse),
                    )
                });
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
        let mut covering = self
            .list
            .iter()
            .filter(|b| b.covers(ask) && b.account(ask, &self.words).is_some());
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
    /// is given back). `Ok(None)`: no budget covers it.
    pub fn admit(
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
            let mut ledger = b.ledger();
            let reserved = match b.mode {
                BudgetMode::Enforce => ledger.reserve(&key, max_cost, now),
                BudgetMode::Shadow => {
                    let (r, would) = ledger.force(&key, max_cost, now);
                    if would.is_some() {
                        b.would_refuse.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            budget = %b.name,
                            key = %key,
                            max_cost = %crate::cost::Nanos(max_cost),
                            "budget in shadow mode would have refused this request"
                        );
                    }
                    Ok(r)
                }
            };
            match reserved {
                Ok(r) => parts.push((Arc::clone(b), r)),
                Err(refusal) => {
                    let amount = ledger.amount();
                    drop(ledger);
                    Hold { parts }.settle(0, now);
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
                .filter(|b| b.config.store == BudgetStore::Local)
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

    /// Every budget as `/status` and the metrics show it, with its `top` spenders.
    pub fn views(&self, top: usize, now: Timestamp) -> Vec<BudgetView> {
        self.list
            .iter()
            .map(|b| {
                let mut ledger = b.ledger();
                let window = ledger.window(now).clone();
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
                    accounts: ledger.len(now),
                    top: ledger.top(top, now),
                    warn_at: b.config.warn_at.clone(),
                    would_refuse: b.would_refuse.load(Ordering::Relaxed),
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
        for (b, r) in self.parts {
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
        self.parts.iter().map(|(_, r)| r.amount).max().unwrap_or(0)
    }

    /// The budgets the request is held in.
    pub fn budgets(&self) -> impl Iterator<Item = &Arc<str>> {
        self.parts.iter().map(|(b, _)| &b.name)
    }
}

#[cfg(test)]
mod tests;

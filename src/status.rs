//! `GET /status`: the running gateway as JSON (docs/admin.md), built from the snapshots the
//! domain hands out (`Limits::snapshot`, `Limits::cooldowns`, the shared store's health) and
//! the gateway's last config load. Nothing here holds a domain lock longer than its copy,
//! and nothing runs on a request.
//!
//! A key is shown only as ezgate already names it: a configured client's name, a key
//! fingerprint (`fp:` + 12 hex digits), a configured or well-known model, `global`. Values a
//! caller sends (an IP address, a header's value, an unknown model) appear as the
//! fingerprint of the value, never as the value.
//!
//! A new section (the learned upstream quota, budgets) is one more field of [`Status`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::budget::Budgets;
use crate::clients::{fingerprint, sha256};
use crate::config::{BudgetMode, BudgetStore, ClientConfig, LimitKey, Mode, Period};
use crate::gateway::{Gateway, ReloadRecord};
use crate::limits::store::OVERFLOW_KEY;
use crate::limits::{Cooldown, KeyUse, PolicySnapshot};
use crate::metrics::{currency_value, BudgetSample, Metrics};
use crate::quota::{tightest, Learned, UnitView, ANY_MODEL};

/// How many of a policy's busiest keys `/status` shows.
pub const BUSIEST_KEYS: usize = 5;

#[derive(Serialize)]
pub struct Status {
    pub version: &'static str,
    pub draining: bool,
    pub config: ConfigStatus,
    pub limits: Vec<PolicyStatus>,
    pub upstream_cooldowns: Vec<CooldownStatus>,
    /// `null` without a `[redis]` section.
    pub store: Option<StoreStatus>,
    /// The upstream's quota learned from its headers, per key and model; `null` with
    /// `upstream.quota.mode = "off"`.
    pub upstream_quota: Option<Vec<QuotaStatus>>,
    /// `upstream.quota.mode = "enforce"`: what the pacing holds; `null` otherwise.
    pub upstream_quota_pacing: Option<PacingStatus>,
    /// What requests cost since ezgate started, per team and per client; `null` without
    /// `[prices]`.
    pub costs: Option<CostsStatus>,
    /// Every `[[budgets]]` entry this period; `null` without budgets.
    pub budgets: Option<BudgetsStatus>,
}

#[derive(Serialize)]
pub struct BudgetsStatus {
    /// `prices.currency`: what every amount here is in.
    pub currency: String,
    pub list: Vec<BudgetStatus>,
}

#[derive(Serialize)]
pub struct BudgetStatus {
    pub name: String,
    /// `team`, `client`, `api_key`, `header:<name>` or `global`.
    pub key: String,
    pub mode: &'static str,
    pub store: &'static str,
    pub period: &'static str,
    /// Each account's amount per period.
    pub amount: f64,
    /// RFC 3339, UTC.
    pub period_start: String,
    pub period_end: String,
    /// Accounts (teams, clients, key fingerprints…) with spend or a reservation this period.
    pub accounts: usize,
    /// The accounts that spent most, most first: names, or fingerprints of keys and header
    /// values, never the keys or values themselves.
    pub top: Vec<AccountStatus>,
    /// Requests a `shadow` budget would have refused since ezgate started.
    pub would_refuse: u64,
    /// `ledger`: the accounts as this gateway keeps them (`store = "local"`); `mirror`: the
    /// accounts this gateway saw, with what Redis last said of them (`store = "redis"`).
    pub view: &'static str,
}

#[derive(Serialize)]
pub struct AccountStatus {
    pub key: String,
    pub spent: f64,
    /// Held by requests in flight.
    pub reserved: f64,
    /// `spent` ÷ `amount`.
    pub used: f64,
    /// The highest `warn_at` share crossed, if any.
    pub warned: Option<f64>,
}

#[derive(Serialize)]
pub struct CostsStatus {
    /// `prices.currency`: what every amount here is in.
    pub currency: String,
    /// Per `clients[].team`, in the currency (exact sums of exact costs).
    pub teams: BTreeMap<String, f64>,
    /// Per client label: a configured client's name, `anonymous` or `other`.
    pub clients: BTreeMap<String, f64>,
}

#[derive(Serialize)]
pub struct PacingStatus {
    /// `local` or `redis`.
    pub store: &'static str,
    /// Keys and models with a picture.
    pub pictures: usize,
    /// Requests waiting for the quota, per priority.
    pub queued: QueuedStatus,
}

#[derive(Serialize)]
pub struct QueuedStatus {
    pub critical: usize,
    pub interactive: usize,
    pub batch: usize,
}

#[derive(Serialize)]
pub struct QuotaStatus {
    /// `org:` + a fingerprint of the organization's key (managed mode), a caller's key
    /// fingerprint (passthrough), or `anonymous`.
    pub key: String,
    /// A configured or well-known model, `*` (the request named none), else its fingerprint.
    pub model: String,
    pub requests: Option<QuotaUnitStatus>,
    pub tokens: Option<QuotaUnitStatus>,
}

#[derive(Serialize)]
pub struct QuotaUnitStatus {
    pub limit: u64,
    /// `null` once `expired`: the upstream refilled it by an amount not yet seen.
    pub remaining: Option<u64>,
    /// Until the upstream's reset; 0 once passed.
    pub reset_ms: u64,
    /// Since the response that told it.
    pub age_ms: u64,
    pub expired: bool,
}

#[derive(Serialize)]
pub struct ConfigStatus {
    /// The config file's path, or `(built-in defaults)`.
    pub source: String,
    /// As `ezgate_config_info{hash}`.
    pub hash: String,
    pub last_reload: ReloadRecord,
}

#[derive(Serialize)]
pub struct PolicyStatus {
    pub name: String,
    /// The configured key: `client`, `api_key`, `ip`, `header:<name>`, `model`, `global`.
    pub key: String,
    /// `local` or `redis`.
    pub store: &'static str,
    /// What the key counts below describe: `local`, or, for a Redis-shared policy, its
    /// `local_fallback` (the shared counts live in Redis and are not read here).
    pub view: &'static str,
    pub mode: &'static str,
    pub keys: usize,
    /// As `ezgate_ratelimit_utilization{policy}`.
    pub utilization: f64,
    pub busiest: Vec<KeyStatus>,
}

#[derive(Serialize)]
pub struct KeyStatus {
    /// A client name, a fingerprint, a model, `global`, `anonymous`, `none` or `overflow`.
    pub key: String,
    /// The largest used share of its parts, 0–1.
    pub used: f64,
    pub requests: Option<PartStatus>,
    pub tokens: Option<PartStatus>,
    pub in_flight: Option<u32>,
}

#[derive(Serialize)]
pub struct PartStatus {
    pub remaining: u64,
    /// Until the part is whole again.
    pub reset_ms: u64,
}

#[derive(Serialize)]
pub struct CooldownStatus {
    /// `org` (managed mode), a key fingerprint, or `anonymous`.
    pub credential: String,
    /// The model of the upstream 429 (`*` when the request named none).
    pub model: String,
    pub retry_after_ms: u64,
}

#[derive(Serialize)]
pub struct StoreStatus {
    /// `standalone`, `cluster` or `sentinel`.
    pub mode: String,
    pub up: bool,
    /// What the last outage began with (kept after Redis returns).
    pub last_error: Option<String>,
    /// Live gateways sharing the store, by the heartbeat (`null` before its first answer).
    pub fleet: Option<u32>,
}

/// How many of a budget's biggest spenders `/status` shows.
pub const TOP_SPENDERS: usize = 10;

fn budgets(b: &Budgets, currency: &str) -> BudgetsStatus {
    let now = crate::budget::clock::now();
    let list = b
        .views(TOP_SPENDERS, now)
        .into_iter()
        .map(|v| BudgetStatus {
            name: v.name.to_string(),
            key: v.key,
            mode: match v.mode {
                BudgetMode::Enforce => "enforce",
                BudgetMode::Shadow => "shadow",
            },
            store: match v.store {
                BudgetStore::Local => "local",
                BudgetStore::Redis => "redis",
            },
            period: match v.period {
                Period::Day => "day",
                Period::Week => "week",
                Period::Month => "month",
            },
            amount: currency_value(v.amount),
            period_start: v.period_start.to_string(),
            period_end: v.period_end.to_string(),
            accounts: v.accounts,
            top: v
                .top
                .iter()
                .map(|(key, a)| AccountStatus {
                    key: key.to_string(),
                    spent: currency_value(a.spent),
                    reserved: currency_value(a.reserved),
                    used: if v.amount == 0 {
                        0.0
                    } else {
                        a.spent as f64 / v.amount as f64
                    },
                    warned: usize::from(a.warned)
                        .checked_sub(1)
                        .and_then(|i| v.warn_at.get(i).copied()),
                })
                .collect(),
            would_refuse: v.would_refuse,
            view: if v.mirror { "mirror" } else { "ledger" },
        })
        .collect();
    BudgetsStatus {
        currency: currency.to_owned(),
        list,
    }
}

/// The series of `ezgate_budget_spent` and `ezgate_budget_limit`: every account of a budget
/// keyed by team, client or `global` (names the config bounds), and the busiest account of
/// one keyed by API key or header, without a key.
pub fn budget_samples(b: &Budgets, clients: &[ClientConfig]) -> Vec<BudgetSample> {
    let now = crate::budget::clock::now();
    let mut out = Vec::new();
    for v in b.views(usize::MAX, now) {
        if v.named_keys {
            // Every configured team or client has a series from the start of each period,
            // at 0 until it spends: graphs and alerts see no gap at a rollover.
            let mut spent: BTreeMap<Arc<str>, u64> = match v.key.as_str() {
                "team" => clients
                    .iter()
                    .filter_map(|c| c.team.as_deref())
                    .map(|t| (Arc::from(t), 0))
                    .collect(),
                "client" => clients
                    .iter()
                    .map(|c| (Arc::from(c.name.as_str()), 0))
                    .collect(),
                _ => BTreeMap::from([(Arc::from("global"), 0)]),
            };
            spent.extend(v.top.iter().map(|(key, a)| (Arc::clone(key), a.spent)));
            out.extend(spent.into_iter().map(|(key, spent)| BudgetSample {
                budget: Arc::clone(&v.name),
                key,
                spent,
                limit: v.amount,
            }));
        } else {
            out.push(BudgetSample {
                budget: Arc::clone(&v.name),
                key: Arc::from(""),
                spent: v.top.first().map_or(0, |(_, a)| a.spent),
                limit: v.amount,
            });
        }
    }
    out
}

/// The running gateway, now.
pub fn status(gw: &Gateway) -> Status {
    let state = gw.state();
    let limits = state
        .limits
        .snapshot(BUSIEST_KEYS)
        .into_iter()
        .zip(&state.settings.config.limits)
        .map(|(p, cfg)| policy(&p, &cfg.key, &gw.metrics))
        .collect();
    let upstream_cooldowns = state.limits.cooldowns().iter().map(cooldown).collect();
    let store = state
        .store_health()
        .map(|(mode, up, last_error)| StoreStatus {
            mode: mode.to_string(),
            up,
            last_error,
            fleet: state.fleet(),
        });
    Status {
        version: env!("CARGO_PKG_VERSION"),
        draining: gw.is_draining(),
        config: ConfigStatus {
            source: state.settings.source.clone(),
            hash: state.config_hash.to_string(),
            last_reload: gw.last_reload(),
        },
        limits,
        upstream_cooldowns,
        store,
        upstream_quota: state.quota.as_ref().map(|q| quota(q, &gw.metrics)),
        upstream_quota_pacing: state.pacer.as_ref().map(|p| {
            let (pictures, [critical, interactive, batch]) = p.counts();
            PacingStatus {
                store: match state.settings.config.upstream.quota.store {
                    crate::config::QuotaStore::Local => "local",
                    crate::config::QuotaStore::Redis => "redis",
                },
                pictures,
                queued: QueuedStatus {
                    critical,
                    interactive,
                    batch,
                },
            }
        }),
        costs: state.prices.as_ref().map(|p| {
            let totals = gw.metrics.cost.totals();
            let shown = |list: Vec<(String, u64)>| {
                list.into_iter()
                    .map(|(name, nanos)| (name, currency_value(nanos)))
                    .collect()
            };
            CostsStatus {
                currency: p.currency().to_owned(),
                teams: shown(totals.teams),
                clients: shown(totals.clients),
            }
        }),
        budgets: match &state.prices {
            Some(p) if !state.budgets.is_empty() => Some(budgets(&state.budgets, p.currency())),
            _ => None,
        },
    }
}

fn quota(learned: &Learned, metrics: &Metrics) -> Vec<QuotaStatus> {
    let unit = |u: Option<UnitView>| {
        u.map(|u| QuotaUnitStatus {
            limit: u.limit,
            remaining: u.remaining,
            reset_ms: ms(u.reset_in),
            age_ms: ms(u.age),
            expired: u.expired,
        })
    };
    learned
        .snapshot(Instant::now())
        .into_iter()
        .map(|e| QuotaStatus {
            key: e.key.to_string(),
            model: shown_model(&e.model, metrics),
            requests: unit(e.requests),
            tokens: unit(e.tokens),
        })
        .collect()
}

/// A learned model as `/status` may show it: named when ezgate names it in its metrics.
fn shown_model(model: &str, metrics: &Metrics) -> String {
    if model == ANY_MODEL || metrics.model_label(Some(model)) == model {
        model.to_owned()
    } else {
        fingerprint(&sha256(model.as_bytes()))
    }
}

/// Sets `ezgate_upstream_quota_limit` / `_remaining` from the learned table: per model label
/// (a configured or well-known model, else `other`) and unit, the key and model with the
/// least remaining share.
pub fn quota_metrics(learned: &Learned, metrics: &Metrics) {
    let mut entries = learned.snapshot(Instant::now());
    for e in &mut entries {
        let label = metrics.model_label((&*e.model != ANY_MODEL).then_some(&*e.model));
        if *label != *e.model {
            e.model = Arc::from(label);
        }
    }
    let rows = tightest(&entries);
    metrics.status.upstream_quota(
        rows.iter()
            .map(|(model, unit, limit, remaining)| (&**model, *unit, *limit, *remaining)),
    );
}

fn policy(p: &PolicySnapshot, key: &str, metrics: &Metrics) -> PolicyStatus {
    PolicyStatus {
        name: p.name.to_string(),
        key: key.to_owned(),
        store: if p.shared { "redis" } else { "local" },
        view: if p.shared { "local_fallback" } else { "local" },
        mode: match p.mode {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        },
        keys: p.keys,
        utilization: p.utilization,
        busiest: p
            .busiest
            .iter()
            .map(|k| key_status(k, &p.key, metrics))
            .collect(),
    }
}

fn key_status(k: &KeyUse, kind: &LimitKey, metrics: &Metrics) -> KeyStatus {
    let part = |p: Option<(u64, Duration)>| {
        p.map(|(remaining, reset)| PartStatus {
            remaining,
            reset_ms: ms(reset),
        })
    };
    KeyStatus {
        key: shown_key(kind, &k.key, metrics),
        used: k.used,
        requests: part(k.requests),
        tokens: part(k.tokens),
        in_flight: k.in_flight,
    }
}

/// A policy key as `/status` may show it (see the module's doc).
pub fn shown_key(kind: &LimitKey, key: &str, metrics: &Metrics) -> String {
    if key == OVERFLOW_KEY {
        return "overflow".to_owned();
    }
    let hidden = || fingerprint(&sha256(key.as_bytes()));
    match kind {
        // A configured client's name, or the fingerprint ezgate computed for the key.
        LimitKey::Client | LimitKey::ApiKey => key.to_owned(),
        LimitKey::Global => "global".to_owned(),
        LimitKey::Model if key == "none" || metrics.model_label(Some(key)) == key => key.to_owned(),
        LimitKey::Header(_) if key == "none" => key.to_owned(),
        LimitKey::Model | LimitKey::Header(_) | LimitKey::Ip => hidden(),
    }
}

fn cooldown(c: &Cooldown) -> CooldownStatus {
    CooldownStatus {
        credential: c.credential.clone(),
        model: c.model.clone(),
        retry_after_ms: ms(c.remaining),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_a_caller_sent_are_shown_as_fingerprints() {
        let metrics = Metrics::new(["team-model".to_owned()]).unwrap_or_else(|e| panic!("{e}"));
        let header = LimitKey::Header(http::HeaderName::from_static("x-team"));
        let fp = |s: &str| fingerprint(&sha256(s.as_bytes()));
        for (kind, key, shown) in [
            (LimitKey::Client, "search-team", "search-team".to_owned()),
            (
                LimitKey::ApiKey,
                "fp:0123456789ab",
                "fp:0123456789ab".to_owned(),
            ),
            (LimitKey::Ip, "10.1.2.3", fp("10.1.2.3")),
            (header.clone(), "secret-team-value", fp("secret-team-value")),
            (header, "none", "none".to_owned()),
            (LimitKey::Model, "gpt-4o", "gpt-4o".to_owned()),
            (LimitKey::Model, "team-model", "team-model".to_owned()),
            (
                LimitKey::Model,
                "my-private-finetune",
                fp("my-private-finetune"),
            ),
            (LimitKey::Global, "", "global".to_owned()),
            (LimitKey::Ip, OVERFLOW_KEY, "overflow".to_owned()),
        ] {
            assert_eq!(shown_key(&kind, key, &metrics), shown, "{kind:?} {key}");
        }
        assert!(fp("10.1.2.3").starts_with("fp:") && !fp("10.1.2.3").contains("10.1"));
    }
}

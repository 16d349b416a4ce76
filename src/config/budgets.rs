//! `[[budgets]]` (docs/budgets.md): spend caps in money per team, client, API key, header or
//! globally, per calendar period in an IANA zone. Read and checked here; what a budget does
//! is `crate::budget`.

use serde::Deserialize;

/// An amount of the currency in whole nano-units (billionths), as costs are priced.
pub type Amount = u64;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Unique; in metrics, logs and refusals.
    pub name: String,
    /// `team`, `client`, `api_key`, `header:<name>` or `global`.
    pub key: String,
    /// In `prices.currency`, per period.
    pub amount: f64,
    pub period: Period,
    #[serde(default = "utc")]
    pub timezone: String,
    /// Shares of `amount` whose crossing is logged and shown.
    #[serde(default)]
    pub warn_at: Vec<f64>,
    #[serde(default)]
    pub mode: BudgetMode,
    #[serde(default)]
    pub store: BudgetStore,
    /// Only for some models or routes (globs), as for `[[limits]]`.
    #[serde(default, rename = "match")]
    pub matches: BudgetMatch,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// A budget's calendar period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Week,
    Month,
}

/// The IANA zone `name`, from the system's database or the copy built into ezgate.
pub fn zone(name: &str) -> Result<jiff::tz::TimeZone, String> {
    jiff::tz::TimeZone::get(name).map_err(|e| {
        format!("\"{name}\" is not an IANA time zone ({e}); write e.g. \"UTC\" or \"Europe/Paris\"")
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetMode {
    #[default]
    Enforce,
    /// Never refuses; shows what it would have refused.
    Shadow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetStore {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetMatch {
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub routes: Vec<String>,
}

/// What a budget is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetKey {
    Team,
    Client,
    ApiKey,
    /// A request header (lowercase).
    Header(String),
    Global,
}

impl BudgetKey {
    pub fn parse(s: &str) -> Option<BudgetKey> {
        match s {
            "team" => Some(BudgetKey::Team),
            "client" => Some(BudgetKey::Client),
            "api_key" => Some(BudgetKey::ApiKey),
            "global" => Some(BudgetKey::Global),
            _ => {
                let name = s.strip_prefix("header:")?;
                http::HeaderName::from_bytes(name.as_bytes())
                    .ok()
                    .map(|h| BudgetKey::Header(h.as_str().to_owned()))
            }
        }
    }
}

/// The routes whose requests a budget can cover: their responses report token usage.
pub const PRICED_ROUTES: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/realtime",
];

/// The largest amount accepted: a billion currency units, far beyond any budget, and inside
/// what nano-units in a `u64` hold (1.8e10 units).
const MAX_AMOUNT: f64 = 1e9;

/// `amount` in nano-units, rounded to the nearest.
pub fn nanos(amount: f64) -> Amount {
    (amount * 1e9).round() as Amount
}

/// Checks every budget; `has_prices`: a `[prices]` table exists; `has_redis`: a `[redis]`
/// section exists; `has_state_dir`: `server.state_dir` is set. Problems refuse the config;
/// notes only warn.
pub fn validate(
    budgets: &[BudgetConfig],
    has_prices: bool,
    has_redis: bool,
    has_state_dir: bool,
    problems: &mut Vec<String>,
    notes: &mut Vec<String>,
) {
    if !budgets.is_empty() && !has_prices {
        problems.push(
            "budgets: a budget counts money, and there is no [prices] table to price requests with; add [prices] (docs/budgets.md)"
                .to_owned(),
        );
    }
    let mut names = std::collections::HashSet::new();
    for (i, b) in budgets.iter().enumerate() {
        let at = if b.name.is_empty() {
            format!("budgets[{i}]")
        } else {
            format!("budgets[{i}] (\"{}\")", b.name)
        };
        if b.name.is_empty() {
            problems.push(format!(
                "{at}: name is empty; give each budget a unique name"
            ));
        } else if !names.insert(b.name.as_str()) {
            problems.push(format!(
                "{at}: name is used by another budget; names must be unique"
            ));
        }
        if BudgetKey::parse(&b.key).is_none() {
            problems.push(format!(
                "{at}: key \"{}\" is not one of team, client, api_key, header:<name>, global",
                b.key
            ));
        }
        if !(b.amount.is_finite() && b.amount > 0.0 && b.amount <= MAX_AMOUNT) {
            problems.push(format!(
                "{at}: amount {} must be a positive amount of the currency (at most {MAX_AMOUNT:e})",
                b.amount
            ));
        }
        if let Err(e) = zone(&b.timezone) {
            problems.push(format!("{at}: timezone: {e}"));
        }
        let mut last = 0.0;
        for w in &b.warn_at {
            if !(w.is_finite() && *w > 0.0 && *w <= 1.0) || *w <= last {
                problems.push(format!(
                    "{at}: warn_at must be shares above 0 and at most 1, ascending, each once (e.g. [0.8, 0.95]); got {:?}",
                    b.warn_at
                ));
                break;
            }
            last = *w;
        }
        for (j, r) in b.matches.routes.iter().enumerate() {
            let priced = crate::route::Route::from_template(r)
                .is_some_and(|r| r.carries_tokens() || r == crate::route::Route::Realtime);
            if !priced {
                problems.push(format!(
                    "{at}.match.routes[{j}]: \"{r}\" is not a route whose usage ezgate prices; use some of {}",
                    PRICED_ROUTES.join(", ")
                ));
            }
        }
        match b.store {
            BudgetStore::Redis if !has_redis => problems.push(format!(
                "{at}: store \"redis\" needs a [redis] section; add one or use store = \"local\""
            )),
            BudgetStore::Local if !has_state_dir => notes.push(format!(
                "{at}: without server.state_dir this local budget lives in memory: a restart starts it from zero"
            )),
            _ => {}
        }
    }
}

impl BudgetConfig {
    /// As `check-config` shows it, every default written out.
    pub fn display(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "\n[[budgets]]\nname = {:?}\nkey = {:?}\namount = {}",
            self.name,
            self.key,
            super::decimal(u128::from(nanos(self.amount)), 9)
        )?;
        let period = match self.period {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        };
        writeln!(f, "period = \"{period}\"\ntimezone = {:?}", self.timezone)?;
        writeln!(f, "warn_at = {:?}", self.warn_at)?;
        let mode = match self.mode {
            BudgetMode::Enforce => "enforce",
            BudgetMode::Shadow => "shadow",
        };
        let store = match self.store {
            BudgetStore::Local => "local",
            BudgetStore::Redis => "redis",
        };
        writeln!(f, "mode = \"{mode}\"\nstore = \"{store}\"")?;
        let m = &self.matches;
        if !(m.models.is_empty() && m.routes.is_empty()) {
            writeln!(
                f,
                "match = {{ models = {:?}, routes = {:?} }}",
                m.models, m.routes
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(toml_text: &str) -> BudgetConfig {
        toml_edit::de::from_str(toml_text).unwrap()
    }

    #[test]
    fn a_budget_as_the_contract_writes_it() {
        let b = budget(
            r#"
name = "team-monthly"
key = "team"
amount = 500.00
period = "month"
timezone = "Europe/Paris"
warn_at = [0.8, 0.95]
mode = "shadow"
store = "local"
match = { models = ["gpt-4o*"] }
"#,
        );
        assert_eq!(b.mode, BudgetMode::Shadow);
        assert_eq!(nanos(b.amount), 500_000_000_000);
        assert_eq!(b.matches.models, ["gpt-4o*"]);
        let (mut p, mut n) = (Vec::new(), Vec::new());
        validate(&[b], true, false, false, &mut p, &mut n);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(
            n.len(),
            1,
            "a local budget without state_dir is noted: {n:?}"
        );
    }

    #[test]
    fn every_mistake_is_named() {
        let b = budget(
            r#"
name = "b"
key = "header:x y"
amount = -1.0
period = "day"
timezone = "Mars/Olympus"
warn_at = [0.95, 0.8]
store = "redis"
"#,
        );
        let (mut p, mut n) = (Vec::new(), Vec::new());
        validate(&[b.clone(), b], true, false, true, &mut p, &mut n);
        let all = p.join("\n");
        for want in [
            "name is used by another budget",
            "key \"header:x y\"",
            "amount -1",
            "Mars/Olympus",
            "warn_at",
            "store \"redis\" needs a [redis]",
        ] {
            assert!(all.contains(want), "{want} in {all}");
        }
        for bad in ["mode = \"loud\"", "period = \"year\"", "colour = 1"] {
            let text =
                format!("name = \"x\"\nkey = \"global\"\namount = 1.0\nperiod = \"day\"\n{bad}\n")
                    .replace("period = \"day\"\nperiod", "period");
            assert!(
                toml_edit::de::from_str::<BudgetConfig>(&text).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn keys() {
        assert_eq!(BudgetKey::parse("team"), Some(BudgetKey::Team));
        assert_eq!(
            BudgetKey::parse("header:X-User"),
            Some(BudgetKey::Header("x-user".into()))
        );
        assert_eq!(BudgetKey::parse("header:"), None);
        assert_eq!(BudgetKey::parse("ip"), None);
    }
}

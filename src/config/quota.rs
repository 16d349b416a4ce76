//! `[upstream.quota]`: the upstream's own quota, learned from its `x-ratelimit-*` headers
//! (`observe`) and paced on (`enforce`), and `[[clients]] priority`
//! (docs/rate-limits.md "The upstream's quota").

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::units::Dur;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    pub mode: QuotaMode,
    /// Share of the learned limit never spent (pacing).
    pub headroom: Share,
    pub store: QuotaStore,
    pub reserve: Reserve,
    pub max_wait: MaxWait,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            mode: QuotaMode::Observe,
            headroom: Share(5.0),
            store: QuotaStore::Local,
            reserve: Reserve::default(),
            max_wait: MaxWait::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaMode {
    /// Nothing read, nothing kept.
    Off,
    /// Learn, export (`ezgate_upstream_quota_*`), show in `/status`.
    #[default]
    Observe,
    /// Also pace on what was learned: a request the quota cannot carry waits its turn.
    Enforce,
}

impl QuotaMode {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaMode::Off => "off",
            QuotaMode::Observe => "observe",
            QuotaMode::Enforce => "enforce",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaStore {
    #[default]
    Local,
    Redis,
}

/// A client's claim on a scarce upstream quota: waiting requests are admitted by priority,
/// and each priority keeps the `reserve` of the ones above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Critical,
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    /// Highest first.
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Interactive, Priority::Batch];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Interactive => "interactive",
            Priority::Batch => "batch",
        }
    }

    /// Position in [`Priority::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl QuotaConfig {
    /// The share of the learned limit a request of `p` leaves unspent: the headroom, plus
    /// the reserve of the priorities above it.
    pub fn floor(&self, p: Priority) -> f64 {
        let reserve = match p {
            Priority::Critical => 0.0,
            Priority::Interactive => self.reserve.critical.fraction(),
            Priority::Batch => self.reserve.interactive.fraction(),
        };
        (self.headroom.fraction() + reserve).min(1.0)
    }

    pub fn max_wait(&self, p: Priority) -> Duration {
        match p {
            Priority::Critical => self.max_wait.critical.0,
            Priority::Interactive => self.max_wait.interactive.0,
            Priority::Batch => self.max_wait.batch.0,
        }
    }
}

/// Traffic below a priority stops when less than its reserve remains.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reserve {
    pub critical: Share,
    pub interactive: Share,
}

impl Default for Reserve {
    fn default() -> Self {
        Reserve {
            critical: Share(10.0),
            interactive: Share(30.0),
        }
    }
}

/// The longest a request of each priority waits for the quota, then 429.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaxWait {
    pub critical: Dur,
    pub interactive: Dur,
    pub batch: Dur,
}

impl Default for MaxWait {
    fn default() -> Self {
        MaxWait {
            critical: Dur(Duration::from_secs(10)),
            interactive: Dur(Duration::from_secs(2)),
            batch: Dur(Duration::from_secs(300)),
        }
    }
}

/// The longest `max_wait` accepted: a request held longer is a client timing out.
const MAX_WAIT_CEILING: Duration = Duration::from_secs(3600);

/// A share written as a percentage, `"5%"`, `"12.5%"`, from 0 to 100; holds the
/// percentage as written (so it prints back exactly).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Deserialize)]
#[serde(try_from = "String")]
pub struct Share(pub f64);

impl Share {
    /// The share as a fraction of one.
    pub fn fraction(self) -> f64 {
        self.0 / 100.0
    }
}

impl TryFrom<String> for Share {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad =
            || format!("\"{s}\" is not a share; write a percentage from 0% to 100%, e.g. \"5%\"");
        let num = s.trim().strip_suffix('%').ok_or_else(bad)?.trim_end();
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(bad());
        }
        let v: f64 = num.parse().map_err(|_| bad())?;
        if !(0.0..=100.0).contains(&v) {
            return Err(bad());
        }
        Ok(Share(v))
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

pub(super) fn validate(q: &QuotaConfig, has_redis: bool, problems: &mut Vec<String>) {
    if q.headroom.0 >= 100.0 {
        problems.push(
            "upstream.quota.headroom: must be below 100% (a headroom of the whole limit leaves nothing to spend)".to_owned(),
        );
    }
    if q.headroom.0 + q.reserve.interactive.0 >= 100.0 {
        problems.push(format!(
            "upstream.quota: headroom ({}) and reserve.interactive ({}) together leave batch traffic nothing; keep their sum below 100%",
            q.headroom, q.reserve.interactive
        ));
    }
    if q.reserve.critical.0 > q.reserve.interactive.0 {
        problems.push(format!(
            "upstream.quota.reserve: critical ({}) must not exceed interactive ({}): batch stops below the interactive reserve, interactive below the critical one",
            q.reserve.critical, q.reserve.interactive
        ));
    }
    for (name, d) in [
        ("critical", q.max_wait.critical),
        ("interactive", q.max_wait.interactive),
        ("batch", q.max_wait.batch),
    ] {
        if d.0 > MAX_WAIT_CEILING {
            problems.push(format!(
                "upstream.quota.max_wait.{name}: \"{d}\" is longer than 1h; clients time out long before"
            ));
        }
    }
    if q.store == QuotaStore::Redis && !has_redis {
        problems.push(
            "upstream.quota.store: \"redis\" needs a [redis] section; add one or use store = \"local\"".to_owned(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares() {
        assert_eq!(Share::try_from("5%".to_owned()), Ok(Share(5.0)));
        assert_eq!(Share::try_from("12.5%".to_owned()), Ok(Share(12.5)));
        assert_eq!(Share::try_from("0%".to_owned()), Ok(Share(0.0)));
        assert_eq!(Share::try_from("100%".to_owned()), Ok(Share(100.0)));
        for bad in ["5", "", "%", "-5%", "101%", "5 %x", "1e2%", "NaN%", "inf%"] {
            assert!(Share::try_from(bad.to_owned()).is_err(), "{bad:?}");
        }
        assert_eq!(Share(5.0).to_string(), "5%");
        assert_eq!(Share(30.0).to_string(), "30%");
        assert_eq!(Share(12.5).to_string(), "12.5%");
    }

    #[test]
    fn impossible_values_are_refused_by_name() {
        let mut q = QuotaConfig {
            mode: QuotaMode::Enforce,
            headroom: Share(100.0),
            store: QuotaStore::Redis,
            ..QuotaConfig::default()
        };
        q.reserve.critical = Share(50.0);
        q.max_wait.batch = Dur(Duration::from_secs(7200));
        let mut p = Vec::new();
        validate(&q, false, &mut p);
        let all = p.join("\n");
        for key in [
            "upstream.quota: headroom",
            "upstream.quota.headroom",
            "upstream.quota.reserve:",
            "upstream.quota.max_wait.batch",
            "upstream.quota.store",
        ] {
            assert!(all.contains(key), "{key} in {all}");
        }
        let mut p = Vec::new();
        validate(&QuotaConfig::default(), false, &mut p);
        assert!(p.is_empty(), "{p:?}");
        let enforce = QuotaConfig {
            mode: QuotaMode::Enforce,
            ..QuotaConfig::default()
        };
        validate(&enforce, false, &mut p);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn floors_keep_the_reserve_of_the_priorities_above() {
        let q = QuotaConfig::default();
        assert!((q.floor(Priority::Critical) - 0.05).abs() < 1e-9);
        assert!((q.floor(Priority::Interactive) - 0.15).abs() < 1e-9);
        assert!((q.floor(Priority::Batch) - 0.35).abs() < 1e-9);
        assert_eq!(q.max_wait(Priority::Interactive), Duration::from_secs(2));
    }
}

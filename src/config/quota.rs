//! `[upstream.quota]`: the upstream's own quota, learned from its `x-ratelimit-*` headers
//! (docs/rate-limits.md "The upstream's quota (learned)"). The whole surface is read and
//! checked; `mode` is what acts today (`off` or `observe`), `enforce` is refused until
//! pacing exists.

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
    /// Pace on what was learned (not built yet: refused by the checks).
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
    if q.mode == QuotaMode::Enforce {
        problems.push(
            "upstream.quota.mode: \"enforce\" (pacing on the learned quota) is not available in this release; use \"observe\" (learn and export) or \"off\"".to_owned(),
        );
    }
    if q.headroom.0 >= 100.0 {
        problems.push(
            "upstream.quota.headroom: must be below 100% (a headroom of the whole limit leaves nothing to spend)".to_owned(),
        );
    }
    if q.reserve.interactive.0 >= 100.0 {
        problems.push("upstream.quota.reserve.interactive: must be below 100%".to_owned());
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
    fn enforce_and_impossible_values_are_refused_by_name() {
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
            "upstream.quota.mode",
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
    }
}

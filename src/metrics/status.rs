//! The operator's gauges and counters (`GET /status` shows the same numbers): set when
//! `/metrics` is scraped and when a config is loaded, never on a request.

use prometheus::{GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts};

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

/// The gauges and counters of the running gateway as an operator sees it (`GET /status`
/// shows the same): set when `/metrics` is scraped and when a reload is applied or refused,
/// never on a request.
pub struct StatusMetrics {
    pub(super) utilization: GaugeVec,
    pub(super) cooldowns: IntGauge,
    pub(super) reloads: IntCounterVec,
    pub(super) config_info: IntGaugeVec,
    /// `ezgate_upstream_quota_limit` / `_remaining`: set when scraped from the learned table.
    pub(super) quota_limit: IntGaugeVec,
    pub(super) quota_remaining: IntGaugeVec,
}

/// One model label and unit of the learned upstream quota: (model, unit, limit, remaining;
/// `None` once its reset has passed).
pub type QuotaRow<'a> = (&'a str, &'a str, u64, Option<u64>);

impl StatusMetrics {
    pub(super) fn new() -> Result<StatusMetrics, prometheus::Error> {
        let reloads = IntCounterVec::new(
            opts(
                "ezgate_config_reloads_total",
                "Config reloads (SIGHUP), by result: applied, or refused (the previous config keeps serving).",
            ),
            &["result"],
        )?;
        for result in ["applied", "refused"] {
            reloads.with_label_values(&[result]);
        }
        Ok(StatusMetrics {
            utilization: GaugeVec::new(
                opts(
                    "ezgate_ratelimit_utilization",
                    "Share of its limit used by each policy's busiest key, 0-1 (local view; computed when scraped).",
                ),
                &["policy"],
            )?,
            cooldowns: IntGauge::new(
                "ezgate_upstream_cooldowns",
                "Upstream-429 cooldowns running: keys and models ezgate holds back until the upstream's Retry-After.",
            )?,
            reloads,
            quota_limit: IntGaugeVec::new(
                opts(
                    "ezgate_upstream_quota_limit",
                    "The upstream's quota limit learned from its x-ratelimit-limit-* headers, by model and unit (requests, tokens); of several keys, the one with the least remaining share.",
                ),
                &["model", "unit"],
            )?,
            quota_remaining: IntGaugeVec::new(
                opts(
                    "ezgate_upstream_quota_remaining",
                    "The upstream's remaining quota learned from its x-ratelimit-remaining-* headers, by model and unit; no series once its reset has passed (no longer known).",
                ),
                &["model", "unit"],
            )?,
            config_info: IntGaugeVec::new(
                opts(
                    "ezgate_config_info",
                    "Always 1; its hash label names the config that is serving (as GET /status shows it).",
                ),
                &["hash"],
            )?,
        })
    }

    /// Sets `ezgate_ratelimit_utilization` for exactly these policies (a reload's removed
    /// policies lose their series).
    pub fn utilization<'a>(&self, policies: impl Iterator<Item = (&'a str, f64)>) {
        self.utilization.reset();
        for (policy, used) in policies {
            self.utilization.with_label_values(&[policy]).set(used);
        }
    }

    pub fn cooldowns(&self, n: usize) {
        self.cooldowns.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts a reload (`applied` or `refused`).
    /// Replaces the learned-quota series with `rows` (one per model label and unit).
    pub fn upstream_quota<'a>(&self, rows: impl Iterator<Item = QuotaRow<'a>>) {
        self.quota_limit.reset();
        self.quota_remaining.reset();
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (model, unit, limit, remaining) in rows {
            self.quota_limit
                .with_label_values(&[model, unit])
                .set(gauge(limit));
            if let Some(r) = remaining {
                self.quota_remaining
                    .with_label_values(&[model, unit])
                    .set(gauge(r));
            }
        }
    }

    pub fn reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.reloads.with_label_values(&[result]).inc();
    }

    /// The one `ezgate_config_info` series: the serving config's hash.
    pub fn config(&self, hash: &str) {
        self.config_info.reset();
        self.config_info.with_label_values(&[hash]).set(1);
    }
}

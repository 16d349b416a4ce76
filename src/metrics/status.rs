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
}

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

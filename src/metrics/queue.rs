//! `ezgate_queued_requests` and `ezgate_queue_wait_seconds`: requests waiting for the
//! upstream's quota (`upstream.quota.mode = "enforce"`), by priority.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntGauge, IntGaugeVec, Opts};

use crate::config::Priority;

/// Waits from none (admitted at once) to the longest `max_wait` (an hour).
const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

pub struct QueueMetrics {
    pub(super) queued: IntGaugeVec,
    pub(super) wait: HistogramVec,
}

impl QueueMetrics {
    pub(super) fn new() -> Result<QueueMetrics, prometheus::Error> {
        let queued = IntGaugeVec::new(
            Opts::new(
                "ezgate_queued_requests",
                "Requests waiting for the upstream's quota (upstream.quota.mode = \"enforce\"), by priority.",
            ),
            &["priority"],
        )?;
        let wait = HistogramVec::new(
            HistogramOpts::new(
                "ezgate_queue_wait_seconds",
                "How long paced requests waited for the upstream's quota, by priority (0 when admitted at once; refusals and departures included).",
            )
            .buckets(QUEUE_WAIT_BUCKETS.to_vec()),
            &["priority"],
        )?;
        for p in Priority::ALL {
            queued.with_label_values(&[p.as_str()]);
            wait.with_label_values(&[p.as_str()]);
        }
        Ok(QueueMetrics { queued, wait })
    }

    /// The handles a pacer counts with (queued, waits), by [`Priority::ALL`] position.
    pub fn handles(&self) -> ([IntGauge; 3], [Histogram; 3]) {
        (
            Priority::ALL.map(|p| self.queued.with_label_values(&[p.as_str()])),
            Priority::ALL.map(|p| self.wait.with_label_values(&[p.as_str()])),
        )
    }
}

//! The shared store's and the fleet's series: they exist only while `[redis]` does.

use prometheus::{Histogram, IntGauge};

impl super::Metrics {
    /// `ezgate_fleet_gateways`: the live gateways the fleet heartbeat counted.
    pub fn fleet_gateways(&self, n: u32) {
        let no_labels: [&str; 0] = [];
        self.fleet_gateways
            .with_label_values(&no_labels)
            .set(i64::from(n));
    }

    /// The shared store's handles (`[redis]` is configured): `ezgate_ratelimit_store_up`
    /// and `ezgate_ratelimit_store_check_duration_seconds`, whose series start now.
    pub fn store_handles(&self) -> (IntGauge, Histogram) {
        let no_labels: [&str; 0] = [];
        (
            self.store_up.with_label_values(&no_labels),
            self.store_check_duration.with_label_values(&no_labels),
        )
    }

    /// `[redis]` is gone (a reload removed it): the store series go with it, and the handles
    /// the old store still holds write nowhere.
    pub fn store_removed(&self) {
        let no_labels: [&str; 0] = [];
        let _ = self.store_up.remove_label_values(&no_labels);
        let _ = self.store_check_duration.remove_label_values(&no_labels);
    }
}

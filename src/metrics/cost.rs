//! `ezgate_cost_total{client, model}`, in the currency of `[prices]`. The sums are kept
//! exactly, in whole nano-units (`cost.rs` in the domain says how a request's cost is
//! computed); a sum becomes a float only when it is scraped, read from its exact decimal.
//! The same ledger keeps the totals per client and per team (`clients[].team`) that the
//! admin view's `costs` shows. All since the process started.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, LabelPair, Metric, MetricFamily, MetricType};

use crate::config::decimal;

const NAME: &str = "ezgate_cost_total";
const HELP: &str = "What requests cost, from the usage the upstream reported, in prices.currency (exact sums, by client and model).";

#[derive(Default)]
struct Totals {
    /// By (client label, model label).
    series: BTreeMap<(Box<str>, Box<str>), u64>,
    clients: BTreeMap<Box<str>, u64>,
    teams: BTreeMap<Box<str>, u64>,
}

/// The cost ledger; clones share it (one is registered, one records).
#[derive(Clone)]
pub struct CostMetrics {
    desc: Desc,
    totals: Arc<Mutex<Totals>>,
}

/// Totals since start, in nano-units: per team and per client label, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CostTotals {
    pub teams: Vec<(String, u64)>,
    pub clients: Vec<(String, u64)>,
}

impl CostMetrics {
    pub fn new() -> Result<CostMetrics, prometheus::Error> {
        Ok(CostMetrics {
            desc: Desc::new(
                NAME.to_owned(),
                HELP.to_owned(),
                vec!["client".to_owned(), "model".to_owned()],
                std::collections::HashMap::new(),
            )?,
            totals: Arc::default(),
        })
    }

    /// Adds one request's cost (nano-units) to its client's, its model's and its team's sums.
    pub fn add(&self, client: &str, model: &str, team: Option<&str>, nanos: u64) {
        let mut t = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (Box::from(client), Box::from(model));
        let s = t.series.entry(key).or_insert(0);
        *s = s.saturating_add(nanos);
        let c = t.clients.entry(Box::from(client)).or_insert(0);
        *c = c.saturating_add(nanos);
        if let Some(team) = team {
            let m = t.teams.entry(Box::from(team)).or_insert(0);
            *m = m.saturating_add(nanos);
        }
    }

    pub fn totals(&self) -> CostTotals {
        let t = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        let list =
            |m: &BTreeMap<Box<str>, u64>| m.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        CostTotals {
            teams: list(&t.teams),
            clients: list(&t.clients),
        }
    }
}

/// A sum of nano-units as the float nearest its exact decimal.
pub fn currency_value(nanos: u64) -> f64 {
    decimal(u128::from(nanos), 9).parse().unwrap_or(f64::NAN)
}

impl Collector for CostMetrics {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let t = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        if t.series.is_empty() {
            return Vec::new();
        }
        let label = |name: &str, value: &str| {
            let mut l = LabelPair::default();
            l.set_name(name.to_owned());
            l.set_value(value.to_owned());
            l
        };
        let metrics = t
            .series
            .iter()
            .map(|((client, model), nanos)| {
                let mut m =
                    Metric::from_label(vec![label("client", client), label("model", model)]);
                let mut c = Counter::default();
                c.set_value(currency_value(*nanos));
                m.set_counter(c);
                m
            })
            .collect();
        let mut family = MetricFamily::default();
        family.set_name(NAME.to_owned());
        family.set_help(HELP.to_owned());
        family.set_field_type(MetricType::COUNTER);
        family.set_metric(metrics);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_are_exact_and_shown_in_the_currency() {
        let c = CostMetrics::new().unwrap();
        assert!(c.collect().is_empty());
        // 0.1 + 0.2 as floats is 0.30000000000000004; as nano-units it is 0.3.
        c.add("search", "gpt-4o", Some("core"), 100_000_000);
        c.add("search", "gpt-4o", Some("core"), 200_000_000);
        c.add("batch", "other", None, 7);
        let families = c.clone().collect();
        let values: Vec<(String, f64)> = families[0]
            .get_metric()
            .iter()
            .map(|m| {
                (
                    m.get_label()[0].value().to_owned(),
                    m.get_counter().get_value(),
                )
            })
            .collect();
        assert_eq!(
            values,
            [
                ("batch".to_owned(), 0.000_000_007),
                ("search".to_owned(), 0.3)
            ]
        );
        assert_eq!(
            c.totals(),
            CostTotals {
                teams: vec![("core".into(), 300_000_000)],
                clients: vec![("batch".into(), 7), ("search".into(), 300_000_000)],
            }
        );
    }
}

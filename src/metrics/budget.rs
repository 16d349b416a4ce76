//! `ezgate_budget_spent{budget, key}` and `ezgate_budget_limit{budget, key}`, in the
//! currency of `[prices]`, read from the budgets when scraped (so a scrape sees every
//! settled request, and a new period's zero, at once). The gateway sets where they are read
//! from ([`BudgetMetrics::read_from`]).
//!
//! `key` is a team's or a client's name, or `global`; a budget keyed by API key or header
//! has one series with an empty `key` (no label), showing its busiest account: the one an
//! alert on spent ÷ limit must watch.

use std::sync::{Arc, PoisonError, RwLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType};

use super::currency_value;

const SPENT: &str = "ezgate_budget_spent";
const SPENT_HELP: &str =
    "What a budget's account spent this period (settled requests), in prices.currency.";
const LIMIT: &str = "ezgate_budget_limit";
const LIMIT_HELP: &str = "A budget's amount per period, in prices.currency.";

/// One series of both gauges, in nano-units.
pub struct BudgetSample {
    pub budget: Arc<str>,
    /// Empty for the busiest account of an `api_key` or `header:` budget.
    pub key: Arc<str>,
    pub spent: u64,
    pub limit: u64,
}

type Source = Box<dyn Fn() -> Vec<BudgetSample> + Send + Sync>;

/// The two gauges; clones share where they read from.
#[derive(Clone)]
pub struct BudgetMetrics {
    descs: [Desc; 2],
    source: Arc<RwLock<Option<Source>>>,
}

impl BudgetMetrics {
    pub fn new() -> Result<BudgetMetrics, prometheus::Error> {
        let desc = |name: &str, help: &str| {
            Desc::new(
                name.to_owned(),
                help.to_owned(),
                vec!["budget".to_owned(), "key".to_owned()],
                std::collections::HashMap::new(),
            )
        };
        Ok(BudgetMetrics {
            descs: [desc(SPENT, SPENT_HELP)?, desc(LIMIT, LIMIT_HELP)?],
            source: Arc::default(),
        })
    }

    /// Where a scrape reads the budgets from.
    pub fn read_from(&self, source: Source) {
        *self.source.write().unwrap_or_else(PoisonError::into_inner) = Some(source);
    }
}

impl Collector for BudgetMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let samples = match &*self.source.read().unwrap_or_else(PoisonError::into_inner) {
            Some(read) => read(),
            None => return Vec::new(),
        };
        if samples.is_empty() {
            return Vec::new();
        }
        let label = |name: &str, value: &str| {
            let mut l = LabelPair::default();
            l.set_name(name.to_owned());
            l.set_value(value.to_owned());
            l
        };
        let family = |name: &str, help: &str, value: fn(&BudgetSample) -> u64| {
            let metrics = samples
                .iter()
                .map(|s| {
                    let mut m =
                        Metric::from_label(vec![label("budget", &s.budget), label("key", &s.key)]);
                    let mut g = Gauge::default();
                    g.set_value(currency_value(value(s)));
                    m.set_gauge(g);
                    m
                })
                .collect();
            let mut f = MetricFamily::default();
            f.set_name(name.to_owned());
            f.set_help(help.to_owned());
            f.set_field_type(MetricType::GAUGE);
            f.set_metric(metrics);
            f
        };
        vec![
            family(SPENT, SPENT_HELP, |s| s.spent),
            family(LIMIT, LIMIT_HELP, |s| s.limit),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_when_scraped() {
        let m = BudgetMetrics::new().unwrap();
        assert!(m.collect().is_empty());
        m.read_from(Box::new(|| {
            vec![BudgetSample {
                budget: Arc::from("team-monthly"),
                key: Arc::from("search"),
                spent: 1_250_000_000,
                limit: 500_000_000_000,
            }]
        }));
        let f = m.collect();
        assert_eq!(f[0].name(), SPENT);
        assert_eq!(f[0].get_metric()[0].get_gauge().get_value(), 1.25);
        assert_eq!(f[1].get_metric()[0].get_gauge().get_value(), 500.0);
    }
}

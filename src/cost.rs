//! What a request cost, from the usage the upstream reported and the operator's `[prices]`.
//!
//! Money is integer arithmetic throughout: a price is whole micro-units of the currency
//! (10⁻⁶) per million tokens, so tokens × price is exact in pico-units (10⁻¹²); a request's
//! cost is that sum rounded once, half up, to whole nano-units (10⁻⁹), and totals are sums
//! of nano-units. No float is ever added to another; a cost becomes a decimal only where it
//! is shown (the metric, the access log, `/status`).
//!
//! A request's tokens are priced as: prompt tokens read from the upstream's cache at
//! `cached_input`; audio prompt tokens at `audio_input` (when the model has one, else as
//! text); the rest of the prompt at `input`; audio completion tokens at `audio_output` (when
//! set, else as text); the rest of the completion at `output`. Cached and audio tokens are
//! parts of the prompt and completion counts: they never count more than those.

use std::fmt;
use std::sync::Arc;

use wildmatch::WildMatch;

use crate::config::{decimal, PricesConfig, Rates};

/// Nano-units (10⁻⁹) per unit of the currency.
pub const NANOS_PER_UNIT: u64 = 1_000_000_000;

/// A request's tokens as the upstream reported them (cached and audio tokens are parts of
/// `prompt` and `completion`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub audio_in: u64,
    pub audio_out: u64,
}

/// An amount of the currency, in whole nano-units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Nanos(pub u64);

impl fmt::Display for Nanos {
    /// As a decimal of the currency without trailing zeros: `0.0025`, `12`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&decimal(u128::from(self.0), 9))
    }
}

/// A model neither `prices.models` nor `prices.default` prices. Not refused today: a budget
/// that applies to the request refuses it with this (`docs/budgets.md`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("model \"{model}\" has no price: no prices.models entry matches it and there is no prices.default; add one")]
pub struct Unpriced {
    pub model: String,
}

/// `[prices]`, compiled: globs and their rates.
#[derive(Debug)]
pub struct Prices {
    currency: Arc<str>,
    models: Vec<(WildMatch, Rates)>,
    default: Option<Rates>,
}

impl Prices {
    pub fn new(c: &PricesConfig) -> Prices {
        Prices {
            currency: Arc::from(c.currency.as_str()),
            models: c
                .models
                .iter()
                .map(|m| (WildMatch::new(&m.model), m.rates()))
                .collect(),
            default: c.default.as_ref().map(|d| d.rates()),
        }
    }

    /// The ISO 4217 code every cost is in.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// The rates of `model`: its entry (validation keeps them disjoint), else the default.
    pub fn rates(&self, model: &str) -> Result<Rates, Unpriced> {
        self.models
            .iter()
            .find(|(glob, _)| glob.matches(model))
            .map(|(_, r)| *r)
            .or(self.default)
            .ok_or_else(|| Unpriced {
                model: model.to_owned(),
            })
    }

    /// What `tokens` of `model` cost.
    pub fn cost(&self, model: &str, tokens: &Tokens) -> Result<Nanos, Unpriced> {
        self.rates(model).map(|r| cost(&r, tokens))
    }
}

/// What `t` costs at `r`, exactly (see the module's documentation).
pub fn cost(r: &Rates, t: &Tokens) -> Nanos {
    let cached = t.cached.min(t.prompt);
    let audio_in = match r.audio_input {
        Some(_) => t.audio_in.min(t.prompt - cached),
        None => 0,
    };
    let text_in = t.prompt - cached - audio_in;
    let audio_out = match r.audio_output {
        Some(_) => t.audio_out.min(t.completion),
        None => 0,
    };
    let text_out = t.completion - audio_out;
    let w = |tokens: u64, micros: u64| u128::from(tokens) * u128::from(micros);
    // Pico-units: tokens × micro-units per million tokens.
    let picos = w(text_in, r.input)
        + w(cached, r.cached_input)
        + w(audio_in, r.audio_input.unwrap_or(0))
        + w(text_out, r.output)
        + w(audio_out, r.audio_output.unwrap_or(0));
    Nanos(u64::try_from((picos + 500) / 1000).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Currency, ModelPrice, Price, PriceConfig};

    fn rates(input: u64, cached: u64, output: u64) -> Rates {
        Rates {
            input,
            cached_input: cached,
            output,
            audio_input: None,
            audio_output: None,
        }
    }

    fn tokens(prompt: u64, completion: u64, cached: u64) -> Tokens {
        Tokens {
            prompt,
            completion,
            cached,
            ..Tokens::default()
        }
    }

    #[test]
    fn text_and_cached_tokens_at_their_prices() {
        // gpt-4o: 2.50 in, 1.25 cached, 10.00 out per 1M tokens.
        let r = rates(2_500_000, 1_250_000, 10_000_000);
        // 1000 prompt (400 cached) and 500 completion tokens:
        // 600 × 2.5e-6 + 400 × 1.25e-6 + 500 × 1e-5 = 0.0015 + 0.0005 + 0.005 = 0.007.
        assert_eq!(cost(&r, &tokens(1000, 500, 400)), Nanos(7_000_000));
        assert_eq!(cost(&r, &tokens(1000, 500, 400)).to_string(), "0.007");
        // One token of input: 2.5e-6 exactly.
        assert_eq!(cost(&r, &tokens(1, 0, 0)), Nanos(2_500));
        // Cached beyond the prompt counts no more than the prompt.
        assert_eq!(cost(&r, &tokens(10, 0, 50)), cost(&r, &tokens(10, 0, 10)));
        assert_eq!(cost(&r, &Tokens::default()), Nanos(0));
    }

    #[test]
    fn rounding_is_once_per_request_half_up() {
        // 0.02 per 1M: one token is 2e-8 = 20 nano-units, exact.
        assert_eq!(cost(&rates(20_000, 20_000, 0), &tokens(1, 0, 0)), Nanos(20));
        // 0.0015 per 1M (1500 micro): one token is 1.5e-9, rounded half up to 2 nano.
        assert_eq!(cost(&rates(1_500, 1_500, 0), &tokens(1, 0, 0)), Nanos(2));
        // Three such tokens: 4.5e-9 → 5, not 3 × 2.
        assert_eq!(cost(&rates(1_500, 1_500, 0), &tokens(3, 0, 0)), Nanos(5));
        // 1.4e-9 rounds down.
        assert_eq!(cost(&rates(1_400, 1_400, 0), &tokens(1, 0, 0)), Nanos(1));
        // Huge counts do not overflow: saturated, never wrapped.
        assert_eq!(
            cost(&rates(1_000_000_000_000, 0, 0), &tokens(u64::MAX, 0, 0)),
            Nanos(u64::MAX)
        );
    }

    #[test]
    fn audio_tokens_at_audio_prices_when_set() {
        let mut r = rates(4_000_000, 400_000, 16_000_000);
        // 100 prompt tokens (30 audio, 20 cached), 50 completion tokens (40 audio).
        let t = Tokens {
            prompt: 100,
            completion: 50,
            cached: 20,
            audio_in: 30,
            audio_out: 40,
        };
        // No audio prices: audio is text. 80 × 4 + 20 × 0.4 + 50 × 16 = 1128 micro.
        assert_eq!(cost(&r, &t), Nanos(1_128_000));
        r.audio_input = Some(32_000_000);
        r.audio_output = Some(64_000_000);
        // 50 × 4 + 20 × 0.4 + 30 × 32 + 10 × 16 + 40 × 64 = 200 + 8 + 960 + 160 + 2560.
        assert_eq!(cost(&r, &t), Nanos(3_888_000));
    }

    #[test]
    fn globs_and_the_default() {
        let entry = |model: &str, input: u64| ModelPrice {
            model: model.to_owned(),
            input: Price(input),
            cached_input: None,
            output: Some(Price(10_000_000)),
            audio_input: None,
            audio_output: None,
        };
        let mut c = PricesConfig {
            currency: Currency::try_from("EUR".to_owned()).unwrap(),
            models: vec![
                entry("gpt-4o*", 2_500_000),
                entry("text-embedding-3-small", 20_000),
            ],
            default: None,
        };
        let p = Prices::new(&c);
        assert_eq!(p.currency(), "EUR");
        assert_eq!(p.rates("gpt-4o-mini").map(|r| r.input), Ok(2_500_000));
        assert_eq!(p.rates("gpt-4o").map(|r| r.cached_input), Ok(2_500_000));
        assert_eq!(
            p.rates("text-embedding-3-small").map(|r| r.input),
            Ok(20_000)
        );
        let e = p.rates("o1").unwrap_err();
        assert_eq!(e.model, "o1");
        assert!(e.to_string().contains("prices.default"), "{e}");
        assert!(p.cost("o1", &tokens(1, 1, 0)).is_err());
        c.default = Some(PriceConfig {
            input: Price(5_000_000),
            cached_input: None,
            output: Some(Price(15_000_000)),
            audio_input: None,
            audio_output: None,
        });
        let p = Prices::new(&c);
        // 1M in and 1M out at the default: 5 + 15.
        assert_eq!(
            p.cost("o1", &tokens(1_000_000, 1_000_000, 0)),
            Ok(Nanos(20 * NANOS_PER_UNIT))
        );
        assert_eq!(p.rates("gpt-4o").map(|r| r.input), Ok(2_500_000));
    }
}

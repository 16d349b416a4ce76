//! `[prices]`: what the operator pays the upstream per million tokens, per model glob, in one
//! currency. Prices are read as decimals and kept as whole micro-units of the currency
//! (10⁻⁶) per million tokens, so that every cost computed from them is integer arithmetic
//! (`cost.rs`). There is no built-in price list: prices are the operator's.

use std::fmt;

use serde::Deserialize;

/// The largest price accepted, per million tokens (a typo guard that also keeps every
/// product of tokens and price inside integer range).
const MAX_PRICE: f64 = 1_000_000.0;

/// `[prices]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricesConfig {
    pub currency: Currency,
    #[serde(default)]
    pub models: Vec<ModelPrice>,
    /// The price of a model no entry of `models` matches. Without it such a model is
    /// unpriced, which a budget refuses.
    #[serde(default)]
    pub default: Option<PriceConfig>,
}

/// One entry of `prices.models`: a model glob (`*` any run, `?` one character) and its prices.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub model: String,
    pub input: Price,
    #[serde(default)]
    pub cached_input: Option<Price>,
    #[serde(default)]
    pub output: Option<Price>,
    #[serde(default)]
    pub audio_input: Option<Price>,
    #[serde(default)]
    pub audio_output: Option<Price>,
}

/// `prices.default`: the prices of [`ModelPrice`] without a model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub input: Price,
    #[serde(default)]
    pub cached_input: Option<Price>,
    #[serde(default)]
    pub output: Option<Price>,
    #[serde(default)]
    pub audio_input: Option<Price>,
    #[serde(default)]
    pub audio_output: Option<Price>,
}

/// The prices of one model with their defaults applied, in micro-units per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    pub input: u64,
    /// Default: `input`.
    pub cached_input: u64,
    /// Default: 0.
    pub output: u64,
    /// Audio tokens the usage reports; when absent they cost what text tokens cost.
    pub audio_input: Option<u64>,
    pub audio_output: Option<u64>,
}

impl ModelPrice {
    pub fn rates(&self) -> Rates {
        rates(
            self.input,
            self.cached_input,
            self.output,
            self.audio_input,
            self.audio_output,
        )
    }
}

impl PriceConfig {
    pub fn rates(&self) -> Rates {
        rates(
            self.input,
            self.cached_input,
            self.output,
            self.audio_input,
            self.audio_output,
        )
    }
}

fn rates(
    input: Price,
    cached: Option<Price>,
    output: Option<Price>,
    audio_in: Option<Price>,
    audio_out: Option<Price>,
) -> Rates {
    Rates {
        input: input.0,
        cached_input: cached.unwrap_or(input).0,
        output: output.map_or(0, |p| p.0),
        audio_input: audio_in.map(|p| p.0),
        audio_output: audio_out.map(|p| p.0),
    }
}

/// A price per million tokens, in micro-units of the currency: read from a TOML number,
/// non-negative, finite, at most 1 000 000, rounded to the micro-unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "f64")]
pub struct Price(pub u64);

impl TryFrom<f64> for Price {
    type Error = String;

    fn try_from(v: f64) -> Result<Price, String> {
        if !v.is_finite() {
            return Err(format!(
                "{v} is not a price; use a number of the currency per 1M tokens, e.g. 2.50"
            ));
        }
        if v < 0.0 {
            return Err(format!(
                "{v} is negative; a price per 1M tokens is 0 or more"
            ));
        }
        if v > MAX_PRICE {
            return Err(format!(
                "{v} per 1M tokens is above the largest price accepted (1000000)"
            ));
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "finite, within 0..=1e12 after scaling"
        )]
        let micros = (v * 1e6).round() as u64;
        Ok(Price(micros))
    }
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&decimal(u128::from(self.0), 6))
    }
}

/// `units` of 10^-`scale` as a decimal without trailing zeros: `decimal(2_500_000, 6)` is
/// `"2.5"`, `decimal(3, 9)` is `"0.000000003"`.
pub fn decimal(units: u128, scale: u32) -> String {
    let one = 10u128.pow(scale);
    let (whole, frac) = (units / one, units % one);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:0width$}", width = scale as usize);
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// `prices.currency`: an ISO 4217 code, as written in the standard (three capitals).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Currency(String);

impl Currency {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Currency {
    type Error = String;

    fn try_from(s: String) -> Result<Currency, String> {
        if ISO_4217.contains(&s.as_str()) {
            return Ok(Currency(s));
        }
        let upper = s.trim().to_ascii_uppercase();
        let meant = if ISO_4217.contains(&upper.as_str()) {
            Some(upper.as_str())
        } else {
            ALIASES
                .iter()
                .find(|(names, _)| names.contains(&upper.as_str()))
                .map(|(_, code)| *code)
        };
        Err(match meant {
            Some(code) => format!("\"{s}\" is not an ISO 4217 currency code; write \"{code}\""),
            None => format!(
                "\"{s}\" is not an ISO 4217 currency code; use three capital letters such as \"USD\", \"EUR\" or \"GBP\""
            ),
        })
    }
}

/// Spellings operators write for the common currencies, and the code they mean.
const ALIASES: &[(&[&str], &str)] = &[
    (
        &["$", "US$", "US DOLLAR", "DOLLAR", "DOLLARS", "USDOLLAR"],
        "USD",
    ),
    (&["€", "EURO", "EUROS"], "EUR"),
    (&["£", "POUND", "POUNDS", "STERLING", "UKP"], "GBP"),
    (&["¥", "YEN"], "JPY"),
    (&["RMB", "YUAN", "CN¥"], "CNY"),
    (&["CA$", "C$"], "CAD"),
    (&["A$", "AU$"], "AUD"),
    (&["FR", "CHF."], "CHF"),
    (&["₹", "RUPEE", "RUPEES", "RS"], "INR"),
];

/// The active ISO 4217 currency codes (and funds codes), without `XTS` (testing) and `XXX`
/// (no currency).
const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD",
    "CAD", "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY", "COP", "COU", "CRC", "CUC", "CUP",
    "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP",
    "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS",
    "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW",
    "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD",
    "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN",
    "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR",
    "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SLL",
    "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY",
    "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES",
    "VND", "VUV", "WST", "XAF", "XAG", "XAU", "XBA", "XBB", "XBC", "XBD", "XCD", "XCG", "XDR",
    "XOF", "XPD", "XPF", "XPT", "XSU", "XUA", "YER", "ZAR", "ZMW", "ZWG", "ZWL",
];

/// Checks of `[prices]` beyond what reading it checks: every glob non-empty, and no model
/// name priced twice (see [`overlap`]).
pub(super) fn validate(p: &PricesConfig, problems: &mut Vec<String>) {
    for (i, m) in p.models.iter().enumerate() {
        if m.model.trim().is_empty() {
            problems.push(format!("prices.models[{i}].model: must not be empty"));
            continue;
        }
        for (j, earlier) in p.models[..i].iter().enumerate() {
            if let Some(name) = overlap(&earlier.model, &m.model) {
                problems.push(format!(
                    "prices.models[{i}].model: \"{}\" and prices.models[{j}].model \"{}\" both match the model \"{name}\"; a model has one price, so make the globs disjoint",
                    m.model, earlier.model
                ));
            }
        }
    }
}

/// A model name both globs match, if there is one: two entries overlap exactly when some
/// name matches both (identical globs, a literal name another glob matches, or two globs
/// such as `gpt-4*` and `*-mini`). `*` matches any run of characters, `?` one character.
pub fn overlap(a: &str, b: &str) -> Option<String> {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // A search over pairs of positions: a `*` may match nothing, or take the other
    // pattern's next character (a literal, a `?`, or nothing more when both are `*`). A
    // common name exists where both stars never take the same characters, so this finds
    // one if any exists. Each pair is visited once.
    let mut seen = vec![false; (a.len() + 1) * (b.len() + 1)];
    let mut stack = vec![(0usize, 0usize, String::new())];
    while let Some((i, j, name)) = stack.pop() {
        let at = i * (b.len() + 1) + j;
        if seen[at] {
            continue;
        }
        seen[at] = true;
        let (ca, cb) = (a.get(i).copied(), b.get(j).copied());
        match (ca, cb) {
            (None, None) => return Some(name),
            (Some('*'), _) | (_, Some('*')) => {
                if ca == Some('*') {
                    stack.push((i + 1, j, name.clone()));
                    if let Some(c) = cb.filter(|&c| c != '*') {
                        stack.push((i, j + 1, format!("{name}{}", concrete(c))));
                    }
                }
                if cb == Some('*') {
                    stack.push((i, j + 1, name.clone()));
                    if let Some(c) = ca.filter(|&c| c != '*') {
                        stack.push((i + 1, j, format!("{name}{}", concrete(c))));
                    }
                }
            }
            (Some(x), Some(y)) if x == y || x == '?' || y == '?' => {
                let c = if x == '?' { y } else { x };
                stack.push((i + 1, j + 1, format!("{name}{}", concrete(c))));
            }
            _ => {}
        }
    }
    None
}

/// A character of a name standing for `c` of a glob (`?` stands for any: `x`).
fn concrete(c: char) -> char {
    if c == '?' {
        'x'
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wildmatch::WildMatch;

    #[test]
    fn prices_are_micro_units() {
        assert_eq!(Price::try_from(2.5), Ok(Price(2_500_000)));
        assert_eq!(Price::try_from(0.02), Ok(Price(20_000)));
        assert_eq!(Price::try_from(0.075), Ok(Price(75_000)));
        assert_eq!(Price::try_from(0.0), Ok(Price(0)));
        assert!(Price::try_from(-0.01).unwrap_err().contains("negative"));
        assert!(Price::try_from(f64::NAN).is_err());
        assert!(Price::try_from(f64::INFINITY).is_err());
        assert!(Price::try_from(2e6).is_err());
        assert_eq!(Price(2_500_000).to_string(), "2.5");
        assert_eq!(Price(20_000).to_string(), "0.02");
        assert_eq!(Price(10_000_000).to_string(), "10");
        assert_eq!(decimal(3, 9), "0.000000003");
        assert_eq!(decimal(1_000_000_001, 9), "1.000000001");
    }

    #[test]
    fn currencies_are_iso_4217_as_written() {
        assert!(Currency::try_from("USD".to_owned()).is_ok());
        assert!(Currency::try_from("EUR".to_owned()).is_ok());
        for (wrong, right) in [
            ("usd", "USD"),
            ("US$", "USD"),
            ("EURO", "EUR"),
            ("eur", "EUR"),
            ("£", "GBP"),
        ] {
            let e = Currency::try_from(wrong.to_owned()).unwrap_err();
            assert!(e.contains(&format!("write \"{right}\"")), "{wrong}: {e}");
        }
        let e = Currency::try_from("ABC".to_owned()).unwrap_err();
        assert!(e.contains("three capital letters"), "{e}");
        assert!(Currency::try_from("XXX".to_owned()).is_err());
    }

    #[test]
    fn overlaps_are_found_with_a_witness() {
        for (a, b) in [
            ("gpt-4o", "gpt-4o"),
            ("gpt-4o*", "gpt-4o*"),
            ("gpt-4o*", "gpt-4o-mini"),
            ("gpt-4o-mini", "gpt-4o*"),
            ("gpt-4*", "*-mini"),
            ("*", "anything"),
            ("gpt-?o", "gpt-4*"),
            ("a*b*c", "*bc"),
            ("**", "x"),
        ] {
            let name = overlap(a, b).unwrap_or_else(|| panic!("{a} / {b}"));
            assert!(WildMatch::new(a).matches(&name), "{a} {name}");
            assert!(WildMatch::new(b).matches(&name), "{b} {name}");
        }
        for (a, b) in [
            ("gpt-4o", "gpt-4o-mini"),
            ("gpt-4o-*", "gpt-4.1*"),
            ("text-embedding-3-small", "text-embedding-3-large"),
            ("a*b", "*c"),
            ("?", "ab"),
            ("gpt-4o*", "o1*"),
        ] {
            assert_eq!(overlap(a, b), None, "{a} / {b}");
        }
    }

    #[test]
    fn validation_names_both_entries() {
        let p = |m: &str| ModelPrice {
            model: m.to_owned(),
            input: Price(1),
            cached_input: None,
            output: None,
            audio_input: None,
            audio_output: None,
        };
        let prices = PricesConfig {
            currency: Currency("USD".to_owned()),
            models: vec![p("gpt-4o*"), p("gpt-4.1"), p("gpt-4o-mini"), p("")],
            default: None,
        };
        let mut problems = Vec::new();
        validate(&prices, &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("prices.models[2].model: \"gpt-4o-mini\" and prices.models[0].model \"gpt-4o*\" both match the model \"gpt-4o-mini\""), "{}", problems[0]);
        assert!(problems[1].starts_with("prices.models[3].model: must not be empty"));
        let r = p("x").rates();
        assert_eq!(
            (r.input, r.cached_input, r.output, r.audio_input),
            (1, 1, 0, None)
        );
    }
}

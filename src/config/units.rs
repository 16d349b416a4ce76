//! Config value types that parse from strings: durations (`"250ms"`), sizes (`"10MiB"`),
//! rates (`"600/min"`), listen addresses (`"127.0.0.1:8080"`) and secrets (`"${VAR}"`).

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// Seconds in one unit of time, in the spellings durations and rates share.
fn unit_secs(unit: &str) -> Option<u64> {
    match unit {
        "s" | "sec" | "second" | "seconds" => Some(1),
        "m" | "min" | "minute" | "minutes" => Some(60),
        "h" | "hour" | "hours" => Some(3600),
        "d" | "day" | "days" => Some(86400),
        _ => None,
    }
}

/// The unit spellings, for error messages.
const UNITS: &str = "s, sec, second, m, min, minute, h, hour, d or day";

/// A duration written `"250ms"`, `"30s"`, `"5m"`, `"1h"` or `"1d"` (also `"5min"`,
/// `"2 hours"`: the units of [`unit_secs`]; fractions such as `"1.5s"` are read exactly, to
/// the nanosecond). A bare number (`30`, `"30"`) is refused with a hint to add the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

/// Nanoseconds in one unit of a duration.
fn unit_nanos(unit: &str) -> Option<u128> {
    match unit {
        "ms" => Some(1_000_000),
        u => unit_secs(u).map(|s| u128::from(s) * 1_000_000_000),
    }
}

/// `"1.5"` × `unit` nanoseconds, exactly (digits past the nanosecond are dropped).
fn scaled(num: &str, unit: u128) -> Option<u128> {
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
        || int.len() > 20
    {
        return None;
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    // 18 digits are below a nanosecond of a day; more cannot change the result.
    let frac = &frac[..frac.len().min(18)];
    let mut value = int.checked_mul(unit)?;
    if !frac.is_empty() {
        let f: u128 = frac.parse().ok()?;
        value = value.checked_add(f * unit / 10u128.pow(frac.len() as u32))?;
    }
    Some(value)
}

impl TryFrom<String> for Dur {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || {
            format!("\"{s}\" is not a duration; write a number and a unit (ms, {UNITS}), e.g. \"250ms\", \"30s\", \"5m\"")
        };
        let t = s.trim();
        let Some(split) = t.find(|c: char| !c.is_ascii_digit() && c != '.') else {
            if !t.is_empty() && scaled(t, 1).is_some() {
                return Err(format!(
                    "\"{s}\" is not a duration; write it with its unit, e.g. \"{t}s\" or \"{t}ms\""
                ));
            }
            return Err(bad());
        };
        let (num, unit) = t.split_at(split);
        let unit = unit_nanos(unit.trim()).ok_or_else(bad)?;
        let nanos = scaled(num, unit).ok_or_else(bad)?;
        if nanos > 365 * 86_400 * 1_000_000_000 {
            return Err(bad());
        }
        let nanos = u64::try_from(nanos).map_err(|_| bad())?;
        Ok(Dur(Duration::from_nanos(nanos)))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = d.deserialize_any(Written("a duration such as \"30s\""))?;
        match text {
            Ok(s) => Dur::try_from(s),
            Err(n) if n.starts_with('-') => Err(format!(
                "{n} is not a duration; write a positive number and a unit, e.g. \"30s\""
            )),
            Err(n) => Err(format!(
                "{n} is not a duration; write it with its unit, e.g. \"{n}s\" or \"{n}ms\""
            )),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// What a config value was written as: a string, or a bare number (as written) that a
/// unit-bearing type refuses with a hint.
struct Written(&'static str);

impl serde::de::Visitor<'_> for Written {
    type Value = Result<String, String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Ok(v.to_owned()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Ok(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Err(v.to_string()))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Err(v.to_string()))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Err(v.to_string()))
    }
}

impl fmt::Display for Dur {
    /// The largest unit that writes the duration exactly, as the docs write durations:
    /// `"250ms"`, `"30s"`, `"5m"`, `"4h"`, `"1d"`; below a millisecond, a fraction of one
    /// (`"1.5ms"`). What it prints parses back to the same duration.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.as_nanos();
        if n == 0 {
            return f.write_str("0s");
        }
        const S: u128 = 1_000_000_000;
        for (unit, size) in [("d", 86_400 * S), ("h", 3600 * S), ("m", 60 * S), ("s", S)] {
            if n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        let (ms, rest) = (n / 1_000_000, n % 1_000_000);
        if rest == 0 {
            return write!(f, "{ms}ms");
        }
        let frac = format!("{rest:06}");
        write!(f, "{ms}.{}ms", frac.trim_end_matches('0'))
    }
}

/// A size written `"512KiB"`, `"16MiB"`, `"1GiB"`, `"10MB"`, `"10kB"`, `"1000"` or a TOML
/// integer (`1048576`): bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(Written("a size such as \"16MiB\" or a number of bytes"))? {
            Ok(s) => ByteSize::try_from(s),
            Err(n) => match n.parse::<u64>() {
                Ok(bytes) => Ok(ByteSize(bytes)),
                Err(_) => Err(format!(
                    "{n} is not a size; write a whole number of bytes (e.g. 1048576) or a size with its unit (e.g. \"1MiB\")"
                )),
            },
        }
        .map_err(serde::de::Error::custom)
    }
}

impl TryFrom<String> for ByteSize {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("\"{s}\" is not a size; write e.g. \"512KiB\", \"16MiB\", \"1GiB\"");
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "kB" | "KB" => 1000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    /// The largest unit that writes the size exactly (`"16MiB"`, `"10MB"`, `"1000B"`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        let units: [(&str, u64); 6] = [
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
            ("GB", 1_000_000_000),
            ("MB", 1_000_000),
            ("kB", 1000),
        ];
        for (unit, size) in units {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

/// A rate written `"N/s"`, `"N/min"`, `"N/h"` or `"N/day"` (or any unit of [`unit_secs`]:
/// `"N/minute"`, `"N/d"`, …).
/// A bare number (`5000`, `"5000"`) is refused with a hint: its unit is not guessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl TryFrom<String> for Rate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || {
            format!("\"{s}\" is not a rate; use N/s, N/min, N/h or N/day (the unit may be {UNITS})")
        };
        let t = s.trim();
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bare_rate(t));
        }
        let (n, unit) = t.split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = Duration::from_secs(unit_secs(unit.trim()).ok_or_else(bad)?);
        if count == 0 {
            return Err(format!(
                "\"{s}\" is a zero rate; remove the limit or give a positive count"
            ));
        }
        Ok(Rate { count, per })
    }
}

/// The refusal of a rate written without its unit.
fn bare_rate(n: &str) -> String {
    if n.starts_with('-') || n.contains('.') {
        return format!(
            "{n} is not a rate; write a whole positive count and its unit, e.g. \"600/min\""
        );
    }
    format!("{n} is not a rate; write it with its unit, e.g. \"{n}/min\"")
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(Written("a rate such as \"600/min\""))? {
            Ok(s) => Rate::try_from(s),
            Err(n) => Err(bare_rate(&n)),
        }
        .map_err(serde::de::Error::custom)
    }
}

impl Rate {
    /// Time between two admissions at a steady pace.
    pub fn interval(&self) -> Duration {
        self.per / self.count
    }

    pub fn unit(&self) -> &'static str {
        match self.per.as_secs() {
            1 => "s",
            60 => "min",
            3600 => "h",
            _ => "day",
        }
    }

    pub fn unit_word(&self) -> &'static str {
        match self.per.as_secs() {
            1 => "second",
            60 => "minute",
            3600 => "hour",
            _ => "day",
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.unit())
    }
}

/// A listen address: an IP address and a port. Host names are refused rather than resolved,
/// so that what ezgate binds never depends on DNS or `/etc/hosts` at startup.
pub fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!(
            "\"{s}\" is not an IP address and port; write e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080 (host names such as localhost are not resolved)"
        )
    })
}

/// serde `deserialize_with` for [`listen_addr`].
pub fn de_listen_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    listen_addr(&s).map_err(serde::de::Error::custom)
}

/// The levels a log filter directive may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a `RUST_LOG`-style filter (`log.level`, or `RUST_LOG` itself): comma-separated
/// directives, each a level (`info`) or `target=level` (`ezgate::access=off`). A bare word
/// that is not a level would be read as a target name and turn every other log off, so it is
/// refused (`"warning"`: use `"warn"`).
pub fn log_filter(s: &str) -> Result<(), String> {
    let hint = "use trace, debug, info, warn, error or off, or target=level directives such as \"info,ezgate::access=off\"";
    for d in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        // Span filters (`target[span{field=value}]`) are left to the filter's own parser.
        let level = match d.rsplit_once('=') {
            Some((_, level)) if !level.contains([']', '}']) => Some(level.trim()),
            Some(_) => None,
            None if d.contains('[') => None,
            None => Some(d),
        };
        if let Some(level) = level {
            if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
                let whole = if d == s.trim() {
                    String::new()
                } else {
                    format!(" in \"{s}\"")
                };
                return Err(format!("\"{d}\"{whole} is not a level; {hint}"));
            }
        }
    }
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| ())
        .map_err(|e| format!("\"{s}\" is not a log filter ({e}); {hint}"))
}

/// What a policy keys on, written `client`, `api_key`, `ip`, `header:<name>`, `model` or
/// `global`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    Client,
    ApiKey,
    Ip,
    Header(http::HeaderName),
    Model,
    Global,
}

impl TryFrom<String> for LimitKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Ok(match s.as_str() {
            "client" => LimitKey::Client,
            "api_key" => LimitKey::ApiKey,
            "ip" => LimitKey::Ip,
            "model" => LimitKey::Model,
            "global" => LimitKey::Global,
            other => match other.strip_prefix("header:") {
                Some(h) => LimitKey::Header(
                    http::HeaderName::from_bytes(h.trim().as_bytes())
                        .map_err(|_| format!("\"{other}\" names an invalid header"))?,
                ),
                None => {
                    return Err(format!(
                        "\"{other}\" is not a key kind; use client, api_key, ip, header:<name>, model or global"
                    ))
                }
            },
        })
    }
}

impl fmt::Display for LimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitKey::Client => f.write_str("client"),
            LimitKey::ApiKey => f.write_str("api_key"),
            LimitKey::Ip => f.write_str("ip"),
            LimitKey::Header(h) => write!(f, "header:{h}"),
            LimitKey::Model => f.write_str("model"),
            LimitKey::Global => f.write_str("global"),
        }
    }
}

/// A secret: a literal, or `"${VAR}"` read from the environment when the config loads.
/// Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What this secret refers to, when it is a reference rather than the value itself.
    pub fn reference(&self) -> Option<SecretRef<'_>> {
        let inner = self.0.trim().strip_prefix("${")?.strip_suffix('}')?;
        Some(match inner.strip_prefix("file:") {
            Some(path) => SecretRef::File(path),
            None => SecretRef::Env(inner),
        })
    }

    /// The variable name of a `${VAR}` reference, if this is one.
    pub fn env_ref(&self) -> Option<&str> {
        match self.reference()? {
            SecretRef::Env(var) => Some(var),
            SecretRef::File(_) => None,
        }
    }
}

/// Where a secret's value is read from: `${VAR}` or `${file:/path}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretRef<'a> {
    Env(&'a str),
    File(&'a str),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            Dur::try_from("250ms".to_owned()),
            Ok(Dur(Duration::from_millis(250)))
        );
        assert_eq!(
            Dur::try_from("5m".to_owned()),
            Ok(Dur(Duration::from_secs(300)))
        );
        assert_eq!(
            Dur::try_from("1.5s".to_owned()),
            Ok(Dur(Duration::from_millis(1500)))
        );
        for (text, secs) in [
            ("2sec", 2),
            ("2 seconds", 2),
            ("5min", 300),
            ("5 minutes", 300),
            ("1hour", 3600),
            ("2d", 172_800),
            ("1day", 86_400),
        ] {
            assert_eq!(
                Dur::try_from(text.to_owned()),
                Ok(Dur(Duration::from_secs(secs))),
                "{text}"
            );
        }
        assert!(Dur::try_from("5 parsecs".to_owned())
            .unwrap_err()
            .contains("ms, s, sec, second, m, min, minute, h, hour, d or day"));
        assert!(Dur::try_from("5".to_owned()).is_err());
        assert!(Dur::try_from("fast".to_owned()).is_err());
        assert!(Dur::try_from("10 years".to_owned()).is_err());
    }

    #[test]
    fn durations_print_as_the_docs_write_them_and_read_back() {
        for (d, text) in [
            (Duration::from_millis(250), "250ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(4 * 3600), "4h"),
            (Duration::from_secs(86_400), "1d"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_micros(1500), "1.5ms"),
            (Duration::from_nanos(1), "0.000001ms"),
            (Duration::ZERO, "0s"),
        ] {
            assert_eq!(Dur(d).to_string(), text);
            assert_eq!(Dur::try_from(text.to_owned()), Ok(Dur(d)), "{text}");
        }
        // Fractions are read exactly, not through a float.
        for (text, nanos) in [
            ("0.1s", 100_000_000),
            ("2.000250s", 2_000_250_000),
            ("1.1ms", 1_100_000),
            (".5s", 500_000_000),
            ("0.3h", 1_080_000_000_000),
        ] {
            assert_eq!(
                Dur::try_from(text.to_owned()),
                Ok(Dur(Duration::from_nanos(nanos))),
                "{text}"
            );
        }
        let e = Dur::try_from("30".to_owned()).unwrap_err();
        assert_eq!(
            e,
            "\"30\" is not a duration; write it with its unit, e.g. \"30s\" or \"30ms\""
        );
        assert!(Dur::try_from("1..5s".to_owned()).is_err());
        assert!(Dur::try_from(".s".to_owned()).is_err());
    }

    #[test]
    fn sizes_print_in_the_largest_exact_unit() {
        for (n, text) in [
            (16 << 20, "16MiB"),
            (1 << 30, "1GiB"),
            (512 << 10, "512KiB"),
            (10_000_000, "10MB"),
            (2000, "2kB"),
            (1_048_577, "1048577B"),
            (0, "0B"),
        ] {
            assert_eq!(ByteSize(n).to_string(), text);
            assert_eq!(ByteSize::try_from(text.to_owned()), Ok(ByteSize(n)));
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(
            ByteSize::try_from("16MiB".to_owned()),
            Ok(ByteSize(16 << 20))
        );
        assert_eq!(ByteSize::try_from("1000".to_owned()), Ok(ByteSize(1000)));
        assert!(ByteSize::try_from("16 megs".to_owned()).is_err());
        assert!(ByteSize::try_from("99999999999999GiB".to_owned()).is_err());
    }

    #[test]
    fn rates() {
        let r = Rate::try_from("600/min".to_owned()).unwrap();
        assert_eq!((r.count, r.per), (600, Duration::from_secs(60)));
        assert_eq!(r.interval(), Duration::from_millis(100));
        assert_eq!(r.to_string(), "600/min");
        for (text, secs) in [
            ("10/s", 1),
            ("10/sec", 1),
            ("10/second", 1),
            ("10/m", 60),
            ("10/min", 60),
            ("10/minute", 60),
            ("10/minutes", 60),
            ("10/h", 3600),
            ("10/hour", 3600),
            ("10/d", 86400),
            ("10/day", 86400),
            (" 10 / day ", 86400),
        ] {
            let r = Rate::try_from(text.to_owned()).unwrap();
            assert_eq!((r.count, r.per.as_secs()), (10, secs), "{text}");
        }
        assert_eq!(
            Rate::try_from("5/minute".to_owned()).unwrap().to_string(),
            "5/min"
        );
        let e = Rate::try_from("10/week".to_owned()).unwrap_err();
        assert_eq!(
            e,
            "\"10/week\" is not a rate; use N/s, N/min, N/h or N/day (the unit may be s, sec, second, m, min, minute, h, hour, d or day)"
        );
        assert_eq!(
            Rate::try_from(" 5000 ".to_owned()).unwrap_err(),
            "5000 is not a rate; write it with its unit, e.g. \"5000/min\""
        );
        assert!(Rate::try_from("10/ms".to_owned()).is_err());
        assert!(Rate::try_from("ten/min".to_owned()).is_err());
        assert!(Rate::try_from("0/s".to_owned())
            .unwrap_err()
            .contains("zero"));
    }

    #[test]
    fn listen_addresses_are_ip_and_port() {
        assert_eq!(
            listen_addr("127.0.0.1:8080"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 8080)))
        );
        assert!(listen_addr("[::1]:0").is_ok());
        let e = listen_addr("localhost:8080").unwrap_err();
        assert!(
            e.starts_with(
                "\"localhost:8080\" is not an IP address and port; write e.g. 127.0.0.1:8080"
            ),
            "{e}"
        );
        assert!(listen_addr("127.0.0.1").is_err());
    }

    #[test]
    fn log_filters_name_levels() {
        for ok in [
            "info",
            "WARN",
            "warn,ezgate::access=off",
            "info,ezgate=debug",
            "ezgate::access=off",
            "",
            "error,hyper[conn]=trace",
        ] {
            assert_eq!(log_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["warning", "info,ezgate=verbose", "loud", "info,ezgate"] {
            let e = log_filter(bad).unwrap_err();
            assert!(e.contains("is not a level; use trace, debug"), "{bad}: {e}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-live-123".to_owned());
        assert_eq!(format!("{s} {s:?}"), "<redacted> \"<redacted>\"");
        assert_eq!(
            Secret::new("${EZLINK_API_KEY}".to_owned()).env_ref(),
            Some("EZLINK_API_KEY")
        );
    }
}

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
/// `"2 hours"`: the units of [`unit_secs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Dur(pub Duration);

impl TryFrom<String> for Dur {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || {
            format!("\"{s}\" is not a duration; write a number and a unit (ms, {UNITS}), e.g. \"250ms\", \"30s\", \"5m\"")
        };
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let secs = match unit.trim() {
            "ms" => n / 1000.0,
            u => n * unit_secs(u).ok_or_else(bad)? as f64,
        };
        if !secs.is_finite() || secs > 365.0 * 86400.0 {
            return Err(bad());
        }
        Ok(Dur(Duration::from_secs_f64(secs)))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// A size written `"512KiB"`, `"16MiB"`, `"1GiB"`, `"1000"` (bytes), `"10MB"` or `"10kB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ByteSize(pub u64);

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
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", n >> 20)
        } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}B")
        }
    }
}

/// A rate written `"N/s"`, `"N/min"`, `"N/h"` or `"N/day"` (or any unit of [`unit_secs`]:
/// `"N/minute"`, `"N/d"`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
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
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
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

    /// The variable name of a `${VAR}` reference, if this is one.
    pub fn env_ref(&self) -> Option<&str> {
        self.0.trim().strip_prefix("${")?.strip_suffix('}')
    }
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

//! Config value types that parse from strings: durations (`"250ms"`), sizes (`"10MiB"`),
//! rates (`"600/min"`) and secrets (`"${VAR}"`).

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// A duration written `"250ms"`, `"30s"`, `"5m"`, `"1h"` or `"1d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Dur(pub Duration);

impl TryFrom<String> for Dur {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad =
            || format!("\"{s}\" is not a duration; write e.g. \"250ms\", \"30s\", \"5m\", \"1h\"");
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let secs = match unit.trim() {
            "ms" => n / 1000.0,
            "s" => n,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            _ => return Err(bad()),
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
        if ms % 1000 == 0 {
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
        if n >= 1 << 20 && n % (1 << 20) == 0 {
            write!(f, "{}MiB", n >> 20)
        } else if n >= 1 << 10 && n % (1 << 10) == 0 {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}B")
        }
    }
}

/// A rate written `"N/s"`, `"N/min"`, `"N/h"` or `"N/day"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl TryFrom<String> for Rate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("\"{s}\" is not a rate; use N/s, N/min, N/h or N/day");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "day" => Duration::from_secs(86400),
            _ => return Err(bad()),
        };
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
        assert!(Rate::try_from("10/minute".to_owned())
            .unwrap_err()
            .contains("N/min"));
        assert!(Rate::try_from("0/s".to_owned())
            .unwrap_err()
            .contains("zero"));
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

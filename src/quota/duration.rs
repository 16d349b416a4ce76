//! Go's duration form (`time.Duration.String` / `time.ParseDuration`), as the upstream writes
//! its `x-ratelimit-reset-*` headers: `1s`, `6m0s`, `20ms`, `1h2m3.5s`, `300us`, `0s`.

use std::time::Duration;

/// The longest reset believed: a value beyond it is read as this (a reset a day away says
/// "not soon"; believing a year would only keep a stale picture longer).
pub const MAX_RESET: Duration = Duration::from_secs(24 * 3600);

/// The longest text read: Go's own longest sane forms are far shorter.
const MAX_LEN: usize = 64;

/// Reads a Go duration. Refuses what `time.ParseDuration` refuses (an empty string, a number
/// without a unit but `0`, an unknown unit, a value past Go's ~292 years) and, since a reset
/// cannot lie in the past, any negative value; caps what it accepts at [`MAX_RESET`].
/// `1h1h` is accepted as Go does (2h).
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    if text.is_empty() || text.len() > MAX_LEN {
        return None;
    }
    let s = text.strip_prefix('+').unwrap_or(text);
    if s.starts_with('-') {
        return None;
    }
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    // Nanoseconds; Go refuses a total past i64::MAX.
    let mut total: u128 = 0;
    while i < bytes.len() {
        let (whole, frac, scale, next) = number(bytes, i)?;
        i = next;
        let unit_start = i;
        while i < bytes.len() && !bytes[i].is_ascii_digit() && bytes[i] != b'.' {
            i += 1;
        }
        let unit: u128 = match s.get(unit_start..i)? {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        total = total
            .checked_add(whole.checked_mul(unit)?)?
            .checked_add(frac * unit / scale)?;
        if total > i64::MAX as u128 {
            return None;
        }
    }
    let nanos = u64::try_from(total).ok()?;
    Some(Duration::from_nanos(nanos).min(MAX_RESET))
}

/// A decimal number at `i`: (whole part, fraction digits, their scale, the index after it).
/// At least one digit on one side of the point, as Go requires.
fn number(bytes: &[u8], mut i: usize) -> Option<(u128, u128, u128, usize)> {
    let start = i;
    let mut whole: u128 = 0;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        whole = whole
            .checked_mul(10)?
            .checked_add(u128::from(bytes[i] - b'0'))?;
        if whole > i64::MAX as u128 {
            return None;
        }
        i += 1;
    }
    let had_whole = i > start;
    let (mut frac, mut scale) = (0u128, 1u128);
    let mut had_frac = false;
    if i < bytes.len() && bytes[i] == b'.' {
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            had_frac = true;
            // Digits past nanosecond precision of an hour change nothing: dropped, as Go does.
            if scale < 1_000_000_000_000_000_000 {
                frac = frac * 10 + u128::from(bytes[i] - b'0');
                scale *= 10;
            }
            i += 1;
        }
    }
    (had_whole || had_frac).then_some((whole, frac, scale, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    #[test]
    fn the_forms_the_upstream_sends() {
        assert_eq!(parse_go_duration("1s"), ms(1000));
        assert_eq!(parse_go_duration("6m0s"), ms(360_000));
        assert_eq!(parse_go_duration("20ms"), ms(20));
        assert_eq!(parse_go_duration("1h2m3.5s"), ms(3_723_500));
        assert_eq!(parse_go_duration("0s"), ms(0));
        assert_eq!(parse_go_duration("0"), ms(0));
        assert_eq!(
            parse_go_duration("1.5ms"),
            Some(Duration::from_micros(1500))
        );
        assert_eq!(parse_go_duration("300us"), Some(Duration::from_micros(300)));
        assert_eq!(
            parse_go_duration("300\u{b5}s"),
            Some(Duration::from_micros(300))
        );
        assert_eq!(
            parse_go_duration("300\u{3bc}s"),
            Some(Duration::from_micros(300))
        );
        assert_eq!(parse_go_duration("7ns"), Some(Duration::from_nanos(7)));
        assert_eq!(parse_go_duration(".5s"), ms(500));
        assert_eq!(parse_go_duration("1.s"), ms(1000));
        assert_eq!(parse_go_duration("+2s"), ms(2000));
        // Go sums repeated units.
        assert_eq!(parse_go_duration("1h1h"), Some(Duration::from_secs(7200)));
    }

    #[test]
    fn nonsense_is_refused() {
        for bad in [
            "", "-1s", "-0s", "1", "12", "1x", "s", ".s", ".", "1.2.3s", "1 s", " 1s", "1s ", "1S",
            "1sec", "ms", "+", "-", "1e3s", "0x10s", "1h-1m", "١s",
        ] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
        // Past Go's range (i64 nanoseconds, ~292 years) and overlong text.
        assert_eq!(parse_go_duration("2562048h"), None);
        assert_eq!(parse_go_duration("99999999999999999999999s"), None);
        assert_eq!(parse_go_duration(&"1".repeat(70)), None);
    }

    #[test]
    fn absurd_resets_are_capped() {
        assert_eq!(parse_go_duration("2562047h"), Some(MAX_RESET));
        assert_eq!(parse_go_duration("25h"), Some(MAX_RESET));
        assert_eq!(parse_go_duration("24h"), Some(MAX_RESET));
        assert_eq!(
            parse_go_duration("23h59m"),
            Some(Duration::from_secs(86_340))
        );
    }
}

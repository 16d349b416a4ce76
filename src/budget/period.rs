//! Calendar periods of a budget (`day`, `week`, `month`) in an IANA time zone: the window a
//! moment falls in, its start and end as instants, and an id that names it (`2026-12-07`,
//! `2026-W49`, `2026-12`). Daylight-saving days are as long as the zone makes them; a week
//! starts on Monday (ISO 8601). Time is passed in, so rollovers are tested without waiting.

use std::sync::Arc;

use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};

pub use crate::config::{zone, Period};

/// One period: from `start` (included) to `end` (excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub id: Arc<str>,
    pub start: Timestamp,
    pub end: Timestamp,
}

/// The window of `period` in `tz` that `now` falls in.
pub fn window(period: Period, tz: &TimeZone, now: Timestamp) -> Result<Window, String> {
    let here = now.to_zoned(tz.clone());
    let start: Zoned = match period {
        Period::Day => here.start_of_day(),
        Period::Week => {
            let back = i64::from(here.weekday().to_monday_zero_offset());
            here.checked_sub(back.days()).and_then(|d| d.start_of_day())
        }
        Period::Month => here.first_of_month().and_then(|d| d.start_of_day()),
    }
    .map_err(|e| format!("the start of the period of {now}: {e}"))?;
    let end = match period {
        Period::Day => start.checked_add(1.day()),
        Period::Week => start.checked_add(1.week()),
        Period::Month => start.checked_add(1.month()),
    }
    .and_then(|z| z.start_of_day())
    .map_err(|e| format!("the end of the period of {now}: {e}"))?;
    let id = match period {
        Period::Day => start.strftime("%Y-%m-%d").to_string(),
        Period::Week => start.strftime("%G-W%V").to_string(),
        Period::Month => start.strftime("%Y-%m").to_string(),
    };
    Ok(Window {
        id: Arc::from(id),
        start: start.timestamp(),
        end: end.timestamp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn days_weeks_and_months_in_utc() {
        let utc = zone("UTC").unwrap();
        let now = ts("2026-12-07T06:13:00Z");
        let d = window(Period::Day, &utc, now).unwrap();
        assert_eq!(&*d.id, "2026-12-07");
        assert_eq!(
            (d.start, d.end),
            (ts("2026-12-07T00:00:00Z"), ts("2026-12-08T00:00:00Z"))
        );
        // 2026-12-07 is a Monday.
        let w = window(Period::Week, &utc, ts("2026-12-13T23:59:59Z")).unwrap();
        assert_eq!(&*w.id, "2026-W50");
        assert_eq!(
            (w.start, w.end),
            (ts("2026-12-07T00:00:00Z"), ts("2026-12-14T00:00:00Z"))
        );
        let m = window(Period::Month, &utc, now).unwrap();
        assert_eq!(&*m.id, "2026-12");
        assert_eq!(
            (m.start, m.end),
            (ts("2026-12-01T00:00:00Z"), ts("2027-01-01T00:00:00Z"))
        );
        // The last instant of a period is in it; its end is in the next.
        assert_eq!(
            window(Period::Month, &utc, ts("2026-12-31T23:59:59.999Z"))
                .unwrap()
                .id,
            Arc::from("2026-12")
        );
        assert_eq!(&*window(Period::Month, &utc, m.end).unwrap().id, "2027-01");
    }

    #[test]
    fn a_zone_moves_the_boundaries_and_daylight_saving_changes_a_days_length() {
        let paris = zone("Europe/Paris").unwrap();
        // Midnight in Paris is 23:00 UTC in winter.
        let d = window(Period::Day, &paris, ts("2026-12-06T23:30:00Z")).unwrap();
        assert_eq!(&*d.id, "2026-12-07");
        assert_eq!(d.start, ts("2026-12-06T23:00:00Z"));
        // 2026-03-29: clocks go forward, a 23-hour day.
        let dst = window(Period::Day, &paris, ts("2026-03-29T12:00:00Z")).unwrap();
        assert_eq!(dst.end.duration_since(dst.start).as_secs(), 23 * 3600);
        // A month that starts in winter time and ends in summer time.
        let m = window(Period::Month, &paris, ts("2026-03-15T00:00:00Z")).unwrap();
        assert_eq!(
            (m.start, m.end),
            (ts("2026-02-28T23:00:00Z"), ts("2026-03-31T22:00:00Z"))
        );
    }

    #[test]
    fn unknown_zones_are_named() {
        let e = zone("Mars/Olympus").unwrap_err();
        assert!(e.contains("Mars/Olympus") && e.contains("IANA"), "{e}");
    }

    #[test]
    fn iso_weeks_across_a_year_end() {
        let utc = zone("UTC").unwrap();
        // 2027-01-01 is a Friday of ISO week 2026-W53.
        let w = window(Period::Week, &utc, ts("2027-01-01T12:00:00Z")).unwrap();
        assert_eq!(&*w.id, "2026-W53");
        assert_eq!(w.start, ts("2026-12-28T00:00:00Z"));
    }
}

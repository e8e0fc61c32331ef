//! Billing periods: calendar months in the customer's IANA zone, as instants.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// A calendar month, `2026-10`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    year: i32,
    month: u32,
}

impl Period {
    pub fn new(year: i32, month: u32) -> Option<Period> {
        ((1..=12).contains(&month) && (1970..=9999).contains(&year))
            .then_some(Period { year, month })
    }

    pub fn next(self) -> Period {
        if self.month == 12 {
            Period {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Period {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The month before, if it is a period (from 1970 on).
    pub fn previous(self) -> Option<Period> {
        if self.month == 1 {
            Period::new(self.year - 1, 12)
        } else {
            Period::new(self.year, self.month - 1)
        }
    }

    /// The period containing `instant` in `tz`.
    pub fn containing(instant: DateTime<Utc>, tz: Tz) -> Period {
        let local = instant.with_timezone(&tz);
        Period {
            year: local.year(),
            month: local.month(),
        }
    }

    /// The first instant of the period in `tz`: local midnight of its first day, or, where the
    /// clocks skip midnight that day, the first local time after it.
    pub fn start(self, tz: Tz) -> DateTime<Utc> {
        local_midnight(self.year, self.month, tz)
    }

    /// The first instant after the period (the next period's start).
    pub fn end(self, tz: Tz) -> DateTime<Utc> {
        self.next().start(tz)
    }
}

fn local_midnight(year: i32, month: u32, tz: Tz) -> DateTime<Utc> {
    // `Period::new` keeps the year and month valid, so the day exists.
    let day = NaiveDate::from_ymd_opt(year, month, 1).unwrap_or(NaiveDate::MIN);
    let mut local = day.and_hms_opt(0, 0, 0).unwrap_or_default();
    // A gap in the local time (a DST change at midnight) lasts at most a few hours; the first
    // valid minute after it is where the day starts.
    for _ in 0..(24 * 60) {
        match tz.from_local_datetime(&local) {
            LocalResult::Single(t) => return t.with_timezone(&Utc),
            LocalResult::Ambiguous(first, _) => return first.with_timezone(&Utc),
            LocalResult::None => local += Duration::minutes(1),
        }
    }
    Utc.from_utc_datetime(&local)
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl FromStr for Period {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a month such as \"2026-10\"");
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 || !y.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let year = y.parse().map_err(|_| bad())?;
        let month = m.parse().map_err(|_| bad())?;
        Period::new(year, month).ok_or_else(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("rfc3339")
            .with_timezone(&Utc)
    }

    #[test]
    fn months_start_at_local_midnight() {
        let oct: Period = "2026-10".parse().expect("period");
        assert_eq!(oct.start(Tz::UTC), at("2026-10-01T00:00:00Z"));
        assert_eq!(oct.end(Tz::UTC), at("2026-11-01T00:00:00Z"));
        assert_eq!(
            oct.start(Tz::America__Sao_Paulo),
            at("2026-10-01T03:00:00Z")
        );
        assert_eq!(oct.start(Tz::Asia__Kolkata), at("2026-09-30T18:30:00Z"));
        let dec: Period = "2026-12".parse().expect("period");
        assert_eq!(dec.next().to_string(), "2027-01");
        assert_eq!(dec.end(Tz::UTC), at("2027-01-01T00:00:00Z"));
        assert_eq!(
            Period::containing(at("2026-10-31T23:59:59.999Z"), Tz::Asia__Kolkata).to_string(),
            "2026-11"
        );
        for bad in [
            "2026-13",
            "2026-1",
            "26-10",
            "2026-10-01",
            "",
            "abcd-ef",
            "1969-12",
        ] {
            assert!(bad.parse::<Period>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_month_whose_first_midnight_is_skipped_starts_after_the_gap() {
        // Paraguay began DST at local midnight on Sunday 2023-10-01: 00:00 to 00:59 did not
        // exist, so October began at 01:00 -03.
        let tz = Tz::America__Asuncion;
        let oct = Period::new(2023, 10).expect("period");
        assert_eq!(oct.start(tz), at("2023-10-01T04:00:00Z"));
        assert_eq!(Period::new(2023, 9).expect("period").end(tz), oct.start(tz));
    }
}

//! The windows of `GET /v1/usage`: minutes, hours, days or months of an IANA zone, as the
//! instants that bound them, and the SQL expression that numbers the window of an event.
//!
//! A window starts at each instant where the zone's clock reads a whole minute, hour, day or
//! month. Where the clock is set back, a minute or an hour is read twice and gives two windows
//! (each as long as the unit); a day or a month starts at the first of them. Where the clock
//! skips ahead over a window's start, the window starts at the first instant after the gap
//! (a day in Sao Paulo that began at 01:00), as billing periods do. So windows never overlap,
//! leave no gap, and each event is in exactly one.
//!
//! The stores number an event's window with integer arithmetic on its time in microseconds:
//! stretches of equally long windows (between two changes of the zone's offset) are one
//! division each, found by a nested `CASE` that halves the stretches at each level. It is the
//! same expression on every store, whatever its time-zone functions would do with the gaps
//! and repeats of a zone's clock.

use std::fmt;
use std::str::FromStr;

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;
use serde::Serialize;

/// At most this many windows in one answer: checked while they are listed, before any work.
pub const MAX_WINDOWS: usize = 10_000;

/// At most this many month windows: each month is a stretch of its own in the statement.
pub const MAX_MONTH_WINDOWS: usize = 1_200;

/// The length of a window, in the zone's calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowSize {
    Minute,
    Hour,
    Day,
    Month,
}

impl WindowSize {
    pub fn as_str(self) -> &'static str {
        match self {
            WindowSize::Minute => "minute",
            WindowSize::Hour => "hour",
            WindowSize::Day => "day",
            WindowSize::Month => "month",
        }
    }

    /// The local start of the window containing local time `t`.
    fn floor(self, t: NaiveDateTime) -> NaiveDateTime {
        let date = t.date();
        let start = match self {
            WindowSize::Minute => date.and_hms_opt(t.hour(), t.minute(), 0),
            WindowSize::Hour => date.and_hms_opt(t.hour(), 0, 0),
            WindowSize::Day => date.and_hms_opt(0, 0, 0),
            WindowSize::Month => NaiveDate::from_ymd_opt(date.year(), date.month(), 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0)),
        };
        // Every date has its first minute of each hour and its first day of the month.
        start.unwrap_or(t)
    }

    /// The local start of the next window after one starting at `t`.
    fn next(self, t: NaiveDateTime) -> Option<NaiveDateTime> {
        match self {
            WindowSize::Minute => t.checked_add_signed(Duration::minutes(1)),
            WindowSize::Hour => t.checked_add_signed(Duration::hours(1)),
            WindowSize::Day => t.checked_add_signed(Duration::days(1)),
            WindowSize::Month => t.checked_add_months(chrono::Months::new(1)),
        }
    }

    /// The local start of the window before one starting at `t`.
    fn previous(self, t: NaiveDateTime) -> Option<NaiveDateTime> {
        match self {
            WindowSize::Minute => t.checked_sub_signed(Duration::minutes(1)),
            WindowSize::Hour => t.checked_sub_signed(Duration::hours(1)),
            WindowSize::Day => t.checked_sub_signed(Duration::days(1)),
            WindowSize::Month => t.checked_sub_months(chrono::Months::new(1)),
        }
    }

    /// Whether a local start read twice (the clock set back) starts two windows: for units
    /// shorter than the clock change, each reading does.
    fn both_readings(self) -> bool {
        matches!(self, WindowSize::Minute | WindowSize::Hour)
    }
}

impl fmt::Display for WindowSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WindowSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "minute" => Ok(WindowSize::Minute),
            "hour" => Ok(WindowSize::Hour),
            "day" => Ok(WindowSize::Day),
            "month" => Ok(WindowSize::Month),
            other => Err(format!(
                "{other:?} is not a window (minute, hour, day or month)"
            )),
        }
    }
}

/// Windows that cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("from {from} is not before to {to}")]
    Empty { from: String, to: String },
    #[error("from {from} to {to} holds more than {max} {size} windows; use a larger window")]
    TooMany {
        from: String,
        to: String,
        max: usize,
        size: WindowSize,
    },
}

/// The windows over `[from, to)`: `bounds[i]..bounds[i + 1]` is window `i`, the first one
/// starting at or before `from` and the last ending at or after `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Windows {
    bounds: Vec<DateTime<Utc>>,
}

impl Windows {
    /// Lists the windows of `size` in `tz` that cover `[from, to)`.
    pub fn new(
        size: WindowSize,
        tz: Tz,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Windows, WindowError> {
        let stamp = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        if from >= to {
            return Err(WindowError::Empty {
                from: stamp(from),
                to: stamp(to),
            });
        }
        let max = match size {
            WindowSize::Month => MAX_MONTH_WINDOWS,
            _ => MAX_WINDOWS,
        };
        let too_many = || WindowError::TooMany {
            from: stamp(from),
            to: stamp(to),
            max,
            size,
        };
        // A day (or month) earlier than `from`'s local window, so that the clock set back
        // around `from` cannot hide the start of its window.
        let mut local = size.floor(from.with_timezone(&tz).naive_local());
        let margin = match size {
            WindowSize::Month => 1,
            WindowSize::Day => 1,
            WindowSize::Hour => 24,
            WindowSize::Minute => 24 * 60,
        };
        for _ in 0..margin {
            local = size.previous(local).unwrap_or(local);
        }
        let mut bounds = Vec::new();
        // Each step is one local start; past `to` by one, the listing ends.
        loop {
            let readings = starts(tz, local, size.both_readings());
            let first = readings[0];
            for r in readings {
                if bounds.last() != Some(&r) {
                    bounds.push(r);
                }
            }
            if first >= to {
                break;
            }
            // Windows before `from` are listed only as a margin: bounded by it.
            if bounds.len() > max + 2 * margin + 64 {
                return Err(too_many());
            }
            // Past a gap in the clock, on from the window the clock reads after it, not
            // through every start the gap skipped.
            let resumed = size.floor(first.with_timezone(&tz).naive_local());
            match size.next(local) {
                Some(next) => local = next.max(resumed),
                None => break,
            }
        }
        bounds.sort_unstable();
        bounds.dedup();
        // The last start at or before `from`, and the first end at or after `to`.
        let first = bounds.partition_point(|b| *b <= from).saturating_sub(1);
        let last = bounds.partition_point(|b| *b < to);
        let bounds: Vec<_> = bounds
            .get(first..=last.min(bounds.len().saturating_sub(1)))
            .unwrap_or_default()
            .to_vec();
        if bounds.len() < 2 || bounds[0] > from || bounds[bounds.len() - 1] < to {
            // Only an instant outside chrono's range could get here: 1970..9999 is checked
            // before.
            return Err(too_many());
        }
        if bounds.len() - 1 > max {
            return Err(too_many());
        }
        Ok(Windows { bounds })
    }

    /// How many windows there are.
    pub fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Window `i`: its first instant and the first instant after it.
    pub fn get(&self, i: usize) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        Some((*self.bounds.get(i)?, *self.bounds.get(i + 1)?))
    }

    /// Stretches of equally long windows: `(first window, its start in µs, window length in
    /// µs, windows in the stretch)`.
    fn stretches(&self) -> Vec<Stretch> {
        let us: Vec<i64> = self.bounds.iter().map(DateTime::timestamp_micros).collect();
        let mut out: Vec<Stretch> = Vec::new();
        for (i, pair) in us.windows(2).enumerate() {
            let length = pair[1] - pair[0];
            match out.last_mut() {
                Some(s) if s.length == length => s.count += 1,
                _ => out.push(Stretch {
                    first: i,
                    start_us: pair[0],
                    length,
                    count: 1,
                }),
            }
        }
        out
    }

    /// An integer expression of `time_us` (an event's time in µs since 1970) giving the number
    /// of its window, for an event within the windows. `div` writes integer division of two
    /// non-negative integers in the store's dialect.
    pub fn number_sql(&self, time_us: &str, div: &dyn Fn(&str, &str) -> String) -> String {
        let stretches = self.stretches();
        number_of(&stretches, time_us, div)
    }
}

#[derive(Debug, Clone, Copy)]
struct Stretch {
    first: usize,
    start_us: i64,
    length: i64,
    count: usize,
}

/// The nested `CASE` over `stretches`, halving them at each level.
fn number_of(stretches: &[Stretch], t: &str, div: &dyn Fn(&str, &str) -> String) -> String {
    match stretches {
        [] => "0".to_owned(),
        [s] if s.count == 1 => s.first.to_string(),
        [s] => format!(
            "({} + {})",
            s.first,
            div(&format!("{t} - {}", s.start_us), &s.length.to_string())
        ),
        _ => {
            let mid = stretches.len() / 2;
            format!(
                "CASE WHEN {t} < {} THEN {} ELSE {} END",
                stretches[mid].start_us,
                number_of(&stretches[..mid], t, div),
                number_of(&stretches[mid..], t, div)
            )
        }
    }
}

/// The instants where `tz`'s clock reads `local`: one, or two where the clock is set back
/// (the first only unless `both`), or where the clock skips `local`, the first instant after
/// the gap.
fn starts(tz: Tz, local: NaiveDateTime, both: bool) -> Vec<DateTime<Utc>> {
    let mut t = local;
    // A gap lasts at most a few hours; the first valid minute after it is where it ends (a
    // zone's offsets are whole minutes).
    for _ in 0..(48 * 60) {
        match tz.from_local_datetime(&t) {
            LocalResult::Single(a) => return vec![a.with_timezone(&Utc)],
            LocalResult::Ambiguous(a, b) if both => {
                return vec![a.with_timezone(&Utc), b.with_timezone(&Utc)];
            }
            LocalResult::Ambiguous(a, _) => return vec![a.with_timezone(&Utc)],
            LocalResult::None => t += Duration::minutes(1),
        }
    }
    vec![Utc.from_utc_datetime(&local)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("instant")
            .with_timezone(&Utc)
    }

    fn listed(w: &Windows) -> Vec<String> {
        (0..w.len())
            .map(|i| {
                let (a, b) = w.get(i).expect("window");
                format!("{} {}", a.to_rfc3339(), b.to_rfc3339())
            })
            .collect()
    }

    /// Evaluates the numbering expression as the stores would.
    fn number(w: &Windows, t: DateTime<Utc>) -> usize {
        let stretches = w.stretches();
        let us = t.timestamp_micros();
        fn eval(stretches: &[Stretch], us: i64) -> usize {
            match stretches {
                [] => 0,
                [s] if s.count == 1 => s.first,
                [s] => s.first + usize::try_from((us - s.start_us) / s.length).unwrap_or(0),
                _ => {
                    let mid = stretches.len() / 2;
                    if us < stretches[mid].start_us {
                        eval(&stretches[..mid], us)
                    } else {
                        eval(&stretches[mid..], us)
                    }
                }
            }
        }
        eval(&stretches, us)
    }

    /// Every microsecond-exact edge lands in the window whose bounds hold it.
    fn check_numbering(w: &Windows) {
        for i in 0..w.len() {
            let (a, b) = w.get(i).expect("window");
            assert_eq!(number(w, a), i, "start of window {i}");
            assert_eq!(
                number(w, b - Duration::microseconds(1)),
                i,
                "end of window {i}"
            );
        }
    }

    #[test]
    fn hours_in_a_half_hour_zone() {
        let w = Windows::new(
            WindowSize::Hour,
            Tz::Asia__Kolkata,
            at("2026-10-01T00:00:00Z"),
            at("2026-10-01T02:00:00Z"),
        )
        .expect("windows");
        assert_eq!(
            listed(&w),
            [
                "2026-09-30T23:30:00+00:00 2026-10-01T00:30:00+00:00",
                "2026-10-01T00:30:00+00:00 2026-10-01T01:30:00+00:00",
                "2026-10-01T01:30:00+00:00 2026-10-01T02:30:00+00:00",
            ]
        );
        check_numbering(&w);
        let sql = w.number_sql("t", &|a, b| format!("({a}) / {b}"));
        assert!(!sql.contains("CASE"), "one stretch: {sql}");
    }

    #[test]
    fn the_clock_set_back_gives_two_hours_and_one_day() {
        // New York: 2026-11-01 02:00 EDT becomes 01:00 EST (06:00 UTC).
        let tz = Tz::America__New_York;
        let from = at("2026-11-01T04:00:00Z"); // 00:00 EDT
        let to = at("2026-11-01T08:00:00Z"); // 03:00 EST
        let hours = Windows::new(WindowSize::Hour, tz, from, to).expect("hours");
        assert_eq!(
            listed(&hours),
            [
                "2026-11-01T04:00:00+00:00 2026-11-01T05:00:00+00:00",
                "2026-11-01T05:00:00+00:00 2026-11-01T06:00:00+00:00",
                "2026-11-01T06:00:00+00:00 2026-11-01T07:00:00+00:00",
                "2026-11-01T07:00:00+00:00 2026-11-01T08:00:00+00:00",
            ]
        );
        check_numbering(&hours);
        let days = Windows::new(WindowSize::Day, tz, from, to).expect("days");
        assert_eq!(
            listed(&days),
            ["2026-11-01T04:00:00+00:00 2026-11-02T05:00:00+00:00"]
        );
        let minutes = Windows::new(WindowSize::Minute, tz, from, to).expect("minutes");
        assert_eq!(minutes.len(), 240);
        check_numbering(&minutes);
    }

    #[test]
    fn a_day_that_skips_midnight_starts_after_the_gap() {
        // Sao Paulo, 2018-11-04: 00:00 became 01:00 (-03 to -02).
        let tz = Tz::America__Sao_Paulo;
        let days = Windows::new(
            WindowSize::Day,
            tz,
            at("2018-11-03T03:00:00Z"),
            at("2018-11-06T02:00:00Z"),
        )
        .expect("days");
        assert_eq!(
            listed(&days),
            [
                "2018-11-03T03:00:00+00:00 2018-11-04T03:00:00+00:00",
                "2018-11-04T03:00:00+00:00 2018-11-05T02:00:00+00:00",
                "2018-11-05T02:00:00+00:00 2018-11-06T02:00:00+00:00",
            ]
        );
        check_numbering(&days);
        // The day of the change is 23 hours: the days form three stretches.
        assert_eq!(days.stretches().len(), 3);
    }

    #[test]
    fn a_skipped_day_is_crossed_at_once() {
        // Samoa skipped 2011-12-30 (23:59:59 on the 29th was followed by 00:00 on the 31st).
        let tz = Tz::Pacific__Apia;
        let from = at("2011-12-30T08:00:00Z");
        let to = from + Duration::hours(4);
        let minutes = Windows::new(WindowSize::Minute, tz, from, to).expect("minutes");
        assert_eq!(minutes.len(), 240);
        check_numbering(&minutes);
        let days = Windows::new(
            WindowSize::Day,
            tz,
            at("2011-12-29T10:00:00Z"),
            at("2012-01-01T10:00:00Z"),
        )
        .expect("days");
        // The 29th, the 31st (the 30th never began), the 1st.
        assert_eq!(days.len(), 3);
        check_numbering(&days);
    }

    #[test]
    fn months_have_their_own_lengths() {
        let months = Windows::new(
            WindowSize::Month,
            Tz::UTC,
            at("2026-01-15T00:00:00Z"),
            at("2026-12-01T00:00:00Z"),
        )
        .expect("months");
        assert_eq!(months.len(), 11);
        assert_eq!(
            months.get(0).map(|(a, _)| a),
            Some(at("2026-01-01T00:00:00Z"))
        );
        assert_eq!(
            months.get(10).map(|(_, b)| b),
            Some(at("2026-12-01T00:00:00Z"))
        );
        check_numbering(&months);
    }

    #[test]
    fn limits_are_checked_while_listing() {
        let e = Windows::new(
            WindowSize::Minute,
            Tz::UTC,
            at("2026-01-01T00:00:00Z"),
            at("9999-01-01T00:00:00Z"),
        )
        .expect_err("too many");
        assert!(
            matches!(
                e,
                WindowError::TooMany {
                    max: MAX_WINDOWS,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            Windows::new(
                WindowSize::Minute,
                Tz::UTC,
                at("2026-01-01T00:00:00Z"),
                at("2026-01-07T22:40:00Z"),
            )
            .is_ok(),
            "exactly 10,000 minutes"
        );
        assert!(matches!(
            Windows::new(
                WindowSize::Month,
                Tz::UTC,
                at("1970-01-01T00:00:00Z"),
                at("9999-01-01T00:00:00Z"),
            ),
            Err(WindowError::TooMany { .. })
        ));
        assert!(matches!(
            Windows::new(
                WindowSize::Day,
                Tz::UTC,
                at("2026-01-01T00:00:00Z"),
                at("2026-01-01T00:00:00Z"),
            ),
            Err(WindowError::Empty { .. })
        ));
    }
}

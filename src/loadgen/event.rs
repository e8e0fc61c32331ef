//! Generated events in a compact, `Copy` form, and their JSON encoding.
//!
//! Keeping events as static strings and numbers (ids are derived from sequence numbers when
//! written) makes them cheap to keep around for re-sending and lets NDJSON be written straight
//! from them, without building a `serde_json::Value` per event.

use std::fmt;

use serde::ser::{Error as _, Serialize, SerializeMap, Serializer};

/// One generated event, before encoding.
#[derive(Debug, Clone, Copy)]
pub(super) struct Event {
    /// Emission index; the id is `evt-<seed>-<tag>-<seq>`.
    pub seq: u64,
    /// Index of the tenant.
    pub tenant: usize,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// `user-<n>`.
    pub subject: Option<u32>,
    pub source: &'static str,
    pub dimensions: Dimensions,
    pub data: Data,
}

/// The type-specific payload; run references are sequence numbers of `agent.run` events.
#[derive(Debug, Clone, Copy)]
pub(super) enum Data {
    Llm {
        provider: &'static str,
        model: &'static str,
        input_tokens: u64,
        output_tokens: u64,
        cached_input_tokens: Option<u64>,
        reasoning_tokens: Option<u64>,
        latency_ms: u64,
        status: &'static str,
        run: Option<u64>,
    },
    Api {
        route: &'static str,
        method: &'static str,
        status_code: u16,
        latency_ms: u64,
        request_bytes: u64,
        response_bytes: u64,
    },
    Agent {
        agent: &'static str,
        run: u64,
        parent: Option<u64>,
        status: &'static str,
        duration_ms: u64,
        steps: u64,
        tool_calls: u64,
    },
}

impl Data {
    fn type_name(&self) -> &'static str {
        match self {
            Data::Llm { .. } => "llm.usage",
            Data::Api { .. } => "api.request",
            Data::Agent { .. } => "agent.run",
        }
    }
}

/// Up to three dimensions.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Dimensions {
    len: u8,
    pairs: [(&'static str, &'static str); 3],
}

impl Dimensions {
    /// Adds a pair; beyond three the rest are dropped.
    pub fn push(&mut self, key: &'static str, value: &'static str) {
        if let Some(slot) = self.pairs.get_mut(usize::from(self.len)) {
            *slot = (key, value);
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[(&'static str, &'static str)] {
        &self.pairs[..usize::from(self.len)]
    }
}

impl Serialize for Dimensions {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let pairs = self.as_slice();
        let mut map = s.serialize_map(Some(pairs.len()))?;
        for (k, v) in pairs {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// An event ready to encode: the compact form plus what it refers to.
#[derive(Debug, Clone, Copy)]
pub(super) struct WireEvent<'a> {
    pub event: &'a Event,
    pub seed: u64,
    /// The configuration's tag (see [`super::Generator`]), part of every id.
    pub tag: u32,
    pub tenant: &'a str,
}

impl Serialize for WireEvent<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.event;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("id", &Tagged("evt", self.seed, self.tag, e.seq))?;
        map.serialize_entry("tenant", self.tenant)?;
        map.serialize_entry("type", e.data.type_name())?;
        map.serialize_entry("time", &Rfc3339Millis(e.time_ms))?;
        if let Some(user) = e.subject {
            map.serialize_entry("subject", &Numbered("user", u64::from(user)))?;
        }
        map.serialize_entry("source", e.source)?;
        if e.dimensions.len > 0 {
            map.serialize_entry("dimensions", &e.dimensions)?;
        }
        map.serialize_entry(
            "data",
            &WireData {
                data: &e.data,
                seed: self.seed,
                tag: self.tag,
            },
        )?;
        map.end()
    }
}

struct WireData<'a> {
    data: &'a Data,
    seed: u64,
    tag: u32,
}

impl Serialize for WireData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        match *self.data {
            Data::Llm {
                provider,
                model,
                input_tokens,
                output_tokens,
                cached_input_tokens,
                reasoning_tokens,
                latency_ms,
                status,
                run,
            } => {
                map.serialize_entry("provider", provider)?;
                map.serialize_entry("model", model)?;
                map.serialize_entry("input_tokens", &input_tokens)?;
                map.serialize_entry("output_tokens", &output_tokens)?;
                if let Some(n) = cached_input_tokens {
                    map.serialize_entry("cached_input_tokens", &n)?;
                }
                if let Some(n) = reasoning_tokens {
                    map.serialize_entry("reasoning_tokens", &n)?;
                }
                map.serialize_entry("latency_ms", &latency_ms)?;
                map.serialize_entry("status", status)?;
                if let Some(run) = run {
                    map.serialize_entry("run_id", &Tagged("run", self.seed, self.tag, run))?;
                }
            }
            Data::Api {
                route,
                method,
                status_code,
                latency_ms,
                request_bytes,
                response_bytes,
            } => {
                map.serialize_entry("route", route)?;
                map.serialize_entry("method", method)?;
                map.serialize_entry("status_code", &status_code)?;
                map.serialize_entry("latency_ms", &latency_ms)?;
                map.serialize_entry("request_bytes", &request_bytes)?;
                map.serialize_entry("response_bytes", &response_bytes)?;
            }
            Data::Agent {
                agent,
                run,
                parent,
                status,
                duration_ms,
                steps,
                tool_calls,
            } => {
                map.serialize_entry("agent", agent)?;
                map.serialize_entry("run_id", &Tagged("run", self.seed, self.tag, run))?;
                if let Some(parent) = parent {
                    map.serialize_entry(
                        "parent_run_id",
                        &Tagged("run", self.seed, self.tag, parent),
                    )?;
                }
                map.serialize_entry("status", status)?;
                map.serialize_entry("duration_ms", &duration_ms)?;
                map.serialize_entry("steps", &steps)?;
                map.serialize_entry("tool_calls", &tool_calls)?;
            }
        }
        map.end()
    }
}

/// `<prefix>-<seed>-<tag>-<n>` (the tag in 8 hex digits), written without an intermediate
/// `String`.
struct Tagged(&'static str, u64, u32, u64);

impl fmt::Display for Tagged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{:08x}-{}", self.0, self.1, self.2, self.3)
    }
}

impl Serialize for Tagged {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `<prefix>-<n>`.
struct Numbered(&'static str, u64);

impl fmt::Display for Numbered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

impl Serialize for Numbered {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(super) struct Rfc3339Millis(pub i64);

impl Rfc3339Millis {
    /// Formats years 0 to 9999; `None` outside them.
    fn format(&self) -> Option<[u8; 24]> {
        let ms = self.0;
        let days = ms.div_euclid(86_400_000);
        let in_day = ms.rem_euclid(86_400_000);
        let (year, month, day) = civil_from_days(days);
        if !(0..=9999).contains(&year) {
            return None;
        }
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, digits: usize, mut value: i64| {
            for i in (at..at + digits).rev() {
                out[i] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, in_day / 3_600_000);
        put(14, 2, in_day / 60_000 % 60);
        put(17, 2, in_day / 1000 % 60);
        put(20, 3, in_day % 1000);
        Some(out)
    }
}

impl Serialize for Rfc3339Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.format() {
            Some(bytes) => s.serialize_str(std::str::from_utf8(&bytes).map_err(S::Error::custom)?),
            None => match chrono::DateTime::from_timestamp_millis(self.0) {
                Some(t) => s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
                None => Err(S::Error::custom("event time out of range")),
            },
        }
    }
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use rand::{Rng as _, SeedableRng as _};

    use super::*;

    fn chrono_format(ms: i64) -> String {
        chrono::DateTime::from_timestamp_millis(ms)
            .expect("in range")
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }

    fn ours(ms: i64) -> String {
        serde_json::to_value(Rfc3339Millis(ms))
            .expect("serialises")
            .as_str()
            .expect("a string")
            .to_owned()
    }

    #[test]
    fn time_format_matches_chrono() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let edges = [
            0,
            -1,
            951_782_400_000,     // 2000-02-29
            1_795_255_200_123,   // 2026-11-21T10:00:00.123Z
            253_402_300_799_999, // 9999-12-31T23:59:59.999Z
            -62_167_219_200_000, // 0000-01-01
        ];
        for ms in edges
            .into_iter()
            .chain((0..20_000).map(|_| rng.random_range(-62_000_000_000_000..253_000_000_000_000)))
        {
            assert_eq!(ours(ms), chrono_format(ms), "at {ms} ms");
        }
        // Beyond four-digit years chrono's own form is used.
        assert_eq!(
            ours(253_402_300_800_000),
            chrono_format(253_402_300_800_000)
        );
    }

    #[test]
    fn dimensions_hold_three() {
        let mut d = Dimensions::default();
        for key in ["a", "b", "c", "d"] {
            d.push(key, "v");
        }
        assert_eq!(
            serde_json::to_string(&d).expect("serialises"),
            r#"{"a":"v","b":"v","c":"v"}"#
        );
    }
}

//! meterd's rollups, defined once and rendered into each store's form.
//!
//! A rollup groups `events` by a time bucket and a fixed set of dimensions and keeps additive
//! measures: counts, token sums, latency and duration sums, and a cumulative latency histogram
//! with fixed bounds, so percentiles can be read from a rollup without the raw events. Because
//! every measure is a sum (a count is a sum of ones), a coarser rollup is exactly the sum of a
//! finer one: `usage_daily` is computed from `usage_hourly`, and every store must give the same
//! numbers for the same events.
//!
//! The definitions here are data ([`ROLLUPS`], [`DIMENSIONS`], [`measures`]); [`postgres`]
//! renders them as a TimescaleDB continuous aggregate or as plain PostgreSQL tables kept by an
//! incremental refresher, [`clickhouse`] as materialized views into `AggregatingMergeTree`
//! tables, [`datafusion`] as queries over the embedded store's `events`. Buckets are UTC: a
//! bucket's value is its start as a UTC timestamp.

pub mod datafusion;
pub mod sql;

use std::sync::OnceLock;

/// The width of a rollup's time bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    Hour,
    Day,
}

impl Width {
    /// The width as an SQL interval literal's text (`1 hour`).
    pub fn interval(self) -> &'static str {
        match self {
            Width::Hour => "1 hour",
            Width::Day => "1 day",
        }
    }

    /// The width in microseconds.
    pub fn micros(self) -> i64 {
        match self {
            Width::Hour => 3_600_000_000,
            Width::Day => 86_400_000_000,
        }
    }

    /// The start of the bucket holding `time_us` (microseconds since the epoch, UTC).
    pub fn bucket_start(self, time_us: i64) -> i64 {
        time_us.div_euclid(self.micros()) * self.micros()
    }
}

/// Where a rollup reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The raw `events` table.
    Events,
    /// Another, finer rollup (by name): a hierarchical rollup.
    Rollup(&'static str),
}

/// One rollup: a name (the relation users query), a bucket width and a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollup {
    pub name: &'static str,
    pub width: Width,
    pub source: Source,
}

/// Every rollup, finer before coarser (a rollup's source comes before it).
pub const ROLLUPS: &[Rollup] = &[
    Rollup {
        name: "usage_hourly",
        width: Width::Hour,
        source: Source::Events,
    },
    Rollup {
        name: "usage_daily",
        width: Width::Day,
        source: Source::Rollup("usage_hourly"),
    },
];

/// How a dimension is computed from an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DimensionExpr {
    /// A column that is never NULL.
    Column(&'static str),
    /// A nullable text column; NULL becomes the empty string, so every store groups the same way
    /// (ClickHouse keys cannot be NULL).
    OrEmpty(&'static str),
    /// `api.request`: the status code's class (`2xx`, `4xx`, `5xx`); other types: their `status`
    /// (`ok`, `error`, `succeeded`, `failed`, ...) or the empty string.
    StatusClass,
}

/// A grouping column of every rollup (besides `bucket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dimension {
    pub name: &'static str,
    pub expr: DimensionExpr,
}

/// The dimensions, in column order after `bucket`.
pub const DIMENSIONS: &[Dimension] = &[
    Dimension {
        name: "tenant",
        expr: DimensionExpr::Column("tenant"),
    },
    Dimension {
        name: "type",
        expr: DimensionExpr::Column("type"),
    },
    Dimension {
        name: "provider",
        expr: DimensionExpr::OrEmpty("provider"),
    },
    Dimension {
        name: "model",
        expr: DimensionExpr::OrEmpty("model"),
    },
    Dimension {
        name: "agent",
        expr: DimensionExpr::OrEmpty("agent"),
    },
    Dimension {
        name: "route",
        expr: DimensionExpr::OrEmpty("route"),
    },
    Dimension {
        name: "status_class",
        expr: DimensionExpr::StatusClass,
    },
];

/// A condition on one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Predicate {
    /// The event is an error: an `api.request` with a 5xx status code, an `llm.usage` with
    /// status `error`, or an `agent.run` that `failed` or hit its `timeout`.
    IsError,
    /// The column is not NULL.
    NotNull(&'static str),
    /// The column is not NULL and at most the bound.
    AtMost(&'static str, i64),
}

/// How a measure aggregates events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// The number of events.
    Count,
    /// The sum of a nullable integer column; NULLs count as 0 and an all-NULL group gives 0.
    Sum(&'static str),
    /// The number of events matching a predicate.
    CountIf(Predicate),
}

/// An additive measure of every rollup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measure {
    pub name: String,
    pub aggregate: Aggregate,
}

/// Upper bounds (inclusive, milliseconds) of the latency histogram. `latency_le_<b>` counts the
/// events with `latency_ms <= b`; `latency_count` (events with any latency) is the `+Inf` bucket.
pub const LATENCY_BOUNDS_MS: &[i64] = &[
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
];

/// The name of the histogram column for `bound`.
pub fn latency_bucket_column(bound: i64) -> String {
    format!("latency_le_{bound}")
}

/// The measures, in column order after the dimensions.
pub fn measures() -> &'static [Measure] {
    static MEASURES: OnceLock<Vec<Measure>> = OnceLock::new();
    MEASURES.get_or_init(|| {
        let m = |name: &str, aggregate| Measure {
            name: name.to_owned(),
            aggregate,
        };
        let mut all = vec![
            m("events", Aggregate::Count),
            m("input_tokens", Aggregate::Sum("input_tokens")),
            m("output_tokens", Aggregate::Sum("output_tokens")),
            m("cached_input_tokens", Aggregate::Sum("cached_input_tokens")),
            m("reasoning_tokens", Aggregate::Sum("reasoning_tokens")),
            m("errors", Aggregate::CountIf(Predicate::IsError)),
            m(
                "latency_count",
                Aggregate::CountIf(Predicate::NotNull("latency_ms")),
            ),
            m("latency_ms_sum", Aggregate::Sum("latency_ms")),
            m(
                "duration_count",
                Aggregate::CountIf(Predicate::NotNull("duration_ms")),
            ),
            m("duration_ms_sum", Aggregate::Sum("duration_ms")),
        ];
        all.extend(LATENCY_BOUNDS_MS.iter().map(|&b| Measure {
            name: latency_bucket_column(b),
            aggregate: Aggregate::CountIf(Predicate::AtMost("latency_ms", b)),
        }));
        all
    })
}

/// The rollup named `name`.
pub fn rollup(name: &str) -> Option<&'static Rollup> {
    ROLLUPS.iter().find(|r| r.name == name)
}

/// Every column of a rollup relation, in order: `bucket`, the dimensions, the measures.
pub fn columns() -> Vec<&'static str> {
    std::iter::once("bucket")
        .chain(DIMENSIONS.iter().map(|d| d.name))
        .chain(measures().iter().map(|m| m.name.as_str()))
        .collect()
}

/// Reads a latency quantile from one rollup row's histogram: the smallest bound whose cumulative
/// count reaches `q` of `latency_count`, or `None` when there are no latencies or the quantile
/// lies above the last bound. `cumulative[i]` is the `latency_le_<LATENCY_BOUNDS_MS[i]>` value.
pub fn latency_quantile(cumulative: &[i64], latency_count: i64, q: f64) -> Option<i64> {
    if latency_count <= 0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    // Rank of the quantile among `latency_count` values, 1-based, as Prometheus reads it.
    let rank = (q * latency_count as f64).ceil().max(1.0) as i64;
    LATENCY_BOUNDS_MS
        .iter()
        .zip(cumulative)
        .find(|&(_, &c)| c >= rank)
        .map(|(&b, _)| b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_unique_and_ordered() {
        let cols = columns();
        let mut sorted = cols.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), cols.len(), "duplicate column in {cols:?}");
        assert_eq!(cols[0], "bucket");
        assert_eq!(cols[1], "tenant");
        assert!(cols.contains(&"latency_le_60000"));
    }

    #[test]
    fn sources_come_first() {
        for (i, r) in ROLLUPS.iter().enumerate() {
            if let Source::Rollup(src) = r.source {
                let j = ROLLUPS
                    .iter()
                    .position(|s| s.name == src)
                    .expect("source rollup is defined");
                assert!(j < i, "{} reads {src}, defined after it", r.name);
            }
        }
    }

    #[test]
    fn buckets_are_utc_and_floor_negative_times() {
        assert_eq!(Width::Hour.bucket_start(3_600_000_000 + 1), 3_600_000_000);
        assert_eq!(Width::Hour.bucket_start(3_600_000_000), 3_600_000_000);
        assert_eq!(Width::Hour.bucket_start(-1), -3_600_000_000);
        assert_eq!(Width::Day.bucket_start(86_400_000_000 - 1), 0);
    }

    #[test]
    fn quantile_reads_the_first_bound_reaching_the_rank() {
        // 10 latencies: 4 <= 5 ms, 9 <= 100 ms, all <= 1000 ms.
        let mut cumulative = vec![0; LATENCY_BOUNDS_MS.len()];
        for (i, &b) in LATENCY_BOUNDS_MS.iter().enumerate() {
            cumulative[i] = match b {
                ..=49 => 4,
                50..=999 => 9,
                _ => 10,
            };
        }
        assert_eq!(latency_quantile(&cumulative, 10, 0.4), Some(5));
        assert_eq!(latency_quantile(&cumulative, 10, 0.5), Some(50));
        assert_eq!(latency_quantile(&cumulative, 10, 0.9), Some(50));
        assert_eq!(latency_quantile(&cumulative, 10, 0.95), Some(1_000));
        assert_eq!(latency_quantile(&cumulative, 0, 0.5), None);
        // Above the last bound.
        let low = vec![0; LATENCY_BOUNDS_MS.len()];
        assert_eq!(latency_quantile(&low, 3, 0.5), None);
    }
}

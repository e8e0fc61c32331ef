//! The embedded store's form of the rollups: DataFusion SQL computing each rollup from the
//! `events` table at query time. The query crate registers it as a table and narrows the scan
//! of `events` to the buckets a query asks for.
//!
//! Every rollup is computed from the events directly, the coarser ones included: every measure
//! is a sum, so `usage_daily` from the events equals `usage_daily` from `usage_hourly`, and a
//! count stays a count (`BIGINT`) instead of becoming a sum of counts. Token and time sums are
//! exact `DECIMAL(38, 0)` (meterd's `sum` never wraps), as PostgreSQL's `numeric`. The
//! dimensions and the error rule are PostgreSQL's SQL, which DataFusion reads as it is.

use std::fmt::Write as _;

use crate::sql::{dimension_sql, predicate_sql};
use crate::{Aggregate, DIMENSIONS, Rollup, Width, measures};

/// The SQL type of a summed measure.
pub const SUM_TYPE: &str = "DECIMAL(38, 0)";

fn bucket_expr(width: Width) -> &'static str {
    // `time` is a UTC timestamp, so its truncation is the UTC bucket.
    match width {
        Width::Hour => "date_trunc('hour', time)",
        Width::Day => "date_trunc('day', time)",
    }
}

fn measure_sql(aggregate: &Aggregate) -> String {
    match aggregate {
        Aggregate::Count => "count(*)".to_owned(),
        Aggregate::Sum(c) => format!("coalesce(sum({c}), CAST(0 AS {SUM_TYPE}))"),
        // `count` of a CASE without ELSE counts the rows matching: a BIGINT, never NULL.
        Aggregate::CountIf(p) => format!("count(CASE WHEN {} THEN 1 END)", predicate_sql(p)),
    }
}

/// `SELECT bucket, dimensions, measures FROM events GROUP BY ...` computing `rollup`.
pub fn select_sql(rollup: &Rollup) -> String {
    let mut sql = format!("SELECT {} AS bucket", bucket_expr(rollup.width));
    for d in DIMENSIONS {
        let _ = write!(sql, ",\n       {} AS {}", dimension_sql(&d.expr), d.name);
    }
    for m in measures() {
        let _ = write!(sql, ",\n       {} AS {}", measure_sql(&m.aggregate), m.name);
    }
    let group: Vec<String> = (1..=DIMENSIONS.len() + 1).map(|i| i.to_string()).collect();
    let _ = write!(sql, "\nFROM events\nGROUP BY {}", group.join(", "));
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ROLLUPS;

    #[test]
    fn every_rollup_reads_events_with_every_column() {
        for r in ROLLUPS {
            let sql = select_sql(r);
            assert!(sql.contains("FROM events"), "{sql}");
            for c in crate::columns() {
                assert!(sql.contains(&format!(" AS {c}")), "{c} missing from {sql}");
            }
        }
        let hourly = select_sql(&ROLLUPS[0]);
        assert!(hourly.starts_with("SELECT date_trunc('hour', time) AS bucket"));
        assert!(
            hourly
                .contains("coalesce(sum(input_tokens), CAST(0 AS DECIMAL(38, 0))) AS input_tokens")
        );
        assert!(hourly.contains("count(CASE WHEN latency_ms <= 5 THEN 1 END) AS latency_le_5"));
    }
}

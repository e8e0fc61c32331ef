//! The ClickHouse form of the rollups: a materialized view per rollup, writing aggregate states
//! into an `AggregatingMergeTree` table `<db>.<name>_state`, and a plain view `<db>.<name>` that
//! finalises them into the same columns and values as the PostgreSQL relations.
//!
//! Every rollup here aggregates the inserted event rows directly, the coarser ones included:
//! a materialized view sees each inserted block, and a rollup fed from another rollup's state
//! table would make its write depend on that table's write succeeding first. Because every
//! measure is a sum, `usage_daily` computed from the events equals `usage_daily` computed from
//! `usage_hourly`.
//!
//! Delivery markers: meterd's insert table carries a `_delivery` id on every row and one
//! marker row (`_marker = 1`) per insert. The materialized views group the marker row on its
//! own (its `_delivery` kept, every dimension empty) and every event row under `_delivery = 0`,
//! so each state table holds, in the same part as the insert's aggregates, a row saying that
//! this insert reached it. meterd reads those rows to settle an insert whose outcome it did not
//! see; the user views leave them out.

use std::fmt::Write as _;

use meterd_rollups::{Aggregate, DIMENSIONS, DimensionExpr, Predicate, Rollup, Width, measures};

/// The table forms a server supports, chosen from its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    /// `LowCardinality(String)` for dictionary-encoded dimension columns.
    pub low_cardinality: bool,
    /// `DateTime64(6, 'UTC')` for event times with microseconds.
    pub datetime64: bool,
    /// Table `TTL` for retention.
    pub ttl: bool,
}

impl Dialect {
    /// ClickHouse before 21.8 (Debian's 18.16 among them): `LowCardinality` and `TTL` are
    /// experimental or missing and `DateTime64` does not exist.
    pub const LEGACY: Dialect = Dialect {
        low_cardinality: false,
        datetime64: false,
        ttl: false,
    };

    /// ClickHouse 21.8 and later.
    pub const MODERN: Dialect = Dialect {
        low_cardinality: true,
        datetime64: true,
        ttl: true,
    };

    /// The first release the modern form is used for.
    pub const MODERN_SINCE: (u32, u32) = (21, 8);

    /// The dialect of server version `major.minor`.
    pub fn for_version(major: u32, minor: u32) -> Dialect {
        if (major, minor) >= Self::MODERN_SINCE {
            Self::MODERN
        } else {
            Self::LEGACY
        }
    }

    /// A text column type for values with few distinct values (dimensions).
    pub fn dimension_type(&self) -> &'static str {
        if self.low_cardinality {
            "LowCardinality(String)"
        } else {
            "String"
        }
    }
}

/// The name of the state table behind rollup `name`.
pub fn state_table(name: &str) -> String {
    format!("{name}_state")
}

/// The state type of exact sums: 128-bit decimals add without wrapping (the sum of 2^64
/// events of 2^63-1 fits), as PostgreSQL's `numeric(38, 0)` and meterd's SQL `sum`.
const SUM_STATE: &str = "AggregateFunction(sum, Decimal(38, 0))";

fn bucket_expr(width: Width) -> &'static str {
    match width {
        Width::Hour => "toStartOfHour(toDateTime(intDiv(time_us, 1000000), 'UTC'))",
        Width::Day => "toStartOfDay(toDateTime(intDiv(time_us, 1000000), 'UTC'))",
    }
}

fn predicate_sql(p: &Predicate) -> String {
    match p {
        Predicate::IsError => "(type = 'api.request' AND ifNull(status_code, 0) >= 500) \
             OR (type = 'llm.usage' AND ifNull(status, '') = 'error') \
             OR (type = 'agent.run' AND ifNull(status, '') IN ('failed', 'timeout'))"
            .to_owned(),
        Predicate::NotNull(c) => format!("isNotNull({c})"),
        Predicate::AtMost(c, bound) => format!("ifNull({c} <= {bound}, 0)"),
    }
}

fn dimension_sql(expr: &DimensionExpr) -> String {
    match expr {
        DimensionExpr::Column(c) => (*c).to_owned(),
        DimensionExpr::OrEmpty(c) => format!("ifNull({c}, '')"),
        DimensionExpr::StatusClass => "if(type = 'api.request', \
             concat(toString(intDiv(ifNull(status_code, 0), 100)), 'xx'), ifNull(status, ''))"
            .to_owned(),
    }
}

/// The aggregate state of one measure over inserted event rows, and its state type.
fn state_sql(aggregate: &Aggregate) -> (String, &'static str) {
    match aggregate {
        Aggregate::Count => ("countState()".to_owned(), "AggregateFunction(count)"),
        Aggregate::Sum(c) => (
            format!("sumState(toDecimal128(ifNull({c}, 0), 0))"),
            SUM_STATE,
        ),
        Aggregate::CountIf(p) => (
            format!("sumState(toUInt64({}))", predicate_sql(p)),
            "AggregateFunction(sum, UInt64)",
        ),
    }
}

/// `CREATE TABLE IF NOT EXISTS <db>.<name>_state`: the aggregate states of `rollup`, keyed by
/// tenant first so a tenant's rows are read together.
pub fn state_table_ddl(db: &str, rollup: &Rollup, dialect: &Dialect) -> String {
    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS {db}.{table} (\n    bucket DateTime('UTC')",
        table = state_table(rollup.name)
    );
    for d in DIMENSIONS {
        let _ = write!(sql, ",\n    {} {}", d.name, dialect.dimension_type());
    }
    sql.push_str(",\n    _delivery UInt64");
    for m in measures() {
        let (_, ty) = state_sql(&m.aggregate);
        let _ = write!(sql, ",\n    {} {ty}", m.name);
    }
    let key: Vec<&str> = std::iter::once("tenant")
        .chain(std::iter::once("bucket"))
        .chain(DIMENSIONS.iter().map(|d| d.name).filter(|&n| n != "tenant"))
        .chain(std::iter::once("_delivery"))
        .collect();
    let _ = write!(
        sql,
        "\n) ENGINE = AggregatingMergeTree\nPARTITION BY toYYYYMM(bucket)\nORDER BY ({})",
        key.join(", ")
    );
    sql
}

/// The aggregating `SELECT` of a materialized view computing `rollup` from meterd's insert
/// table `from`: event rows grouped by bucket and dimensions under `_delivery = 0`, the marker
/// row alone under its own `_delivery`.
pub fn aggregate_select(rollup: &Rollup, from: &str) -> String {
    let mut sql = format!("SELECT {} AS bucket", bucket_expr(rollup.width));
    for d in DIMENSIONS {
        let _ = write!(sql, ",\n       {} AS {}", dimension_sql(&d.expr), d.name);
    }
    sql.push_str(",\n       if(_marker = 1, _delivery, toUInt64(0)) AS _delivery");
    for m in measures() {
        let (expr, _) = state_sql(&m.aggregate);
        let _ = write!(sql, ",\n       {expr} AS {}", m.name);
    }
    let group: Vec<&str> = std::iter::once("bucket")
        .chain(DIMENSIONS.iter().map(|d| d.name))
        .chain(std::iter::once("_delivery"))
        .collect();
    let _ = write!(sql, "\nFROM {from}\nGROUP BY {}", group.join(", "));
    sql
}

/// `CREATE VIEW IF NOT EXISTS <db>.<name>`: the finalised rollup, the same columns in the same
/// order as PostgreSQL's, counts as `Int64` and sums as exact `Decimal(38, 0)`, delivery markers
/// left out.
pub fn view_ddl(db: &str, rollup: &Rollup) -> String {
    let mut sql = format!(
        "CREATE VIEW IF NOT EXISTS {db}.{name} AS\nSELECT bucket",
        name = rollup.name
    );
    for d in DIMENSIONS {
        let _ = write!(sql, ", {}", d.name);
    }
    for m in measures() {
        let expr = match m.aggregate {
            Aggregate::Count => format!("toInt64(countMerge({}))", m.name),
            // A count of events cannot pass 2^63.
            Aggregate::CountIf(_) => format!("toInt64(sumMerge({}))", m.name),
            Aggregate::Sum(_) => format!("sumMerge({})", m.name),
        };
        let _ = write!(sql, ",\n       {expr} AS {}", m.name);
    }
    let group: Vec<&str> = std::iter::once("bucket")
        .chain(DIMENSIONS.iter().map(|d| d.name))
        .collect();
    let _ = write!(
        sql,
        "\nFROM {db}.{table}\nWHERE _delivery = 0\nGROUP BY {}",
        group.join(", "),
        table = state_table(rollup.name),
    );
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterd_rollups::ROLLUPS;

    #[test]
    fn versions_choose_the_dialect() {
        assert_eq!(Dialect::for_version(18, 16), Dialect::LEGACY);
        assert_eq!(Dialect::for_version(21, 7), Dialect::LEGACY);
        assert_eq!(Dialect::for_version(21, 8), Dialect::MODERN);
        assert_eq!(Dialect::for_version(25, 3), Dialect::MODERN);
    }

    #[test]
    fn every_column_is_rendered_once() {
        for r in ROLLUPS {
            let view = view_ddl("meterd", r);
            for c in meterd_rollups::columns() {
                assert!(
                    view.contains(&format!(" AS {c}\n")) || view.contains(&format!(" {c},")),
                    "{c} missing from {view}"
                );
            }
            let select = aggregate_select(r, "meterd.events_in");
            let table = state_table_ddl("meterd", r, &Dialect::LEGACY);
            for m in measures() {
                assert!(select.contains(&format!(" AS {}", m.name)));
                assert!(table.contains(&format!("    {} ", m.name)));
            }
            assert!(table.contains("_delivery UInt64"));
            assert!(!table.contains("LowCardinality"));
            assert!(state_table_ddl("meterd", r, &Dialect::MODERN).contains("LowCardinality"));
        }
    }
}

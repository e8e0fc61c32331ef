//! meterd's tables in ClickHouse, in the form the server's version supports.
//!
//! Every statement is `IF NOT EXISTS`, so starting meterd against a database it already set up
//! changes nothing, and two nodes starting together at worst see one statement fail and retry.
//! A table keeps the form it was created in: after a server upgrade meterd goes on writing the
//! old form (the insert table and the views' inputs are the same in both).

use std::fmt::Write as _;

use meterd_rollups::clickhouse::{self as rollup_sql, Dialect};
use meterd_rollups::{ROLLUPS, Rollup};

use super::block::input_columns;
use super::{ChError, ClickHouseConfig, query_err};

/// The server's version, as `SELECT version()` gives it (`18.16.1`, `24.8.4.13`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerVersion {
    pub text: String,
    pub major: u32,
    pub minor: u32,
}

impl ServerVersion {
    pub fn parse(text: &str) -> Result<Self, ChError> {
        let bad = || ChError::Version(text.to_owned());
        let mut parts = text.trim().split('.');
        let mut number = || -> Result<u32, ChError> {
            parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)
        };
        Ok(Self {
            major: number()?,
            minor: number()?,
            text: text.trim().to_owned(),
        })
    }

    pub fn dialect(&self) -> Dialect {
        Dialect::for_version(self.major, self.minor)
    }
}

/// Which tables a repair insert can target: the tables a materialized view of `events_in`
/// writes, each behind its own `repair_<table>` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The table written (`events`, `usage_hourly_state`, ...).
    pub table: String,
    /// The `Null` table whose one view writes only `table`.
    pub repair_entry: String,
    /// Whether the table keeps every event row with its delivery id (`events`) or one marker
    /// row per delivery (the rollups' state tables).
    pub kind: TargetKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Events,
    RollupState,
}

/// Every table an insert into `events_in` writes.
pub fn targets() -> Vec<Target> {
    std::iter::once(Target {
        table: "events".to_owned(),
        repair_entry: "repair_events".to_owned(),
        kind: TargetKind::Events,
    })
    .chain(ROLLUPS.iter().map(|r| Target {
        table: rollup_sql::state_table(r.name),
        repair_entry: format!("repair_{}", r.name),
        kind: TargetKind::RollupState,
    }))
    .collect()
}

fn time_type(dialect: &Dialect) -> &'static str {
    if dialect.datetime64 {
        "DateTime64(6, 'UTC')"
    } else {
        "DateTime('UTC')"
    }
}

/// The expression turning microseconds since the epoch into `time_type`.
fn time_expr(dialect: &Dialect, column: &str) -> String {
    if dialect.datetime64 {
        format!("fromUnixTimestamp64Micro({column}, 'UTC')")
    } else {
        format!("toDateTime(intDiv({column}, 1000000), 'UTC')")
    }
}

/// The columns of `events` (name, type), in order.
fn event_columns(dialect: &Dialect) -> Vec<(&'static str, String)> {
    let dim = dialect.dimension_type().to_owned();
    let nullable_dim = if dialect.low_cardinality {
        "LowCardinality(Nullable(String))".to_owned()
    } else {
        "Nullable(String)".to_owned()
    };
    let time = time_type(dialect).to_owned();
    let mut columns = vec![
        ("tenant", dim.clone()),
        ("id", "String".to_owned()),
        ("type", dim),
        ("time", time.clone()),
        ("time_us", "Int64".to_owned()),
        ("ingested_at", time),
        // Exact, as `time_us`: the SQL API reads `ingested_at` from it.
        ("ingested_at_us", "Int64".to_owned()),
    ];
    for (name, ty) in input_columns() {
        let name = name.as_str();
        match name {
            "tenant" | "id" | "type" | "time_us" | "ingested_at_us" | "_marker" => {}
            "provider" | "model" | "method" | "agent" | "status" => {
                columns.push((name, nullable_dim.clone()));
            }
            _ => columns.push((name, (*ty).to_owned())),
        }
    }
    columns
}

fn events_select(dialect: &Dialect, from: &str) -> String {
    let exprs: Vec<String> = event_columns(dialect)
        .into_iter()
        .map(|(name, _)| match name {
            "time" => format!("{} AS time", time_expr(dialect, "time_us")),
            "ingested_at" => format!("{} AS ingested_at", time_expr(dialect, "ingested_at_us")),
            _ => name.to_owned(),
        })
        .collect();
    format!(
        "SELECT {}\nFROM {from}\nWHERE _marker = 0",
        exprs.join(",\n       ")
    )
}

fn input_table(db: &str, name: &str) -> String {
    let columns: Vec<String> = input_columns()
        .iter()
        .map(|(n, t)| format!("    {n} {t}"))
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.{name} (\n{}\n) ENGINE = Null",
        columns.join(",\n")
    )
}

fn events_table(db: &str, dialect: &Dialect, retention_days: Option<u32>) -> String {
    let columns: Vec<String> = event_columns(dialect)
        .into_iter()
        .map(|(n, t)| format!("    {n} {t}"))
        .collect();
    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS {db}.events (\n{}\n) ENGINE = MergeTree\n\
         PARTITION BY toYYYYMM(time)\nORDER BY (tenant, time, id)",
        columns.join(",\n")
    );
    if let (true, Some(days)) = (dialect.ttl, retention_days) {
        let _ = write!(sql, "\nTTL toDateTime(time) + INTERVAL {days} DAY");
    }
    sql
}

fn rollup_view_statements(db: &str, rollup: &Rollup, dialect: &Dialect) -> Vec<String> {
    let state = rollup_sql::state_table(rollup.name);
    vec![
        rollup_sql::state_table_ddl(db, rollup, dialect),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{name}_mv TO {db}.{state} AS\n{select}",
            name = rollup.name,
            select = rollup_sql::aggregate_select(rollup, &format!("{db}.events_in")),
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.repair_{name}_mv TO {db}.{state} AS\n\
             {select}",
            name = rollup.name,
            select = rollup_sql::aggregate_select(rollup, &format!("{db}.repair_{}", rollup.name)),
        ),
        rollup_sql::view_ddl(db, rollup),
    ]
}

/// Every statement creating meterd's tables in database `db`, in order.
pub fn statements(db: &str, dialect: &Dialect, retention_days: Option<u32>) -> Vec<String> {
    let mut sql = vec![
        format!("CREATE DATABASE IF NOT EXISTS {db}"),
        input_table(db, "events_in"),
    ];
    for t in targets() {
        sql.push(input_table(db, &t.repair_entry));
    }
    sql.push(events_table(db, dialect, retention_days));
    sql.push(format!(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.events_mv TO {db}.events AS\n{}",
        events_select(dialect, &format!("{db}.events_in"))
    ));
    sql.push(format!(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.repair_events_mv TO {db}.events AS\n{}",
        events_select(dialect, &format!("{db}.repair_events"))
    ));
    for r in ROLLUPS {
        sql.extend(rollup_view_statements(db, r, dialect));
    }
    sql
}

/// Reads the server's version and creates what is missing. Returns the version.
pub async fn ensure(
    client: &clickhouse::Client,
    config: &ClickHouseConfig,
) -> Result<ServerVersion, ChError> {
    if !super::valid_database_name(&config.database) {
        return Err(ChError::DatabaseName(config.database.clone()));
    }
    let text: String = client
        .query("SELECT version()")
        .fetch_one()
        .await
        .map_err(query_err("reading the server version"))?;
    let version = ServerVersion::parse(&text)?;
    let dialect = version.dialect();
    for statement in statements(&config.database, &dialect, config.retention_days) {
        client
            .query(&statement)
            .execute()
            .await
            .map_err(query_err("creating meterd's tables"))?;
    }
    warn_of_wrapping_rollup_sums(client, &config.database).await?;
    Ok(version)
}

/// Tables are only created when missing, so a database from before exact sums keeps rollup sum
/// states of `UInt64`, which wrap past 2^64. Say so until ClickHouse has versioned migrations.
async fn warn_of_wrapping_rollup_sums(
    client: &clickhouse::Client,
    database: &str,
) -> Result<(), ChError> {
    let types: Vec<String> = client
        .query(
            "SELECT type FROM system.columns \
             WHERE database = ? AND table = 'usage_hourly_state' AND name = 'input_tokens'",
        )
        .bind(database)
        .fetch_all()
        .await
        .map_err(query_err("reading the rollup state types"))?;
    if types.iter().any(|t| t.contains("UInt64")) {
        tracing::warn!(
            database,
            "this ClickHouse database was created before exact rollup sums: its usage_hourly and \
             usage_daily token and time sums stop at 2^63-1 and wrap past 2^64 (events and SQL \
             sums over them are exact)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        let v = ServerVersion::parse("18.16.1\n").expect("parse");
        assert_eq!((v.major, v.minor, v.text.as_str()), (18, 16, "18.16.1"));
        assert_eq!(v.dialect(), Dialect::LEGACY);
        let v = ServerVersion::parse("24.8.4.13").expect("parse");
        assert_eq!(v.dialect(), Dialect::MODERN);
        for bad in ["", "x.y", "24", "24."] {
            assert!(ServerVersion::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn statements_differ_by_dialect_only_where_they_should() {
        let legacy = statements("meterd", &Dialect::LEGACY, Some(30)).join(";\n");
        let modern = statements("meterd", &Dialect::MODERN, Some(30)).join(";\n");
        assert!(!legacy.contains("DateTime64") && !legacy.contains("LowCardinality"));
        assert!(!legacy.contains("TTL"));
        assert!(modern.contains("time DateTime64(6, 'UTC')"));
        assert!(modern.contains("TTL toDateTime(time) + INTERVAL 30 DAY"));
        // The insert tables are the same in both.
        let input = input_table("meterd", "events_in");
        assert!(legacy.contains(&input) && modern.contains(&input));
        // `events` has every input column but the marker, and the derived times.
        let events = events_table("meterd", &Dialect::LEGACY, None);
        for (name, _) in input_columns() {
            let wanted = name != "_marker";
            assert_eq!(events.contains(&format!("    {name} ")), wanted, "{name}");
        }
    }
}

//! meterd's tables in ClickHouse, in the form the server's version supports, and their
//! versioned migrations.
//!
//! A fresh database is created at the current version. A database of an older version is
//! migrated: columns are added to `events` (`ALTER TABLE ... ADD COLUMN`, which ClickHouse does
//! in metadata only), and the insert tables and their views are created again under versioned
//! names (`events_in_v2`, `events_mv_v2`, ...). Views are never dropped and re-created in place:
//! an insert by another node between the drop and the create would be lost for the view's
//! table. The old insert tables keep their views: on current releases a node still running the
//! older build goes on delivering through them (its events get NULL in the new columns); on
//! 18.16, which refuses a view whose table gained a column the view does not select, its
//! inserts fail until it runs the new build, and its log keeps the events meanwhile. Applied
//! versions are recorded in `schema_migrations`; a database from before versions were recorded
//! is version 1.
//!
//! Migrations run under a guard, so two nodes starting at once do not interleave them: a
//! query with a fixed `query_id` that sleeps until it is killed. ClickHouse refuses a second
//! query with the id of a running one (of the same user), which makes it a lock on one server;
//! its `max_execution_time` is a lease, so a node that dies holding it frees it within a minute.
//! A start that finds the database current takes no guard.
//!
//! A table keeps the form it was created in: after a server upgrade meterd goes on writing the
//! old form (the insert table and the views' inputs are the same in both).

use std::fmt::Write as _;
use std::time::Duration;

use meterd_rollups::ROLLUPS;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::block::input_columns;
use crate::rollups::{self as rollup_sql, Dialect};
use crate::{ChError, ClickHouseConfig, query_err};

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

/// One version of meterd's ClickHouse schema. Version 1 is the schema before versions were
/// recorded; each later one adds the columns of `events` it names (from the column table).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub adds_columns: &'static [&'static str],
}

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "base",
        adds_columns: &[],
    },
    Migration {
        version: 2,
        name: "cache_write_input_tokens",
        adds_columns: &["cache_write_input_tokens"],
    },
];

/// The version this build creates and writes.
pub fn current_version() -> u32 {
    MIGRATIONS.last().map_or(1, |m| m.version)
}

/// The insert tables in use: `events_in` and the `repair_*` tables, named with `suffix` (empty
/// for those created with a fresh database, `_v<N>` for those created by migration `N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entries {
    pub suffix: String,
}

impl Entries {
    /// The insert table `base` (`events_in`, `repair_events`, ...) in this set.
    pub fn name(&self, base: &str) -> String {
        format!("{base}{}", self.suffix)
    }
}

/// The insert table columns at `version`: those of the column table not added by a later
/// migration.
fn input_columns_at(version: u32) -> Vec<(String, &'static str)> {
    let later: Vec<&str> = MIGRATIONS
        .iter()
        .filter(|m| m.version > version)
        .flat_map(|m| m.adds_columns.iter().copied())
        .collect();
    input_columns()
        .iter()
        .filter(|(name, _)| !later.contains(&name.as_str()))
        .cloned()
        .collect()
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

/// The columns of `events` (name, type) at `version`, in order.
fn event_columns(dialect: &Dialect, version: u32) -> Vec<(String, String)> {
    let dim = dialect.dimension_type().to_owned();
    let nullable_dim = if dialect.low_cardinality {
        "LowCardinality(Nullable(String))".to_owned()
    } else {
        "Nullable(String)".to_owned()
    };
    let time = time_type(dialect).to_owned();
    let mut columns: Vec<(String, String)> = vec![
        ("tenant".into(), dim.clone()),
        ("id".into(), "String".to_owned()),
        ("type".into(), dim),
        ("time".into(), time.clone()),
        ("time_us".into(), "Int64".to_owned()),
        ("ingested_at".into(), time),
        // Exact, as `time_us`: the SQL API reads `ingested_at` from it.
        ("ingested_at_us".into(), "Int64".to_owned()),
    ];
    for (name, ty) in input_columns_at(version) {
        match name.as_str() {
            "tenant" | "id" | "type" | "time_us" | "ingested_at_us" | "_marker" => {}
            "provider" | "model" | "method" | "agent" | "status" => {
                columns.push((name, nullable_dim.clone()));
            }
            _ => columns.push((name, ty.to_owned())),
        }
    }
    columns
}

fn events_select(dialect: &Dialect, version: u32, from: &str) -> String {
    let exprs: Vec<String> = event_columns(dialect, version)
        .into_iter()
        .map(|(name, _)| match name.as_str() {
            "time" => format!("{} AS time", time_expr(dialect, "time_us")),
            "ingested_at" => format!("{} AS ingested_at", time_expr(dialect, "ingested_at_us")),
            _ => name,
        })
        .collect();
    format!(
        "SELECT {}\nFROM {from}\nWHERE _marker = 0",
        exprs.join(",\n       ")
    )
}

fn input_table(db: &str, name: &str, version: u32) -> String {
    let columns: Vec<String> = input_columns_at(version)
        .iter()
        .map(|(n, t)| format!("    {n} {t}"))
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.{name} (\n{}\n) ENGINE = Null",
        columns.join(",\n")
    )
}

fn events_table(db: &str, dialect: &Dialect, retention_days: Option<u32>, version: u32) -> String {
    let columns: Vec<String> = event_columns(dialect, version)
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

fn migrations_table(db: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (\n    version UInt32,\n    \
         name String,\n    applied_at DateTime DEFAULT now(),\n    applied_by String\n) \
         ENGINE = MergeTree ORDER BY version"
    )
}

/// The insert tables of `entries` at `version` and the views from them into `events` and the
/// rollups' state tables (which must exist).
fn entry_statements(db: &str, dialect: &Dialect, version: u32, entries: &Entries) -> Vec<String> {
    let suffix = &entries.suffix;
    let events_in = entries.name("events_in");
    let mut sql = vec![input_table(db, &events_in, version)];
    for t in targets() {
        sql.push(input_table(db, &entries.name(&t.repair_entry), version));
    }
    sql.push(format!(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.events_mv{suffix} TO {db}.events AS\n{}",
        events_select(dialect, version, &format!("{db}.{events_in}"))
    ));
    sql.push(format!(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.repair_events_mv{suffix} TO {db}.events AS\n{}",
        events_select(dialect, version, &format!("{db}.{}", entries.name("repair_events")))
    ));
    for r in ROLLUPS {
        let name = r.name;
        let state = rollup_sql::state_table(name);
        let repair = entries.name(&format!("repair_{name}"));
        sql.push(format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{name}_mv{suffix} TO {db}.{state} AS\n{}",
            rollup_sql::aggregate_select(r, &format!("{db}.{events_in}")),
        ));
        sql.push(format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.repair_{name}_mv{suffix} TO {db}.{state} AS\n{}",
            rollup_sql::aggregate_select(r, &format!("{db}.{repair}")),
        ));
    }
    sql
}

/// Every statement creating meterd's tables in a fresh database `db` at the current version,
/// in order (the tables a view writes before the view).
pub fn statements(db: &str, dialect: &Dialect, retention_days: Option<u32>) -> Vec<String> {
    statements_at(db, dialect, retention_days, current_version())
}

/// The statements of a fresh database at `version` (tests build older databases with it).
pub fn statements_at(
    db: &str,
    dialect: &Dialect,
    retention_days: Option<u32>,
    version: u32,
) -> Vec<String> {
    let mut sql = vec![
        format!("CREATE DATABASE IF NOT EXISTS {db}"),
        migrations_table(db),
    ];
    sql.push(events_table(db, dialect, retention_days, version));
    for r in ROLLUPS {
        sql.push(rollup_sql::state_table_ddl(db, r, dialect));
    }
    let fresh = Entries {
        suffix: String::new(),
    };
    sql.extend(entry_statements(db, dialect, version, &fresh));
    for r in ROLLUPS {
        sql.push(rollup_sql::view_ddl(db, r));
    }
    sql
}

/// What [`ensure`] found and left: the server's version and the insert tables to write.
#[derive(Debug, Clone)]
pub struct Schema {
    pub server: ServerVersion,
    pub entries: Entries,
    /// The schema version the database was at before, if it had one (`None`: created now).
    pub migrated_from: Option<u32>,
}

/// How long a node holding the migration guard keeps it at most (it frees it when done).
const GUARD_LEASE: Duration = Duration::from_secs(60);
/// How long a node waits for another one's migrations.
const GUARD_WAIT: Duration = Duration::from_secs(600);

/// Reads the server's version, then under the migration guard creates meterd's tables or
/// migrates them to the current version. Returns what to write to.
pub async fn ensure(
    client: &clickhouse::Client,
    config: &ClickHouseConfig,
) -> Result<Schema, ChError> {
    if !crate::valid_database_name(&config.database) {
        return Err(ChError::DatabaseName(config.database.clone()));
    }
    let text: String = client
        .query("SELECT version()")
        .fetch_one()
        .await
        .map_err(query_err("reading the server version"))?;
    let server = ServerVersion::parse(&text)?;
    let db = &config.database;
    // The usual start finds the database current and takes no guard: a node killed while
    // holding it then delays only the next migration, not every start.
    let applied = applied_version(client, db).await?;
    let migrated_from = match applied {
        Some(v) if v >= current_version() => {
            if v > current_version() {
                tracing::warn!(
                    database = %db,
                    version = v,
                    supported = current_version(),
                    "the ClickHouse tables were migrated by a newer meterd; writing the insert \
                     tables of this version"
                );
            }
            Some(v)
        }
        _ => {
            let guard = Guard::acquire(client, db).await?;
            let result = migrate(client, config, &server.dialect(), &guard).await;
            guard.release().await;
            result?
        }
    };
    let entries = current_entries(client, &config.database).await?;
    warn_of_wrapping_rollup_sums(client, &config.database).await?;
    Ok(Schema {
        server,
        entries,
        migrated_from,
    })
}

async fn execute(
    client: &clickhouse::Client,
    sql: &str,
    step: &'static str,
) -> Result<(), ChError> {
    client.query(sql).execute().await.map_err(query_err(step))
}

async fn table_exists(client: &clickhouse::Client, db: &str, table: &str) -> Result<bool, ChError> {
    let n: u64 = client
        .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
        .bind(db)
        .bind(table)
        .fetch_one()
        .await
        .map_err(query_err("reading the catalog"))?;
    Ok(n > 0)
}

/// The newest version recorded in `db`, if any (`None` also for a table left empty by a node
/// that stopped before recording).
async fn applied_version(client: &clickhouse::Client, db: &str) -> Result<Option<u32>, ChError> {
    if !table_exists(client, db, "schema_migrations").await? {
        return Ok(None);
    }
    let max: u32 = client
        .query(&format!(
            "SELECT ifNull(max(version), 0) FROM {db}.schema_migrations"
        ))
        .fetch_one()
        .await
        .map_err(query_err("reading the applied migrations"))?;
    Ok((max > 0).then_some(max))
}

/// Brings database `config.database` to the current version; returns the version it was at.
async fn migrate(
    client: &clickhouse::Client,
    config: &ClickHouseConfig,
    dialect: &Dialect,
    guard: &Guard,
) -> Result<Option<u32>, ChError> {
    let db = &config.database;
    let from = match applied_version(client, db).await? {
        Some(v) => v,
        None if table_exists(client, db, "events").await? => {
            // Set up before versions were recorded: version 1. Its statements are all `IF NOT
            // EXISTS`: they complete a database an older node left half made.
            for sql in statements_at(db, dialect, config.retention_days, 1) {
                execute(client, &sql, "completing meterd's tables").await?;
            }
            guard.still_held().await?;
            record(client, db, &MIGRATIONS[..1]).await?;
            1
        }
        None => {
            for sql in statements(db, dialect, config.retention_days) {
                execute(client, &sql, "creating meterd's tables").await?;
            }
            // A node of an older build may have created `events` first, without the newer
            // columns (its statements are `IF NOT EXISTS` too): add what is missing.
            let existing = events_columns(client, db).await?;
            for sql in upgrade_statements(db, dialect, 1, &existing)?
                .into_iter()
                .filter(|sql| sql.starts_with("ALTER"))
            {
                execute(client, &sql, "completing meterd's tables").await?;
            }
            guard.still_held().await?;
            record(client, db, MIGRATIONS).await?;
            return Ok(None);
        }
    };
    let pending: Vec<Migration> = MIGRATIONS
        .iter()
        .filter(|m| m.version > from)
        .copied()
        .collect();
    if pending.is_empty() {
        return Ok(Some(from));
    }
    let existing = events_columns(client, db).await?;
    for sql in upgrade_statements(db, dialect, from, &existing)? {
        execute(client, &sql, "migrating meterd's tables").await?;
    }
    guard.still_held().await?;
    record(client, db, &pending).await?;
    tracing::info!(
        database = %db,
        from,
        to = current_version(),
        "migrated meterd's ClickHouse tables"
    );
    Ok(Some(from))
}

/// The statements taking database `db` from schema version `from` to the current one, given
/// the columns `events` already has (a column is added only where missing, and after the one
/// it follows in the column table, so the table's order matches a fresh database's).
pub fn upgrade_statements(
    db: &str,
    dialect: &Dialect,
    from: u32,
    existing: &[String],
) -> Result<Vec<String>, ChError> {
    let current = current_version();
    let columns = event_columns(dialect, current);
    let mut sql = Vec::new();
    let mut adds_columns = false;
    for m in MIGRATIONS.iter().filter(|m| m.version > from) {
        for &name in m.adds_columns {
            adds_columns = true;
            if existing.iter().any(|e| e == name) {
                continue;
            }
            let Some(at) = columns.iter().position(|(n, _)| n == name) else {
                return Err(ChError::Block(format!(
                    "migration {} adds {name}, which the column table lacks",
                    m.version
                )));
            };
            let after = at
                .checked_sub(1)
                .map(|i| format!(" AFTER {}", columns[i].0))
                .unwrap_or_default();
            sql.push(format!(
                "ALTER TABLE {db}.events ADD COLUMN {name} {}{after}",
                columns[at].1
            ));
        }
    }
    if adds_columns {
        // New insert tables and views, beside the old ones (see the module's documentation).
        let entries = Entries {
            suffix: format!("_v{current}"),
        };
        sql.extend(entry_statements(db, dialect, current, &entries));
    }
    Ok(sql)
}

/// The columns `events` has.
async fn events_columns(client: &clickhouse::Client, db: &str) -> Result<Vec<String>, ChError> {
    client
        .query("SELECT name FROM system.columns WHERE database = ? AND table = 'events'")
        .bind(db)
        .fetch_all()
        .await
        .map_err(query_err("reading the columns of events"))
}

async fn record(
    client: &clickhouse::Client,
    db: &str,
    migrations: &[Migration],
) -> Result<(), ChError> {
    let applied_by = format!(
        "meterd {} (pid {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    for m in migrations {
        client
            .query(&format!(
                "INSERT INTO {db}.schema_migrations (version, name, applied_by) VALUES (?, ?, ?)"
            ))
            .bind(m.version)
            .bind(m.name)
            .bind(applied_by.as_str())
            .execute()
            .await
            .map_err(query_err("recording a migration"))?;
    }
    Ok(())
}

/// The insert tables to write: those of the newest migration that created some, else the
/// fresh database's.
async fn current_entries(client: &clickhouse::Client, db: &str) -> Result<Entries, ChError> {
    let names: Vec<String> = client
        .query(
            "SELECT name FROM system.tables WHERE database = ? AND startsWith(name, 'events_in_v')",
        )
        .bind(db)
        .fetch_all()
        .await
        .map_err(query_err("reading the catalog"))?;
    // A newer meterd's tables have columns this build does not send: its own are kept.
    let newest = names
        .iter()
        .filter_map(|n| n.strip_prefix("events_in_v")?.parse::<u32>().ok())
        .filter(|&v| v <= current_version())
        .max();
    Ok(Entries {
        suffix: newest.map(|v| format!("_v{v}")).unwrap_or_default(),
    })
}

/// The migration guard: a sleeping query with a fixed id, told apart from another node's by a
/// token in its text. Dropped without [`Guard::release`] (an error, a shutdown), it ends its
/// query from a task of its own, so other nodes need not wait for the lease.
struct Guard {
    client: clickhouse::Client,
    query_id: String,
    token: String,
    released: bool,
    _holder: AbortOnDropHandle<Result<(), clickhouse::error::Error>>,
}

/// ClickHouse's `QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING`: another node holds the guard.
const SAME_ID_RUNNING: &str = "Code: 216";

/// How many times the guard's query may end early (see [`guard_attempt_may_be_retried`])
/// before the failure is reported: a server that is gone is not waited for.
const GUARD_EARLY_ENDS: u32 = 5;

/// ClickHouse's `QUERY_WAS_CANCELLED`.
const CANCELLED: &str = "Code: 394";

/// Whether the guard's query failed for a reason of the moment (the connection, a cancel)
/// rather than one that another attempt would meet again (no right to run it, a readonly
/// profile).
fn guard_attempt_may_be_retried(e: &clickhouse::error::Error) -> bool {
    use clickhouse::error::Error;
    match e {
        Error::Network(_) | Error::TimedOut => true,
        Error::BadResponse(text) => text.contains(CANCELLED),
        _ => false,
    }
}

impl Guard {
    async fn acquire(client: &clickhouse::Client, db: &str) -> Result<Guard, ChError> {
        let query_id = format!("meterd-schema-{db}");
        let give_up = Instant::now() + GUARD_WAIT;
        let mut early_ends = 0;
        loop {
            let token = uuid::Uuid::new_v4().simple().to_string();
            let query = client
                .query(&format!(
                    "SELECT sleep(1) FROM system.numbers WHERE '{token}' != ''"
                ))
                .with_setting("query_id", query_id.clone())
                .with_setting("max_block_size", "1")
                .with_setting("max_execution_time", GUARD_LEASE.as_secs().to_string());
            // Its end (killed, the lease over, or refused) is seen through `is_finished`.
            let mut holder = AbortOnDropHandle::new(tokio::spawn(async move {
                query.fetch_all::<u8>().await.map(drop)
            }));
            let waiting_since = Instant::now();
            loop {
                if Self::holds(client, &query_id, &token).await? {
                    return Ok(Guard {
                        client: client.clone(),
                        query_id,
                        token,
                        released: false,
                        _holder: holder,
                    });
                }
                if holder.is_finished() {
                    match (&mut holder).await {
                        // Refused because another node's query has the id: wait for it.
                        Ok(Err(e)) if e.to_string().contains(SAME_ID_RUNNING) => break,
                        // The connection broke or the query was cancelled before it was
                        // seen running: nothing was held, so try again.
                        Ok(Err(e))
                            if guard_attempt_may_be_retried(&e)
                                && early_ends < GUARD_EARLY_ENDS =>
                        {
                            early_ends += 1;
                            tracing::warn!(%query_id, error = %e, "the migration guard's query ended early; trying again");
                            break;
                        }
                        // Anything else (no right to run it, a readonly profile, the server
                        // gone) is this node's problem, not a wait.
                        Ok(Err(source)) => {
                            return Err(ChError::Query {
                                step: "taking the migration guard",
                                source,
                            });
                        }
                        Ok(Ok(())) | Err(_) => break,
                    }
                }
                if waiting_since.elapsed() > Duration::from_secs(10) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if Instant::now() > give_up {
                return Err(ChError::GuardTimeout {
                    query_id,
                    waited: GUARD_WAIT,
                });
            }
            tracing::info!(%query_id, "another meterd node is migrating the ClickHouse tables; waiting");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Whether the guard's query with `token` is running.
    async fn holds(
        client: &clickhouse::Client,
        query_id: &str,
        token: &str,
    ) -> Result<bool, ChError> {
        let running: u64 = client
            .query(
                "SELECT count() FROM system.processes \
                 WHERE query_id = ? AND position(query, ?) > 0",
            )
            .bind(query_id)
            .bind(token)
            .fetch_one()
            .await
            .map_err(query_err("checking the migration guard"))?;
        Ok(running > 0)
    }

    /// Fails unless this node still holds the guard: its lease may have ended during a slow
    /// migration, letting another node in. Checked before a migration is recorded; the steps
    /// before are idempotent, so the next attempt finishes them.
    async fn still_held(&self) -> Result<(), ChError> {
        if Self::holds(&self.client, &self.query_id, &self.token).await? {
            Ok(())
        } else {
            Err(ChError::GuardLost {
                query_id: self.query_id.clone(),
                lease: GUARD_LEASE,
            })
        }
    }

    fn kill_statement(&self) -> clickhouse::query::Query {
        self.client
            .query("KILL QUERY WHERE query_id = ? AND position(query, ?) > 0 SYNC")
            .bind(self.query_id.as_str())
            .bind(self.token.as_str())
    }

    /// Ends the guard's query. A failure only delays other nodes until the lease ends.
    async fn release(mut self) {
        self.released = true;
        if let Err(e) = self.kill_statement().execute().await {
            tracing::warn!(
                query_id = %self.query_id,
                error = %e,
                "ending the migration guard's query; other nodes wait for its lease to end"
            );
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let kill = self.kill_statement();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = kill.execute().await;
            });
        }
    }
}

/// A database from before exact sums keeps rollup sum states of `UInt64`, which wrap past
/// 2^64: no migration converts aggregate states. Say so.
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
        let input = input_table("meterd", "events_in", current_version());
        assert!(legacy.contains(&input) && modern.contains(&input));
        // `events` has every input column but the marker, and the derived times.
        let events = events_table("meterd", &Dialect::LEGACY, None, current_version());
        for (name, _) in input_columns() {
            let wanted = name != "_marker";
            assert_eq!(events.contains(&format!("    {name} ")), wanted, "{name}");
        }
    }

    /// Version 1 is the schema before `cache_write_input_tokens`; the current one has it, in
    /// every table, and migration 2 names it.
    #[test]
    fn each_version_has_the_columns_of_its_migrations() {
        let v1 = statements_at("meterd", &Dialect::LEGACY, None, 1).join(";\n");
        assert!(!v1.contains("cache_write_input_tokens"));
        assert!(v1.contains("cached_input_tokens"));
        let current = statements("meterd", &Dialect::LEGACY, None);
        let with_column = current
            .iter()
            .filter(|s| s.contains("cache_write_input_tokens"))
            .count();
        // events, events_in, the three repair tables, and the two views into events.
        assert_eq!(with_column, 1 + 1 + targets().len() + 2, "{current:#?}");
        let versions: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert_eq!(versions, (1..=current_version()).collect::<Vec<_>>());
        // Every column a migration adds is in the column table.
        for m in MIGRATIONS {
            for name in m.adds_columns {
                assert!(input_columns().iter().any(|(n, _)| n == name), "{name}");
            }
        }
        let v2 = Entries {
            suffix: "_v2".into(),
        };
        let entries = entry_statements("meterd", &Dialect::LEGACY, 2, &v2).join(";\n");
        assert!(entries.contains("CREATE TABLE IF NOT EXISTS meterd.events_in_v2 ("));
        assert!(entries.contains("meterd.events_mv_v2 TO meterd.events AS"));
        assert!(entries.contains("FROM meterd.repair_usage_daily_v2"));
        assert!(!entries.contains("meterd.events_in\n"));
    }
}

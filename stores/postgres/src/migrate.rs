//! The migration runner: applies `crate::migrations::POSTGRES` in order, each in its own
//! transaction, recorded in `meterd.schema_migrations`, while holding an advisory lock so that
//! meterd processes starting together apply each migration once.

use tokio_postgres::Client;

use crate::migrations::{Flavor, POSTGRES};
use crate::{PgError, PostgresConfig, TimescaleMode, sql_err};

/// The advisory lock key of migrations (`'mtrdmigr'` as bytes).
const MIGRATION_LOCK_KEY: i64 = 0x6d74_7264_6d69_6772;

/// What [`migrate`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub flavor: Flavor,
    /// Versions applied by this call (empty when the schema was current).
    pub applied: Vec<i32>,
    /// The schema version now.
    pub version: i32,
}

fn checksum(sql: &str) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(sql.as_bytes()))
}

/// Brings the `meterd` schema up to date and applies the TimescaleDB policies of `config`.
pub async fn migrate(
    client: &mut Client,
    config: &PostgresConfig,
) -> Result<MigrationReport, PgError> {
    migrate_to(client, config, i32::MAX).await
}

/// Like [`migrate`], but applies migrations up to version `last` only: upgrade tests build the
/// schema an older meterd left.
pub async fn migrate_to(
    client: &mut Client,
    config: &PostgresConfig,
    last: i32,
) -> Result<MigrationReport, PgError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(sql_err("taking the migration lock"))?;
    let result = migrate_locked(client, config, last).await;
    // When the connection itself failed, the lock went with the session.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = result?;
    unlocked.map_err(sql_err("releasing the migration lock"))?;
    Ok(report)
}

async fn migrate_locked(
    client: &mut Client,
    config: &PostgresConfig,
    last: i32,
) -> Result<MigrationReport, PgError> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS meterd;
             CREATE TABLE IF NOT EXISTS meterd.schema_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 flavor text NOT NULL,
                 checksum text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await
        .map_err(sql_err("creating meterd.schema_migrations"))?;
    let rows = client
        .query(
            "SELECT version, name, flavor, checksum FROM meterd.schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(sql_err("reading meterd.schema_migrations"))?;

    let flavor = match rows.first() {
        Some(row) => {
            let recorded: String = row.try_get(2).map_err(sql_err("reading a result column"))?;
            Flavor::parse(&recorded).ok_or(PgError::UnknownFlavor(recorded))?
        }
        None => choose_flavor(client, config.timescaledb).await?,
    };
    if flavor == Flavor::Postgres && config.timescaledb == TimescaleMode::Require {
        return Err(PgError::TimescaleUnavailable(
            "this database's meterd schema was created without TimescaleDB".to_owned(),
        ));
    }

    let known = POSTGRES.last().map_or(0, |m| m.version);
    let mut version = 0;
    for row in &rows {
        let v: i32 = row.try_get(0).map_err(sql_err("reading a result column"))?;
        let applied: String = row.try_get(3).map_err(sql_err("reading a result column"))?;
        let Some(m) = POSTGRES.iter().find(|m| m.version == v) else {
            return Err(PgError::NewerSchema { database: v, known });
        };
        let current = checksum(m.sql(flavor));
        if applied != current {
            return Err(PgError::ChecksumMismatch {
                version: v,
                name: row.try_get(1).map_err(sql_err("reading a result column"))?,
                applied,
                current,
            });
        }
        version = version.max(v);
    }

    let mut applied = Vec::new();
    let recorded = version;
    for m in POSTGRES
        .iter()
        .filter(|m| m.version > recorded && m.version <= last)
    {
        let sql = m.sql(flavor);
        let failed = |source| PgError::Migration {
            version: m.version,
            name: m.name,
            source,
        };
        let tx = client
            .transaction()
            .await
            .map_err(sql_err("starting a migration"))?;
        tx.batch_execute(sql).await.map_err(failed)?;
        tx.execute(
            "INSERT INTO meterd.schema_migrations (version, name, flavor, checksum)
             VALUES ($1, $2, $3, $4)",
            &[&m.version, &m.name, &flavor.as_str(), &checksum(sql)],
        )
        .await
        .map_err(sql_err("recording a migration"))?;
        tx.commit()
            .await
            .map_err(sql_err("committing a migration"))?;
        tracing::info!(
            version = m.version,
            name = m.name,
            flavor = flavor.as_str(),
            "applied migration"
        );
        applied.push(m.version);
        version = m.version;
        if flavor == Flavor::TimescaleDb {
            for statement in m.timescaledb_after {
                client.batch_execute(statement).await.map_err(failed)?;
            }
        }
    }

    if flavor == Flavor::TimescaleDb {
        apply_timescaledb_policies(client, config).await?;
    }
    Ok(MigrationReport {
        flavor,
        applied,
        version,
    })
}

async fn choose_flavor(client: &Client, mode: TimescaleMode) -> Result<Flavor, PgError> {
    if mode == TimescaleMode::Off {
        return Ok(Flavor::Postgres);
    }
    let available: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')",
            &[],
        )
        .await
        .map_err(sql_err("looking for the timescaledb extension"))?
        .try_get(0)
        .map_err(sql_err("reading a result column"))?;
    if !available {
        return match mode {
            TimescaleMode::Require => Err(PgError::TimescaleUnavailable(
                "the extension is not installed on the server".to_owned(),
            )),
            _ => Ok(Flavor::Postgres),
        };
    }
    match client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        .await
    {
        Ok(()) => Ok(Flavor::TimescaleDb),
        Err(e) if mode == TimescaleMode::Auto => {
            tracing::warn!(
                error = %crate::error_chain(&e),
                "TimescaleDB is installed but could not be enabled (is it in \
                 shared_preload_libraries?); using plain PostgreSQL"
            );
            Ok(Flavor::Postgres)
        }
        Err(e) => Err(PgError::TimescaleUnavailable(crate::error_chain(&e))),
    }
}

/// The TimescaleDB policy statements, in the order [`migrate`] runs them; the `ADD_*` ones take
/// the interval as `$1` (text).
pub const REMOVE_COMPRESSION_POLICY: &str =
    "SELECT remove_compression_policy('meterd.events_data', if_exists => true)";
pub const ADD_COMPRESSION_POLICY: &str =
    "SELECT add_compression_policy('meterd.events_data', compress_after => $1::text::interval)";
pub const REMOVE_RETENTION_POLICY: &str =
    "SELECT remove_retention_policy('meterd.events_data', if_exists => true)";
pub const ADD_RETENTION_POLICY: &str =
    "SELECT add_retention_policy('meterd.events_data', drop_after => $1::text::interval)";

/// Replaces the compression and retention policies of `meterd.events_data` with the configured
/// ones (or none).
async fn apply_timescaledb_policies(
    client: &mut Client,
    config: &PostgresConfig,
) -> Result<(), PgError> {
    let tx = client
        .transaction()
        .await
        .map_err(sql_err("starting the policy update"))?;
    tx.execute(REMOVE_COMPRESSION_POLICY, &[])
        .await
        .map_err(sql_err("removing the compression policy"))?;
    if let Some(after) = &config.compress_after {
        tx.execute(ADD_COMPRESSION_POLICY, &[after])
            .await
            .map_err(sql_err(
                "adding the compression policy (postgres.compress_after)",
            ))?;
    }
    tx.execute(REMOVE_RETENTION_POLICY, &[])
        .await
        .map_err(sql_err("removing the retention policy"))?;
    if let Some(retention) = &config.retention {
        tx.execute(ADD_RETENTION_POLICY, &[retention])
            .await
            .map_err(sql_err("adding the retention policy (postgres.retention)"))?;
    }
    tx.commit()
        .await
        .map_err(sql_err("committing the policy update"))
}

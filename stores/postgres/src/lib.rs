//! PostgreSQL (and TimescaleDB) as a store fed from the log.
//!
//! - [`migrate`]: applies the versioned DDL under `stores/postgres/migrations/` under an
//!   advisory lock, choosing TimescaleDB when the extension can be enabled, and sets the
//!   TimescaleDB policies from the configuration.
//! - The sink reads the log from this node's checkpoint and writes batches with binary COPY.
//!   Each batch's COPY and the advance of the node's checkpoint row in
//!   `meterd.sink_checkpoints` commit in one transaction, so a batch is in the table exactly
//!   when the checkpoint covers it: a replay after any failure starts where the committed
//!   checkpoint says and never adds a row twice, without a unique index on the hot path.
//! - Upkeep (plain PostgreSQL): refreshes the rollups, creates partitions ahead and drops them
//!   past retention. TimescaleDB does this itself with its policies.

pub mod billing;
pub mod copy;
pub mod migrate;
pub mod migrations;
pub mod rollups;
mod sink;
pub mod sql;
mod store;
pub mod upkeep;

use std::time::Duration;

pub use crate::migrations::Flavor;
pub use meterd_ingest::sink::SinkStatus;
pub(crate) use meterd_ingest::sink::error_chain;
pub use migrate::{MigrationReport, migrate};
pub use sink::{connect, spawn};
pub use store::PostgresStore;

/// Whether to use TimescaleDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimescaleMode {
    /// Use it when the extension can be enabled, plain PostgreSQL otherwise.
    #[default]
    Auto,
    /// Fail unless the extension can be enabled.
    Require,
    /// Never use it.
    Off,
}

/// Settings of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database` (or key=value form).
    pub url: String,
    pub timescaledb: TimescaleMode,
    /// The most events one COPY transaction carries.
    pub batch_rows: usize,
    /// TimescaleDB: compress chunks older than this interval (`7 days`); `None` disables.
    pub compress_after: Option<String>,
    /// Drop raw events older than this interval (`400 days`); `None` keeps them. Rollups keep
    /// the buckets already materialised for dropped days, as long as no late event reaches a
    /// dropped day (configuration keeps retention at least as long as the accepted event age).
    pub retention: Option<String>,
    /// Plain PostgreSQL: how often the rollup refresher runs.
    pub refresh_interval: Duration,
    /// Plain PostgreSQL: how many days of partitions exist ahead of today.
    pub partitions_ahead_days: u32,
}

impl PostgresConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            timescaledb: TimescaleMode::Auto,
            batch_rows: 10_000,
            compress_after: Some("7 days".to_owned()),
            retention: None,
            refresh_interval: Duration::from_secs(30),
            partitions_ahead_days: 3,
        }
    }
}

/// A failure of the PostgreSQL store. The sink retries all of them with backoff; the log keeps
/// the events meanwhile.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("connecting to PostgreSQL")]
    Connect(#[source] tokio_postgres::Error),
    #[error("PostgreSQL: {step}")]
    Sql {
        step: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("applying migration {version} ({name})")]
    Migration {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "migration {version} ({name}) differs from the one applied to this database \
         (checksum {applied} there, {current} here)"
    )]
    ChecksumMismatch {
        version: i32,
        name: String,
        applied: String,
        current: String,
    },
    #[error(
        "the database's meterd schema is at version {database}; this meterd knows up to {known}"
    )]
    NewerSchema { database: i32, known: i32 },
    #[error(
        "event {id:?} has a value of {field} ({us} µs since 1970) that no timestamp can hold; the log record is damaged"
    )]
    TimeOutOfRange { id: String, field: String, us: i64 },
    #[error(
        "PostgreSQL's checkpoint for this node is {0}, and a log position is never negative; was meterd.sink_checkpoints edited by hand?"
    )]
    NegativeCheckpoint(i64),
    #[error("the database records an unknown schema flavor {0:?}")]
    UnknownFlavor(String),
    #[error("TimescaleDB is required but cannot be used: {0}")]
    TimescaleUnavailable(String),
    #[error(
        "this node's checkpoint in PostgreSQL moved from {expected} behind meterd's back; \
         is a second meterd running with the same data directory?"
    )]
    CheckpointMoved { expected: u64 },
    #[error(
        "PostgreSQL's checkpoint {database} for this node lies beyond the log's end {end}; \
         the data directory does not belong to the node that wrote it"
    )]
    CheckpointAhead { database: u64, end: u64 },
    #[error(transparent)]
    Log(#[from] meterd_ingest::tailer::TailError),
}

pub(crate) fn sql_err(step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |source| PgError::Sql { step, source }
}

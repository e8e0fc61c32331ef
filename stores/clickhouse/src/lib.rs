//! ClickHouse as a store fed from the log.
//!
//! - [`schema`]: reads the server's version and creates meterd's tables in the form it supports
//!   (see [`crate::rollups::Dialect`]): the insert table `events_in` (`Null` engine),
//!   `events` (`MergeTree`, by month, ordered by tenant and time), the rollups' state tables
//!   (`AggregatingMergeTree`) with their finalising views, and the materialized views between.
//! - The sink reads the log from this node's checkpoint in batches (rows, bytes and period
//!   limits) and sends each batch as one `INSERT` of one `Native` block per month.
//!
//! Exactly once, without transactions. A materialized view counts every block it sees, so a
//! batch sent twice would count twice in the rollups even where the raw rows could collapse.
//! meterd therefore never sends a batch whose outcome it does not know:
//!
//! - Before a batch is sent, the sink durably records its log range (`sinks/clickhouse.delivery`),
//!   so after a crash it re-reads exactly that batch, with the same boundaries.
//! - Every row carries the batch's delivery id (`_delivery`), one per month block, and the block
//!   carries one marker row. `events` keeps the id on every event row; each rollup's state table
//!   keeps the marker as a row of its own. One block is one part in each table, written whole or
//!   not at all: a `Native` block cut short is refused by the server (a row-based format cut at
//!   a row boundary would be taken as a complete insert), and one month is one partition.
//! - A batch whose outcome is unknown (an error, a timeout, a crash) is settled: for each table,
//!   meterd reads whether its delivery id is there and sends the block again to just the tables
//!   that lack it, through a `Null` table per target (`repair_<table>`) whose only view writes
//!   there. A server killed between two views' writes, or a view that failed after others had
//!   written, is repaired the same way.

pub mod billing;
pub mod block;
pub mod rollups;
pub mod schema;
mod sink;
pub mod sql;
mod store;

use std::time::Duration;

pub use meterd_ingest::sink::SinkStatus;
pub use sink::{client, spawn};
pub use store::ClickHouseStore;

/// How meterd reaches ClickHouse and batches its inserts.
#[derive(Debug, Clone)]
pub struct ClickHouseConfig {
    /// The HTTP interface, e.g. `http://localhost:8123`.
    pub url: String,
    /// The database meterd creates and writes (`meterd`).
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// An insert is sent once this many events are read...
    pub batch_rows: usize,
    /// ...or this many bytes of log records...
    pub batch_bytes: usize,
    /// ...or once the oldest event of a partial batch has waited this long.
    pub batch_period: Duration,
    /// Days of raw events to keep, by event time; rollups are kept. `None` keeps everything.
    pub retention_days: Option<u32>,
}

impl ClickHouseConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            database: "meterd".to_owned(),
            user: None,
            password: None,
            batch_rows: 100_000,
            batch_bytes: 64 * 1024 * 1024,
            batch_period: Duration::from_secs(1),
            retention_days: None,
        }
    }
}

/// Largest batch: ClickHouse's default `max_insert_block_size`.
pub const MAX_BATCH_ROWS: usize = 1_048_576;

/// Whether `name` can be used unquoted as a ClickHouse database name.
pub fn valid_database_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 64
}

#[derive(Debug, thiserror::Error)]
pub enum ChError {
    #[error("ClickHouse: {step}")]
    Query {
        step: &'static str,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("ClickHouse reports version {0:?}, which meterd cannot read")]
    Version(String),
    #[error("{0:?} is not a usable ClickHouse database name (letters, digits and _)")]
    DatabaseName(String),
    #[error(
        "event {id:?} has a time ({time_us} µs since 1970) that ClickHouse's DateTime cannot hold; the log record is damaged"
    )]
    TimeOutOfRange { id: String, time_us: i64 },
    #[error("building an insert block: {0}")]
    Block(String),
    #[error(
        "{table} holds {found} of the {expected} rows of delivery {delivery:#x}; an insert is \
         written whole or not at all, so something else wrote or deleted these rows"
    )]
    PartialDelivery {
        table: String,
        delivery: u64,
        found: u64,
        expected: u64,
    },
    #[error(
        "delivery {delivery:#x} was sent to {table} again, but {table} still lacks it (is a view \
         missing or changed?)"
    )]
    RepairDidNotLand { table: String, delivery: u64 },
    #[error(
        "the delivery record says a batch was sent from {from} to {end}, but the log's records \
         from {from} end at {found}; the data directory's files do not belong together"
    )]
    RecordMismatch { from: u64, end: u64, found: u64 },
    #[error(
        "the delivery record (checkpoint {checkpoint}) reaches beyond the log ({start} to {end}); \
         the data directory's files do not belong together"
    )]
    RecordOutsideLog {
        checkpoint: u64,
        start: u64,
        end: u64,
    },
    #[error(
        "waited {waited:?} for another meterd node's migration of the ClickHouse tables (query \
         id {query_id}); if no node is migrating, `KILL QUERY WHERE query_id = '{query_id}'`"
    )]
    GuardTimeout { query_id: String, waited: Duration },
    #[error(
        "the migration guard's lease ({lease:?}, query id {query_id}) ended before the migration \
         did; it is tried again"
    )]
    GuardLost { query_id: String, lease: Duration },
    #[error("an earlier insert (query id {query_id}) is still running on the server")]
    StillRunning { query_id: String },
    #[error(transparent)]
    Log(#[from] meterd_ingest::tailer::TailError),
    #[error("a blocking task failed: {0}")]
    ReaderTask(String),
    #[error("the delivery record")]
    Record(#[source] meterd_ingest::Error),
}

pub(crate) fn query_err(step: &'static str) -> impl FnOnce(clickhouse::error::Error) -> ChError {
    move |source| ChError::Query { step, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names() {
        for ok in ["meterd", "meterd_test_1", "_x"] {
            assert!(valid_database_name(ok), "{ok}");
        }
        for bad in ["", "1x", "a-b", "a.b", "a`b", "a b", &"x".repeat(65)] {
            assert!(!valid_database_name(bad), "{bad}");
        }
    }
}

//! What the external stores fed from the log share: this node's identity, per store a copy of
//! its delivery checkpoint, the status a sink reports, and the retry loop sinks run in.
//!
//! PostgreSQL keeps its own checkpoint, in the same transaction as the rows: that is the truth
//! about what was delivered there. ClickHouse has no transactions; its sink keeps the truth
//! here, in a durable delivery record (see [`DeliveryRecord`]). The checkpoint copy under
//! `sinks/<name>.lsn` only tells the log, at startup and before the store is reachable, how much
//! it must keep; it may lag the truth (the log then keeps a little more) but never runs ahead of
//! it, because it is written from the consumer's checkpoint, which a sink advances only after
//! the store confirmed.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::log::Lsn;
use crate::state_file::{self, Durability};

fn state_err(path: &Path, source: std::io::Error) -> Error {
    Error::SinkState {
        path: path.to_owned(),
        source,
    }
}

fn checkpoint_path(data_dir: &Path, sink: &str) -> PathBuf {
    data_dir.join("sinks").join(format!("{sink}.lsn"))
}

/// The checkpoint copy as written: `{"version": 1, "lsn": N}`; before versions, the bare number.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointFile {
    version: u32,
    lsn: Lsn,
}

const CHECKPOINT_VERSION: u32 = 1;

/// The saved checkpoint of `sink`, if any. An unreadable or garbled file (a crash mid-write)
/// counts as none: the log then keeps everything it has, which is always safe. A file of a
/// newer format is an error.
pub fn load_checkpoint(data_dir: &Path, sink: &str) -> Result<Option<Lsn>> {
    let path = checkpoint_path(data_dir, sink);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_err(&path, e)),
    };
    match state_file::json_version(&text) {
        Some(version) if version > CHECKPOINT_VERSION => Err(Error::StateVersion {
            path,
            version,
            supported: CHECKPOINT_VERSION,
        }),
        Some(_) => Ok(serde_json::from_str::<CheckpointFile>(&text)
            .ok()
            .map(|file| file.lsn)),
        // Written before versions: the bare number.
        None => Ok(text.trim().parse().ok()),
    }
}

/// Saves `lsn` as the checkpoint of `sink`. Not synced: a lost update only makes the log keep
/// more.
pub fn save_checkpoint(data_dir: &Path, sink: &str, lsn: Lsn) -> Result<()> {
    let path = checkpoint_path(data_dir, sink);
    let file = CheckpointFile {
        version: CHECKPOINT_VERSION,
        lsn,
    };
    let bytes = serde_json::to_vec(&file).map_err(|e| state_err(&path, e.into()))?;
    state_file::replace(&path, &bytes, Durability::Unsynced).map_err(|e| state_err(&path, e))
}

/// A sink's durable record of its delivery: everything up to `checkpoint` is in the store, and
/// the log records from `checkpoint` up to `in_flight_end` may be, in part or in full. It is
/// written, and synced, before a batch is sent, so after a crash the sink knows exactly which
/// batch to settle, with the same boundaries as when it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub checkpoint: Lsn,
    pub in_flight_end: Lsn,
}

/// The delivery record as written: `{"version": 1, "checkpoint": A, "in_flight_end": B}`;
/// before versions, the two numbers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveryFile {
    version: u32,
    checkpoint: Lsn,
    in_flight_end: Lsn,
}

const DELIVERY_VERSION: u32 = 1;

fn delivery_path(data_dir: &Path, sink: &str) -> PathBuf {
    data_dir.join("sinks").join(format!("{sink}.delivery"))
}

/// The delivery record of `sink`, if one was written. Unlike a checkpoint copy, a garbled
/// record is an error: guessing could send a batch twice.
pub fn load_delivery(data_dir: &Path, sink: &str) -> Result<Option<DeliveryRecord>> {
    let path = delivery_path(data_dir, sink);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_err(&path, e)),
    };
    let garbled = |path: &Path| {
        state_err(
            path,
            std::io::Error::new(
                ErrorKind::InvalidData,
                format!("not a delivery record: {text:?}"),
            ),
        )
    };
    let record = match state_file::json_version(&text) {
        Some(version) if version > DELIVERY_VERSION => {
            return Err(Error::StateVersion {
                path,
                version,
                supported: DELIVERY_VERSION,
            });
        }
        Some(_) => match serde_json::from_str::<DeliveryFile>(&text) {
            Ok(file) => DeliveryRecord {
                checkpoint: file.checkpoint,
                in_flight_end: file.in_flight_end,
            },
            Err(_) => return Err(garbled(&path)),
        },
        // Written before versions: the two numbers.
        None => {
            let mut parts = text.split_whitespace().map(str::parse::<Lsn>);
            match (parts.next(), parts.next(), parts.next()) {
                (Some(Ok(checkpoint)), Some(Ok(in_flight_end)), None) => DeliveryRecord {
                    checkpoint,
                    in_flight_end,
                },
                _ => return Err(garbled(&path)),
            }
        }
    };
    if record.in_flight_end < record.checkpoint {
        return Err(garbled(&path));
    }
    Ok(Some(record))
}

/// Writes the delivery record of `sink` durably.
pub fn save_delivery(data_dir: &Path, sink: &str, record: DeliveryRecord) -> Result<()> {
    let path = delivery_path(data_dir, sink);
    let file = DeliveryFile {
        version: DELIVERY_VERSION,
        checkpoint: record.checkpoint,
        in_flight_end: record.in_flight_end,
    };
    let bytes = serde_json::to_vec(&file).map_err(|e| state_err(&path, e.into()))?;
    state_file::replace(&path, &bytes, Durability::Synced).map_err(|e| state_err(&path, e))
}

/// This node's identity, created (a random UUID) with the data directory and kept in
/// `node_id`. A node's delivery checkpoints are only meaningful for its own log, so a new data
/// directory is a new node.
pub fn node_id(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("node_id");
    match fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => {
            // A bare id; a development build once wrote `{"version": 1, "node_id": ...}`.
            #[derive(Deserialize)]
            struct Wrapped {
                node_id: String,
            }
            return Ok(match serde_json::from_str::<Wrapped>(&text) {
                Ok(wrapped) if text.trim_start().starts_with('{') => wrapped.node_id,
                _ => text.trim().to_owned(),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(state_err(&path, e)),
    }
    let id = uuid::Uuid::new_v4().to_string();
    state_file::replace(&path, id.as_bytes(), Durability::Synced)
        .map_err(|e| state_err(&path, e))?;
    Ok(id)
}

/// What the sink reports about itself, for `/readyz` and the logs.
#[derive(Debug, Default)]
pub struct SinkStatus {
    connected: AtomicBool,
    delivered: AtomicU64,
    last_error: Mutex<Option<String>>,
    refresher_error: Mutex<Option<String>>,
    errors: AtomicU64,
    /// When the last successful rollup refresh started (µs since 1970; 0: none yet).
    rollups_refreshed_at_us: std::sync::atomic::AtomicI64,
}

impl SinkStatus {
    /// Whether the sink holds a working connection.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// The log position up to which events are confirmed by the store.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Acquire)
    }

    pub fn set_delivered(&self, lsn: Lsn) {
        self.delivered.store(lsn, Ordering::Release);
    }

    /// The last failure, until the next success.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The last failure of the plain-PostgreSQL upkeep (rollup refresh, partitions), until its
    /// next success. It does not make meterd unready: ingest and delivery go on.
    pub fn refresher_error(&self) -> Option<String> {
        self.refresher_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_refresher_error(&self, error: Option<String>) {
        *self
            .refresher_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }

    /// When the store's rollups last caught up with what it held (the start of the last
    /// successful refresh), for stores that refresh them: plain PostgreSQL.
    pub fn rollups_refreshed_at_us(&self) -> Option<i64> {
        Some(self.rollups_refreshed_at_us.load(Ordering::Acquire)).filter(|t| *t > 0)
    }

    pub fn set_rollups_refreshed_at_us(&self, at_us: i64) {
        self.rollups_refreshed_at_us.store(at_us, Ordering::Release);
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
        if connected {
            *self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// Failed delivery attempts so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Acquire)
    }

    pub fn set_error(&self, error: String) {
        self.errors.fetch_add(1, Ordering::AcqRel);
        self.connected.store(false, Ordering::Release);
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error);
    }
}

/// A running sink: its status and its tasks.
#[derive(Debug)]
pub struct SinkHandle {
    pub status: Arc<SinkStatus>,
    store: &'static str,
    tasks: Vec<JoinHandle<()>>,
}

impl SinkHandle {
    /// Waits for the tasks to end (after the shutdown token was cancelled). A batch in flight is
    /// abandoned; the sink's own bookkeeping (a rolled-back transaction, a delivery record)
    /// settles it at the next start.
    pub async fn join(self) {
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(store = self.store, error = %e, "a sink task panicked");
            }
        }
    }
}

/// Starts a sink: `deliver` runs under [`retrying`] and reports each failure in the status,
/// which it marks connected once it is delivering; `others` are the store's further tasks.
pub fn spawn_sink<E, F, Fut>(
    store: &'static str,
    shutdown: CancellationToken,
    deliver: F,
    others: Vec<JoinHandle<()>>,
    status: Arc<SinkStatus>,
) -> SinkHandle
where
    E: std::error::Error + Send + 'static,
    F: Fn(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
{
    let reporting = Arc::clone(&status);
    let task = tokio::spawn(retrying(store, "sink", shutdown, move |token| {
        let status = Arc::clone(&reporting);
        let session = deliver(token);
        async move {
            let result = session.await;
            if let Err(e) = &result {
                status.set_error(error_chain(e));
            }
            result
        }
    }));
    let mut tasks = vec![task];
    tasks.extend(others);
    SinkHandle {
        status,
        store,
        tasks,
    }
}

/// Formats an error with its chain of sources, for logs and status.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Runs `session` until it returns `Ok` (it saw the shutdown), retrying errors with
/// exponential backoff (100 ms to 5 s, jittered; started over after a session that ran for a
/// while). `store` and `task` name it in the logs.
pub async fn retrying<E, F, Fut>(
    store: &'static str,
    task: &'static str,
    shutdown: CancellationToken,
    session: F,
) where
    E: std::error::Error,
    F: Fn(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), E>>,
{
    let backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut delays = backoff();
    loop {
        let started = Instant::now();
        // Cancelling drops a batch in flight; the log keeps it, and the sink's own bookkeeping
        // (a rolled-back transaction, a delivery record) settles it at the next start.
        let result = tokio::select! {
            r = session(shutdown.clone()) => r,
            () = shutdown.cancelled() => return,
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(store, task, error = %error_chain(&e), "task failed; retrying")
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            delays = backoff();
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_garbage_reads_as_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load_checkpoint(dir.path(), "postgres").expect("load"), None);
        save_checkpoint(dir.path(), "postgres", 4096).expect("save");
        assert_eq!(
            load_checkpoint(dir.path(), "postgres").expect("load"),
            Some(4096)
        );
        fs::write(checkpoint_path(dir.path(), "postgres"), "").expect("write");
        assert_eq!(load_checkpoint(dir.path(), "postgres").expect("load"), None);
        // Written before versions: the bare number.
        fs::write(checkpoint_path(dir.path(), "postgres"), "77\n").expect("write");
        assert_eq!(
            load_checkpoint(dir.path(), "postgres").expect("load"),
            Some(77)
        );
        fs::write(
            checkpoint_path(dir.path(), "postgres"),
            r#"{"version": 2, "lsn": 5, "a_later_field": true}"#,
        )
        .expect("write");
        let newer = load_checkpoint(dir.path(), "postgres").expect_err("newer");
        assert!(newer.to_string().contains("version 2"), "{newer}");
    }

    #[test]
    fn delivery_records_round_trip_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load_delivery(dir.path(), "clickhouse").expect("load"), None);
        let record = DeliveryRecord {
            checkpoint: 10,
            in_flight_end: 400,
        };
        save_delivery(dir.path(), "clickhouse", record).expect("save");
        assert_eq!(
            load_delivery(dir.path(), "clickhouse").expect("load"),
            Some(record)
        );
        // Written before versions: the two numbers.
        fs::write(delivery_path(dir.path(), "clickhouse"), "10 400\n").expect("write");
        assert_eq!(
            load_delivery(dir.path(), "clickhouse").expect("load"),
            Some(record)
        );
        fs::write(
            delivery_path(dir.path(), "clickhouse"),
            r#"{"version": 9, "checkpoint": 1, "in_flight_end": 2, "a_later_field": 3}"#,
        )
        .expect("write");
        let newer = load_delivery(dir.path(), "clickhouse").expect_err("newer");
        assert!(newer.to_string().contains("version 9"), "{newer}");
        for garbage in [
            "",
            "10",
            "400 10",
            "10 400 7",
            "ten 400",
            r#"{"version": 1, "checkpoint": 400, "in_flight_end": 10}"#,
        ] {
            fs::write(delivery_path(dir.path(), "clickhouse"), garbage).expect("write");
            assert!(
                load_delivery(dir.path(), "clickhouse").is_err(),
                "{garbage:?} was accepted"
            );
        }
    }

    #[test]
    fn node_id_is_stable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = node_id(dir.path()).expect("create");
        assert_eq!(node_id(dir.path()).expect("read"), a);
        assert_eq!(a.len(), 36);
        fs::write(dir.path().join("node_id"), "an-old-id\n").expect("write");
        assert_eq!(node_id(dir.path()).expect("read"), "an-old-id");
        fs::write(
            dir.path().join("node_id"),
            r#"{"version":1,"node_id":"a-wrapped-id"}"#,
        )
        .expect("write");
        assert_eq!(node_id(dir.path()).expect("read"), "a-wrapped-id");
    }
}

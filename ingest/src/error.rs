//! Errors of the ingest path. Each variant names the step that failed.

use std::path::PathBuf;

use crate::log::Lsn;

/// An ingest-side failure (storage, encoding, a stopped component). Request problems are not
/// here: they are answered as 4xx by [`crate::http`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("registering ingest's metrics")]
    Metrics(#[source] prometheus::Error),
    #[error("log I/O on {path}")]
    LogIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("log is corrupt at position {lsn}: {reason}")]
    LogCorrupt { lsn: Lsn, reason: &'static str },
    #[error("log position {requested} was already trimmed (the log starts at {start})")]
    LogTrimmed { requested: Lsn, start: Lsn },
    #[error("a log record of {len} bytes is larger than allowed")]
    RecordTooLarge { len: usize },
    #[error("encoding a log record")]
    Encode(#[source] postcard::Error),
    #[error("decoding the log record at {lsn}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: postcard::Error,
    },
    #[error(
        "the log record at {lsn} is of format version {version}; this build reads up to version {supported}: it was written by a newer meterd"
    )]
    RecordVersion {
        lsn: Lsn,
        version: u8,
        supported: u8,
    },
    #[error(
        "{path} is of format version {version}; this build reads up to version {supported}: it was written by a newer meterd"
    )]
    StateVersion {
        path: PathBuf,
        version: u32,
        supported: u32,
    },
    #[error("dedup index")]
    Index(#[from] fjall::Error),
    #[error("dedup index entry for {key:?} is malformed")]
    IndexEntry { key: String },
    #[error("building Arrow batches")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("writing or reading Parquet")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("embedded store I/O on {path}")]
    StoreIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded store manifest {path}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("sink state file {path}")]
    SinkState {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the log writer has stopped")]
    WriterStopped,
    #[error(
        "the data directory {path} is in use by another meterd ({}); stop it or give this one \
         another --data-dir",
        holder(.pid)
    )]
    DataDirInUse { path: PathBuf, pid: Option<u32> },
    #[error("data directory lock {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The process holding a data directory, as its lock file names it.
fn holder(pid: &Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "process unknown".to_owned(),
    }
}

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! Local state of the external stores fed from the log: this node's identity and, per store, a
//! copy of its delivery checkpoint.
//!
//! The store's own checkpoint (kept in the store, in the same transaction as the rows) is the
//! truth about what was delivered. The copy here only tells the log, at startup and before the
//! store is reachable, how much it must keep; it may lag the truth (the log then keeps a little
//! more) but never runs ahead of it, because it is written from the consumer's checkpoint, which
//! a store advances only after its commit.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::log::Lsn;

fn state_err(path: &Path, source: std::io::Error) -> Error {
    Error::SinkState {
        path: path.to_owned(),
        source,
    }
}

fn checkpoint_path(data_dir: &Path, sink: &str) -> PathBuf {
    data_dir.join("sinks").join(format!("{sink}.lsn"))
}

/// The saved checkpoint of `sink`, if any. An unreadable or garbled file (a crash mid-write)
/// counts as none: the log then keeps everything it has, which is always safe.
pub fn load_checkpoint(data_dir: &Path, sink: &str) -> Result<Option<Lsn>> {
    let path = checkpoint_path(data_dir, sink);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().parse().ok()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(state_err(&path, e)),
    }
}

/// Saves `lsn` as the checkpoint of `sink` (write to a temporary file, then rename).
pub fn save_checkpoint(data_dir: &Path, sink: &str, lsn: Lsn) -> Result<()> {
    let path = checkpoint_path(data_dir, sink);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| state_err(dir, e))?;
    }
    let tmp = path.with_extension("lsn.tmp");
    fs::write(&tmp, lsn.to_string()).map_err(|e| state_err(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| state_err(&path, e))
}

/// This node's identity, created (a random UUID) with the data directory and kept in
/// `node_id`. A node's delivery checkpoints are only meaningful for its own log, so a new data
/// directory is a new node.
pub fn node_id(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("node_id");
    match fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(state_err(&path, e)),
    }
    let id = uuid::Uuid::new_v4().to_string();
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, &id).map_err(|e| state_err(&tmp, e))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| state_err(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| state_err(&path, e))?;
    Ok(id)
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
    }

    #[test]
    fn node_id_is_stable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = node_id(dir.path()).expect("create");
        assert_eq!(node_id(dir.path()).expect("read"), a);
        assert_eq!(a.len(), 36);
    }
}

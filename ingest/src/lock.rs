//! One meterd per data directory: an exclusive lock on `meterd.lock`, held for the life of the
//! process and released by the kernel when it exits, however it exits (`kill -9` included).
//!
//! The dedup index takes a lock of its own, but its error names neither the directory nor the
//! other process; this one does both, before anything else is opened.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const LOCK_FILE: &str = "meterd.lock";

/// The held lock on a data directory; dropping it releases the directory.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock on `dir` (created if missing) and writes this process's id into the lock
    /// file, or fails with [`Error::DataDirInUse`] naming the process that holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = lock_path(dir);
        let io = |source| Error::DataDir {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                // The holder wrote its id when it took the lock; unreadable means unknown.
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(Error::DataDirInUse {
                    path: dir.to_owned(),
                    pid,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// Where the lock of `dir` lives, for messages and tests.
pub fn lock_path(dir: &Path) -> PathBuf {
    dir.join(LOCK_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DataDirLock::acquire(dir.path()).expect("first");
        let err = DataDirLock::acquire(dir.path()).expect_err("second");
        let text = err.to_string();
        assert!(
            text.contains("in use by another meterd")
                && text.contains(&format!("pid {}", std::process::id()))
                && text.contains(&dir.path().display().to_string()),
            "{text}"
        );
        drop(first);
        DataDirLock::acquire(dir.path()).expect("free again once released");
        assert!(lock_path(dir.path()).exists());
    }
}

//! The small files meterd keeps under its data directory beside the log and the dedup index
//! (the Parquet manifest, the sinks' checkpoint copies and delivery records, the node id):
//! each is replaced whole and atomically, and each carries a format version.
//!
//! Each file is a JSON object with a `version` field. A file of a version newer than this
//! build is an error naming both versions; the files written before versions existed (a bare
//! number, two numbers, a bare id) are read as version 0.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

/// Whether a replaced file must survive a power loss once [`replace`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// The new contents and the rename are synced.
    Synced,
    /// A crash may leave the old contents (never a mix of both).
    Unsynced,
}

/// Replaces the file at `path` with `bytes`: written to `<path>.tmp`, then renamed over it, so
/// a reader sees the old contents or the new, never part of them.
pub(crate) fn replace(path: &Path, bytes: &[u8], durability: Durability) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    if durability == Durability::Synced {
        file.sync_all()?;
    }
    drop(file);
    fs::rename(&tmp, path)?;
    if durability == Durability::Synced {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_writes_whole_files_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/state.json");
        for (bytes, durability) in [
            (&b"first"[..], Durability::Synced),
            (&b"second, longer"[..], Durability::Unsynced),
        ] {
            replace(&path, bytes, durability).expect("replace");
            assert_eq!(fs::read(&path).expect("read"), bytes);
        }
        let names: Vec<_> = fs::read_dir(dir.path().join("sub"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }
}

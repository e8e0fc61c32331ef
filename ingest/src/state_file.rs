//! The small files meterd keeps under its data directory beside the log and the dedup index
//! (the Parquet manifest, the sinks' checkpoint copies and delivery records, the node id):
//! each is replaced whole and atomically, and each carries a format version.
//!
//! Each file is a JSON object with a `version` field. A file of a version newer than this
//! build is an error naming both versions; the files written before versions existed (a bare
//! number, two numbers) are read as version 0. The node id stays a bare id: it is an identity,
//! not a format, and an older meterd must read it as the same id.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

/// Whether a replaced file must survive a power loss once [`replace`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// The new contents and the rename are synced.
    Synced,
    /// A process crash leaves the old contents or the new; a power loss may leave the file
    /// empty, so a reader must take an unreadable file as none.
    Unsynced,
}

/// The `version` of a state file written as JSON; `None` for text that is not a JSON object
/// (a file from before versions, or a damaged one). Read leniently, so a newer file with fields
/// this build does not know is still recognised as newer.
pub(crate) fn json_version(text: &str) -> Option<u32> {
    #[derive(serde::Deserialize)]
    struct Versioned {
        version: u32,
    }
    if !text.trim_start().starts_with('{') {
        return None;
    }
    serde_json::from_str::<Versioned>(text)
        .ok()
        .map(|v| v.version)
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

//! Closed invoices: stored once, when their period is closed, as the exact bytes answered then,
//! and answered byte for byte ever after.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::period::Period;

/// Where closed invoices are kept.
#[async_trait]
pub trait ClosedStore: Send + Sync + fmt::Debug {
    /// Every closed invoice of `tenant`, by period, as stored.
    async fn load(&self, tenant: &str) -> Result<BTreeMap<Period, Vec<u8>>, ClosedError>;

    /// Stores `body` as the closed invoice of `tenant` for `period`, unless one is stored
    /// already; answers the one that is stored now (`body`, or the earlier one).
    async fn store(
        &self,
        tenant: &str,
        period: Period,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, ClosedError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ClosedError {
    #[error("closed invoices at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("closed invoices: {0}")]
    Store(String),
}

/// The directory layout's version: `<dir>/v1/<tenant, hex>/<YYYY-MM>.json`. A later layout gets
/// a directory of its own and reads this one.
const LAYOUT: &str = "v1";

/// Closed invoices under the data directory.
#[derive(Debug, Clone)]
pub struct FileClosedStore {
    dir: PathBuf,
    /// One closing at a time, so two requests closing the same period store one invoice.
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl FileClosedStore {
    /// Keeps invoices under `dir` (created when the first is stored).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into().join(LAYOUT),
            lock: Arc::default(),
        }
    }

    /// Tenants are any text; a directory name is their UTF-8 bytes in hex.
    fn tenant_dir(&self, tenant: &str) -> PathBuf {
        let hex: String = tenant.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.join(hex)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClosedError + '_ {
    move |source| ClosedError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_all(dir: &Path) -> Result<BTreeMap<Period, Vec<u8>>, ClosedError> {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(period) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|p| p.parse::<Period>().ok())
        else {
            // Temporary files of an interrupted write, and anything else, are not invoices.
            continue;
        };
        let path = entry.path();
        out.insert(period, std::fs::read(&path).map_err(io(&path))?);
    }
    Ok(out)
}

/// Writes `body` to `path` so that a crash leaves either nothing or all of it.
fn write_durably(path: &Path, body: &[u8]) -> Result<(), ClosedError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(body).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[async_trait]
impl ClosedStore for FileClosedStore {
    async fn load(&self, tenant: &str) -> Result<BTreeMap<Period, Vec<u8>>, ClosedError> {
        let dir = self.tenant_dir(tenant);
        tokio::task::spawn_blocking(move || read_all(&dir))
            .await
            .map_err(|e| ClosedError::Store(e.to_string()))?
    }

    async fn store(
        &self,
        tenant: &str,
        period: Period,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, ClosedError> {
        let _one_at_a_time = self.lock.lock().await;
        let path = self.tenant_dir(tenant).join(format!("{period}.json"));
        tokio::task::spawn_blocking(move || match std::fs::read(&path) {
            Ok(existing) => Ok(existing),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_durably(&path, &body)?;
                Ok(body)
            }
            Err(e) => Err(io(&path)(e)),
        })
        .await
        .map_err(|e| ClosedError::Store(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_invoice_is_stored_once_and_read_back_byte_for_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileClosedStore::new(dir.path());
        let oct: Period = "2026-10".parse().expect("period");
        assert!(store.load("café/ü").await.expect("load").is_empty());
        let first = store
            .store("café/ü", oct, b"{\"total\": \"1.00\"}".to_vec())
            .await
            .expect("store");
        assert_eq!(first, b"{\"total\": \"1.00\"}");
        // A second closing keeps the first invoice.
        let second = store
            .store("café/ü", oct, b"{\"total\": \"2.00\"}".to_vec())
            .await
            .expect("store");
        assert_eq!(second, first);
        // A leftover temporary file of an interrupted write is not an invoice.
        std::fs::write(
            store.tenant_dir("café/ü").join("2026-11.json.tmp"),
            b"partial",
        )
        .expect("write");
        let reopened = FileClosedStore::new(dir.path());
        let all = reopened.load("café/ü").await.expect("load");
        assert_eq!(all.len(), 1);
        assert_eq!(all[&oct], first);
        assert!(reopened.load("other").await.expect("load").is_empty());
    }
}

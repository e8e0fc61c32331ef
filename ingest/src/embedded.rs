//! The embedded store: accepted events as Parquet files partitioned by UTC day, plus an
//! in-memory tail of events accepted but not yet flushed.
//!
//! The manifest (`_manifest.json`, replaced atomically by rename) is the truth about which files
//! belong to the table and up to which log position they hold events. A flush writes new files,
//! fsyncs them, then publishes a manifest that lists them with the new position; a crash before
//! the rename leaves orphan files that the next start deletes, and the log is replayed from the
//! old position, so no event is ever in two files or lost. The tail is cut back in the same
//! critical section that swaps the manifest, so a snapshot sees every event exactly once.
//!
//! Compaction merges small files of one day into one sorted file the same way: write, fsync,
//! swap the manifest; replaced files are deleted only after a grace period so queries that
//! planned on them can finish.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take_record_batch};
use arrow::datatypes::TimestampMicrosecondType;
use meterd_schemas::{EventsSnapshot, events_schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::log::{Consumer, LogShared, Lsn, sync_dir};

const MANIFEST: &str = "_manifest.json";
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Tuning of the embedded store.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedOptions {
    /// Flush the tail once it holds this many rows...
    pub flush_rows: usize,
    /// ...or once its oldest row waited this long.
    pub flush_interval: Duration,
    /// Files with fewer rows than this are compaction candidates.
    pub compact_target_rows: u64,
    /// Compact a day once it has this many candidate files.
    pub compact_min_files: usize,
    /// How long replaced files stay on disk for queries that already planned on them.
    pub delete_grace: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            flush_rows: 200_000,
            flush_interval: Duration::from_secs(5),
            compact_target_rows: 2_000_000,
            compact_min_files: 8,
            delete_grace: Duration::from_secs(300),
        }
    }
}

/// One Parquet file of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the store directory.
    pub path: String,
    /// UTC day number (days since the epoch) of every row in the file.
    pub day: i64,
    pub rows: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    version: u32,
    /// Every event before this log position is in `files`.
    flushed_lsn: Lsn,
    files: Vec<FileEntry>,
}

#[derive(Debug)]
struct TailBatch {
    end: Lsn,
    batch: RecordBatch,
    added: Instant,
}

#[derive(Debug, Default)]
struct State {
    manifest: Manifest,
    tail: Vec<TailBatch>,
    tail_rows: usize,
    doomed: Vec<(Instant, PathBuf)>,
}

/// The embedded Parquet store.
#[derive(Debug)]
pub struct EmbeddedStore {
    dir: PathBuf,
    options: EmbeddedOptions,
    state: Mutex<State>,
    /// Serialises flushes and compactions, the two writers of the manifest.
    maintenance: Mutex<()>,
    consumer: Consumer,
}

impl EmbeddedStore {
    /// Opens the store in `dir`, deletes files no manifest lists (left by a crash) and registers
    /// as a consumer of `log` at its flushed position. The caller replays the log from
    /// [`flushed_lsn`](Self::flushed_lsn) into [`push`](Self::push).
    pub fn open(dir: &Path, log: &LogShared, options: EmbeddedOptions) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| store_io(dir, e))?;
        let path = dir.join(MANIFEST);
        let manifest: Manifest = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Manifest {
                path: path.clone(),
                source: e,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest {
                version: 1,
                ..Manifest::default()
            },
            Err(e) => return Err(store_io(&path, e)),
        };
        remove_orphans(dir, &manifest)?;
        let consumer = log.register("embedded", manifest.flushed_lsn);
        Ok(Self {
            dir: dir.to_owned(),
            options,
            state: Mutex::new(State {
                manifest,
                ..State::default()
            }),
            maintenance: Mutex::new(()),
            consumer,
        })
    }

    /// The log position up to which events are in Parquet files.
    pub fn flushed_lsn(&self) -> Lsn {
        self.lock().manifest.flushed_lsn
    }

    /// Adds accepted events (already durable in the log up to `end`) to the tail.
    pub fn push(&self, end: Lsn, batch: RecordBatch) {
        let mut st = self.lock();
        if end <= st.manifest.flushed_lsn || batch.num_rows() == 0 {
            return;
        }
        st.tail_rows += batch.num_rows();
        st.tail.push(TailBatch {
            end,
            batch,
            added: Instant::now(),
        });
    }

    /// Rows accepted but not yet in Parquet.
    pub fn tail_rows(&self) -> usize {
        self.lock().tail_rows
    }

    /// The files and tail batches that together hold every accepted event once.
    pub fn snapshot(&self) -> EventsSnapshot {
        let st = self.lock();
        EventsSnapshot {
            parquet_files: st
                .manifest
                .files
                .iter()
                .map(|f| self.dir.join(&f.path))
                .collect(),
            batches: st.tail.iter().map(|t| t.batch.clone()).collect(),
        }
    }

    /// The files of the table, as the manifest lists them.
    pub fn files(&self) -> Vec<FileEntry> {
        self.lock().manifest.files.clone()
    }

    /// Whether the tail is due for a flush.
    pub fn flush_due(&self) -> bool {
        let st = self.lock();
        st.tail_rows >= self.options.flush_rows
            || st
                .tail
                .first()
                .is_some_and(|t| t.added.elapsed() >= self.options.flush_interval)
    }

    /// Writes the whole tail to Parquet and publishes it. Returns the rows written.
    pub fn flush(&self) -> Result<usize> {
        let _guard = self
            .maintenance
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (batches, upto) = {
            let st = self.lock();
            let Some(last) = st.tail.last() else {
                return Ok(0);
            };
            (
                st.tail.iter().map(|t| t.batch.clone()).collect::<Vec<_>>(),
                last.end,
            )
        };
        let all = concat_batches(&events_schema(), &batches)?;
        let mut new_files = Vec::new();
        for (day, rows) in split_by_day(&all)? {
            new_files.push(self.write_file(day, &rows)?);
        }
        let rows = all.num_rows();
        let manifest = {
            let st = self.lock();
            let mut m = st.manifest.clone();
            m.flushed_lsn = upto;
            m.files.extend(new_files);
            m
        };
        self.publish(&manifest)?;
        {
            let mut st = self.lock();
            st.manifest = manifest;
            st.tail.retain(|t| t.end > upto);
            st.tail_rows = st.tail.iter().map(|t| t.batch.num_rows()).sum();
        }
        self.consumer.advance(upto);
        Ok(rows)
    }

    /// Merges the small files of each day into one. Returns the number of files replaced.
    pub fn compact(&self) -> Result<usize> {
        let _guard = self
            .maintenance
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let files = self.lock().manifest.files.clone();
        let mut by_day: BTreeMap<i64, Vec<FileEntry>> = BTreeMap::new();
        for f in files
            .into_iter()
            .filter(|f| f.rows < self.options.compact_target_rows)
        {
            by_day.entry(f.day).or_default().push(f);
        }
        let mut replaced = 0;
        for (day, inputs) in by_day {
            if inputs.len() < self.options.compact_min_files {
                continue;
            }
            let mut batches = Vec::new();
            for f in &inputs {
                let path = self.dir.join(&f.path);
                let file = File::open(&path).map_err(|e| store_io(&path, e))?;
                for b in ParquetRecordBatchReaderBuilder::try_new(file)?
                    .with_batch_size(64 * 1024)
                    .build()?
                {
                    batches.push(b?);
                }
            }
            let merged = sort_rows(&concat_batches(&events_schema(), &batches)?)?;
            let out = self.write_file(day, &merged)?;
            let manifest = {
                let st = self.lock();
                let mut m = st.manifest.clone();
                m.files.retain(|f| !inputs.contains(f));
                m.files.push(out);
                m
            };
            self.publish(&manifest)?;
            let mut st = self.lock();
            st.manifest = manifest;
            let when = Instant::now();
            st.doomed
                .extend(inputs.iter().map(|f| (when, self.dir.join(&f.path))));
            replaced += inputs.len();
        }
        Ok(replaced)
    }

    /// Deletes replaced files whose grace period is over.
    pub fn delete_replaced(&self, force: bool) -> Result<usize> {
        let due: Vec<PathBuf> = {
            let mut st = self.lock();
            let grace = self.options.delete_grace;
            let (due, keep): (Vec<_>, Vec<_>) = st
                .doomed
                .drain(..)
                .partition(|(when, _)| force || when.elapsed() >= grace);
            st.doomed = keep;
            due.into_iter().map(|(_, p)| p).collect()
        };
        for p in &due {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(store_io(p, e)),
            }
        }
        Ok(due.len())
    }

    fn write_file(&self, day: i64, rows: &RecordBatch) -> Result<FileEntry> {
        let day_dir = format!("day={}", day_label(day));
        let dir = self.dir.join(&day_dir);
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(|e| store_io(&dir, e))?;
            sync_dir(&self.dir)?;
        }
        let name = format!("part-{}.parquet", uuid::Uuid::new_v4().simple());
        let path = dir.join(&name);
        let file = File::create(&path).map_err(|e| store_io(&path, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(128 * 1024))
            .build();
        let mut writer = ArrowWriter::try_new(file, events_schema(), Some(props))?;
        writer.write(rows)?;
        let file = writer.into_inner()?;
        file.sync_all().map_err(|e| store_io(&path, e))?;
        let bytes = file.metadata().map_err(|e| store_io(&path, e))?.len();
        sync_dir(&dir)?;
        Ok(FileEntry {
            path: format!("{day_dir}/{name}"),
            day,
            rows: rows.num_rows() as u64,
            bytes,
        })
    }

    fn publish(&self, manifest: &Manifest) -> Result<()> {
        let path = self.dir.join(MANIFEST);
        let tmp = self.dir.join(format!("{MANIFEST}.tmp"));
        let bytes = serde_json::to_vec(manifest).map_err(|e| Error::Manifest {
            path: path.clone(),
            source: e,
        })?;
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()
        };
        write().map_err(|e| store_io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| store_io(&path, e))?;
        sync_dir(&self.dir)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves State consistent before it can panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn store_io(path: &Path, source: std::io::Error) -> Error {
    Error::StoreIo {
        path: path.to_owned(),
        source,
    }
}

/// `YYYY-MM-DD` of a UTC day number.
fn day_label(day: i64) -> String {
    chrono::DateTime::from_timestamp(day * 86_400, 0)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| format!("{day}"))
}

/// Splits rows by the UTC day of `time`, each part sorted by tenant and time.
fn split_by_day(batch: &RecordBatch) -> Result<Vec<(i64, RecordBatch)>> {
    let time = time_column(batch)?;
    let mut days: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for (i, t) in time.values().iter().enumerate() {
        days.entry(t.div_euclid(MICROS_PER_DAY))
            .or_default()
            .push(i as u32);
    }
    let mut out = Vec::with_capacity(days.len());
    for (day, idx) in days {
        let part = take_record_batch(batch, &arrow::array::UInt32Array::from(idx))?;
        out.push((day, sort_rows(&part)?));
    }
    Ok(out)
}

/// Sorts by (tenant, time) so row-group statistics prune well on the usual filters.
fn sort_rows(batch: &RecordBatch) -> Result<RecordBatch> {
    let col = |name: &str| -> Result<Arc<dyn Array>> {
        batch.column_by_name(name).cloned().ok_or_else(|| {
            Error::Arrow(arrow::error::ArrowError::SchemaError(format!(
                "events batch lacks column {name}"
            )))
        })
    };
    let indices = lexsort_to_indices(
        &[
            SortColumn {
                values: col("tenant")?,
                options: None,
            },
            SortColumn {
                values: col("time")?,
                options: None,
            },
        ],
        None,
    )?;
    Ok(take_record_batch(batch, &indices)?)
}

fn time_column(
    batch: &RecordBatch,
) -> Result<&arrow::array::PrimitiveArray<TimestampMicrosecondType>> {
    batch
        .column_by_name("time")
        .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
        .ok_or_else(|| {
            Error::Arrow(arrow::error::ArrowError::SchemaError(
                "events batch lacks a time column".into(),
            ))
        })
}

/// Deletes Parquet files and temporary manifests no manifest lists: leftovers of a crash
/// between writing a file and publishing it, or of a delete that did not happen.
fn remove_orphans(dir: &Path, manifest: &Manifest) -> Result<()> {
    let listed: std::collections::HashSet<PathBuf> =
        manifest.files.iter().map(|f| dir.join(&f.path)).collect();
    for entry in fs::read_dir(dir).map_err(|e| store_io(dir, e))? {
        let entry = entry.map_err(|e| store_io(dir, e))?;
        let path = entry.path();
        if path.is_dir() {
            for file in fs::read_dir(&path).map_err(|e| store_io(&path, e))? {
                let file = file.map_err(|e| store_io(&path, e))?.path();
                if file.extension().is_some_and(|e| e == "parquet") && !listed.contains(&file) {
                    fs::remove_file(&file).map_err(|e| store_io(&file, e))?;
                    tracing::info!(path = %file.display(), "removed orphan parquet file");
                }
            }
        } else if path
            .file_name()
            .is_some_and(|n| n == format!("{MANIFEST}.tmp").as_str())
        {
            fs::remove_file(&path).map_err(|e| store_io(&path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap as Map;

    use meterd_schemas::{ApiRequest, Event, EventData, EventsBatchBuilder, StoredEvent};

    use super::*;
    use crate::log::{LogOptions, LogWriter};

    fn batch(ids: std::ops::Range<u32>, day: i64) -> RecordBatch {
        let mut b = EventsBatchBuilder::new();
        for i in ids {
            let e = StoredEvent {
                ingested_at_us: 0,
                event: Event {
                    tenant: format!("t{}", i % 3),
                    id: format!("e{i}"),
                    time_us: day * MICROS_PER_DAY + i64::from(i) * 1000,
                    subject: None,
                    source: None,
                    dimensions: Map::new(),
                    data: EventData::ApiRequest(ApiRequest {
                        route: None,
                        method: None,
                        status_code: 200,
                        latency_ms: 1,
                        request_bytes: None,
                        response_bytes: None,
                    }),
                },
            };
            b.append(&e).expect("append");
        }
        b.finish().expect("finish")
    }

    fn rows_in(snapshot: &EventsSnapshot) -> usize {
        let mut n: usize = snapshot.batches.iter().map(RecordBatch::num_rows).sum();
        for p in &snapshot.parquet_files {
            let f = File::open(p).expect("open parquet");
            n += ParquetRecordBatchReaderBuilder::try_new(f)
                .expect("reader")
                .metadata()
                .file_metadata()
                .num_rows() as usize;
        }
        n
    }

    #[test]
    fn flush_moves_the_tail_into_day_files_exactly_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_w, log, _) =
            LogWriter::open(&dir.path().join("log"), LogOptions::default()).expect("log");
        let store =
            EmbeddedStore::open(&dir.path().join("events"), &log, EmbeddedOptions::default())
                .expect("open");
        store.push(10, batch(0..100, 20_000));
        store.push(20, batch(100..150, 20_001));
        assert_eq!(rows_in(&store.snapshot()), 150);
        assert_eq!(store.flush().expect("flush"), 150);
        let snap = store.snapshot();
        assert!(snap.batches.is_empty());
        assert_eq!(snap.parquet_files.len(), 2, "one file per UTC day");
        assert_eq!(rows_in(&snap), 150);
        assert_eq!(store.flushed_lsn(), 20);
        // A replayed push below the flushed position is ignored.
        store.push(20, batch(100..150, 20_001));
        assert_eq!(rows_in(&store.snapshot()), 150);
        drop(store);
        let store =
            EmbeddedStore::open(&dir.path().join("events"), &log, EmbeddedOptions::default())
                .expect("reopen");
        assert_eq!(store.flushed_lsn(), 20);
        assert_eq!(rows_in(&store.snapshot()), 150);
    }

    #[test]
    fn orphans_from_a_crashed_flush_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_w, log, _) =
            LogWriter::open(&dir.path().join("log"), LogOptions::default()).expect("log");
        let events = dir.path().join("events");
        let store = EmbeddedStore::open(&events, &log, EmbeddedOptions::default()).expect("open");
        store.push(10, batch(0..10, 20_000));
        store.flush().expect("flush");
        // A file written but never published.
        let orphan = store
            .write_file(20_000, &batch(10..20, 20_000))
            .expect("write");
        drop(store);
        let store = EmbeddedStore::open(&events, &log, EmbeddedOptions::default()).expect("reopen");
        assert!(!events.join(&orphan.path).exists());
        assert_eq!(rows_in(&store.snapshot()), 10);
    }

    #[test]
    fn compaction_merges_small_files_and_keeps_every_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_w, log, _) =
            LogWriter::open(&dir.path().join("log"), LogOptions::default()).expect("log");
        let opts = EmbeddedOptions {
            compact_min_files: 3,
            ..EmbeddedOptions::default()
        };
        let store = EmbeddedStore::open(&dir.path().join("events"), &log, opts).expect("open");
        for i in 0..4u32 {
            store.push(u64::from(i) + 1, batch(i * 10..i * 10 + 10, 20_000));
            store.flush().expect("flush");
        }
        assert_eq!(store.files().len(), 4);
        assert_eq!(store.compact().expect("compact"), 4);
        assert_eq!(store.files().len(), 1);
        assert_eq!(rows_in(&store.snapshot()), 40);
        assert_eq!(store.delete_replaced(true).expect("delete"), 4);
        let f = File::open(&store.snapshot().parquet_files[0]).expect("open");
        let merged: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(f)
            .expect("reader")
            .build()
            .expect("build")
            .map(|b| b.expect("batch"))
            .collect();
        let merged = concat_batches(&events_schema(), &merged).expect("concat");
        let tenants: Vec<_> = merged
            .column_by_name("tenant")
            .expect("tenant")
            .as_string::<i32>()
            .iter()
            .flatten()
            .collect();
        let mut sorted = tenants.clone();
        sorted.sort_unstable();
        assert_eq!(tenants, sorted, "compacted files are sorted by tenant");
    }
}

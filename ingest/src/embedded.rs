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
//! swap the manifest. A replaced file is deleted as soon as no running query can still read it
//! (see [`Epoch`]), so outside readers of the folder (DuckDB, pandas, polars) see exactly the
//! table's files whenever no query is running, and always after a graceful stop.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take_record_batch};
use arrow::datatypes::TimestampMicrosecondType;
use meterd_schemas::{EventsSnapshot, SnapshotPin, events_schema};
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
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            flush_rows: 200_000,
            flush_interval: Duration::from_secs(5),
            compact_target_rows: 2_000_000,
            compact_min_files: 8,
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

/// The manifest's format version. Version 1 is the only one so far; a newer manifest is an
/// error, never read as this one.
const MANIFEST_VERSION: u32 = 1;

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
    /// The end of the last batch pushed (0: none since opening).
    pushed_end: Lsn,
    /// The epoch snapshots taken now belong to.
    epoch: Arc<Epoch>,
}

/// A span of time between two compactions, for deciding when a replaced file may go.
///
/// A snapshot taken in an epoch may list any file that was part of the table then. A compaction
/// hands the files it replaced to the current epoch and starts a new one; the old epoch deletes
/// them when it is dropped, that is when the store has moved on and no query holds a pin on it
/// (queries pin before planning and release after their last batch, see
/// [`EmbeddedStore::pin`]). An epoch also keeps the next one alive, so a query pinned in an
/// older epoch keeps every file replaced later too: each was listed in that query's snapshots
/// or in later ones it may still take.
///
/// This is meterd's own and written by hand: it is what ties a file's deletion to the queries
/// of this store, which no generic crate knows about.
#[derive(Debug, Default)]
struct Epoch {
    /// Files replaced during this epoch, deleted when it ends.
    retired: Mutex<Vec<PathBuf>>,
    /// The epoch after this one, kept alive by this one.
    next: OnceLock<Arc<Epoch>>,
}

impl Drop for Epoch {
    fn drop(&mut self) {
        let retired = std::mem::take(
            self.retired
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for path in retired {
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::debug!(path = %path.display(), "deleted a replaced parquet file")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Nothing can be returned from here; the next start removes the file as an
                // orphan (no manifest lists it).
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "could not delete a replaced parquet file; it is removed at the next start"
                ),
            }
        }
    }
}

/// The embedded Parquet store.
#[derive(Debug)]
pub struct EmbeddedStore {
    dir: PathBuf,
    options: EmbeddedOptions,
    state: Mutex<State>,
    /// Held by a flush from start to end.
    flushing: Mutex<()>,
    /// Held by a compaction from start to end.
    compacting: Mutex<()>,
    /// Held while the manifest is changed and published, so a flush and a compaction never
    /// publish over each other.
    publishing: Mutex<()>,
    consumer: Consumer,
}

impl EmbeddedStore {
    /// Opens the store in `dir`, deletes files no manifest lists (left by a crash) and registers
    /// as a consumer of `log` at its flushed position. The caller replays the log from
    /// [`flushed_lsn`](Self::flushed_lsn) into [`push`](Self::push).
    pub fn open(dir: &Path, log: &LogShared, options: EmbeddedOptions) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| store_io(dir, e))?;
        // Snapshots hand out absolute paths (DataFusion's file scan takes nothing else), and a
        // relative data directory such as the default `./meterd-data` is the common case.
        let dir = &std::path::absolute(dir).map_err(|e| store_io(dir, e))?;
        let path = dir.join(MANIFEST);
        let manifest: Manifest = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Manifest {
                path: path.clone(),
                source: e,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest {
                version: MANIFEST_VERSION,
                ..Manifest::default()
            },
            Err(e) => return Err(store_io(&path, e)),
        };
        if manifest.version > MANIFEST_VERSION {
            return Err(Error::StateVersion {
                path,
                version: manifest.version,
                supported: MANIFEST_VERSION,
            });
        }
        remove_orphans(dir, &manifest)?;
        let consumer = log.register("embedded", manifest.flushed_lsn);
        Ok(Self {
            dir: dir.to_owned(),
            options,
            state: Mutex::new(State {
                manifest,
                ..State::default()
            }),
            flushing: Mutex::new(()),
            compacting: Mutex::new(()),
            publishing: Mutex::new(()),
            consumer,
        })
    }

    /// The log position up to which events are in Parquet files.
    pub fn flushed_lsn(&self) -> Lsn {
        self.lock().manifest.flushed_lsn
    }

    /// The log position up to which every accepted event is visible to queries (in a Parquet
    /// file or in the tail): a snapshot taken after reading it holds them all.
    pub fn visible_lsn(&self) -> Lsn {
        let st = self.lock();
        st.pushed_end.max(st.manifest.flushed_lsn)
    }

    /// Adds accepted events (already durable in the log up to `end`) to the tail.
    pub fn push(&self, end: Lsn, batch: RecordBatch) {
        let mut st = self.lock();
        st.pushed_end = st.pushed_end.max(end);
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

    /// The directory the files of [`EmbeddedStore::snapshot`] lie under.
    pub fn dir(&self) -> &Path {
        &self.dir
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

    /// Keeps every file of the snapshots taken from now on (until the pin is dropped) on disk,
    /// even if a compaction replaces it meanwhile. A query holds one from before it plans until
    /// its last batch is read.
    pub fn pin(&self) -> SnapshotPin {
        Arc::clone(&self.lock().epoch) as SnapshotPin
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
        // One flush at a time; a compaction meanwhile only waits for the short publish below.
        let _flushing = self.flushing.lock().unwrap_or_else(PoisonError::into_inner);
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
        let _publishing = self
            .publishing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
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
        // One compaction at a time. It reads, merges and writes without holding up flushes,
        // and publishes under the short publishing lock.
        let _compacting = self
            .compacting
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
            // Files keep the schema they were written with: a column added since reads as NULL.
            let batches = batches
                .iter()
                .map(to_events_schema)
                .collect::<Result<Vec<_>>>()?;
            let merged = sort_rows(&concat_batches(&events_schema(), &batches)?)?;
            let out = self.write_file(day, &merged)?;
            let _publishing = self
                .publishing
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let manifest = {
                let st = self.lock();
                // Only compactions remove files, and they run one at a time: the inputs are
                // still listed.
                let mut m = st.manifest.clone();
                m.files.retain(|f| !inputs.contains(f));
                m.files.push(out);
                m
            };
            self.publish(&manifest)?;
            let ended = {
                let mut st = self.lock();
                st.manifest = manifest;
                let next = Arc::new(Epoch::default());
                let ended = std::mem::replace(&mut st.epoch, Arc::clone(&next));
                ended
                    .retired
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(inputs.iter().map(|f| self.dir.join(&f.path)));
                // Set once, right here: only the current epoch is ever ended.
                let _ = ended.next.set(next);
                ended
            };
            // Outside the lock: with no query pinned, this deletes the replaced files now.
            drop(ended);
            replaced += inputs.len();
        }
        Ok(replaced)
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
        let bytes = serde_json::to_vec(manifest).map_err(|e| Error::Manifest {
            path: path.clone(),
            source: e,
        })?;
        crate::state_file::replace(&path, &bytes, crate::state_file::Durability::Synced)
            .map_err(|e| store_io(&path, e))
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

/// `batch`, read from a file written with an older schema of `events`, in today's: its columns
/// by name, each column it lacks as NULLs (a column added since).
fn to_events_schema(batch: &RecordBatch) -> Result<RecordBatch> {
    let schema = events_schema();
    if batch.schema() == schema {
        return Ok(batch.clone());
    }
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(column) => Ok(Arc::clone(column)),
            None if field.is_nullable() => Ok(arrow::array::new_null_array(
                field.data_type(),
                batch.num_rows(),
            )),
            None => Err(arrow::error::ArrowError::SchemaError(format!(
                "an events file lacks the required column {}",
                field.name()
            ))),
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema, columns)?)
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

    fn parquet_files_on_disk(dir: &Path) -> usize {
        fs::read_dir(dir)
            .expect("store dir")
            .flatten()
            .filter(|e| e.path().is_dir())
            .flat_map(|d| fs::read_dir(d.path()).expect("day dir").flatten())
            .filter(|f| f.path().extension().is_some_and(|e| e == "parquet"))
            .count()
    }

    #[test]
    fn replaced_files_stay_while_a_query_pinned_before_the_compaction_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_w, log, _) =
            LogWriter::open(&dir.path().join("log"), LogOptions::default()).expect("log");
        let opts = EmbeddedOptions {
            compact_min_files: 2,
            ..EmbeddedOptions::default()
        };
        let events = dir.path().join("events");
        let store = EmbeddedStore::open(&events, &log, opts).expect("open");
        for i in 0..2u32 {
            store.push(u64::from(i) + 1, batch(i * 10..i * 10 + 10, 20_000));
            store.flush().expect("flush");
        }
        let old_query = store.pin();
        let old_snapshot = store.snapshot();
        assert_eq!(store.compact().expect("compact"), 2);
        // Pinned in the next epoch, released before the older pin.
        let newer_query = store.pin();
        for i in 2..4u32 {
            store.push(u64::from(i) + 1, batch(i * 10..i * 10 + 10, 20_000));
            store.flush().expect("flush");
        }
        assert_eq!(store.compact().expect("compact"), 3);
        assert_eq!(rows_in(&old_snapshot), 20, "the old snapshot still reads");
        assert_eq!(parquet_files_on_disk(&events), 6);
        drop(newer_query);
        assert_eq!(
            parquet_files_on_disk(&events),
            6,
            "the older query may still take snapshots listing any of them"
        );
        drop(old_query);
        assert_eq!(parquet_files_on_disk(&events), 1);
        assert_eq!(rows_in(&store.snapshot()), 40);
    }

    #[test]
    fn a_relative_directory_gives_absolute_snapshot_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_w, log, _) =
            LogWriter::open(&dir.path().join("log"), LogOptions::default()).expect("log");
        let cwd = std::env::current_dir().expect("cwd");
        let relative = pathdiff(&dir.path().join("events"), &cwd);
        assert!(relative.is_relative());
        let store = EmbeddedStore::open(&relative, &log, EmbeddedOptions::default()).expect("open");
        store.push(10, batch(0..10, 20_000));
        store.flush().expect("flush");
        let snap = store.snapshot();
        assert_eq!(snap.parquet_files.len(), 1);
        assert!(
            snap.parquet_files[0].is_absolute(),
            "{:?}",
            snap.parquet_files
        );
    }

    /// `target` relative to `base`, with `..` as needed (both absolute).
    fn pathdiff(target: &Path, base: &Path) -> PathBuf {
        let t: Vec<_> = target.components().collect();
        let b: Vec<_> = base.components().collect();
        let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
        let mut out = PathBuf::new();
        for _ in common..b.len() {
            out.push("..");
        }
        for c in &t[common..] {
            out.push(c);
        }
        out
    }

    /// A file written before a column was added reads with the column as NULLs.
    #[test]
    fn batches_of_an_older_schema_gain_the_new_columns_as_nulls() {
        let full = batch(0..3, 20_000);
        let schema = full.schema();
        let last = schema.fields().len() - 1;
        let older = full
            .project(&(0..last).collect::<Vec<_>>())
            .expect("project");
        let adapted = to_events_schema(&older).expect("adapt");
        assert_eq!(adapted.schema(), events_schema());
        assert_eq!(adapted.column(last).null_count(), 3);
        assert_eq!(adapted.column(0), full.column(0));
    }

    /// A compaction holds the store only while it publishes: a flush during the reading,
    /// merging and writing of a compaction goes ahead.
    #[test]
    fn a_running_compaction_does_not_hold_up_a_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_w, log, _) =
            LogWriter::open(&dir.path().join("log"), LogOptions::default()).expect("log");
        let store = Arc::new(
            EmbeddedStore::open(&dir.path().join("events"), &log, EmbeddedOptions::default())
                .expect("open"),
        );
        store.push(10, batch(0..100, 20_000));
        // A compaction in the middle of its work.
        let compacting = store.compacting.lock().expect("compaction lock");
        let flusher = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || store.flush())
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !flusher.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the flush waited for the compaction"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(compacting);
        assert_eq!(flusher.join().expect("flush thread").expect("flush"), 100);
        assert_eq!(store.flushed_lsn(), 10);
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
        // No query held a pin: the replaced files are gone at once.
        assert_eq!(
            parquet_files_on_disk(&dir.path().join("events")),
            1,
            "the folder holds exactly the table's files"
        );
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

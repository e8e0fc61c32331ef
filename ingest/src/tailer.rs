//! The log reader every sink uses: it cuts the log into batches by rows, bytes and age, reads
//! (and prepares) the next batch while the sink delivers the current one, and once it has
//! caught up waits for the log's durable end to move instead of polling.

use std::sync::Arc;
use std::time::Duration;

use meterd_schemas::StoredEvent;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::log::{LogReader, LogShared, Lsn};

/// How a tailer cuts batches. A batch ends after the record that reaches `rows` events or
/// `bytes` payload bytes (whole records: at least one), or when its first event has waited
/// `age` and the log has nothing more.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub rows: usize,
    pub bytes: usize,
    pub age: Duration,
}

/// Events read from the log, from `start` up to `end` (whole records), with what the sink
/// prepared from them on the reading task (ClickHouse builds its insert blocks there).
#[derive(Debug)]
pub struct Batch<T> {
    pub start: Lsn,
    pub end: Lsn,
    pub events: Vec<StoredEvent>,
    /// Payload bytes of the batch's records.
    pub bytes: usize,
    pub prepared: T,
}

/// A failure of the tailer itself.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("reading the log")]
    Log(#[source] crate::Error),
    #[error("the log reader task failed: {0}")]
    Task(String),
}

type Prepare<T, E> = dyn Fn(Lsn, &[StoredEvent]) -> Result<T, E> + Send + Sync;
type Read<T, E> = AbortOnDropHandle<Result<(LogReader, Option<Batch<T>>), E>>;

/// Reads the log from a position on, batch after batch. Dropping it abandons a read in
/// progress.
pub struct Tailer<T, E> {
    log: Arc<LogShared>,
    limits: Limits,
    prepare: Arc<Prepare<T, E>>,
    /// Marked seen before every read, so a move during or after the read wakes [`Self::more`].
    durable: watch::Receiver<Lsn>,
    /// Where the next batch starts.
    position: Lsn,
    /// The reader, while no read is running.
    reader: Option<LogReader>,
    /// The read of the batch at `position`, started ahead.
    pending: Option<Read<T, E>>,
}

impl<T, E> std::fmt::Debug for Tailer<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tailer")
            .field("limits", &self.limits)
            .field("position", &self.position)
            .field("reading", &self.pending.is_some())
            .finish_non_exhaustive()
    }
}

impl<T, E> Tailer<T, E>
where
    T: Send + 'static,
    E: From<TailError> + Send + 'static,
{
    /// A tailer reading from `from`; `prepare` runs on the reading task for each batch.
    pub fn new(
        log: Arc<LogShared>,
        from: Lsn,
        limits: Limits,
        prepare: impl Fn(Lsn, &[StoredEvent]) -> Result<T, E> + Send + Sync + 'static,
    ) -> Self {
        let durable = log.watch_durable_end();
        Self {
            log,
            limits,
            prepare: Arc::new(prepare),
            durable,
            position: from,
            reader: None,
            pending: None,
        }
    }

    /// The next batch from the tailer's position, or `None` when the log holds nothing past
    /// it. Before a batch is returned, the read of the one after it starts: the tailer's
    /// position moves to the batch's end, which is where the sink's checkpoint goes once the
    /// store confirmed it.
    pub async fn next(&mut self) -> Result<Option<Batch<T>>, E> {
        let read = match self.pending.take() {
            Some(read) => read,
            None => self.start_read(),
        };
        let (reader, batch) = read.await.map_err(|e| TailError::Task(e.to_string()))??;
        self.reader = Some(reader);
        if let Some(batch) = &batch {
            self.position = batch.end;
            self.pending = Some(self.start_read());
        }
        Ok(batch)
    }

    /// Waits until the log's durable end moves after the last read began. Returns at once if it
    /// already has; never returns if the log's writer is gone.
    pub async fn more(&mut self) {
        if self.durable.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    fn start_read(&mut self) -> Read<T, E> {
        self.durable.borrow_and_update();
        let log = Arc::clone(&self.log);
        let reader = self.reader.take();
        let (from, limits) = (self.position, self.limits);
        let prepare = Arc::clone(&self.prepare);
        let durable = self.durable.clone();
        AbortOnDropHandle::new(tokio::spawn(async move {
            let (reader, batch) = read_batch(log, reader, from, limits, durable).await?;
            let Some(batch) = batch else {
                return Ok((reader, None));
            };
            let batch = tokio::task::spawn_blocking(move || -> Result<Batch<T>, E> {
                let prepared = prepare(batch.start, &batch.events)?;
                Ok(Batch {
                    start: batch.start,
                    end: batch.end,
                    events: batch.events,
                    bytes: batch.bytes,
                    prepared,
                })
            })
            .await
            .map_err(|e| TailError::Task(e.to_string()))??;
            Ok((reader, Some(batch)))
        }))
    }
}

/// Reads one batch from `from`: up to the limits, or what there is once the first event has
/// waited `limits.age`. `None` when the log has nothing past `from`.
async fn read_batch(
    log: Arc<LogShared>,
    reader: Option<LogReader>,
    from: Lsn,
    limits: Limits,
    mut durable: watch::Receiver<Lsn>,
) -> Result<(LogReader, Option<Batch<()>>), TailError> {
    let mut batch = Batch {
        start: from,
        end: from,
        events: Vec::new(),
        bytes: 0,
        prepared: (),
    };
    let mut reader = reader;
    let mut first_read: Option<Instant> = None;
    loop {
        durable.borrow_and_update();
        let step = read_step(
            Arc::clone(&log),
            reader.take(),
            batch.end,
            limits.rows.saturating_sub(batch.events.len()),
            limits.bytes.saturating_sub(batch.bytes),
            None,
        )
        .await?;
        if !step.events.is_empty() {
            first_read.get_or_insert_with(Instant::now);
        }
        batch.events.extend(step.events);
        batch.end = step.end;
        batch.bytes += step.bytes;
        let full = batch.events.len() >= limits.rows || batch.bytes >= limits.bytes;
        let Some(first) = first_read else {
            return Ok((step.reader, None));
        };
        let deadline = first + limits.age;
        if full || Instant::now() >= deadline {
            return Ok((step.reader, Some(batch)));
        }
        reader = Some(step.reader);
        if step.caught_up {
            tokio::select! {
                _ = durable.changed() => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

/// Re-reads exactly the records from `from` up to `end`: a batch delivered before, with the
/// same boundaries. The returned batch ends where the records did; a caller checks it is `end`.
pub async fn read_exact(log: Arc<LogShared>, from: Lsn, end: Lsn) -> Result<Batch<()>, TailError> {
    let step = read_step(log, None, from, usize::MAX, usize::MAX, Some(end)).await?;
    Ok(Batch {
        start: from,
        end: step.end,
        events: step.events,
        bytes: step.bytes,
        prepared: (),
    })
}

/// What one blocking read step produced.
struct Step {
    reader: LogReader,
    events: Vec<StoredEvent>,
    end: Lsn,
    bytes: usize,
    caught_up: bool,
}

/// Reads whole records from `from` on a blocking thread, until `max_rows` events or `max_bytes`
/// bytes (at least one record if there is one), the log's durable end, or `until`.
async fn read_step(
    log: Arc<LogShared>,
    reader: Option<LogReader>,
    from: Lsn,
    max_rows: usize,
    max_bytes: usize,
    until: Option<Lsn>,
) -> Result<Step, TailError> {
    tokio::task::spawn_blocking(move || -> crate::Result<Step> {
        let mut reader = match reader {
            Some(r) if r.position() == from => r,
            _ => log.reader(from)?,
        };
        let (mut events, mut end, mut bytes, mut caught_up) = (Vec::new(), from, 0, false);
        let mut payload = Vec::new();
        while events.len() < max_rows.max(1) && bytes < max_bytes.max(1) {
            if until.is_some_and(|u| end >= u) {
                break;
            }
            let Some((lsn, record_end)) = reader.next_record(&mut payload)? else {
                caught_up = true;
                break;
            };
            events.extend(crate::decode_record(lsn, &payload)?);
            bytes += payload.len();
            end = record_end;
        }
        Ok(Step {
            reader,
            events,
            end,
            bytes,
            caught_up,
        })
    })
    .await
    .map_err(|e| TailError::Task(e.to_string()))?
    .map_err(TailError::Log)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use meterd_schemas::{ApiRequest, Event, EventData};

    use super::*;
    use crate::log::{LogOptions, LogWriter};

    fn limits(rows: usize, age: Duration) -> Limits {
        Limits {
            rows,
            bytes: usize::MAX,
            age,
        }
    }

    /// An api.request event of tenant `acme`, for tests.
    pub(crate) fn event(id: &str) -> StoredEvent {
        StoredEvent {
            ingested_at_us: 0,
            event: Event {
                tenant: "acme".into(),
                id: id.into(),
                time_us: 1_700_000_000_000_000,
                subject: None,
                source: None,
                dimensions: BTreeMap::new(),
                data: EventData::ApiRequest(ApiRequest {
                    route: None,
                    method: None,
                    status_code: 200,
                    latency_ms: 1,
                    request_bytes: None,
                    response_bytes: None,
                }),
            },
        }
    }

    fn append_events(writer: &mut LogWriter, ids: &[&str]) {
        for id in ids {
            let event = event(id);
            let payload = crate::record::encode(std::slice::from_ref(&event)).expect("encode");
            writer.append(&payload).expect("append");
        }
        writer.sync().expect("sync");
    }

    #[tokio::test]
    async fn batches_follow_the_log_and_wake_when_it_grows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut writer, log, _) = LogWriter::open(dir.path(), LogOptions::default()).expect("log");
        let mut tailer: Tailer<usize, TailError> = Tailer::new(
            Arc::clone(&log),
            log.start(),
            limits(2, Duration::ZERO),
            |_, e| Ok(e.len()),
        );
        assert!(tailer.next().await.expect("empty read").is_none());
        assert!(
            tokio::time::timeout(Duration::from_millis(100), tailer.more())
                .await
                .is_err(),
            "woken with nothing new"
        );

        append_events(&mut writer, &["a", "b", "c"]);
        // Woken by the sync, not by a timer.
        tokio::time::timeout(Duration::from_secs(5), tailer.more())
            .await
            .expect("woken by the durable end");
        let first = tailer.next().await.expect("read").expect("a batch");
        assert_eq!(first.events.len(), 2);
        assert_eq!(first.prepared, 2);
        let second = tailer.next().await.expect("read").expect("a batch");
        assert_eq!((second.start, second.events.len()), (first.end, 1));
        assert_eq!(second.events[0].event.id, "c");
        assert!(tailer.next().await.expect("read").is_none());

        let again = read_exact(Arc::clone(&log), first.start, first.end)
            .await
            .expect("exact");
        assert_eq!((again.end, again.events.len()), (first.end, 2));
    }

    #[tokio::test]
    async fn a_batch_waits_its_age_for_more_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut writer, log, _) = LogWriter::open(dir.path(), LogOptions::default()).expect("log");
        append_events(&mut writer, &["a"]);
        let mut tailer: Tailer<(), TailError> = Tailer::new(
            Arc::clone(&log),
            log.start(),
            limits(10, Duration::from_secs(30)),
            |_, _| Ok(()),
        );
        let read = tokio::spawn(async move { tailer.next().await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        append_events(&mut writer, &["b", "c"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        append_events(&mut writer, &["d", "e", "f", "g", "h", "i", "j"]);
        let batch = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("full before its age")
            .expect("task")
            .expect("read")
            .expect("a batch");
        assert_eq!(batch.events.len(), 10);
    }
}

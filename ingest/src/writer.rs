//! The group-commit writer: one thread that decides, for every submitted event, whether it is
//! new, a duplicate or a conflict, appends the new ones to the log, and answers only after the
//! log is fsynced.
//!
//! Requests that arrive while an fsync is running queue up and share the next one, so throughput
//! does not collapse to one fsync per request. Deciding and appending on one thread is what makes
//! dedup race-free: two requests carrying the same `(tenant, id)` are ordered, and the second one
//! sees the first in the index.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use meterd_schemas::{Event, EventsBatchBuilder, StoredEvent};
use tokio::sync::{mpsc, oneshot};

use crate::dedup::{DedupIndex, Seen, index_key};
use crate::embedded::EmbeddedStore;
use crate::error::{Error, Result};
use crate::log::{LogWriter, Lsn};

/// What happened to a submitted batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    /// Events stored for the first time.
    pub accepted: usize,
    /// Events whose key was already accepted with the same content.
    pub duplicates: usize,
    /// Ids whose key was already accepted with different content.
    pub conflicts: Vec<String>,
}

/// A batch waiting for the writer.
#[derive(Debug)]
pub(crate) struct Submission {
    pub events: Vec<Event>,
    pub reply: oneshot::Sender<Result<Outcome>>,
}

/// Most events one group commit takes before it fsyncs.
const GROUP_MAX_EVENTS: usize = 64 * 1024;

/// Marks ingest failed if the writer thread unwinds from a panic, so `/readyz` reports it and
/// submissions are refused instead of waiting on a thread that is gone.
struct FailOnPanic(Arc<AtomicBool>);

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Release);
            tracing::error!("the log writer panicked; refusing further ingest");
        }
    }
}

pub(crate) struct Writer {
    pub log: LogWriter,
    pub index: Arc<DedupIndex>,
    pub store: Arc<EmbeddedStore>,
    pub failed: Arc<AtomicBool>,
    pub clock: fn() -> i64,
    /// Counts outcomes and what is accepted, once it is durable.
    pub metrics: crate::metrics::IngestMetrics,
    /// Told of every accepted batch once the embedded store shows it.
    pub changes: Changes,
}

/// Told of every batch of accepted events, with the log position that makes it durable, after
/// the embedded store shows it and whether or not usage metrics are on (for counts kept over
/// stored events). Records replayed when ingest opens are not told: they were accepted by an
/// earlier run. Called on the log writer's thread: keep it to a pass over the batch.
pub trait ChangeObserver: Send + Sync {
    fn changed(&self, end: Lsn, events: &[StoredEvent]);
}

/// The change observers ingest tells of every accepted batch.
#[derive(Clone, Default)]
pub struct Changes(pub Vec<Arc<dyn ChangeObserver>>);

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Changes({})", self.0.len())
    }
}

impl Writer {
    /// Runs until every sender is gone, then returns.
    pub fn run(mut self, mut rx: mpsc::Receiver<Submission>) {
        let mut group = Vec::new();
        // Declared after `group`, so on a panic it is dropped first: the flag is set before
        // the unanswered submissions learn that the writer is gone.
        let _marks_failure = FailOnPanic(Arc::clone(&self.failed));
        while let Some(first) = rx.blocking_recv() {
            let mut events = first.events.len();
            group.push(first);
            while events < GROUP_MAX_EVENTS {
                match rx.try_recv() {
                    Ok(s) => {
                        events += s.events.len();
                        group.push(s);
                    }
                    Err(_) => break,
                }
            }
            if self.failed.load(Ordering::Acquire) {
                for s in group.drain(..) {
                    let _ = s.reply.send(Err(Error::WriterStopped));
                }
                continue;
            }
            match self.commit(&mut group) {
                Ok(outcomes) => {
                    for (s, o) in group.drain(..).zip(outcomes) {
                        // The sender may have gone (client hung up); the events are durable anyway.
                        let _ = s.reply.send(Ok(o));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, source = ?std::error::Error::source(&e), "log writer failed; refusing further ingest");
                    self.failed.store(true, Ordering::Release);
                    for s in group.drain(..) {
                        let _ = s.reply.send(Err(Error::WriterStopped));
                    }
                }
            }
        }
    }

    /// Dedups, appends and fsyncs one group; returns one outcome per submission.
    fn commit(&mut self, group: &mut [Submission]) -> Result<Vec<Outcome>> {
        let ingested_at_us = (self.clock)();
        let mut fresh: HashMap<Vec<u8>, Seen> = HashMap::new();
        let mut outcomes = Vec::with_capacity(group.len());
        let mut stored = Vec::new();
        for s in group.iter_mut() {
            let mut o = Outcome::default();
            for event in s.events.drain(..) {
                let key = index_key(&event.tenant, &event.id);
                let hash = event.content_hash();
                let seen = match fresh.get(&key) {
                    Some(seen) => Some(*seen),
                    None => self.index.get(&key)?,
                };
                match seen {
                    Some(seen) if seen.hash == hash => o.duplicates += 1,
                    Some(_) => o.conflicts.push(event.id),
                    None => {
                        fresh.insert(
                            key,
                            Seen {
                                hash,
                                time_us: event.time_us,
                            },
                        );
                        o.accepted += 1;
                        stored.push(StoredEvent {
                            ingested_at_us,
                            event,
                        });
                    }
                }
            }
            outcomes.push(o);
        }
        if stored.is_empty() {
            for o in &outcomes {
                self.metrics.outcome(o);
            }
            return Ok(outcomes);
        }
        let payload = crate::record::encode(&stored)?;
        self.log.append(&payload)?;
        let end = self.log.sync()?;
        push_to_store(&self.store, &stored, end)?;
        for o in &self.changes.0 {
            o.changed(end, &stored);
        }
        self.index
            .insert_batch(fresh.iter().map(|(k, s)| (k.as_slice(), *s)), end)?;
        self.metrics.accepted(&stored);
        for o in &outcomes {
            self.metrics.outcome(o);
        }
        Ok(outcomes)
    }
}

/// Makes durable events visible to queries through the embedded store's tail.
pub(crate) fn push_to_store(store: &EmbeddedStore, events: &[StoredEvent], end: Lsn) -> Result<()> {
    let mut builder = EventsBatchBuilder::new();
    for e in events {
        builder.append(e)?;
    }
    store.push(end, builder.finish()?);
    Ok(())
}

/// Records replayed events in the dedup index.
pub(crate) fn index_replayed(index: &DedupIndex, events: &[StoredEvent], end: Lsn) -> Result<()> {
    let keys: Vec<(Vec<u8>, Seen)> = events
        .iter()
        .map(|e| {
            (
                index_key(&e.event.tenant, &e.event.id),
                Seen {
                    hash: e.event.content_hash(),
                    time_us: e.event.time_us,
                },
            )
        })
        .collect();
    index.insert_batch(keys.iter().map(|(k, s)| (k.as_slice(), *s)), end)
}

/// Decodes one log record (the record at `lsn`): the events of one accepted group, in any
/// format version this build reads.
pub fn decode_record(lsn: Lsn, payload: &[u8]) -> Result<Vec<StoredEvent>> {
    crate::record::decode(lsn, payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::EmbeddedOptions;
    use crate::log::LogOptions;

    fn panicking_clock() -> i64 {
        panic!("a bug in the writer");
    }

    #[test]
    fn a_panic_of_the_writer_marks_ingest_failed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, shared, _) =
            LogWriter::open(&dir.path().join("log"), LogOptions::default()).expect("log");
        let index = Arc::new(DedupIndex::open(&dir.path().join("dedup")).expect("index"));
        let store = Arc::new(
            EmbeddedStore::open(
                &dir.path().join("events"),
                &shared,
                EmbeddedOptions::default(),
            )
            .expect("store"),
        );
        let failed = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            log,
            index,
            store,
            failed: Arc::clone(&failed),
            clock: panicking_clock,
            metrics: crate::metrics::IngestMetrics::new(
                &crate::metrics::LabelLimits::default(),
                true,
                crate::metrics::Observers::default(),
            )
            .expect("metrics"),
            changes: Changes::default(),
        };
        let (tx, rx) = mpsc::channel(4);
        let thread = std::thread::spawn(move || writer.run(rx));
        let (reply, answer) = oneshot::channel();
        tx.blocking_send(Submission {
            events: Vec::new(),
            reply,
        })
        .expect("send");
        assert!(thread.join().is_err(), "the writer panicked");
        assert!(
            answer.blocking_recv().is_err(),
            "no answer from a dead writer"
        );
        assert!(failed.load(Ordering::Acquire));
    }
}

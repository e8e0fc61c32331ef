//! How many accepted events lie in the log after a position, so a store's delivery lag can be
//! told in events as well as bytes. The log's records do not carry their event count apart from
//! their payload, so the counts are kept here: each accepted batch's as it is made durable
//! ([`ChangeObserver`]), and those of the records written before the process started by one
//! read of the log at startup ([`Backlog::count_existing`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use meterd_schemas::StoredEvent;

use crate::ChangeObserver;
use crate::error::Result;
use crate::log::{LogShared, Lsn};
use crate::sink::SinkStatus;

/// Records' event counts, by the position each record ends at.
#[derive(Debug, Default)]
pub struct Backlog {
    state: Mutex<State>,
    /// The stores whose lag is asked for: records every one of them confirmed are forgotten.
    stores: std::sync::OnceLock<Vec<Arc<SinkStatus>>>,
}

#[derive(Debug, Default)]
struct State {
    /// The records written since the process started.
    since_start: Records,
    /// The records written before; `None` until counted.
    before_start: Option<Records>,
}

/// `(end, events up to and including the record)` of consecutive records, ascending, so the
/// events after a position are one binary search away.
#[derive(Debug, Default)]
struct Records {
    ends: VecDeque<(Lsn, u64)>,
    /// The running count before the first record kept (the forgotten ones').
    forgotten: u64,
}

impl Records {
    fn push(&mut self, end: Lsn, events: u64) {
        let before = self.ends.back().map_or(self.forgotten, |(_, c)| *c);
        self.ends.push_back((end, before + events));
    }

    /// Events in the records that end after `lsn`.
    fn after(&self, lsn: Lsn) -> u64 {
        let total = self.ends.back().map_or(self.forgotten, |(_, c)| *c);
        let upto = self.ends.partition_point(|(end, _)| *end <= lsn);
        let confirmed = match upto {
            0 => self.forgotten,
            n => self.ends[n - 1].1,
        };
        total - confirmed
    }

    /// Drops the records ending at or before `lsn`.
    fn forget(&mut self, lsn: Lsn) {
        while let Some(&(end, count)) = self.ends.front() {
            if end > lsn {
                break;
            }
            self.ends.pop_front();
            self.forgotten = count;
        }
    }
}

impl Backlog {
    /// Counts the events of every record `log` holds up to `end` (the durable end when the
    /// process started, read before any batch was accepted): reads and decodes them, so run it
    /// off the async threads. Records the log drops meanwhile (every consumer confirmed them)
    /// are skipped.
    pub fn count_existing(&self, log: &Arc<LogShared>, end: Lsn) -> Result<()> {
        let mut records = Records::default();
        let mut payload = Vec::new();
        let mut pos = log.start();
        let mut reader = log.reader(pos)?;
        while pos < end {
            let (start, next) = match reader.next_record(&mut payload) {
                Ok(Some(record)) => record,
                Ok(None) => break,
                // A segment dropped while it was read (trimmed, or its file gone): every
                // consumer confirmed it, so nothing there can be lagging.
                Err(_) if log.start() > pos => {
                    pos = log.start();
                    reader = log.reader(pos)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if next > end {
                break;
            }
            records.push(next, crate::decode_record(start, &payload)?.len() as u64);
            pos = next;
        }
        self.lock().before_start = Some(records);
        Ok(())
    }

    /// Accepted events in the records that end after `lsn`; `None` while the records from
    /// before the process started are not counted yet.
    pub fn events_after(&self, lsn: Lsn) -> Option<u64> {
        let st = self.lock();
        let before_start = st.before_start.as_ref()?.after(lsn);
        Some(st.since_start.after(lsn) + before_start)
    }

    /// The stores whose lag is asked for; the records all of them confirmed are forgotten as
    /// batches are added. Set once; later calls are ignored.
    pub fn watch(&self, stores: Vec<Arc<SinkStatus>>) {
        let _ = self.stores.set(stores);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ChangeObserver for Backlog {
    fn changed(&self, end: Lsn, events: &[StoredEvent]) {
        let confirmed = self
            .stores
            .get()
            .and_then(|s| s.iter().map(|s| s.delivered()).min());
        let mut st = self.lock();
        st.since_start.push(end, events.len() as u64);
        if let Some(confirmed) = confirmed {
            st.since_start.forget(confirmed);
            if let Some(records) = &mut st.before_start {
                records.forget(confirmed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize) -> Vec<StoredEvent> {
        vec![crate::tailer::tests::event("e"); n]
    }

    #[test]
    fn events_after_a_position_sum_the_later_records() {
        let b = Backlog::default();
        let store = Arc::new(SinkStatus::default());
        b.watch(vec![Arc::clone(&store)]);
        b.changed(300, &batch(5));
        // Before the startup count, nothing is known.
        assert_eq!(b.events_after(0), None);
        let mut before = Records::default();
        before.push(100, 3);
        before.push(200, 4);
        b.lock().before_start = Some(before);
        b.changed(350, &batch(2));
        assert_eq!(b.events_after(0), Some(14));
        assert_eq!(b.events_after(100), Some(11));
        assert_eq!(b.events_after(150), Some(11));
        assert_eq!(b.events_after(200), Some(7));
        assert_eq!(b.events_after(300), Some(2));
        assert_eq!(b.events_after(350), Some(0));
        // What the store confirmed is forgotten at the next batch; the counts after it stay.
        store.set_delivered(200);
        b.changed(400, &batch(1));
        assert_eq!(
            b.lock().before_start.as_ref().map(|r| r.ends.len()),
            Some(0)
        );
        assert_eq!(b.events_after(200), Some(8));
        assert_eq!(b.events_after(300), Some(3));
        store.set_delivered(350);
        b.changed(450, &batch(4));
        assert_eq!(b.lock().since_start.ends.len(), 2);
        assert_eq!(b.events_after(350), Some(5));
        assert_eq!(b.events_after(400), Some(4));
        assert_eq!(b.events_after(450), Some(0));
    }
}

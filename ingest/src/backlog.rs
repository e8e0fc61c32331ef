//! How many accepted events lie in the log after a position, so a store's delivery lag can be
//! told in events as well as bytes. The log's records do not carry their event count apart from
//! their payload, so the counts are kept here: each accepted batch's as it is made durable
//! ([`ChangeObserver`]), and those of the records written before the process started by one
//! read of the log at startup ([`Backlog::count_existing`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use meterd_schemas::StoredEvent;

use crate::ChangeObserver;
use crate::error::{Error, Result};
use crate::log::{LogShared, Lsn};
use crate::sink::SinkStatus;

/// Records' event counts, by the position each record ends at.
#[derive(Debug, Default)]
pub struct Backlog {
    state: Mutex<State>,
    /// The stores whose lag is asked for: records every one of them confirmed are forgotten.
    stores: std::sync::OnceLock<Vec<Arc<SinkStatus>>>,
}

/// Records remembered before those every store confirmed are forgotten.
const FORGET_PAST: usize = 1_024;

#[derive(Debug, Default)]
struct State {
    /// `(end, events)` of the records written since the process started, ascending.
    since_start: VecDeque<(Lsn, u64)>,
    /// Their events in all.
    since_start_events: u64,
    /// `(end, events)` of the records written before, ascending; `None` until counted.
    before_start: Option<VecDeque<(Lsn, u64)>>,
    before_start_events: u64,
}

/// Events in the records of `records` that end after `lsn`: `total` less those ending at or
/// before it.
fn after(records: &VecDeque<(Lsn, u64)>, total: u64, lsn: Lsn) -> u64 {
    let upto = records.partition_point(|(end, _)| *end <= lsn);
    let delivered: u64 = records.iter().take(upto).map(|(_, n)| n).sum();
    total - delivered
}

/// Drops the records ending at or before `lsn`, keeping `total` the sum of the rest.
fn forget(records: &mut VecDeque<(Lsn, u64)>, total: &mut u64, lsn: Lsn) {
    while let Some(&(end, n)) = records.front() {
        if end > lsn {
            break;
        }
        records.pop_front();
        *total -= n;
    }
}

impl Backlog {
    /// Counts the events of every record `log` holds up to `end` (the durable end when the
    /// process started, read before any batch was accepted): reads and decodes them, so run it
    /// off the async threads. Records the log drops meanwhile (every consumer confirmed them)
    /// are skipped.
    pub fn count_existing(&self, log: &Arc<LogShared>, end: Lsn) -> Result<()> {
        let mut records = VecDeque::new();
        let mut total = 0u64;
        let mut payload = Vec::new();
        let mut pos = log.start();
        let mut reader = log.reader(pos)?;
        while pos < end {
            let (start, next) = match reader.next_record(&mut payload) {
                Ok(Some(record)) => record,
                Ok(None) => break,
                Err(Error::LogTrimmed { .. }) => {
                    // Confirmed by every consumer meanwhile: nothing there can be lagging.
                    pos = log.start().max(pos);
                    reader = log.reader(pos)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if next > end {
                break;
            }
            let events = crate::decode_record(start, &payload)?.len() as u64;
            records.push_back((next, events));
            total += events;
            pos = next;
        }
        let mut st = self.lock();
        st.before_start = Some(records);
        st.before_start_events = total;
        Ok(())
    }

    /// Accepted events in the records that end after `lsn`; `None` while the records from
    /// before the process started are not counted yet and some of them end after `lsn`.
    pub fn events_after(&self, lsn: Lsn) -> Option<u64> {
        let st = self.lock();
        let since_start = after(&st.since_start, st.since_start_events, lsn);
        let before_start = match &st.before_start {
            Some(records) => after(records, st.before_start_events, lsn),
            None => return None,
        };
        Some(since_start + before_start)
    }

    /// The stores whose lag is asked for; the records all of them confirmed are forgotten as
    /// batches are added. Set once; later calls are ignored.
    pub fn watch(&self, stores: Vec<Arc<SinkStatus>>) {
        let _ = self.stores.set(stores);
    }

    /// Forgets the records ending at or before `lsn`.
    pub fn forget_up_to(&self, lsn: Lsn) {
        let mut st = self.lock();
        Self::forget_locked(&mut st, lsn);
    }

    fn forget_locked(st: &mut State, lsn: Lsn) {
        forget(&mut st.since_start, &mut st.since_start_events, lsn);
        if let Some(records) = &mut st.before_start {
            forget(records, &mut st.before_start_events, lsn);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ChangeObserver for Backlog {
    fn changed(&self, end: Lsn, events: &[StoredEvent]) {
        let mut st = self.lock();
        st.since_start.push_back((end, events.len() as u64));
        st.since_start_events += events.len() as u64;
        if st.since_start.len() > FORGET_PAST
            && let Some(confirmed) = self
                .stores
                .get()
                .and_then(|s| s.iter().map(|s| s.delivered()).min())
        {
            Self::forget_locked(&mut st, confirmed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_after_a_position_sum_the_later_records() {
        let b = Backlog::default();
        // Before the startup count, nothing is known.
        b.changed(300, &[]);
        assert_eq!(b.events_after(0), None);
        {
            let mut st = b.lock();
            st.since_start.clear();
            st.since_start_events = 0;
            st.before_start = Some(VecDeque::from([(100, 3), (200, 4)]));
            st.before_start_events = 7;
        }
        let batch = |n: usize| -> Vec<StoredEvent> {
            let e = StoredEvent {
                ingested_at_us: 0,
                event: meterd_schemas::Event {
                    tenant: "acme".into(),
                    id: "e".into(),
                    time_us: 0,
                    subject: None,
                    source: None,
                    dimensions: Default::default(),
                    data: meterd_schemas::EventData::ApiRequest(meterd_schemas::ApiRequest {
                        route: None,
                        method: None,
                        status_code: 200,
                        latency_ms: 1,
                        request_bytes: None,
                        response_bytes: None,
                    }),
                },
            };
            vec![e; n]
        };
        b.changed(300, &batch(5));
        b.changed(350, &batch(2));
        assert_eq!(b.events_after(0), Some(14));
        assert_eq!(b.events_after(100), Some(11));
        assert_eq!(b.events_after(200), Some(7));
        assert_eq!(b.events_after(300), Some(2));
        assert_eq!(b.events_after(350), Some(0));
        b.forget_up_to(200);
        assert_eq!(b.events_after(200), Some(7));
        assert_eq!(b.events_after(0), Some(7));
        b.forget_up_to(350);
        assert_eq!(b.events_after(0), Some(0));
    }
}

//! The payload of a log record: the events of one accepted group, with the format version.
//!
//! The first records were bare postcard of `Vec<StoredEvent>` in the layout now frozen as
//! [`meterd_schemas::frozen::v1`]. Since then a record starts with a zero byte, which no
//! first-format record starts with (postcard writes the number of events first, and a record
//! is never empty), then the format version, then the events:
//!
//! | version | layout |
//! |---|---|
//! | 1 (no header) | `frozen::v1` |
//! | 2 | `frozen::v1` (the same events; the first with a header) |
//!
//! A record of a version newer than this build is an error naming both versions, never a guess.

use meterd_schemas::StoredEvent;
use meterd_schemas::frozen::v1;

use crate::error::{Error, Result};
use crate::log::Lsn;

/// The first byte of every record that carries its version.
const VERSIONED: u8 = 0;
/// The version this build writes.
pub const CURRENT_VERSION: u8 = 2;

/// Encodes the events of one group as a record of [`CURRENT_VERSION`].
pub(crate) fn encode(events: &[StoredEvent]) -> Result<Vec<u8>> {
    postcard::to_extend(events, vec![VERSIONED, CURRENT_VERSION]).map_err(Error::Encode)
}

/// Decodes the record at `lsn`, of any version this build knows.
pub fn decode(lsn: Lsn, payload: &[u8]) -> Result<Vec<StoredEvent>> {
    let decode_error = |source| Error::Decode { lsn, source };
    match payload {
        [VERSIONED, CURRENT_VERSION, events @ ..] => {
            postcard::from_bytes(events).map_err(decode_error)
        }
        [VERSIONED, version, ..] => Err(Error::RecordVersion {
            lsn,
            version: *version,
            supported: CURRENT_VERSION,
        }),
        [VERSIONED] => Err(Error::LogCorrupt {
            lsn,
            reason: "a record with a header and no version",
        }),
        first_format => postcard::from_bytes::<Vec<v1::StoredEvent>>(first_format)
            .map(|events| events.into_iter().map(StoredEvent::from).collect())
            .map_err(decode_error),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use meterd_schemas::{ApiRequest, Event, EventData};

    use super::*;

    fn events(n: usize) -> Vec<StoredEvent> {
        (0..n)
            .map(|i| StoredEvent {
                ingested_at_us: 5,
                event: Event {
                    tenant: "acme".into(),
                    id: format!("e{i}"),
                    time_us: 1_700_000_000_000_000,
                    subject: None,
                    source: Some("bot".into()),
                    dimensions: BTreeMap::from([("a".into(), "1".into())]),
                    data: EventData::ApiRequest(ApiRequest {
                        route: Some("/v1/chat".into()),
                        method: None,
                        status_code: 200,
                        latency_ms: 12,
                        request_bytes: None,
                        response_bytes: Some(9),
                    }),
                },
            })
            .collect()
    }

    #[test]
    fn records_round_trip_in_every_version() {
        for n in [1, 127, 128, 300] {
            let written = events(n);
            let current = encode(&written).expect("encode");
            assert_eq!(&current[..2], &[VERSIONED, CURRENT_VERSION]);
            assert_eq!(decode(0, &current).expect("current"), written);
            // The first format: bare postcard, whose first byte is never zero.
            let first = postcard::to_allocvec(&written).expect("first format");
            assert_ne!(first[0], VERSIONED, "{n} events");
            assert_eq!(decode(0, &first).expect("first format"), written);
        }
    }

    #[test]
    fn newer_and_damaged_records_are_errors() {
        let mut newer = encode(&events(1)).expect("encode");
        newer[1] = CURRENT_VERSION + 1;
        let message = decode(7, &newer).expect_err("newer").to_string();
        assert!(message.contains("version 3"), "{message}");
        assert!(decode(7, &[VERSIONED]).is_err());
        assert!(decode(7, &[VERSIONED, CURRENT_VERSION, 0xff]).is_err());
    }
}

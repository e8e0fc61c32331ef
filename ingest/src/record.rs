//! The payload of a log record: the events of one accepted group, with the format version.
//!
//! The first records were bare postcard of `Vec<StoredEvent>` in the layout now frozen as
//! [`meterd_schemas::frozen::v1`]. Since then a record starts with [`HEADER`], ten `0xFF`
//! bytes, then the format version, then the events. No first-format record starts that way
//! (it starts with the number of events as a canonical varint, at most ten bytes, the last
//! below `0x80`), and a build that only knows the first format fails on such a record with a
//! bad-varint error instead of reading it as something else: a rollback to an older meterd
//! stops at the first newer record, it never skips it.
//!
//! | version | layout |
//! |---|---|
//! | 1 (no header) | `frozen::v1` |
//! | 2 | `frozen::v1` (the same events; the first with a header) |
//! | 3 | [`StoredEvent`] as of `cache_write_input_tokens` (`llm.usage` gained it) |
//!
//! When the event types change again, the layout of version 3 is frozen beside `v1` first.
//!
//! A record of a version newer than this build is an error naming both versions, never a guess.

use meterd_schemas::StoredEvent;
use meterd_schemas::frozen::v1;

use crate::error::{Error, Result};
use crate::log::Lsn;

/// The start of every record that carries its version: an invalid postcard varint.
const HEADER: [u8; 10] = [0xFF; 10];
/// The version this build writes.
pub const CURRENT_VERSION: u8 = 3;

/// Encodes the events of one group as a record of [`CURRENT_VERSION`].
pub(crate) fn encode(events: &[StoredEvent]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(HEADER.len() + 1 + events.len() * 128);
    out.extend_from_slice(&HEADER);
    out.push(CURRENT_VERSION);
    postcard::to_extend(events, out).map_err(Error::Encode)
}

/// Decodes the record at `lsn`, of any version this build knows.
pub fn decode(lsn: Lsn, payload: &[u8]) -> Result<Vec<StoredEvent>> {
    // Strict: every byte read, at least one event. postcard alone accepts trailing bytes, and a
    // record of another format must not read as a shorter or empty one.
    let v1_layout = |bytes: &[u8]| {
        let events = whole::<v1::StoredEvent>(lsn, bytes)?;
        Ok(events.into_iter().map(StoredEvent::from).collect())
    };
    let Some(versioned) = payload.strip_prefix(&HEADER) else {
        return v1_layout(payload);
    };
    match versioned {
        [2, events @ ..] => v1_layout(events),
        [3, events @ ..] => whole::<StoredEvent>(lsn, events),
        [version, ..] if *version > CURRENT_VERSION => Err(Error::RecordVersion {
            lsn,
            version: *version,
            supported: CURRENT_VERSION,
        }),
        _ => Err(Error::LogCorrupt {
            lsn,
            reason: "a record with a header and no known version",
        }),
    }
}

/// Events of one layout that take up every byte of `bytes`, at least one.
fn whole<T: serde::de::DeserializeOwned>(lsn: Lsn, bytes: &[u8]) -> Result<Vec<T>> {
    let (events, rest) = postcard::take_from_bytes::<Vec<T>>(bytes)
        .map_err(|source| Error::Decode { lsn, source })?;
    if events.is_empty() || !rest.is_empty() {
        return Err(Error::LogCorrupt {
            lsn,
            reason: "a record that is not whole events of a known format",
        });
    }
    Ok(events)
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
            assert_eq!(
                &current[..11],
                &[
                    0xFF,
                    0xFF,
                    0xFF,
                    0xFF,
                    0xFF,
                    0xFF,
                    0xFF,
                    0xFF,
                    0xFF,
                    0xFF,
                    CURRENT_VERSION
                ]
            );
            assert_eq!(decode(0, &current).expect("current"), written);
            // The first format: bare postcard.
            let first = postcard::to_allocvec(&written).expect("first format");
            assert_eq!(decode(0, &first).expect("first format"), written);
            // A build that knows only the first format refuses a versioned record rather
            // than reading it as something else.
            assert!(postcard::from_bytes::<Vec<v1::StoredEvent>>(&current).is_err());
        }
    }

    /// `llm.usage` gained `cache_write_input_tokens` in version 3: it round-trips, and a
    /// version 2 record (the first layout) reads with it absent.
    #[test]
    fn version_2_records_read_without_the_later_field() {
        let first = v1::StoredEvent {
            ingested_at_us: 5,
            event: v1::Event {
                tenant: "acme".into(),
                id: "e".into(),
                time_us: 1_700_000_000_000_000,
                subject: None,
                source: None,
                dimensions: BTreeMap::new(),
                data: v1::EventData::LlmUsage(v1::LlmUsage {
                    provider: "anthropic".into(),
                    model: "claude".into(),
                    input_tokens: 10,
                    output_tokens: 20,
                    cached_input_tokens: Some(3),
                    reasoning_tokens: None,
                    latency_ms: None,
                    status: None,
                    run_id: None,
                }),
            },
        };
        let mut v2 = HEADER.to_vec();
        v2.push(2);
        v2.extend(postcard::to_allocvec(&vec![first.clone()]).expect("v1 layout"));
        let read = decode(0, &v2).expect("version 2");
        let mut current = StoredEvent::from(first);
        assert_eq!(read, vec![current.clone()]);
        let meterd_schemas::EventData::LlmUsage(d) = &mut current.event.data else {
            unreachable!("an llm.usage event")
        };
        assert_eq!(d.cache_write_input_tokens, None);
        d.cache_write_input_tokens = Some(7);
        let written = vec![current];
        assert_eq!(
            decode(0, &encode(&written).expect("encode")).expect("v3"),
            written
        );
    }

    /// Pins the bytes of version 3, which is postcard of the live event types: a field added to
    /// them changes these bytes, and the test says to freeze version 3's layout and add a
    /// version 4 first, or old logs would be misread.
    #[test]
    fn version_3_bytes_are_pinned() {
        let mut events = events(2);
        events[1].event.data = meterd_schemas::EventData::LlmUsage(meterd_schemas::LlmUsage {
            provider: "anthropic".into(),
            model: "claude".into(),
            input_tokens: 10,
            output_tokens: 20,
            cached_input_tokens: Some(3),
            cache_write_input_tokens: Some(4),
            reasoning_tokens: Some(5),
            latency_ms: Some(6),
            status: Some("ok".into()),
            run_id: Some("r".into()),
        });
        let bytes = encode(&events).expect("encode");
        let hash = xxhash_rust::xxh3::xxh3_64(&bytes);
        assert_eq!(
            hash, 0xfcd4_a608_e5c8_107c,
            "{hash:#x}: the record layout changed"
        );
    }

    #[test]
    fn newer_and_damaged_records_are_errors() {
        let mut newer = encode(&events(1)).expect("encode");
        newer[HEADER.len()] = CURRENT_VERSION + 1;
        let message = decode(7, &newer).expect_err("newer").to_string();
        assert!(message.contains("version 4"), "{message}");
        for version in [None, Some(0), Some(1)] {
            let mut damaged = HEADER.to_vec();
            damaged.extend(version);
            let message = decode(7, &damaged).expect_err("damaged").to_string();
            assert!(message.contains("corrupt"), "{message}");
        }
        let mut truncated = encode(&events(2)).expect("encode");
        truncated.truncate(20);
        assert!(decode(7, &truncated).is_err());
        // Bytes after the events, or no events at all, are not a first-format record.
        let mut longer = postcard::to_allocvec(&events(1)).expect("first format");
        longer.push(0);
        assert!(decode(7, &longer).is_err());
        assert!(decode(7, &[0, 2, 1, 2, 3]).is_err());
    }
}

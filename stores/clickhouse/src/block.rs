//! What meterd inserts: the columns of `events_in`, one `Native` block per month of event time,
//! each closed by its delivery's marker row.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use chrono::{DateTime, Datelike};
use clickhouse::native::Block;
use clickhouse::native::builder::BlockBuilder;
use clickhouse::native::encode::Encode;
use meterd_ingest::log::Lsn;
use meterd_schemas::StoredEvent;
use meterd_schemas::columns::{COLUMNS, Kind, Value};

use crate::ChError;

/// The columns of `events_in` and of the `repair_*` tables, in order, with their types: the
/// columns of `events` ([`COLUMNS`]) as ClickHouse takes them in, then the delivery id and the
/// marker flag. They do not depend on the server version; the materialized views convert to
/// each table's types.
pub fn input_columns() -> &'static [(String, &'static str)] {
    static INPUT: LazyLock<Vec<(String, &'static str)>> = LazyLock::new(|| {
        COLUMNS
            .iter()
            .map(|c| c.clickhouse_input())
            .chain([
                ("_delivery".to_owned(), "UInt64"),
                ("_marker".to_owned(), "UInt8"),
            ])
            .collect()
    });
    &INPUT
}

/// The events of one batch that fall in one month, as one block.
pub struct MonthBlock {
    /// `YYYYMM` of the events' time (UTC): the partition of every table written.
    pub month: u32,
    /// The delivery id on every row.
    pub delivery: u64,
    /// Event rows (the marker row not counted).
    pub events: u64,
    /// Earliest and latest event time in the block (µs), bounding the check of `events`.
    pub min_time_us: i64,
    pub max_time_us: i64,
    pub block: Block,
}

impl std::fmt::Debug for MonthBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonthBlock")
            .field("month", &self.month)
            .field("delivery", &format_args!("{:#x}", self.delivery))
            .field("events", &self.events)
            .field("min_time_us", &self.min_time_us)
            .field("max_time_us", &self.max_time_us)
            .finish_non_exhaustive()
    }
}

/// `YYYYMM` of a time in microseconds (UTC); `None` outside January 1970 to January 2106, the
/// months ClickHouse's `DateTime` holds whole.
pub fn month_of(time_us: i64) -> Option<u32> {
    let t = DateTime::from_timestamp_micros(time_us)?;
    let year = u32::try_from(t.year())
        .ok()
        .filter(|y| (1970..=2106).contains(y))?;
    // `DateTime` ends on 2106-02-07.
    (year < 2106 || t.month() == 1).then_some(year * 100 + t.month())
}

/// The id of the delivery of `node`'s batch starting at `batch_start`, for its events of
/// `month`: stable across restarts (a settled batch is found again), distinct across nodes,
/// batches and months, and never 0 (0 marks rollup rows that are not markers).
pub fn delivery_id(node: &str, batch_start: Lsn, month: u32) -> u64 {
    let key = format!("{node}:{batch_start}:{month}");
    xxhash_rust::xxh3::xxh3_64(key.as_bytes()).max(1)
}

/// Splits a batch into month blocks, each in log order and closed by its marker row.
pub fn month_blocks(
    node: &str,
    batch_start: Lsn,
    events: &[StoredEvent],
) -> Result<Vec<MonthBlock>, ChError> {
    let mut months: BTreeMap<u32, Vec<&StoredEvent>> = BTreeMap::new();
    for e in events {
        let month = month_of(e.event.time_us).ok_or(ChError::TimeOutOfRange {
            id: e.event.id.clone(),
            time_us: e.event.time_us,
        })?;
        months.entry(month).or_default().push(e);
    }
    months
        .into_iter()
        .map(|(month, events)| build(month, delivery_id(node, batch_start, month), &events))
        .collect()
}

fn block_err(e: impl std::fmt::Display) -> ChError {
    ChError::Block(e.to_string())
}

/// Adds one column: the events' values, then the marker row's.
fn column<T: Encode>(
    builder: &mut BlockBuilder,
    name: &str,
    values: impl Iterator<Item = T>,
    marker: T,
) -> Result<(), ChError> {
    builder
        .upsert_column::<T>(name)
        .map_err(block_err)?
        .add_all(values.chain(std::iter::once(marker)))
        .map_err(block_err)?;
    Ok(())
}

fn build(month: u32, delivery: u64, events: &[&StoredEvent]) -> Result<MonthBlock, ChError> {
    let min_time_us = events.iter().map(|e| e.event.time_us).min().unwrap_or(0);
    let max_time_us = events.iter().map(|e| e.event.time_us).max().unwrap_or(0);

    let mut b = BlockBuilder::new();
    for c in COLUMNS {
        let (name, _) = c.clickhouse_input();
        let values: Vec<Value<'_>> = events.iter().map(|e| (c.read)(e)).collect();
        let mismatch = || block_err(format!("column {} read a value of another kind", c.name));
        match c.kind {
            Kind::Text => {
                let texts = values
                    .iter()
                    .map(|v| match v {
                        Value::Text(t) => Ok(*t),
                        _ => Err(mismatch()),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if c.nullable {
                    column(&mut b, &name, texts.into_iter(), None)?;
                } else {
                    column(
                        &mut b,
                        &name,
                        texts.into_iter().map(Option::unwrap_or_default),
                        "",
                    )?;
                }
            }
            Kind::Int => {
                let ints = values
                    .iter()
                    .map(|v| match v {
                        Value::Int(n) => Ok(*n),
                        _ => Err(mismatch()),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if c.nullable {
                    column(&mut b, &name, ints.into_iter(), None)?;
                } else {
                    column(
                        &mut b,
                        &name,
                        ints.into_iter().map(Option::unwrap_or_default),
                        0,
                    )?;
                }
            }
            Kind::Time => {
                let times = values
                    .iter()
                    .map(|v| match v {
                        Value::Time(us) => Ok(*us),
                        _ => Err(mismatch()),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                // The marker's time puts it in the block's month and in an hour the block
                // touches.
                let marker = if c.name == "time" { min_time_us } else { 0 };
                column(&mut b, &name, times.into_iter(), marker)?;
            }
            Kind::Dimensions => {
                let json = values
                    .iter()
                    .map(|v| match v {
                        Value::Dimensions(map) => serde_json::to_string(map).map_err(block_err),
                        _ => Err(mismatch()),
                    })
                    .collect::<Result<Vec<String>, _>>()?;
                column(&mut b, &name, json.iter().map(String::as_str), "")?;
            }
        }
    }
    column(
        &mut b,
        "_delivery",
        events.iter().map(|_| delivery),
        delivery,
    )?;
    column(&mut b, "_marker", events.iter().map(|_| 0u8), 1u8)?;
    let block = b.build().map_err(block_err)?;
    Ok(MonthBlock {
        month,
        delivery,
        events: events.len() as u64,
        min_time_us,
        max_time_us,
        block,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_utc() {
        // 2026-01-31T23:59:59.999999Z and one microsecond later.
        let end_of_january = 1_769_903_999_999_999;
        assert_eq!(month_of(end_of_january), Some(202_601));
        assert_eq!(month_of(end_of_january + 1), Some(202_602));
        assert_eq!(month_of(-1), None);
        assert_eq!(month_of(i64::MAX), None);
    }

    #[test]
    fn delivery_ids_are_stable_distinct_and_never_zero() {
        let a = delivery_id("node-a", 4096, 202_601);
        assert_eq!(a, delivery_id("node-a", 4096, 202_601));
        assert_ne!(a, delivery_id("node-b", 4096, 202_601));
        assert_ne!(a, delivery_id("node-a", 4097, 202_601));
        assert_ne!(a, delivery_id("node-a", 4096, 202_602));
        assert_ne!(a, 0);
    }

    #[test]
    fn input_columns_match_the_block() {
        let names: Vec<&str> = input_columns().iter().map(|(n, _)| n.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
    }
}

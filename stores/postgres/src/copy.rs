//! Binary COPY of events into `meterd.events_data` (and, for benchmarks, any table of the
//! same columns).

use std::collections::BTreeMap;
use std::pin::Pin;

use bytes::BytesMut;
use chrono::{DateTime, Utc};
use meterd_schemas::StoredEvent;
use meterd_schemas::columns::{COLUMNS, Kind, Value};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{IsNull, Json, ToSql, Type, to_sql_checked};

use crate::PgError;

/// The columns of `events`, in table order ([`COLUMNS`]), as a column list.
pub fn columns() -> String {
    COLUMNS
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `COPY <table> (columns) FROM STDIN (FORMAT binary)`; `table` is trusted (a constant).
pub fn copy_statement(table: &str) -> String {
    format!("COPY {table} ({}) FROM STDIN (FORMAT binary)", columns())
}

/// The binary COPY types of [`COLUMNS`], in order.
pub fn types() -> Vec<Type> {
    COLUMNS
        .iter()
        .map(|c| match c.kind {
            Kind::Text => Type::TEXT,
            Kind::Int => Type::INT8,
            Kind::Time => Type::TIMESTAMPTZ,
            Kind::Dimensions => Type::JSONB,
        })
        .collect()
}

/// One value of a row, as COPY sends it.
#[derive(Debug)]
enum Field<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
    Time(DateTime<Utc>),
    Dimensions(Json<&'a BTreeMap<String, String>>),
}

impl ToSql for Field<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Field::Text(v) => v.to_sql(ty, out),
            Field::Int(v) => v.to_sql(ty, out),
            Field::Time(v) => v.to_sql(ty, out),
            Field::Dimensions(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <Option<&str> as ToSql>::accepts(ty)
            || <Option<i64> as ToSql>::accepts(ty)
            || <DateTime<Utc> as ToSql>::accepts(ty)
            || <Json<&BTreeMap<String, String>> as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// A time for PostgreSQL. Validation bounds event times to a few hundred days around now, far
/// inside chrono's range: a time outside it is a damaged record, and an error rather than a
/// plausible wrong date.
fn timestamp(id: &str, field: &str, us: i64) -> Result<DateTime<Utc>, PgError> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| PgError::TimeOutOfRange {
        id: id.to_owned(),
        field: field.to_owned(),
        us,
    })
}

/// Writes one event as one row.
pub async fn write_event(
    writer: Pin<&mut BinaryCopyInWriter>,
    stored: &StoredEvent,
) -> Result<(), PgError> {
    let id = &stored.event.id;
    let fields = COLUMNS
        .iter()
        .map(|c| {
            Ok(match (c.read)(stored) {
                Value::Text(v) => Field::Text(v),
                Value::Int(v) => Field::Int(v),
                Value::Time(us) => Field::Time(timestamp(id, c.name, us)?),
                Value::Dimensions(map) => Field::Dimensions(Json(map)),
            })
        })
        .collect::<Result<Vec<_>, PgError>>()?;
    let row: Vec<&(dyn ToSql + Sync)> = fields.iter().map(|f| f as &(dyn ToSql + Sync)).collect();
    writer.write(&row).await.map_err(|source| PgError::Sql {
        step: "COPY into meterd.events_data",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_no_timestamp_holds_are_errors() {
        assert_eq!(
            timestamp("e", "time", 0).expect("the epoch"),
            DateTime::UNIX_EPOCH
        );
        let message = timestamp("e1", "time", i64::MAX)
            .expect_err("out of range")
            .to_string();
        assert!(message.contains("\"e1\" has a value of time"), "{message}");
    }
}

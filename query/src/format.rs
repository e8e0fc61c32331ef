//! Writing a query result in the format the client asked for.
//!
//! JSON (the default), NDJSON and CSV render every timestamp as RFC 3339 with an offset, `Z` for
//! UTC (`2026-11-21T10:00:00.123Z`), which is what the rest of meterd's API speaks; a timestamp
//! without a zone is a UTC one. Maps become JSON objects, and the JSON answer names each
//! column's type as SQL does (`BIGINT`, `TIMESTAMP WITH TIME ZONE`).

use std::sync::Arc;

use arrow::array::timezone::Tz;
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringBuilder};
use arrow::csv::WriterBuilder as CsvWriterBuilder;
use arrow::datatypes::{
    DataType, Field, FieldRef, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType,
};
use arrow::error::ArrowError;
use arrow::ipc::writer::StreamWriter;
use arrow::json::WriterBuilder as JsonWriterBuilder;
use arrow::json::writer::{
    Encoder, EncoderFactory, EncoderOptions, LineDelimited, NullableEncoder, make_encoder,
};
use chrono::SecondsFormat;

use crate::budget::Output;
use crate::error::{Error, Result};

/// An output format of `POST /v1/sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `{"columns": [{"name", "type"}], "rows": [[...]]}`.
    Json,
    /// One JSON object per row.
    Ndjson,
    /// CSV with a header row; nested values as JSON text.
    Csv,
    /// An Arrow IPC stream.
    Arrow,
}

impl Format {
    /// Parses the `format` query parameter; absent means JSON.
    pub fn parse(name: Option<&str>) -> Result<Self> {
        match name.map(str::to_ascii_lowercase).as_deref() {
            None | Some("json") => Ok(Format::Json),
            Some("ndjson") => Ok(Format::Ndjson),
            Some("csv") => Ok(Format::Csv),
            Some("arrow") => Ok(Format::Arrow),
            Some(_) => Err(Error::UnknownFormat(name.unwrap_or_default().to_owned())),
        }
    }

    /// The format's name as the query parameter spells it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Ndjson => "ndjson",
            Format::Csv => "csv",
            Format::Arrow => "arrow",
        }
    }

    /// The response `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Ndjson => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }

    /// Writes the whole result into `out`. `schema` is the result's schema, so an empty result
    /// still describes its columns. Batches are written in slices of [`SLICE_ROWS`] rows, so
    /// the response cap and the memory pool stop an oversized answer within a slice.
    pub(crate) fn encode_into(
        self,
        schema: &SchemaRef,
        batches: &[RecordBatch],
        out: &mut Output,
    ) -> Result<()> {
        let slices = batches.iter().flat_map(|batch| {
            (0..batch.num_rows())
                .step_by(SLICE_ROWS)
                .map(|offset| batch.slice(offset, SLICE_ROWS.min(batch.num_rows() - offset)))
        });
        let encoded = match self {
            Format::Json => encode_json(schema, slices, out),
            Format::Ndjson => encode_ndjson(slices, out),
            Format::Csv => encode_csv(schema, slices, out),
            Format::Arrow => encode_arrow(schema, slices, out),
        };
        encoded.map_err(|source| match out.take_refusal() {
            Some(refusal) => refusal,
            None => Error::Encode {
                format: self.name(),
                source,
            },
        })
    }
}

#[cfg(test)]
impl Format {
    /// The whole answer, without limits.
    fn encode(self, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
        let pool: Arc<dyn datafusion::execution::memory_pool::MemoryPool> =
            Arc::new(datafusion::execution::memory_pool::UnboundedMemoryPool::default());
        let mut out = Output::new(&pool, usize::MAX, usize::MAX);
        self.encode_into(schema, batches, &mut out)?;
        Ok(out.buf)
    }
}

/// Rows encoded between two checks of the response's size.
const SLICE_ROWS: usize = 256;

fn encoder_options() -> EncoderOptions {
    EncoderOptions::default()
        .with_explicit_nulls(true)
        .with_encoder_factory(Arc::new(Rfc3339Timestamps))
}

fn encode_json(
    schema: &SchemaRef,
    batches: impl Iterator<Item = RecordBatch>,
    out: &mut Output,
) -> Result<(), ArrowError> {
    #[derive(serde::Serialize)]
    struct Column<'a> {
        name: &'a str,
        #[serde(rename = "type")]
        data_type: String,
    }
    let columns: Vec<Column<'_>> = schema
        .fields()
        .iter()
        .map(|f| Column {
            name: f.name(),
            data_type: sql_type_name(f.data_type()),
        })
        .collect();

    out.buf.extend_from_slice(b"{\"columns\":");
    serde_json::to_writer(&mut out.buf, &columns)
        .map_err(|e| ArrowError::JsonError(e.to_string()))?;
    out.buf.extend_from_slice(b",\"rows\":[");
    let options = encoder_options();
    let mut first_row = true;
    for batch in batches {
        let batch_schema = batch.schema();
        let mut encoders = batch_schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(field, column)| make_encoder(field, column.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            if !first_row {
                out.buf.push(b',');
            }
            first_row = false;
            out.buf.push(b'[');
            for (i, encoder) in encoders.iter_mut().enumerate() {
                if i > 0 {
                    out.buf.push(b',');
                }
                if encoder.is_null(row) {
                    out.buf.extend_from_slice(b"null");
                } else {
                    encoder.encode(row, &mut out.buf);
                }
            }
            out.buf.push(b']');
            // Per row: 256 rows of large values would be gigabytes between two checks.
            out.charge()?;
        }
    }
    out.buf.extend_from_slice(b"]}");
    out.charge()?;
    Ok(())
}

fn encode_ndjson(
    batches: impl Iterator<Item = RecordBatch>,
    out: &mut Output,
) -> Result<(), ArrowError> {
    let mut writer = JsonWriterBuilder::new()
        .with_explicit_nulls(true)
        .with_encoder_factory(Arc::new(Rfc3339Timestamps))
        .build::<_, LineDelimited>(out);
    for batch in batches {
        writer.write(&batch)?;
    }
    writer.finish()
}

fn encode_csv(
    schema: &SchemaRef,
    batches: impl Iterator<Item = RecordBatch>,
    out: &mut Output,
) -> Result<(), ArrowError> {
    let mut writer = CsvWriterBuilder::new().with_header(true).build(out);
    let mut empty = true;
    for batch in batches {
        empty = false;
        writer.write(&csv_compatible(&batch)?)?;
    }
    if empty {
        // The header comes from the first batch written; an empty one still gets it out.
        writer.write(&csv_compatible(&RecordBatch::new_empty(Arc::clone(
            schema,
        )))?)?;
    }
    Ok(())
}

fn encode_arrow(
    schema: &SchemaRef,
    batches: impl Iterator<Item = RecordBatch>,
    out: &mut Output,
) -> Result<(), ArrowError> {
    let mut writer = StreamWriter::try_new(out, schema)?;
    for batch in batches {
        writer.write(&batch)?;
    }
    writer.finish()
}

/// The SQL name of a column's type, as DataFusion's SQL spells it in `CAST(... AS <type>)`, for
/// the `columns` of a JSON answer (Arrow's own names such as `Timestamp(µs, "UTC")` are for
/// Arrow users; they get the Arrow format).
pub(crate) fn sql_type_name(data_type: &DataType) -> String {
    match data_type {
        DataType::Null => "NULL".to_owned(),
        DataType::Boolean => "BOOLEAN".to_owned(),
        DataType::Int8 => "TINYINT".to_owned(),
        DataType::Int16 => "SMALLINT".to_owned(),
        DataType::Int32 => "INTEGER".to_owned(),
        DataType::Int64 => "BIGINT".to_owned(),
        DataType::UInt8 => "TINYINT UNSIGNED".to_owned(),
        DataType::UInt16 => "SMALLINT UNSIGNED".to_owned(),
        DataType::UInt32 => "INTEGER UNSIGNED".to_owned(),
        DataType::UInt64 => "BIGINT UNSIGNED".to_owned(),
        DataType::Float16 | DataType::Float32 => "REAL".to_owned(),
        DataType::Float64 => "DOUBLE".to_owned(),
        DataType::Decimal32(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal256(p, s) => format!("DECIMAL({p}, {s})"),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "VARCHAR".to_owned(),
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => "BYTEA".to_owned(),
        DataType::Timestamp(_, Some(_)) => "TIMESTAMP WITH TIME ZONE".to_owned(),
        DataType::Timestamp(_, None) => "TIMESTAMP".to_owned(),
        DataType::Date32 | DataType::Date64 => "DATE".to_owned(),
        DataType::Time32(_) | DataType::Time64(_) => "TIME".to_owned(),
        DataType::Duration(_) | DataType::Interval(_) => "INTERVAL".to_owned(),
        DataType::List(item)
        | DataType::LargeList(item)
        | DataType::ListView(item)
        | DataType::LargeListView(item)
        | DataType::FixedSizeList(item, _) => format!("{}[]", sql_type_name(item.data_type())),
        DataType::Struct(fields) => {
            let inner: Vec<String> = fields
                .iter()
                .map(|f| format!("{} {}", f.name(), sql_type_name(f.data_type())))
                .collect();
            format!("STRUCT({})", inner.join(", "))
        }
        DataType::Map(entries, _) => match entries.data_type() {
            DataType::Struct(kv) if kv.len() == 2 => format!(
                "MAP({}, {})",
                sql_type_name(kv[0].data_type()),
                sql_type_name(kv[1].data_type())
            ),
            other => format!("MAP({})", sql_type_name(other)),
        },
        DataType::Dictionary(_, values) => sql_type_name(values),
        DataType::RunEndEncoded(_, values) => sql_type_name(values.data_type()),
        DataType::Union(..) => "UNION".to_owned(),
    }
}

/// Whether arrow-csv cannot write the type (it refuses nested types), so the column is written
/// as JSON text instead.
fn needs_json_text(data_type: &DataType) -> bool {
    match data_type {
        DataType::List(_)
        | DataType::LargeList(_)
        | DataType::ListView(_)
        | DataType::LargeListView(_)
        | DataType::FixedSizeList(..)
        | DataType::Struct(_)
        | DataType::Map(..)
        | DataType::Union(..) => true,
        DataType::Dictionary(_, values) => needs_json_text(values),
        _ => false,
    }
}

/// Replaces columns arrow-csv would refuse or render differently from the JSON formats with
/// Utf8 columns holding their JSON rendering (strings unquoted).
fn csv_compatible(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    if !schema
        .fields()
        .iter()
        .any(|f| needs_json_text(f.data_type()) || matches!(f.data_type(), DataType::Timestamp(..)))
    {
        return Ok(batch.clone());
    }
    let options = encoder_options();
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        let timestamp = matches!(field.data_type(), DataType::Timestamp(..));
        if !timestamp && !needs_json_text(field.data_type()) {
            fields.push(Arc::clone(field));
            columns.push(Arc::clone(column));
            continue;
        }
        let mut encoder = make_encoder(field, column.as_ref(), &options)?;
        let mut text = StringBuilder::new();
        let mut buf = Vec::new();
        for row in 0..column.len() {
            if encoder.is_null(row) {
                text.append_null();
                continue;
            }
            buf.clear();
            encoder.encode(row, &mut buf);
            let mut value = String::from_utf8(std::mem::take(&mut buf))
                .map_err(|e| ArrowError::CsvError(format!("column {}: {e}", field.name())))?;
            if timestamp {
                // The JSON encoding is a quoted string without escapes; CSV wants the bare text.
                value = value.trim_matches('"').to_owned();
                if value == "null" {
                    text.append_null();
                    continue;
                }
            }
            text.append_value(&value);
            buf = value.into_bytes();
        }
        fields.push(Arc::new(Field::new(
            field.name(),
            DataType::Utf8,
            field.is_nullable(),
        )));
        columns.push(Arc::new(text.finish()));
    }
    RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())),
        columns,
    )
}

/// Encodes timestamps that carry a time zone as RFC 3339 strings, `Z` for UTC, with as many
/// fractional digits as the value needs (none, 3, 6 or 9).
#[derive(Debug)]
struct Rfc3339Timestamps;

impl EncoderFactory for Rfc3339Timestamps {
    fn make_default_encoder<'a>(
        &self,
        _field: &'a FieldRef,
        array: &'a dyn Array,
        _options: &'a EncoderOptions,
    ) -> Result<Option<NullableEncoder<'a>>, ArrowError> {
        let DataType::Timestamp(unit, tz) = array.data_type() else {
            return Ok(None);
        };
        // meterd keeps time in UTC: a timestamp without a zone (a cast string, a computed
        // value) is a UTC one, and gets its `Z` like every other timestamp of the API.
        let tz: Tz = tz.as_deref().unwrap_or("UTC").parse()?;
        let values = match unit {
            TimeUnit::Second => array
                .as_primitive_opt::<TimestampSecondType>()
                .map(|a| a.values()),
            TimeUnit::Millisecond => array
                .as_primitive_opt::<TimestampMillisecondType>()
                .map(|a| a.values()),
            TimeUnit::Microsecond => array
                .as_primitive_opt::<TimestampMicrosecondType>()
                .map(|a| a.values()),
            TimeUnit::Nanosecond => array
                .as_primitive_opt::<TimestampNanosecondType>()
                .map(|a| a.values()),
        };
        let Some(values) = values else {
            return Ok(None);
        };
        let encoder = TimestampEncoder {
            values,
            unit: *unit,
            tz,
        };
        Ok(Some(NullableEncoder::new(
            Box::new(encoder),
            array.logical_nulls(),
        )))
    }
}

struct TimestampEncoder<'a> {
    values: &'a [i64],
    unit: TimeUnit,
    tz: Tz,
}

impl Encoder for TimestampEncoder<'_> {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        match self
            .values
            .get(idx)
            .and_then(|v| format_timestamp(*v, self.unit, self.tz))
        {
            Some(text) => {
                out.push(b'"');
                out.extend_from_slice(text.as_bytes());
                out.push(b'"');
            }
            // Out of chrono's range: there is no RFC 3339 form to give.
            None => out.extend_from_slice(b"null"),
        }
    }
}

fn format_timestamp(value: i64, unit: TimeUnit, tz: Tz) -> Option<String> {
    use arrow::array::temporal_conversions::as_datetime_with_timezone;
    let datetime = match unit {
        TimeUnit::Second => as_datetime_with_timezone::<TimestampSecondType>(value, tz),
        TimeUnit::Millisecond => as_datetime_with_timezone::<TimestampMillisecondType>(value, tz),
        TimeUnit::Microsecond => as_datetime_with_timezone::<TimestampMicrosecondType>(value, tz),
        TimeUnit::Nanosecond => as_datetime_with_timezone::<TimestampNanosecondType>(value, tz),
    }?;
    Some(datetime.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

#[cfg(test)]
mod tests {
    use arrow::array::{
        Int64Array, MapBuilder, StringArray, TimestampMicrosecondArray, TimestampNanosecondArray,
    };

    use super::*;

    fn batch() -> RecordBatch {
        let time = TimestampMicrosecondArray::from(vec![
            Some(1_795_255_200_123_000),
            None,
            Some(1_795_255_200_000_001),
        ])
        .with_timezone("UTC");
        let paris = TimestampMicrosecondArray::from(vec![Some(0), Some(0), Some(0)])
            .with_timezone("+01:00");
        let mut map = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        map.keys().append_value("region");
        map.values().append_value("eu");
        map.append(true).expect("map row");
        map.append(true).expect("map row");
        map.append(false).expect("map row");
        let columns: Vec<ArrayRef> = vec![
            Arc::new(time),
            Arc::new(paris),
            Arc::new(map.finish()),
            Arc::new(Int64Array::from(vec![Some(1), None, Some(-3)])),
            Arc::new(StringArray::from(vec![Some("a,\"b\""), Some("c"), None])),
        ];
        let fields: Vec<Field> = ["time", "local", "dims", "n", "s"]
            .iter()
            .zip(&columns)
            .map(|(name, c)| Field::new(*name, c.data_type().clone(), true))
            .collect();
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("batch")
    }

    #[test]
    fn json_is_columns_and_rows() {
        let batch = batch();
        let out = Format::Json
            .encode(&batch.schema(), &[batch])
            .expect("json");
        let value: serde_json::Value = serde_json::from_slice(&out).expect("valid json");
        assert_eq!(value["columns"][0]["name"], "time");
        assert_eq!(value["columns"][0]["type"], "TIMESTAMP WITH TIME ZONE");
        assert_eq!(value["columns"][2]["type"], "MAP(VARCHAR, VARCHAR)");
        assert_eq!(value["columns"][3]["type"], "BIGINT");
        assert_eq!(value["columns"][4]["type"], "VARCHAR");
        assert_eq!(
            value["rows"],
            serde_json::json!([
                ["2026-11-21T10:00:00.123Z", "1970-01-01T01:00:00+01:00", {"region": "eu"}, 1, "a,\"b\""],
                [null, "1970-01-01T01:00:00+01:00", {}, null, "c"],
                ["2026-11-21T10:00:00.000001Z", "1970-01-01T01:00:00+01:00", null, -3, null],
            ])
        );
    }

    #[test]
    fn empty_results_keep_their_columns() {
        let schema = batch().schema();
        let json: serde_json::Value =
            serde_json::from_slice(&Format::Json.encode(&schema, &[]).expect("json"))
                .expect("valid");
        assert_eq!(json["rows"], serde_json::json!([]));
        assert_eq!(json["columns"].as_array().map(Vec::len), Some(5));
        let csv = Format::Csv.encode(&schema, &[]).expect("csv");
        assert_eq!(
            String::from_utf8(csv).expect("utf8"),
            "time,local,dims,n,s\n"
        );
        assert!(
            Format::Ndjson
                .encode(&schema, &[])
                .expect("ndjson")
                .is_empty()
        );
    }

    #[test]
    fn csv_writes_nested_values_as_json_text() {
        let batch = batch();
        let csv = String::from_utf8(Format::Csv.encode(&batch.schema(), &[batch]).expect("csv"))
            .expect("utf8");
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "time,local,dims,n,s");
        assert_eq!(
            lines[1],
            r#"2026-11-21T10:00:00.123Z,1970-01-01T01:00:00+01:00,"{""region"":""eu""}",1,"a,""b""""#
        );
        assert_eq!(lines[2], ",1970-01-01T01:00:00+01:00,{},,c");
    }

    #[test]
    fn timestamps_without_a_zone_are_utc_with_an_offset() {
        let naive = TimestampNanosecondArray::from(vec![Some(1_795_255_200_508_051_313), None]);
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new(
                "now()",
                naive.data_type().clone(),
                true,
            )])),
            vec![Arc::new(naive)],
        )
        .expect("batch");
        let json: serde_json::Value = serde_json::from_slice(
            &Format::Json
                .encode(&batch.schema(), std::slice::from_ref(&batch))
                .expect("json"),
        )
        .expect("valid");
        assert_eq!(json["columns"][0]["type"], "TIMESTAMP");
        assert_eq!(
            json["rows"],
            serde_json::json!([["2026-11-21T10:00:00.508051313Z"], [null]])
        );
        let ndjson = Format::Ndjson
            .encode(&batch.schema(), std::slice::from_ref(&batch))
            .expect("ndjson");
        assert_eq!(
            String::from_utf8(ndjson).expect("utf8"),
            "{\"now()\":\"2026-11-21T10:00:00.508051313Z\"}\n{\"now()\":null}\n"
        );
        let csv = Format::Csv.encode(&batch.schema(), &[batch]).expect("csv");
        assert_eq!(
            String::from_utf8(csv).expect("utf8"),
            // A lone null column is quoted so the row is not a blank line.
            "now()\n2026-11-21T10:00:00.508051313Z\n\"\"\n"
        );
    }

    #[test]
    fn type_names_are_sql() {
        use arrow::datatypes::{IntervalUnit, TimeUnit};
        let cases = [
            (DataType::Decimal128(38, 0), "DECIMAL(38, 0)"),
            (DataType::Float64, "DOUBLE"),
            (DataType::Boolean, "BOOLEAN"),
            (DataType::Utf8View, "VARCHAR"),
            (DataType::Date32, "DATE"),
            (DataType::Interval(IntervalUnit::MonthDayNano), "INTERVAL"),
            (DataType::Timestamp(TimeUnit::Nanosecond, None), "TIMESTAMP"),
            (
                DataType::List(Arc::new(Field::new("item", DataType::Int64, true))),
                "BIGINT[]",
            ),
            (
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                "VARCHAR",
            ),
        ];
        for (data_type, name) in cases {
            assert_eq!(sql_type_name(&data_type), name, "{data_type}");
        }
    }

    #[test]
    fn unknown_formats_are_refused() {
        assert_eq!(Format::parse(None).expect("default"), Format::Json);
        assert_eq!(Format::parse(Some("CSV")).expect("csv"), Format::Csv);
        let e = Format::parse(Some("xml")).expect_err("xml");
        assert_eq!(
            e.to_string(),
            "unknown format \"xml\": expected json, ndjson, csv or arrow"
        );
    }
}

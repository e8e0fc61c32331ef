//! ClickHouse relations (`meterd.events`, `meterd.usage_hourly`, ...) as DataFusion tables, so
//! `POST /v1/sql` can answer from the ClickHouse store while ClickHouse does the filtering.
//!
//! At registration the relation's columns are read from `system.columns` and mapped to Arrow
//! types (see [`Kind`]); meterd's bookkeeping columns (`_delivery`, and `time_us`, which becomes
//! `time`) are not shown. At scan time the projection, the filters that translate exactly (see
//! [`Translator`]) and the limit become one `SELECT ... FORMAT JSONEachRow`, decoded into Arrow
//! batches as it streams in. ClickHouse 18.16 has no query parameters, so literals are rendered
//! into the SQL: strings quoted and escaped, numbers and times as integers, nothing else.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::json::ReaderBuilder;
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::expr::{Between, BinaryExpr, InList};
use datafusion::logical_expr::{Expr, Operator};
use meterd_query::pushdown::{int_value, literal_value, text_value, timestamp_value};
use meterd_query::remote::{Dialect, RemoteTable, Scan};
use tokio::sync::mpsc::Sender;

/// An `IN` list longer than this is left to DataFusion, keeping the SQL text small.
const MAX_IN_LIST: usize = 1_000;

/// How a ClickHouse column is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `String`, `FixedString`, `Enum*`: `Utf8`. Comparisons and `IN` pushed down (both
    /// compare bytes).
    Text,
    /// Signed and unsigned integers up to 32 bits, and `Int64`: `Int64`. Pushed down.
    Int,
    /// `UInt64`: `UInt64`. Pushed down.
    UInt,
    /// `Float32`, `Float64`: `Float64`. Only `IS [NOT] NULL` pushed down (NaN ordering).
    Float,
    /// `Decimal(P, S)` with `P <= 38` (the rollups' exact sums): `Decimal128(38, S)`. Only
    /// `IS [NOT] NULL` pushed down.
    Decimal { scale: i8 },
    /// `DateTime` (seconds): `Timestamp(Microsecond, "UTC")`. Pushed down for whole seconds.
    DateTime,
    /// `DateTime64(p)`: `Timestamp(Microsecond, "UTC")`. Pushed down.
    DateTime64,
    /// A time with its exact microseconds beside it (`events.time` read from `time_us`,
    /// `ingested_at` from `ingested_at_us`). Pushed down on the microseconds, with the implied
    /// condition on the time column so ClickHouse can use its key and partitions.
    EventTime,
    /// Anything else: `Utf8` holding `toString(value)`. Only `IS [NOT] NULL` pushed down.
    AsText,
}

impl Kind {
    fn from_type(ty: &str) -> Self {
        let base = strip(strip(ty, "LowCardinality"), "Nullable");
        match base {
            "String" => Kind::Text,
            _ if base.starts_with("FixedString") || base.starts_with("Enum") => Kind::Text,
            "Int8" | "Int16" | "Int32" | "Int64" | "UInt8" | "UInt16" | "UInt32" => Kind::Int,
            "UInt64" => Kind::UInt,
            "Float32" | "Float64" => Kind::Float,
            _ if base.starts_with("Decimal") => {
                decimal_scale(base).map_or(Kind::AsText, |scale| Kind::Decimal { scale })
            }
            _ if base == "DateTime" || base.starts_with("DateTime(") => Kind::DateTime,
            _ if base.starts_with("DateTime64") => Kind::DateTime64,
            _ => Kind::AsText,
        }
    }

    fn arrow_type(self) -> DataType {
        match self {
            Kind::Text | Kind::AsText => DataType::Utf8,
            Kind::Int => DataType::Int64,
            Kind::UInt => DataType::UInt64,
            Kind::Float => DataType::Float64,
            Kind::Decimal { scale } => DataType::Decimal128(38, scale),
            Kind::DateTime | Kind::DateTime64 | Kind::EventTime => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
        }
    }
}

/// The scale of `Decimal(P, S)`, `Decimal32(S)`, `Decimal64(S)` or `Decimal128(S)` when it fits
/// Arrow's `Decimal128` (at most 38 digits).
fn decimal_scale(ty: &str) -> Option<i8> {
    let (name, args) = ty.strip_suffix(')')?.split_once('(')?;
    let args: Vec<u8> = args
        .split(',')
        .map(|a| a.trim().parse().ok())
        .collect::<Option<_>>()?;
    let (precision, scale) = match (name, args.as_slice()) {
        ("Decimal", [p, s]) => (*p, *s),
        ("Decimal32", [s]) => (9, *s),
        ("Decimal64", [s]) => (18, *s),
        ("Decimal128", [s]) => (38, *s),
        _ => return None,
    };
    (precision <= 38 && scale <= precision)
        .then(|| i8::try_from(scale).ok())
        .flatten()
}

/// `inner` of `wrapper(inner)`, or `ty` itself.
fn strip<'a>(ty: &'a str, wrapper: &str) -> &'a str {
    ty.strip_prefix(wrapper)
        .and_then(|rest| rest.strip_prefix('('))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or(ty)
}

#[derive(Debug, Clone)]
pub struct ChColumn {
    name: String,
    kind: Kind,
    nullable: bool,
}

impl ChColumn {
    /// The column as the SQL sent reads it (the JSON value the decoder expects).
    fn value_sql(&self) -> String {
        let c = quote_ident(&self.name);
        match self.kind {
            // Decimals come as JSON numbers with every digit, which the decoder reads exactly.
            Kind::Text | Kind::Float | Kind::Decimal { .. } => c,
            Kind::Int => format!("toInt64({c})"),
            Kind::UInt => format!("toUInt64({c})"),
            Kind::DateTime => format!("toInt64(toUInt32({c})) * 1000000"),
            Kind::DateTime64 => format!("toUnixTimestamp64Micro({c})"),
            Kind::EventTime => quote_ident(&format!("{}_us", self.name)),
            Kind::AsText => format!("toString({c})"),
        }
    }

    /// The column as the `i`th item of the select list. The alias is positional, never the
    /// column's name: ClickHouse resolves a name in `WHERE` to a select-list alias first, so
    /// `time_us AS time` would turn the bound on `time` into a bound on microseconds.
    fn select_item(&self, i: usize) -> String {
        format!("{} AS {}", self.value_sql(), wire_name(i))
    }
}

/// The alias of the `i`th selected column, as the decoder reads it.
fn wire_name(i: usize) -> String {
    format!("_meterd_c{i}")
}

/// A ClickHouse identifier in backquotes.
fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// A ClickHouse string literal.
fn quote_str(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// ClickHouse as a remote store: a client and the time limit of each scan.
#[derive(Debug)]
pub struct ClickHouse {
    client: clickhouse::Client,
    timeout: Duration,
}

/// A relation of the ClickHouse store.
pub type ClickHouseTable = RemoteTable<ClickHouse>;

/// Reads the columns of `database.name` from `system.columns`, in column order.
pub async fn discover(
    client: clickhouse::Client,
    database: &str,
    name: &str,
    timeout: Duration,
) -> Result<ClickHouseTable> {
    let qualified = format!("{database}.{name}");
    let engine: Option<String> = client
        .query("SELECT engine FROM system.tables WHERE database = ? AND name = ?")
        .bind(database)
        .bind(name)
        .fetch_optional()
        .await
        .map_err(|e| external(e, format!("reading the definition of {qualified}")))?;
    let Some(engine) = engine else {
        return Err(DataFusionError::Plan(format!(
            "ClickHouse has no table or view {qualified}"
        )));
    };
    let raw: Vec<(String, String)> = client
        .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
        .bind(database)
        .bind(name)
        .fetch_all()
        .await
        .map_err(|e| external(e, format!("reading the columns of {qualified}")))?;
    // A time column with a `<name>_us` beside it (`time`, and `ingested_at` in databases
    // created since it has one) is read exactly from the microseconds; those columns are
    // not relations' columns of their own.
    let exact = |name: &str| {
        raw.iter()
            .any(|(n, ty)| n == name && ty.contains("DateTime"))
            && raw.iter().any(|(n, _)| *n == format!("{name}_us"))
    };
    let exact_times: Vec<String> = raw
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| exact(n))
        .collect();
    let mut columns = Vec::with_capacity(raw.len());
    for (column, ty) in raw {
        let micros_of = column.strip_suffix("_us");
        if column == "_delivery" || micros_of.is_some_and(|t| exact_times.iter().any(|e| e == t)) {
            continue;
        }
        let kind = if exact_times.contains(&column) {
            Kind::EventTime
        } else {
            Kind::from_type(&ty)
        };
        let nullable = ty.contains("Nullable(");
        columns.push(ChColumn {
            name: column,
            kind,
            nullable,
        });
    }
    if columns.is_empty() {
        return Err(DataFusionError::Plan(format!(
            "ClickHouse relation {qualified} has no columns"
        )));
    }
    let fields: Vec<Field> = columns
        .iter()
        .map(|c| Field::new(&c.name, c.kind.arrow_type(), c.nullable))
        .collect();
    let table_type = if engine == "View" || engine == "MaterializedView" {
        TableType::View
    } else {
        TableType::Base
    };
    Ok(ClickHouseTable {
        dialect: Arc::new(ClickHouse { client, timeout }),
        relation: format!("{}.{}", quote_ident(database), quote_ident(name)),
        columns: columns.into(),
        schema: Arc::new(Schema::new(fields)),
        table_type,
    })
}

impl Dialect for ClickHouse {
    type Column = ChColumn;
    /// Literals are written into the SQL, quoted and escaped (see [`quote_str`]).
    type Params = ();

    const EXEC_NAME: &'static str = "ClickHouseScanExec";

    fn predicate(columns: &[ChColumn], expr: &Expr, _params: &mut ()) -> Option<String> {
        Translator(columns).predicate(expr)
    }

    /// ClickHouse needs at least one column; `count(*)` needs only the rows.
    fn select(columns: &[ChColumn], relation: &str) -> String {
        let select_list = if columns.is_empty() {
            "1 AS `_row`".to_owned()
        } else {
            columns
                .iter()
                .enumerate()
                .map(|(i, c)| c.select_item(i))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!("SELECT {select_list} FROM {relation}")
    }

    fn params_display(_params: &()) -> Option<String> {
        None
    }

    /// Decodes the `JSONEachRow` output as it arrives. Dropping the task drops the request,
    /// which ends the query on the server; `max_execution_time` bounds it otherwise.
    async fn fetch(&self, scan: &Scan<Self>, tx: &Sender<Result<RecordBatch>>) -> Result<()> {
        fetch(self, scan, tx).await
    }
}

/// Turns DataFusion filters into ClickHouse conditions that select exactly the same rows, or
/// `None`.
struct Translator<'a>(&'a [ChColumn]);

impl Translator<'_> {
    fn predicate(&self, expr: &Expr) -> Option<String> {
        match expr {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
                Operator::And | Operator::Or => {
                    let l = self.predicate(left)?;
                    let r = self.predicate(right)?;
                    let word = if *op == Operator::And { "AND" } else { "OR" };
                    Some(format!("({l} {word} {r})"))
                }
                _ => self.comparison(left, *op, right),
            },
            Expr::Between(Between {
                expr,
                negated: false,
                low,
                high,
            }) => {
                let lo = self.comparison(expr, Operator::GtEq, low)?;
                let hi = self.comparison(expr, Operator::LtEq, high)?;
                Some(format!("({lo} AND {hi})"))
            }
            Expr::InList(InList {
                expr,
                list,
                negated,
            }) if !list.is_empty() && list.len() <= MAX_IN_LIST => {
                let column = self.column(expr)?;
                if !matches!(column.kind, Kind::Text | Kind::Int | Kind::UInt) {
                    return None;
                }
                let values = list
                    .iter()
                    .map(|v| literal(column.kind, v).map(|(sql, exact)| exact.then_some(sql)))
                    .collect::<Option<Option<Vec<String>>>>()??;
                let value = column.value_sql();
                let values = values.join(", ");
                Some(match (negated, column.nullable) {
                    (false, _) => format!("{value} IN ({values})"),
                    (true, false) => format!("{value} NOT IN ({values})"),
                    // ClickHouse 18.16 answers true for NULL NOT IN a list of four or more
                    // (it turns shorter lists into comparisons, which answer NULL); in SQL a
                    // NULL is in no list and out of none.
                    (true, true) => format!("(isNotNull({value}) AND {value} NOT IN ({values}))"),
                })
            }
            Expr::IsNull(inner) => Some(format!("isNull({})", self.column(inner)?.value_sql())),
            Expr::IsNotNull(inner) => {
                Some(format!("isNotNull({})", self.column(inner)?.value_sql()))
            }
            _ => None,
        }
    }

    fn column(&self, expr: &Expr) -> Option<&ChColumn> {
        match expr {
            Expr::Column(c) => self.0.iter().find(|col| col.name == c.name),
            _ => None,
        }
    }

    /// `column op literal` (either side), for the kinds whose order ClickHouse and Arrow share.
    fn comparison(&self, left: &Expr, op: Operator, right: &Expr) -> Option<String> {
        let (column, value, op) = match (self.column(left), self.column(right)) {
            (Some(c), None) => (c, right, op),
            (None, Some(c)) => (c, left, op.swap()?),
            _ => return None,
        };
        let sql_op = match op {
            Operator::Eq => "=",
            Operator::NotEq => "!=",
            Operator::Lt => "<",
            Operator::LtEq => "<=",
            Operator::Gt => ">",
            Operator::GtEq => ">=",
            _ => return None,
        };
        if matches!(
            column.kind,
            Kind::Float | Kind::Decimal { .. } | Kind::AsText
        ) {
            return None;
        }
        let (literal, exact) = literal(column.kind, value)?;
        if !exact {
            return None;
        }
        let condition = format!("{} {sql_op} {literal}", column.value_sql());
        match column.kind {
            Kind::EventTime => {
                // `time` is `time_us` rounded down to its second (or DateTime64 of it), so a
                // bound on `time_us` implies this bound on `time`, which ClickHouse can use.
                // Only within `DateTime`'s range: outside it `toDateTime` would wrap.
                let us: i64 = literal.parse().ok()?;
                let second = us.div_euclid(1_000_000);
                let in_range = (0..i64::from(u32::MAX)).contains(&second);
                let implied = match op {
                    _ if !in_range => None,
                    Operator::Eq | Operator::Gt | Operator::GtEq => Some(format!(
                        "{} >= toDateTime({second}, 'UTC')",
                        quote_ident(&column.name)
                    )),
                    Operator::Lt | Operator::LtEq => Some(format!(
                        "{} < toDateTime({}, 'UTC')",
                        quote_ident(&column.name),
                        second + 1
                    )),
                    _ => None,
                };
                Some(match implied {
                    Some(i) => format!("({condition} AND {i})"),
                    None => condition,
                })
            }
            Kind::DateTime => {
                // Compare the column itself, so its key and partitions are used.
                let us: i64 = literal.parse().ok()?;
                // Whole seconds within `DateTime`'s range only: `toDateTime` would wrap.
                if us.rem_euclid(1_000_000) != 0
                    || !(0..=i64::from(u32::MAX)).contains(&us.div_euclid(1_000_000))
                {
                    return None;
                }
                Some(format!(
                    "{} {sql_op} toDateTime({}, 'UTC')",
                    quote_ident(&column.name),
                    us / 1_000_000
                ))
            }
            _ => Some(condition),
        }
    }
}

/// The SQL literal of `expr` for a column of `kind`, and whether comparing with it is exact.
fn literal(kind: Kind, expr: &Expr) -> Option<(String, bool)> {
    let value = literal_value(expr)?;
    match (kind, &value) {
        (Kind::Text, v) => text_value(v).map(|s| (quote_str(s), true)),
        (Kind::Int, v) => int_value(v).map(|i| (i.to_string(), true)),
        (Kind::UInt, v) => int_value(v)
            .and_then(|i| u64::try_from(i).ok())
            .map(|u| (u.to_string(), true)),
        (Kind::DateTime | Kind::DateTime64 | Kind::EventTime, v) => {
            timestamp_micros(v).map(|us| (us.to_string(), true))
        }
        _ => None,
    }
}

/// A UTC timestamp literal in microseconds, if it is exactly one. Zone-less timestamps are
/// not pushed down: the column is UTC, and DataFusion's comparison of the two is its own
/// business.
fn timestamp_micros(value: &ScalarValue) -> Option<i64> {
    let t = timestamp_value(value)?;
    (t.zoned && t.exact).then_some(t.micros)
}

/// Runs the scan's statement and sends its rows to `tx` until the result ends or the receiver
/// is gone.
async fn fetch(
    store: &ClickHouse,
    request: &Scan<ClickHouse>,
    tx: &Sender<Result<RecordBatch>>,
) -> Result<()> {
    // The decoder reads the positional aliases of the select list; a scan without columns
    // reads a constant per row, and the decoder wants a field for it.
    let decode_schema = if request.schema.fields().is_empty() {
        Arc::new(Schema::new(vec![Field::new(
            "_row",
            DataType::Int64,
            false,
        )]))
    } else {
        Arc::new(Schema::new(
            request
                .schema
                .fields()
                .iter()
                .enumerate()
                .map(|(i, f)| f.as_ref().clone().with_name(wire_name(i)))
                .collect::<Vec<_>>(),
        ))
    };
    let mut decoder = ReaderBuilder::new(Arc::clone(&decode_schema))
        .with_batch_size(request.batch_size.max(1))
        .build_decoder()
        .map_err(|e| external(e, "building the JSON decoder"))?;
    let timeout = store.timeout.as_secs().max(1).to_string();
    let mut cursor = store
        .client
        // Sent verbatim: a `?` in a literal is text, not a bind placeholder.
        .query_raw(&request.sql)
        .with_setting("output_format_json_quote_64bit_integers", "0")
        .with_setting("max_execution_time", timeout)
        .fetch_bytes("JSONEachRow")
        .map_err(|e| refused(e, &request.sql))?;
    let send = |batch: RecordBatch| async move {
        let batch = RecordBatch::try_new_with_options(
            Arc::clone(&request.schema),
            if request.schema.fields().is_empty() {
                vec![]
            } else {
                batch.columns().to_vec()
            },
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
        )
        .map_err(|e| external(e, "building a batch"))?;
        Ok::<bool, DataFusionError>(tx.send(Ok(batch)).await.is_ok())
    };
    loop {
        let chunk = cursor.next().await.map_err(|e| refused(e, &request.sql))?;
        let Some(chunk) = chunk else { break };
        let mut rest: &[u8] = &chunk;
        while !rest.is_empty() {
            let read = decoder
                .decode(rest)
                .map_err(|e| external(e, "decoding ClickHouse's JSON"))?;
            rest = &rest[read..];
            if !rest.is_empty() || read == 0 {
                // The decoder is full: hand a batch on.
                if let Some(batch) = decoder
                    .flush()
                    .map_err(|e| external(e, "decoding ClickHouse's JSON"))?
                    && !send(batch).await?
                {
                    return Ok(());
                }
            }
        }
    }
    if let Some(batch) = decoder
        .flush()
        .map_err(|e| external(e, "decoding ClickHouse's JSON"))?
    {
        send(batch).await?;
    }
    Ok(())
}

/// How much of a statement an error message carries: enough to recognise it, never a
/// megabyte of literal in a log line.
const SQL_EXCERPT_CHARS: usize = 300;

/// The start of `sql`, marked as cut when it is longer than [`SQL_EXCERPT_CHARS`].
fn excerpt(sql: &str) -> String {
    match sql.char_indices().nth(SQL_EXCERPT_CHARS) {
        Some((end, _)) => format!("{}... ({} bytes in all)", &sql[..end], sql.len()),
        None => sql.to_owned(),
    }
}

/// How ClickHouse reports a statement too large or deep for it to parse: "Max query size
/// exceeded" (a `SYNTAX_ERROR`), `TOO_DEEP_SUBQUERIES` (166), `TOO_DEEP_AST` (167),
/// `TOO_BIG_AST` (168), `TOO_DEEP_RECURSION` (306). 18.16 writes `Code: 167, e.displayText()`,
/// servers since 21.8 `Code: 167. DB::Exception: ... (TOO_DEEP_AST)`.
const STATEMENT_TOO_LARGE: &[&str] = &[
    "Max query size exceeded",
    "Code: 166,",
    "Code: 167,",
    "Code: 168,",
    "Code: 306,",
    "Code: 166.",
    "Code: 167.",
    "Code: 168.",
    "Code: 306.",
];

/// An error of ClickHouse running `sql`. A statement that is too large or deep for ClickHouse
/// is the client's doing (a plan error, so a 400 with a short reason); anything else keeps its
/// cause. Either way the message carries only an excerpt of the statement.
fn refused(e: ::clickhouse::error::Error, sql: &str) -> DataFusionError {
    let message = e.to_string();
    if STATEMENT_TOO_LARGE.iter().any(|m| message.contains(m)) {
        let reason = message
            .split_once("DB::Exception: ")
            .map_or(message.as_str(), |(_, rest)| rest);
        let reason: String = reason.chars().take(SQL_EXCERPT_CHARS).collect();
        return DataFusionError::Plan(format!(
            "the statement is too large or too deep for ClickHouse: {reason}; use fewer \
             values in IN lists and shorter literals"
        ));
    }
    external(e, format!("ClickHouse refused `{}`", excerpt(sql)))
}

/// A ClickHouse or decoding error as a DataFusion error, with what we were doing.
fn external(
    e: impl std::error::Error + Send + Sync + 'static,
    doing: impl Into<String>,
) -> DataFusionError {
    DataFusionError::External(Box::new(e)).context(doing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_map() {
        assert_eq!(Kind::from_type("String"), Kind::Text);
        assert_eq!(Kind::from_type("LowCardinality(String)"), Kind::Text);
        assert_eq!(
            Kind::from_type("LowCardinality(Nullable(String))"),
            Kind::Text
        );
        assert_eq!(Kind::from_type("Nullable(Int64)"), Kind::Int);
        assert_eq!(Kind::from_type("UInt64"), Kind::UInt);
        assert_eq!(Kind::from_type("DateTime('UTC')"), Kind::DateTime);
        assert_eq!(Kind::from_type("DateTime"), Kind::DateTime);
        assert_eq!(Kind::from_type("DateTime64(6, 'UTC')"), Kind::DateTime64);
        assert_eq!(Kind::from_type("Array(String)"), Kind::AsText);
        assert_eq!(
            Kind::from_type("Decimal(38, 0)"),
            Kind::Decimal { scale: 0 }
        );
        assert_eq!(
            Kind::from_type("Nullable(Decimal64(4))"),
            Kind::Decimal { scale: 4 }
        );
        assert_eq!(Kind::from_type("Decimal(76, 0)"), Kind::AsText);
    }

    #[test]
    fn literals_are_quoted_and_escaped() {
        assert_eq!(quote_str("a'b\\c"), "'a\\'b\\\\c'");
        assert_eq!(quote_str("x\0y"), "'x\\0y'");
        assert_eq!(quote_ident("we`ird"), "`we\\`ird`");
    }
}

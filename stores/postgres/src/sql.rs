//! PostgreSQL relations (`meterd.events`, `meterd.usage_hourly`, ...) as DataFusion tables, so
//! `POST /v1/sql` can answer from the PostgreSQL store while PostgreSQL does the filtering.
//!
//! At registration the relation's columns are read from the catalog and mapped to Arrow types
//! (see [`ColumnKind`]). At scan time the projection, the filters that translate exactly
//! (see [`Translator`]) and the limit become one `SELECT`, whose literals are bind parameters,
//! never text spliced into the SQL. Rows come back through a portal, one batch per fetch.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayRef, BooleanBuilder, Decimal128Builder, Float64Builder, Int64Builder, RecordBatch,
    RecordBatchOptions, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::compute::kernels::cast_utils::parse_decimal;
use arrow::datatypes::{
    DECIMAL128_MAX_PRECISION, DataType, Decimal128Type, Field, Schema, SchemaRef, TimeUnit,
};
use chrono::{DateTime, NaiveDateTime, Utc};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::expr::{Between, BinaryExpr, Cast, InList};
use datafusion::logical_expr::{Expr, Operator};
use deadpool_postgres::Pool;
use meterd_query::pushdown::{int_value, literal_value, text_value, timestamp_value};
use meterd_query::remote::{Dialect, RemoteTable, Scan};
use tokio::sync::mpsc::Sender;
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, ToSql, Type};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01T00:00:00Z).
const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
/// The earliest timestamp PostgreSQL accepts (4714-11-24 BC), in Unix microseconds.
const POSTGRES_MIN_UNIX_MICROS: i64 = -211_813_488_000_000_000 + POSTGRES_EPOCH_UNIX_MICROS;
/// Widest Arrow decimal; wider `numeric(p, s)` columns are read as `Float64`.
const MAX_DECIMAL128_PRECISION: i32 = 38;
/// An `IN` list longer than this is left to DataFusion, so a statement stays far below
/// PostgreSQL's 65535 bind parameters.
const MAX_IN_LIST_PARAMS: usize = 1_000;

/// How a PostgreSQL column is read, and which filters on it translate exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    /// `text`, `varchar`: `Utf8`. Equality, ordering and `IN` filters are pushed down.
    Text,
    /// `int2`, `int4`, `int8`: `Int64` (the narrow ones read as `int8`). Filters pushed down.
    Int,
    /// `bool`: `Boolean`. Filters pushed down.
    Bool,
    /// `timestamptz`: `Timestamp(Microsecond, "UTC")`. Filters pushed down.
    TimestampTz,
    /// `timestamp`: `Timestamp(Microsecond, None)`. Filters pushed down.
    Timestamp,
    /// `float8`; also `float4` and unconstrained `numeric` (or wider than 38 digits) read as
    /// `float8`: `Float64`. Only `IS [NOT] NULL` is pushed down: float and numeric comparisons
    /// do not order NaN and -0.0 the way Arrow does.
    Float,
    /// `numeric(p, s)` with `p <= 38` and `0 <= s <= p`: `Decimal128(38, s)`, read as text and
    /// parsed exactly. Only `IS [NOT] NULL` is pushed down.
    Decimal {
        /// Digits after the decimal point.
        scale: i8,
    },
    /// `json`, `jsonb` and every other type: `Utf8` holding the value's text form (`::text`).
    /// Only `IS [NOT] NULL` is pushed down: comparing text forms is not comparing values.
    AsText,
}

impl ColumnKind {
    /// The kind for a catalog type name (`pg_type.typname`) and type modifier.
    fn from_catalog(type_name: &str, type_modifier: i32) -> Self {
        match type_name {
            "text" | "varchar" => ColumnKind::Text,
            "int2" | "int4" | "int8" => ColumnKind::Int,
            "bool" => ColumnKind::Bool,
            "timestamptz" => ColumnKind::TimestampTz,
            "timestamp" => ColumnKind::Timestamp,
            "float4" | "float8" => ColumnKind::Float,
            "numeric" => match numeric_precision_scale(type_modifier) {
                Some((precision, scale))
                    if precision <= MAX_DECIMAL128_PRECISION
                        && (0..=precision).contains(&scale) =>
                {
                    // `scale <= precision <= 38`, so it fits.
                    ColumnKind::Decimal {
                        scale: i8::try_from(scale).unwrap_or(i8::MAX),
                    }
                }
                _ => ColumnKind::Float,
            },
            _ => ColumnKind::AsText,
        }
    }

    fn arrow_type(self) -> DataType {
        match self {
            ColumnKind::Text | ColumnKind::AsText => DataType::Utf8,
            ColumnKind::Int => DataType::Int64,
            ColumnKind::Bool => DataType::Boolean,
            ColumnKind::TimestampTz => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
            ColumnKind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            ColumnKind::Float => DataType::Float64,
            ColumnKind::Decimal { scale } => DataType::Decimal128(38, scale),
        }
    }
}

/// `numeric(p, s)`'s precision and scale from its type modifier; `None` when unconstrained.
fn numeric_precision_scale(type_modifier: i32) -> Option<(i32, i32)> {
    // PostgreSQL stores ((p << 16) | s) + VARHDRSZ, s as an 11-bit signed number (since 15).
    let packed = type_modifier.checked_sub(4).filter(|packed| *packed >= 0)?;
    let precision = (packed >> 16) & 0xffff;
    let scale = ((packed & 0x7ff) ^ 1024) - 1024;
    Some((precision, scale))
}

/// One column of the relation, in catalog order.
#[derive(Debug, Clone)]
pub struct PgColumn {
    name: String,
    kind: ColumnKind,
    /// The cast that makes PostgreSQL send the value in the form [`read_column`] decodes.
    read_cast: Option<&'static str>,
}

impl PgColumn {
    fn new(name: String, type_name: &str, type_modifier: i32) -> Self {
        let kind = ColumnKind::from_catalog(type_name, type_modifier);
        let read_cast = match (kind, type_name) {
            (ColumnKind::Int, "int2" | "int4") => Some("int8"),
            (ColumnKind::Float, "float4" | "numeric") => Some("float8"),
            (ColumnKind::Decimal { .. } | ColumnKind::AsText, _) => Some("text"),
            _ => None,
        };
        Self {
            name,
            kind,
            read_cast,
        }
    }

    /// The column's entry in the `SELECT` list.
    fn select_item(&self) -> String {
        let name = quote_ident(&self.name);
        match self.read_cast {
            Some(cast) => format!("{name}::{cast} AS {name}"),
            None => name,
        }
    }
}

/// `"name"`, with embedded quotes doubled: the only way an identifier enters the SQL.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// PostgreSQL as a remote store: a connection pool and the time limit of each scan.
#[derive(Debug)]
pub struct Postgres {
    pool: Pool,
    /// PostgreSQL's `statement_timeout` for each scan, so an abandoned fetch stops there too.
    statement_timeout: Duration,
}

/// A PostgreSQL table or view `schema.name`, read through a connection pool.
pub type PostgresTable = RemoteTable<Postgres>;

/// Reads the columns of `schema.name` (a table, view, materialized view, partitioned or
/// foreign table) from the catalog, in column order.
pub async fn discover(
    pool: Pool,
    schema: &str,
    name: &str,
    statement_timeout: Duration,
) -> Result<PostgresTable> {
    let qualified = format!("{schema}.{name}");
    let client = pool
        .get()
        .await
        .map_err(|e| external(e, format!("connecting to PostgreSQL to read {qualified}")))?;
    // LEFT JOIN: a relation without columns still yields one row, so "missing" is clear.
    let rows = client
        .query(
            "SELECT c.relkind::text, a.attname::text, t.typname::text, a.atttypmod, a.attnotnull
             FROM pg_catalog.pg_class c
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_catalog.pg_attribute a
               ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             LEFT JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
             WHERE n.nspname = $1 AND c.relname = $2
               AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
             ORDER BY a.attnum",
            &[&schema, &name],
        )
        .await
        .map_err(|e| external(e, format!("reading the columns of {qualified}")))?;
    let Some(first) = rows.first() else {
        return Err(DataFusionError::Plan(format!(
            "PostgreSQL has no table or view {qualified}"
        )));
    };
    let read_error =
        |e: tokio_postgres::Error| external(e, format!("reading the columns of {qualified}"));
    let relkind: String = first.try_get(0).map_err(read_error)?;
    let mut columns = Vec::with_capacity(rows.len());
    let mut fields = Vec::with_capacity(rows.len());
    for row in &rows {
        // No attribute: the relation has no columns (the LEFT JOIN's one row).
        let Some(column_name) = row.try_get::<_, Option<String>>(1).map_err(read_error)? else {
            continue;
        };
        let type_name: String = row.try_get(2).map_err(read_error)?;
        let type_modifier: i32 = row.try_get(3).map_err(read_error)?;
        let not_null: bool = row.try_get(4).map_err(read_error)?;
        let column = PgColumn::new(column_name, &type_name, type_modifier);
        fields.push(Field::new(
            &column.name,
            column.kind.arrow_type(),
            !not_null,
        ));
        columns.push(column);
    }
    if columns.is_empty() {
        return Err(DataFusionError::Plan(format!(
            "PostgreSQL relation {qualified} has no columns"
        )));
    }
    if name == "events" {
        // Migrations add columns at the end of the table; `events` shows them in the column
        // table's order, as the other stores do, so `SELECT *` answers alike everywhere.
        let position = |column: &str| {
            meterd_schemas::columns::COLUMNS
                .iter()
                .position(|c| c.name == column)
                .unwrap_or(usize::MAX)
        };
        let mut paired: Vec<(PgColumn, Field)> = columns.into_iter().zip(fields).collect();
        paired.sort_by_key(|(column, _)| position(&column.name));
        (columns, fields) = paired.into_iter().unzip();
    }
    let table_type = match relkind.as_str() {
        "v" | "m" => TableType::View,
        _ => TableType::Base,
    };
    tracing::debug!(
        relation = %qualified,
        columns = columns.len(),
        "read PostgreSQL table definition"
    );
    Ok(PostgresTable {
        dialect: Arc::new(Postgres {
            pool,
            statement_timeout,
        }),
        relation: format!("{}.{}", quote_ident(schema), quote_ident(name)),
        columns: columns.into(),
        schema: Arc::new(Schema::new(fields)),
        table_type,
    })
}

impl Dialect for Postgres {
    type Column = PgColumn;
    type Params = Vec<Param>;

    const EXEC_NAME: &'static str = "PostgresScanExec";

    fn predicate(columns: &[PgColumn], expr: &Expr, params: &mut Vec<Param>) -> Option<String> {
        let mut translator = Translator {
            columns,
            params: std::mem::take(params),
        };
        let condition = translator.predicate(expr);
        *params = translator.params;
        condition
    }

    /// Identifiers are quoted and values are `$n` parameters: nothing from the query text is
    /// spliced into this SQL as is. An empty select list is valid in PostgreSQL: rows without
    /// columns, for `count(*)`.
    fn select(columns: &[PgColumn], relation: &str) -> String {
        let select_list = columns
            .iter()
            .map(PgColumn::select_item)
            .collect::<Vec<_>>()
            .join(", ");
        if select_list.is_empty() {
            format!("SELECT FROM {relation}")
        } else {
            format!("SELECT {select_list} FROM {relation}")
        }
    }

    /// `$1='acme', $2=2026-01-01T00:00:00Z`.
    fn params_display(params: &Vec<Param>) -> Option<String> {
        Some(
            params
                .iter()
                .enumerate()
                .map(|(i, param)| format!("${}={param}", i + 1))
                .collect::<Vec<_>>()
                .join(", "),
        )
    }

    /// Rows are fetched through a portal in a read-only transaction, `batch_size` rows (8192 by
    /// default) per fetch, one batch per fetch. Bind parameters keep every literal out of the
    /// SQL text, which binary `COPY (SELECT ...) TO STDOUT` cannot do: `COPY` takes no
    /// parameters, so values would have to be rendered as escaped literals, the one thing this
    /// module never does. And a portal makes the server produce rows only as the consumer makes
    /// room for them, so a query that stops early (a `LIMIT` applied above, a timeout, a row
    /// cap) leaves at most one fetch behind instead of a whole result to drain. Dropping the
    /// task rolls the transaction back and returns the connection to the pool;
    /// `statement_timeout` bounds a fetch the server is still running.
    async fn fetch(&self, scan: &Scan<Self>, tx: &Sender<Result<RecordBatch>>) -> Result<()> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| external(e, "connecting to PostgreSQL"))?;
        let transaction = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(|e| external(e, "starting a PostgreSQL transaction"))?;
        // An integer from our configuration, not from the query.
        let timeout_ms = self.statement_timeout.as_millis().max(1);
        transaction
            .batch_execute(&format!("SET LOCAL statement_timeout = {timeout_ms}"))
            .await
            .map_err(|e| external(e, "setting the PostgreSQL statement timeout"))?;
        let params: Vec<&(dyn ToSql + Sync)> = scan.params.iter().map(Param::as_sql).collect();
        let portal = transaction
            .bind(scan.sql.as_str(), &params)
            .await
            .map_err(|e| external(e, format!("PostgreSQL refused `{}`", scan.sql)))?;
        let kinds: Vec<ColumnKind> = scan.columns.iter().map(|column| column.kind).collect();
        let max_rows = i32::try_from(scan.batch_size.max(1)).unwrap_or(i32::MAX);
        loop {
            let rows = transaction
                .query_portal(&portal, max_rows)
                .await
                .map_err(|e| external(e, "fetching rows from PostgreSQL"))?;
            // A short fetch means the portal is exhausted.
            let last = i32::try_from(rows.len()).is_ok_and(|n| n < max_rows);
            if !rows.is_empty() {
                let batch = to_record_batch(&scan.schema, &kinds, &rows)?;
                if tx.send(Ok(batch)).await.is_err() {
                    // The query stopped reading; dropping the transaction rolls it back.
                    return Ok(());
                }
            }
            if last {
                break;
            }
        }
        transaction
            .commit()
            .await
            .map_err(|e| external(e, "ending the PostgreSQL transaction"))
    }
}

/// A literal value bound as a statement parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Text(String),
    Int(i64),
    Bool(bool),
    TimestampTz(DateTime<Utc>),
    Timestamp(NaiveDateTime),
}

impl Param {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Text(value) => value,
            Param::Int(value) => value,
            Param::Bool(value) => value,
            Param::TimestampTz(value) => value,
            Param::Timestamp(value) => value,
        }
    }

    /// The type the placeholder is cast to, so PostgreSQL infers the parameter's type from
    /// the value rather than from the column (an `int2` column would otherwise want `int2`).
    fn pg_type(&self) -> &'static str {
        match self {
            Param::Text(_) => "text",
            Param::Int(_) => "int8",
            Param::Bool(_) => "bool",
            Param::TimestampTz(_) => "timestamptz",
            Param::Timestamp(_) => "timestamp",
        }
    }
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Param::Text(value) => write!(f, "'{}'", value.replace('\'', "''")),
            Param::Int(value) => write!(f, "{value}"),
            Param::Bool(value) => write!(f, "{value}"),
            Param::TimestampTz(value) => {
                write!(
                    f,
                    "{}",
                    value.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                )
            }
            Param::Timestamp(value) => write!(f, "{}", value.format("%Y-%m-%dT%H:%M:%S%.f")),
        }
    }
}

/// Translates DataFusion filters into PostgreSQL conditions that keep exactly the rows
/// DataFusion would keep, binding literals as parameters. Anything else is `None`, and
/// DataFusion evaluates that filter itself.
///
/// What translates: `=`, `<>`, `<`, `<=`, `>`, `>=`, `IS [NOT] DISTINCT FROM` between a
/// column and a literal (either side), `[NOT] BETWEEN`, `[NOT] IN` lists of literals,
/// `IS [NOT] NULL`, `IS [NOT] TRUE/FALSE/UNKNOWN`, `AND`, `OR`, `NOT`, and a boolean column
/// alone, on `text`/`varchar`, integer, `bool`, `timestamptz` and `timestamp` columns. Literals
/// may be strings, integers, booleans, timestamps of any unit (with a time zone for
/// `timestamptz`, without for `timestamp`), or a cast of a literal (such as a string cast to a
/// timestamp), which is evaluated with DataFusion's own cast. Comparison and logic operators
/// treat NULL alike in both engines, so a translated filter is exact, not a pre-filter.
#[derive(Debug)]
struct Translator<'a> {
    columns: &'a [PgColumn],
    params: Vec<Param>,
}

impl<'a> Translator<'a> {
    /// A boolean condition.
    fn predicate(&mut self, expr: &Expr) -> Option<String> {
        match expr {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
                Operator::And | Operator::Or => {
                    let left = self.predicate(left)?;
                    let right = self.predicate(right)?;
                    let keyword = if *op == Operator::And { "AND" } else { "OR" };
                    Some(format!("({left} {keyword} {right})"))
                }
                _ => self.comparison(left, *op, right),
            },
            Expr::Not(inner) => Some(format!("(NOT {})", self.predicate(inner)?)),
            Expr::IsNull(inner) => Some(format!("({} IS NULL)", self.operand(inner)?)),
            Expr::IsNotNull(inner) => Some(format!("({} IS NOT NULL)", self.operand(inner)?)),
            Expr::IsTrue(inner) => Some(format!("({} IS TRUE)", self.predicate(inner)?)),
            Expr::IsFalse(inner) => Some(format!("({} IS FALSE)", self.predicate(inner)?)),
            Expr::IsUnknown(inner) => Some(format!("({} IS UNKNOWN)", self.predicate(inner)?)),
            Expr::IsNotTrue(inner) => Some(format!("({} IS NOT TRUE)", self.predicate(inner)?)),
            Expr::IsNotFalse(inner) => Some(format!("({} IS NOT FALSE)", self.predicate(inner)?)),
            Expr::IsNotUnknown(inner) => {
                Some(format!("({} IS NOT UNKNOWN)", self.predicate(inner)?))
            }
            // `x BETWEEN a AND b` is defined as `x >= a AND x <= b`, NULLs included.
            Expr::Between(Between {
                expr,
                negated,
                low,
                high,
            }) => {
                let lower = self.comparison(expr, Operator::GtEq, low)?;
                let upper = self.comparison(expr, Operator::LtEq, high)?;
                let both = format!("({lower} AND {upper})");
                Some(if *negated {
                    format!("(NOT {both})")
                } else {
                    both
                })
            }
            Expr::InList(InList {
                expr,
                list,
                negated,
            }) => self.in_list(expr, list, *negated),
            Expr::Column(_) => {
                let column = self.column(expr)?;
                (column.kind == ColumnKind::Bool).then(|| quote_ident(&column.name))
            }
            _ => None,
        }
    }

    /// The operand of `IS [NOT] NULL`: a column of any type, or a condition.
    fn operand(&mut self, expr: &Expr) -> Option<String> {
        match self.column(expr) {
            Some(column) => Some(quote_ident(&column.name)),
            None => self.predicate(expr),
        }
    }

    /// `column op literal` or `literal op column`.
    fn comparison(&mut self, left: &Expr, op: Operator, right: &Expr) -> Option<String> {
        let (column, op, literal) = match self.column(left) {
            Some(column) => (column, op, right),
            None => (self.column(right)?, op.swap()?, left),
        };
        let value = literal_value(literal)?;
        let (param, exact) = param_for(column.kind, &value)?;
        // A timestamp literal finer than a microsecond lies strictly between two stored
        // values t and t+1µs: `> L` and `>= L` both mean `> t`, `< L` and `<= L` mean `<= t`,
        // and nothing equals it (left to DataFusion rather than rendered as FALSE, which would
        // differ from NULL under NOT).
        let op = if exact {
            op
        } else {
            match op {
                Operator::Gt | Operator::GtEq => Operator::Gt,
                Operator::Lt | Operator::LtEq => Operator::LtEq,
                _ => return None,
            }
        };
        let (sql_op, ordering) = match op {
            Operator::Eq => ("=", false),
            Operator::NotEq => ("<>", false),
            Operator::IsDistinctFrom => ("IS DISTINCT FROM", false),
            Operator::IsNotDistinctFrom => ("IS NOT DISTINCT FROM", false),
            Operator::Lt => ("<", true),
            Operator::LtEq => ("<=", true),
            Operator::Gt => (">", true),
            Operator::GtEq => (">=", true),
            _ => return None,
        };
        let mut column_sql = quote_ident(&column.name);
        if ordering && column.kind == ColumnKind::Text {
            // DataFusion orders strings by their bytes; so does the "C" collation, whatever
            // the column's own collation is. Equality needs no such help (deterministic
            // collations compare equal exactly when the bytes are equal) and keeps its index.
            column_sql.push_str(" COLLATE \"C\"");
        }
        let placeholder = self.bind(param)?;
        Some(format!("({column_sql} {sql_op} {placeholder})"))
    }

    fn in_list(&mut self, expr: &Expr, list: &[Expr], negated: bool) -> Option<String> {
        let column = self.column(expr)?;
        if list.is_empty() || list.len() > MAX_IN_LIST_PARAMS {
            return None;
        }
        let mut placeholders = Vec::with_capacity(list.len());
        for item in list {
            let (param, exact) = param_for(column.kind, &literal_value(item)?)?;
            if !exact {
                return None;
            }
            placeholders.push(self.bind(param)?);
        }
        let not = if negated { "NOT " } else { "" };
        Some(format!(
            "({} {not}IN ({}))",
            quote_ident(&column.name),
            placeholders.join(", ")
        ))
    }

    /// The column `expr` reads, looking through casts that keep every value as it is (a
    /// timestamp to a finer unit, a string to another string type), and only those.
    fn column(&self, expr: &Expr) -> Option<&'a PgColumn> {
        match expr {
            Expr::Column(column) => self.columns.iter().find(|c| c.name == column.name),
            Expr::Cast(Cast { expr, field }) => {
                let Expr::Column(_) = expr.as_ref() else {
                    return None;
                };
                let column = self.column(expr)?;
                keeps_values(column.kind, field.data_type()).then_some(column)
            }
            _ => None,
        }
    }

    /// Adds a parameter and returns its typed placeholder, e.g. `$3::timestamptz`.
    fn bind(&mut self, param: Param) -> Option<String> {
        let cast = param.pg_type();
        self.params.push(param);
        let n = self.params.len();
        (n <= usize::from(u16::MAX)).then(|| format!("${n}::{cast}"))
    }
}

/// Whether casting a column of `kind` to `to` leaves every value, and so every comparison,
/// unchanged. (A timestamp beyond 2262 overflows a nanosecond cast in DataFusion and so fails
/// the query there; PostgreSQL answers instead.)
fn keeps_values(kind: ColumnKind, to: &DataType) -> bool {
    match (kind, to) {
        (ColumnKind::Text, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) => true,
        (ColumnKind::Int, DataType::Int64) => true,
        (ColumnKind::TimestampTz, DataType::Timestamp(unit, Some(_)))
        | (ColumnKind::Timestamp, DataType::Timestamp(unit, None)) => {
            matches!(unit, TimeUnit::Microsecond | TimeUnit::Nanosecond)
        }
        _ => false,
    }
}

/// The parameter comparing `value` with a column of `kind`, and whether it is exact (only a
/// sub-microsecond timestamp is not: it is then rounded down to the microsecond).
fn param_for(kind: ColumnKind, value: &ScalarValue) -> Option<(Param, bool)> {
    match kind {
        ColumnKind::Text => {
            let text = text_value(value)?;
            // PostgreSQL text cannot hold NUL; such a literal matches nothing but would fail
            // the statement.
            (!text.contains('\0')).then(|| (Param::Text(text.to_owned()), true))
        }
        ColumnKind::Int => Some((Param::Int(int_value(value)?), true)),
        ColumnKind::Bool => match *value {
            ScalarValue::Boolean(Some(v)) => Some((Param::Bool(v), true)),
            _ => None,
        },
        ColumnKind::TimestampTz => {
            let (micros, exact) = timestamp_micros(value, true)?;
            let at = DateTime::<Utc>::from_timestamp_micros(micros)?;
            Some((Param::TimestampTz(at), exact))
        }
        ColumnKind::Timestamp => {
            let (micros, exact) = timestamp_micros(value, false)?;
            let at = DateTime::<Utc>::from_timestamp_micros(micros)?.naive_utc();
            Some((Param::Timestamp(at), exact))
        }
        ColumnKind::Float | ColumnKind::Decimal { .. } | ColumnKind::AsText => None,
    }
}

/// A timestamp literal in Unix microseconds, rounded down, and whether that was exact. `None`
/// unless the literal has a time zone exactly when `with_time_zone` (any zone: the value is an
/// instant), or outside PostgreSQL's range.
fn timestamp_micros(value: &ScalarValue, with_time_zone: bool) -> Option<(i64, bool)> {
    let t = timestamp_value(value)?;
    (t.zoned == with_time_zone && t.micros >= POSTGRES_MIN_UNIX_MICROS)
        .then_some((t.micros, t.exact))
}

/// Builds one Arrow column per entry of `kinds` from `rows`.
fn to_record_batch(schema: &SchemaRef, kinds: &[ColumnKind], rows: &[Row]) -> Result<RecordBatch> {
    let columns = kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| read_column(rows, i, *kind))
        .collect::<Result<Vec<_>>>()?;
    let options = RecordBatchOptions::new().with_row_count(Some(rows.len()));
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &options,
    )?)
}

/// Column `i` of every row, in the form [`PgColumn::read_cast`] had PostgreSQL send it.
fn read_column(rows: &[Row], i: usize, kind: ColumnKind) -> Result<ArrayRef> {
    let read_error = |e: tokio_postgres::Error| external(e, "reading a PostgreSQL row");
    Ok(match kind {
        ColumnKind::Text | ColumnKind::AsText => {
            let mut builder = StringBuilder::with_capacity(rows.len(), rows.len() * 16);
            for row in rows {
                builder.append_option(row.try_get::<_, Option<&str>>(i).map_err(read_error)?);
            }
            Arc::new(builder.finish())
        }
        ColumnKind::Int => {
            let mut builder = Int64Builder::with_capacity(rows.len());
            for row in rows {
                builder.append_option(row.try_get::<_, Option<i64>>(i).map_err(read_error)?);
            }
            Arc::new(builder.finish())
        }
        ColumnKind::Float => {
            let mut builder = Float64Builder::with_capacity(rows.len());
            for row in rows {
                builder.append_option(row.try_get::<_, Option<f64>>(i).map_err(read_error)?);
            }
            Arc::new(builder.finish())
        }
        ColumnKind::Bool => {
            let mut builder = BooleanBuilder::with_capacity(rows.len());
            for row in rows {
                builder.append_option(row.try_get::<_, Option<bool>>(i).map_err(read_error)?);
            }
            Arc::new(builder.finish())
        }
        ColumnKind::TimestampTz | ColumnKind::Timestamp => {
            let mut builder = TimestampMicrosecondBuilder::with_capacity(rows.len());
            for row in rows {
                let value = row
                    .try_get::<_, Option<UnixMicros>>(i)
                    .map_err(read_error)?;
                builder.append_option(value.map(|v| v.0));
            }
            let array = builder.finish();
            Arc::new(if kind == ColumnKind::TimestampTz {
                array.with_timezone("UTC")
            } else {
                array
            })
        }
        ColumnKind::Decimal { scale } => {
            let mut builder =
                Decimal128Builder::with_capacity(rows.len()).with_precision_and_scale(38, scale)?;
            for row in rows {
                let text = row.try_get::<_, Option<&str>>(i).map_err(read_error)?;
                let value = match text {
                    // PostgreSQL's text form of a `numeric(p, s)` (`-12.50`); `NaN` and values
                    // past 38 digits are errors.
                    Some(text) => Some(
                        parse_decimal::<Decimal128Type>(text, DECIMAL128_MAX_PRECISION, scale)
                            .map_err(|e| {
                                DataFusionError::External(
                                    format!(
                                        "PostgreSQL numeric {text} does not fit Decimal128(38, {scale}): {e}"
                                    )
                                    .into(),
                                )
                            })?,
                    ),
                    None => None,
                };
                builder.append_option(value);
            }
            Arc::new(builder.finish())
        }
    })
}

/// A `timestamp` or `timestamptz` as Unix microseconds, decoded from the binary format
/// directly: chrono's decoder would be slower, and cannot represent `infinity`, which is
/// refused here with a clear error.
#[derive(Debug, Clone, Copy)]
struct UnixMicros(i64);

impl<'a> FromSql<'a> for UnixMicros {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into()?;
        let since_2000 = i64::from_be_bytes(bytes);
        if since_2000 == i64::MAX || since_2000 == i64::MIN {
            return Err("an infinite timestamp has no Arrow representation".into());
        }
        since_2000
            .checked_add(POSTGRES_EPOCH_UNIX_MICROS)
            .map(UnixMicros)
            .ok_or_else(|| "timestamp out of the Arrow range".into())
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::TIMESTAMP | Type::TIMESTAMPTZ)
    }
}

/// A PostgreSQL or pool error as a DataFusion error, with what we were doing.
fn external(
    e: impl std::error::Error + Send + Sync + 'static,
    doing: impl Into<String>,
) -> DataFusionError {
    DataFusionError::External(Box::new(e)).context(doing)
}

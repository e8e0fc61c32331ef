//! Functions whose output can be far larger than their input, bounded before they allocate.
//!
//! `repeat('a', 1000000000)` is 30 bytes of SQL and a gigabyte of memory, allocated by the
//! function itself, outside DataFusion's memory pool, and during planning when its arguments
//! are constants. meterd replaces each such function with a wrapper that computes, from its
//! arguments, an upper bound of what it will produce and refuses (a 400 naming the function)
//! before calling it when one value would pass [`MAX_VALUE_BYTES`], one call over a batch would
//! pass [`MAX_CALL_BYTES`], or the constants a query folds would together pass its memory
//! limit. The wrapped function does the work unchanged. Written here because which functions
//! grow and by how much is a property of DataFusion's function library that no crate tracks.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, FieldRef, IntervalUnit, TimeUnit};
use datafusion::common::{ScalarValue, exec_err};
use datafusion::error::Result;
use datafusion::execution::FunctionRegistry;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature,
};
use datafusion::prelude::SessionContext;

/// The largest string or array one call may produce for one row.
pub(crate) const MAX_VALUE_BYTES: u64 = 16 * 1024 * 1024;
/// The most one call may produce for all the rows of a batch.
pub(crate) const MAX_CALL_BYTES: u64 = 64 * 1024 * 1024;

/// How a function's output grows with its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(s, n)`: `len(s) * n`.
    Repeat,
    /// `lpad(s, n [, fill])`, `rpad`: `n` characters of up to 4 bytes.
    Pad,
    /// `replace(s, from, to)`: every occurrence of `from` becomes `to`.
    Replace,
    /// `regexp_replace(s, pattern, replacement [, flags])`: every match (each may be empty)
    /// becomes `replacement`, whose `$n` references each copy up to all of `s`.
    RegexpReplace,
    /// `concat(a, b, ...)`: the sum of the arguments.
    Concat,
    /// `concat_ws(sep, a, b, ...)`: the sum, plus a separator between each two.
    ConcatWs,
    /// `array_repeat(element, n)`: `n` elements.
    ArrayRepeat,
    /// `range(start, stop [, step])`, `generate_series`: `(stop - start) / step` elements.
    Range,
    /// `array_resize(array, n [, fill])`: `n` elements.
    ArrayResize,
}

const BOUNDED: &[(&str, Growth)] = &[
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("replace", Growth::Replace),
    ("regexp_replace", Growth::RegexpReplace),
    ("concat", Growth::Concat),
    ("concat_ws", Growth::ConcatWs),
    ("array_repeat", Growth::ArrayRepeat),
    ("range", Growth::Range),
    ("generate_series", Growth::Range),
    ("array_resize", Growth::ArrayResize),
];

/// The functions this module bounds, as DataFusion defines them.
#[derive(Debug)]
pub(crate) struct BoundedFunctions(Vec<(Arc<ScalarUDF>, Growth)>);

/// Replaces each function that can grow its input in `ctx` by its bounded wrapper, and returns
/// the originals so each query can install wrappers that share its [`ConstantAllowance`].
pub(crate) fn register(ctx: &SessionContext) -> Result<BoundedFunctions> {
    let mut originals = Vec::with_capacity(BOUNDED.len());
    for &(name, growth) in BOUNDED {
        let inner = ctx.udf(name)?;
        ctx.register_udf(ScalarUDF::new_from_impl(Bounded {
            inner: Arc::clone(&inner),
            growth,
            allowance: None,
        }));
        originals.push((inner, growth));
    }
    Ok(BoundedFunctions(originals))
}

impl BoundedFunctions {
    /// Installs, in one query's `state`, wrappers whose constant values together may take at
    /// most `bytes`.
    pub(crate) fn install(&self, state: &mut SessionState, bytes: usize) -> Result<()> {
        let allowance = ConstantAllowance::new(bytes);
        state.add_analyzer_rule(Arc::new(crate::checked::CheckValues::new(
            allowance.clone(),
        )));
        for (inner, growth) in &self.0 {
            state.register_udf(Arc::new(ScalarUDF::new_from_impl(Bounded {
                inner: Arc::clone(inner),
                growth: *growth,
                allowance: Some(allowance.clone()),
            })))?;
        }
        Ok(())
    }
}

/// What one query's constant expressions may produce in all. Constants are folded into the
/// plan and live as long as the query, so unlike per-batch values they add up.
#[derive(Debug, Clone)]
pub(crate) struct ConstantAllowance {
    remaining: Arc<AtomicUsize>,
}

impl ConstantAllowance {
    fn new(bytes: usize) -> Self {
        Self {
            remaining: Arc::new(AtomicUsize::new(bytes)),
        }
    }

    pub(crate) fn take(&self, name: &str, bytes: u64) -> Result<()> {
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        match self
            .remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(bytes)
            }) {
            Ok(_) => Ok(()),
            Err(_) => {
                exec_err!("{name}: the constant values of this query would pass its memory limit")
            }
        }
    }
}

/// A bounded function. Equal to another wrapper of the same function whatever the allowance:
/// the allowance is the query's, not part of what the expression means.
#[derive(Debug)]
pub(crate) struct Bounded {
    inner: Arc<ScalarUDF>,
    growth: Growth,
    allowance: Option<ConstantAllowance>,
}

impl PartialEq for Bounded {
    fn eq(&self, other: &Self) -> bool {
        self.inner == other.inner && self.growth == other.growth
    }
}

impl Eq for Bounded {}

impl std::hash::Hash for Bounded {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.inner.hash(state);
        self.growth.hash(state);
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    // `simplify` is not delegated on purpose: `concat` folds its literal arguments there,
    // which would build the value without passing through `invoke_with_args`.

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let name = self.inner.name();
        let rows = args.number_rows;
        let inputs: Vec<Input> = args
            .args
            .iter()
            .map(|a| Input::of(a, rows))
            .collect::<Result<_>>()?;
        let constant = inputs.iter().all(Input::is_constant);
        let mut total: u64 = 0;
        for row in 0..if constant { 1 } else { rows } {
            let bytes = bound(self.growth, &inputs, row);
            if bytes > MAX_VALUE_BYTES {
                return exec_err!(
                    "{name} would produce a value of up to {bytes} bytes; the limit is {MAX_VALUE_BYTES} bytes per value"
                );
            }
            total = total.saturating_add(bytes);
            if total > MAX_CALL_BYTES {
                return exec_err!(
                    "{name} would produce more than {MAX_CALL_BYTES} bytes for one batch of {rows} rows; narrow the query"
                );
            }
        }
        if constant {
            // A constant is folded into the plan and lives as long as the query: the
            // constants of a query add up. Copies of it in each batch are bounded by the
            // batch size (see checked::batch_size_for).
            if let Some(allowance) = &self.allowance {
                allowance.take(name, total)?;
            }
        }
        self.inner.invoke_with_args(args)
    }
}

/// One argument, reduced to what the bounds need: byte lengths and integer values per row.
#[derive(Debug)]
enum Input {
    Constant {
        len: Option<u64>,
        int: Option<i128>,
        text: Option<String>,
    },
    Column {
        lens: Vec<Option<u64>>,
        ints: Option<Vec<Option<i128>>>,
    },
}

impl Input {
    fn of(value: &ColumnarValue, rows: usize) -> Result<Self> {
        Ok(match value {
            ColumnarValue::Scalar(s) => Input::Constant {
                len: scalar_len(s),
                int: scalar_int(s),
                text: match s {
                    ScalarValue::Utf8(Some(t))
                    | ScalarValue::LargeUtf8(Some(t))
                    | ScalarValue::Utf8View(Some(t)) => Some(t.clone()),
                    _ => None,
                },
            },
            ColumnarValue::Array(a) => Input::Column {
                lens: (0..rows.min(a.len())).map(|i| array_len(a, i)).collect(),
                ints: array_ints(a)?,
            },
        })
    }

    fn is_constant(&self) -> bool {
        matches!(self, Input::Constant { .. })
    }

    fn len(&self, row: usize) -> u64 {
        match self {
            Input::Constant { len, .. } => len.unwrap_or(0),
            Input::Column { lens, .. } => lens.get(row).copied().flatten().unwrap_or(0),
        }
    }

    fn int(&self, row: usize) -> Option<i128> {
        match self {
            Input::Constant { int, .. } => *int,
            Input::Column { ints, .. } => ints.as_ref()?.get(row).copied().flatten(),
        }
    }

    fn text(&self) -> Option<&str> {
        match self {
            Input::Constant { text, .. } => text.as_deref(),
            Input::Column { .. } => None,
        }
    }
}

/// Bytes of a string or binary value; an estimate from Arrow's size for anything else.
pub(crate) fn scalar_len(s: &ScalarValue) -> Option<u64> {
    if s.is_null() {
        return None;
    }
    let len = match s {
        ScalarValue::Utf8(Some(t))
        | ScalarValue::LargeUtf8(Some(t))
        | ScalarValue::Utf8View(Some(t)) => t.len(),
        ScalarValue::Binary(Some(b))
        | ScalarValue::LargeBinary(Some(b))
        | ScalarValue::BinaryView(Some(b)) => b.len(),
        other => other.size(),
    };
    Some(len as u64)
}

fn array_len(a: &ArrayRef, i: usize) -> Option<u64> {
    if a.is_null(i) {
        return None;
    }
    let len = match a.data_type() {
        DataType::Utf8 => a.as_string::<i32>().value(i).len(),
        DataType::LargeUtf8 => a.as_string::<i64>().value(i).len(),
        DataType::Utf8View => a.as_string_view().value(i).len(),
        DataType::Binary => a.as_binary::<i32>().value(i).len(),
        DataType::LargeBinary => a.as_binary::<i64>().value(i).len(),
        // The row's own slice, not the whole child buffer it shares with the other rows.
        DataType::List(_) => return Some(array_bytes(&a.as_list::<i32>().value(i))),
        DataType::LargeList(_) => return Some(array_bytes(&a.as_list::<i64>().value(i))),
        other => other.primitive_width().unwrap_or(16),
    };
    Some(len as u64)
}

/// The bytes of the values in `array`, which may be a slice of a larger one. A string or binary
/// view array counts its views and the values they point to; a nested type holding views keeps
/// its values in shared buffers that a slice's size does not count, so for it (and for any type
/// whose slice cannot be measured) every buffer the array holds counts, which may count more
/// than the slice but never less.
pub(crate) fn array_bytes(array: &ArrayRef) -> u64 {
    let views = match array.data_type() {
        DataType::Utf8View => Some(array.as_string_view().views()),
        DataType::BinaryView => Some(array.as_binary_view().views()),
        _ => None,
    };
    if let Some(views) = views {
        // Each value: its 16-byte view, plus its bytes when they are too long to be inline.
        return views
            .iter()
            .map(|view| {
                let len = u64::from(*view as u32);
                16 + if len > 12 { len } else { 0 }
            })
            .sum();
    }
    let data = array.to_data();
    let measured = if holds_views(array.data_type()) {
        None
    } else {
        data.get_slice_memory_size().ok()
    };
    measured.unwrap_or_else(|| array.get_array_memory_size()) as u64
}

fn holds_views(t: &DataType) -> bool {
    match t {
        DataType::Utf8View | DataType::BinaryView => true,
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f)
        | DataType::FixedSizeList(f, _)
        | DataType::Map(f, _) => holds_views(f.data_type()),
        DataType::Struct(fields) => fields.iter().any(|f| holds_views(f.data_type())),
        DataType::Dictionary(_, values) => holds_views(values),
        DataType::RunEndEncoded(_, values) => holds_views(values.data_type()),
        DataType::Union(fields, _) => fields.iter().any(|(_, f)| holds_views(f.data_type())),
        _ => false,
    }
}

/// An integer, or a point in time in nanoseconds, or a step of time in nanoseconds (months
/// counted as their shortest, 28 days, so the number of steps is never underestimated).
fn scalar_int(s: &ScalarValue) -> Option<i128> {
    const DAY: i128 = 86_400_000_000_000;
    Some(match s {
        ScalarValue::Int8(v) => (*v)?.into(),
        ScalarValue::Int16(v) => (*v)?.into(),
        ScalarValue::Int32(v) => (*v)?.into(),
        ScalarValue::Int64(v) => (*v)?.into(),
        ScalarValue::UInt8(v) => (*v)?.into(),
        ScalarValue::UInt16(v) => (*v)?.into(),
        ScalarValue::UInt32(v) => (*v)?.into(),
        ScalarValue::UInt64(v) => (*v)?.into(),
        ScalarValue::Date32(v) => i128::from((*v)?) * DAY,
        ScalarValue::Date64(v) => i128::from((*v)?) * 1_000_000,
        ScalarValue::TimestampSecond(v, _) => i128::from((*v)?) * 1_000_000_000,
        ScalarValue::TimestampMillisecond(v, _) => i128::from((*v)?) * 1_000_000,
        ScalarValue::TimestampMicrosecond(v, _) => i128::from((*v)?) * 1_000,
        ScalarValue::TimestampNanosecond(v, _) => (*v)?.into(),
        ScalarValue::IntervalYearMonth(v) => i128::from((*v)?) * 28 * DAY,
        ScalarValue::IntervalDayTime(v) => {
            let v = (*v)?;
            i128::from(v.days) * DAY + i128::from(v.milliseconds) * 1_000_000
        }
        ScalarValue::IntervalMonthDayNano(v) => {
            let v = (*v)?;
            i128::from(v.months) * 28 * DAY + i128::from(v.days) * DAY + i128::from(v.nanoseconds)
        }
        _ => return None,
    })
}

/// The integer (or time, see [`scalar_int`]) value of each row, if the column has such values.
fn array_ints(a: &ArrayRef) -> Result<Option<Vec<Option<i128>>>> {
    let scale: i128 = match a.data_type() {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64
        | DataType::Timestamp(TimeUnit::Nanosecond, _) => 1,
        DataType::Timestamp(TimeUnit::Microsecond, _) => 1_000,
        DataType::Timestamp(TimeUnit::Millisecond, _) | DataType::Date64 => 1_000_000,
        DataType::Timestamp(TimeUnit::Second, _) => 1_000_000_000,
        DataType::Date32 => 86_400_000_000_000,
        DataType::Interval(
            IntervalUnit::MonthDayNano | IntervalUnit::DayTime | IntervalUnit::YearMonth,
        ) => {
            return Ok(Some(
                (0..a.len())
                    .map(|i| ScalarValue::try_from_array(a, i).map(|s| scalar_int(&s)))
                    .collect::<Result<_>>()?,
            ));
        }
        _ => return Ok(None),
    };
    let values = match a.data_type() {
        DataType::UInt64 => {
            let a = a.as_primitive::<arrow::datatypes::UInt64Type>();
            (0..a.len())
                .map(|i| a.is_valid(i).then(|| i128::from(a.value(i))))
                .collect()
        }
        _ => {
            let cast = arrow::compute::cast(a, &DataType::Int64)?;
            let a = cast.as_primitive::<arrow::datatypes::Int64Type>();
            (0..a.len())
                .map(|i| a.is_valid(i).then(|| i128::from(a.value(i)) * scale))
                .collect()
        }
    };
    Ok(Some(values))
}

/// An upper bound of the bytes `growth` produces for `row` of `inputs`.
fn bound(growth: Growth, inputs: &[Input], row: usize) -> u64 {
    let len = |i: usize| inputs.get(i).map_or(0, |a| a.len(row));
    let count = |i: usize| -> u64 {
        inputs
            .get(i)
            .and_then(|a| a.int(row))
            .map_or(0, |n| u64::try_from(n.max(0)).unwrap_or(u64::MAX))
    };
    match growth {
        Growth::Repeat => len(0).saturating_mul(count(1)),
        Growth::Pad => count(1).saturating_mul(4),
        Growth::Replace => {
            let (s, from, to) = (len(0), len(1), len(2));
            if from > 0 && to <= from {
                s
            } else {
                (s / from.max(1) + 1).saturating_mul(to).saturating_add(s)
            }
        }
        Growth::RegexpReplace => {
            let (s, replacement) = (len(0), len(2));
            // `$1` or `${name}` copies a match, at most all of `s`; without the constant
            // replacement's text, assume every two bytes of it are one.
            let references = match inputs.get(2).and_then(Input::text) {
                Some(text) => text.matches(['$', '\\']).count() as u64,
                None => replacement / 2 + 1,
            };
            let per_match = replacement.saturating_add(references.saturating_mul(s));
            let global = inputs
                .get(3)
                .and_then(Input::text)
                .is_some_and(|flags| flags.contains('g'))
                || inputs.get(3).is_some_and(|flags| !flags.is_constant());
            let matches = if global { s + 1 } else { 1 };
            matches.saturating_mul(per_match).saturating_add(s)
        }
        Growth::Concat => (0..inputs.len()).map(len).fold(0, u64::saturating_add),
        Growth::ConcatWs => {
            let parts = inputs.len().saturating_sub(1) as u64;
            (1..inputs.len())
                .map(len)
                .fold(len(0).saturating_mul(parts), u64::saturating_add)
        }
        Growth::ArrayRepeat => len(0).max(8).saturating_mul(count(1)),
        Growth::Range => {
            let int = |i: usize| inputs.get(i).and_then(|a| a.int(row));
            let (start, stop, step) = match inputs.len() {
                1 => (Some(0), int(0), Some(1)),
                2 => (int(0), int(1), Some(1)),
                _ => (int(0), int(1), int(2)),
            };
            match (start, stop, step) {
                (Some(start), Some(stop), Some(step)) if step != 0 => {
                    let steps = (stop.saturating_sub(start) / step).max(0) as u128 + 1;
                    u64::try_from(steps.saturating_mul(8)).unwrap_or(u64::MAX)
                }
                // A null bound gives a null; a zero step is the function's own error.
                _ => 0,
            }
        }
        Growth::ArrayResize => count(1).saturating_mul(len(2).max(8)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn constant(value: ScalarValue) -> Input {
        Input::of(&ColumnarValue::Scalar(value), 1).expect("input")
    }

    fn text(s: &str) -> Input {
        constant(ScalarValue::Utf8(Some(s.to_owned())))
    }

    fn int(n: i64) -> Input {
        constant(ScalarValue::Int64(Some(n)))
    }

    #[test]
    fn bounds_cover_what_the_functions_produce() {
        assert_eq!(
            bound(Growth::Repeat, &[text("ab"), int(1_000_000_000)], 0),
            2_000_000_000
        );
        assert_eq!(bound(Growth::Repeat, &[text("ab"), int(-5)], 0), 0);
        assert_eq!(bound(Growth::Pad, &[text("x"), int(10)], 0), 40);
        assert_eq!(
            bound(Growth::Replace, &[text("aaaa"), text("a"), text("")], 0),
            4
        );
        assert_eq!(
            bound(Growth::Replace, &[text("aaaa"), text(""), text("xyz")], 0),
            (4 + 1) * 3 + 4
        );
        assert_eq!(
            bound(
                Growth::RegexpReplace,
                &[text("abc"), text("b"), text("x")],
                0
            ),
            1 + 3
        );
        assert_eq!(
            bound(
                Growth::RegexpReplace,
                &[text("abc"), text(""), text("$0$0"), text("g")],
                0
            ),
            4 * (4 + 2 * 3) + 3
        );
        assert_eq!(
            bound(Growth::ConcatWs, &[text("--"), text("a"), text("bc")], 0),
            2 * 2 + 3
        );
        assert_eq!(
            bound(Growth::Range, &[int(1), int(1_000_000_000)], 0),
            8_000_000_000
        );
        assert_eq!(bound(Growth::Range, &[int(10), int(1), int(-1)], 0), 80);
        let days = bound(
            Growth::Range,
            &[
                constant(ScalarValue::Date32(Some(0))),
                constant(ScalarValue::Date32(Some(10))),
                constant(ScalarValue::IntervalMonthDayNano(Some(
                    arrow::datatypes::IntervalMonthDayNano::new(0, 1, 0),
                ))),
            ],
            0,
        );
        assert_eq!(days, 11 * 8);
    }
}

#[cfg(test)]
mod session_tests {
    use super::*;

    #[tokio::test]
    async fn the_constants_of_one_query_share_one_allowance() {
        let ctx = SessionContext::new();
        let functions = register(&ctx).expect("register");
        let run = |sql: &'static str| {
            let mut state = ctx.state();
            functions.install(&mut state, 1_000).expect("install");
            async move {
                let plan = state.create_logical_plan(sql).await?;
                let physical = state.create_physical_plan(&plan).await?;
                let task = Arc::new(datafusion::execution::TaskContext::from(&state));
                datafusion::physical_plan::collect(physical, task).await
            }
        };
        run("SELECT length(repeat('a', 600))").await.expect("fits");
        run("SELECT length(repeat('a', 600))")
            .await
            .expect("a new query, a new allowance");
        let message = run("SELECT length(repeat('a', 600)) + length(repeat('b', 600))")
            .await
            .expect_err("past the allowance")
            .to_string();
        assert!(
            message.contains("constant values of this query"),
            "{message}"
        );
    }
}

//! Every expression that builds strings, binaries, lists or structs is checked after it runs,
//! and constants set how many rows a batch holds.
//!
//! [`crate::bounded_fns`] refuses, before they allocate, the functions whose output has no
//! bound in their input (`repeat`, `lpad`, ...). Everything else grows its input by at most a
//! small factor: `a || b` is both sides, `CAST(list AS VARCHAR)` about three times the list,
//! `encode(s, 'hex')` twice `s`. A small factor is harmless once and a disaster when chained:
//! each `WITH` step of `s || s` doubles, and forty steps are forty terabytes. So each such
//! expression is wrapped, during analysis, in an identity function that measures its result and
//! refuses a batch over [`MAX_CALL_BYTES`] or a constant over [`MAX_VALUE_BYTES`]: what one
//! step can allocate is then its factor times a bounded input, and the chain stops at the first
//! step past the limit.
//!
//! A constant is one value in the plan and `batch_size` copies in every batch that selects it:
//! a 200 KB literal over 8,192 rows is 1.6 GB. [`batch_size_for`] shrinks the batches of a
//! query whose constants are large, so that copying them into a batch stays within
//! [`MAX_CALL_BYTES`].
//!
//! Written here because what an expression may allocate is meterd's limit, not DataFusion's.

use std::sync::Arc;

use arrow::datatypes::{DataType, FieldRef};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, DFSchemaRef, ScalarValue, exec_err, plan_err};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::logical_expr::expr::{Cast, ScalarFunction, TryCast};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ExprSchemable, LogicalPlan, Operator, ReturnFieldArgs, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature, Volatility, WindowFunctionDefinition,
};
use datafusion::optimizer::AnalyzerRule;

use crate::bounded_fns::{
    Bounded, ConstantAllowance, MAX_CALL_BYTES, MAX_VALUE_BYTES, array_bytes, scalar_len,
};

/// The analyzer rule: wraps each value-building expression of a plan in [`Checked`]. Installed
/// per query, with that query's allowance for constants.
#[derive(Debug)]
pub(crate) struct CheckValues {
    allowance: ConstantAllowance,
}

impl CheckValues {
    pub(crate) fn new(allowance: ConstantAllowance) -> Self {
        Self { allowance }
    }

    fn wrap(&self, expr: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
        let builds = match &expr {
            Expr::ScalarFunction(f) => {
                // Bounded functions are refused before they allocate; a checked value is
                // checked already.
                f.func.inner().downcast_ref::<Bounded>().is_none()
                    && f.func.inner().downcast_ref::<Checked>().is_none()
            }
            Expr::BinaryExpr(_) => true,
            // A column or constant cast between string and binary types changes each value
            // by its offsets at most, and the optimizer and the stores' pushdown look through
            // exactly such casts (`name = 'x'::text`): leave them bare.
            Expr::Cast(Cast { expr: inner, field })
            | Expr::TryCast(TryCast { expr: inner, field }) => {
                let plain = matches!(inner.as_ref(), Expr::Column(_) | Expr::Literal(..))
                    && textual(field.data_type())
                    && inner.get_type(schema).is_ok_and(|t| textual(&t));
                !plain
            }
            _ => false,
        };
        // An expression whose type cannot be known here is left to DataFusion to refuse.
        if !builds || !expr.get_type(schema).is_ok_and(|t| variable_width(&t)) {
            return Ok(Transformed::no(expr));
        }
        let checked = Checked {
            signature: Signature::any(1, Volatility::Immutable),
            allowance: self.allowance.clone(),
            name: expr.schema_name().to_string(),
        };
        Ok(Transformed::yes(Expr::ScalarFunction(
            ScalarFunction::new_udf(Arc::new(ScalarUDF::new_from_impl(checked)), vec![expr]),
        )))
    }
}

/// Aggregates whose result holds every value of their frame: as window functions, each row's
/// result grows with its frame, and a partition of n rows builds n^2/2 values.
const GROWING_AGGREGATES: &[&str] = &["array_agg", "string_agg"];

/// Refuses a window function whose result grows with its frame.
fn refuse_growing_windows(plan: &LogicalPlan) -> Result<()> {
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let Expr::WindowFunction(window) = e
                    && let WindowFunctionDefinition::AggregateUDF(udaf) = &window.fun
                    && GROWING_AGGREGATES.contains(&udaf.name())
                {
                    return plan_err!(
                        "{} is not available as a window function: its result grows with the frame; aggregate with GROUP BY instead",
                        udaf.name()
                    );
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })
    .map(|_| ())
}

impl AnalyzerRule for CheckValues {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        refuse_growing_windows(&plan)?;
        plan.transform_up_with_subqueries(|node| {
            let schema = expression_schema(&node);
            node.map_expressions(|expr| expr.transform_up(|e| self.wrap(e, &schema)))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "meterd_check_values"
    }
}

/// The schema a node's expressions are written against: its input's, both sides' for a join.
fn expression_schema(node: &LogicalPlan) -> DFSchemaRef {
    let inputs = node.inputs();
    match inputs.as_slice() {
        [] => Arc::new(DFSchema::empty()),
        [input] => Arc::clone(input.schema()),
        [first, rest @ ..] => rest
            .iter()
            .try_fold(first.schema().as_ref().clone(), |joined, next| {
                joined.join(next.schema())
            })
            .map_or_else(|_| Arc::clone(node.schema()), Arc::new),
    }
}

/// String and binary types, whatever their layout.
fn textual(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
    )
}

/// Types whose values have no fixed size.
fn variable_width(t: &DataType) -> bool {
    !matches!(t, DataType::Null | DataType::Boolean) && t.primitive_width().is_none()
}

/// The identity, refusing a batch over [`MAX_CALL_BYTES`] or a constant over
/// [`MAX_VALUE_BYTES`] (constants also count against the query's allowance). Named and typed
/// as its argument, so wrapping changes no column name.
#[derive(Debug)]
struct Checked {
    signature: Signature,
    allowance: ConstantAllowance,
    /// The argument's name when it was wrapped. Kept rather than computed from the argument:
    /// a chain of wrappers each formatting its whole argument would take time cubic in its
    /// depth (DataFusion names every node of an expression as it types it), and a name kept
    /// is the one the plan around the expression refers to even if the argument is rewritten.
    name: String,
}

impl PartialEq for Checked {
    fn eq(&self, other: &Self) -> bool {
        // What the wrapper means does not depend on which query's allowance it holds.
        self.name == other.name
    }
}

impl Eq for Checked {}

impl std::hash::Hash for Checked {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl ScalarUDFImpl for Checked {
    fn name(&self) -> &str {
        "checked"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn schema_name(&self, _args: &[Expr]) -> Result<String> {
        Ok(self.name.clone())
    }

    fn display_name(&self, args: &[Expr]) -> Result<String> {
        self.schema_name(args)
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types {
            [t] => Ok(t.clone()),
            _ => exec_err!("checked takes one argument"),
        }
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        match args.arg_fields {
            [field] => Ok(Arc::clone(field)),
            _ => exec_err!("checked takes one argument"),
        }
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        Ok(inputs
            .first()
            .map_or(SortProperties::Unordered, |i| i.sort_properties))
    }

    fn preserves_lex_ordering(&self, _inputs: &[ExprProperties]) -> Result<bool> {
        Ok(true)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        // The expression as the statement wrote it, not DataFusion's physical form of it.
        let what = || {
            let mut short: String = self.name.chars().take(100).collect();
            if short.len() < self.name.len() {
                short.push_str("...");
            }
            short
        };
        let Some(value) = args.args.first() else {
            return exec_err!("checked takes one argument");
        };
        match value {
            ColumnarValue::Array(array) => {
                let bytes = array_bytes(array);
                if bytes > MAX_CALL_BYTES {
                    return exec_err!(
                        "{} produced {bytes} bytes for one batch of {rows} rows; the limit is {MAX_CALL_BYTES} bytes per batch",
                        what()
                    );
                }
            }
            ColumnarValue::Scalar(scalar) => {
                let bytes = scalar_len(scalar).unwrap_or(0);
                if bytes > MAX_VALUE_BYTES {
                    return exec_err!(
                        "{} produced a value of {bytes} bytes; the limit is {MAX_VALUE_BYTES} bytes per value",
                        what()
                    );
                }
                self.allowance.take(&what(), bytes)?;
            }
        }
        Ok(value.clone())
    }
}

/// The rows a batch may hold so that the constants of `plan`, copied into every row of a
/// batch, take at most half of [`MAX_CALL_BYTES`]; never more than `default`. Counts every
/// constant each time it appears (each use is its own column of copies), except those that are
/// never copied: a direct operand of a comparison, an item of an `IN` list, a `LIKE` pattern.
pub(crate) fn batch_size_for(plan: &LogicalPlan, default: usize) -> usize {
    let mut bytes: u64 = 0;
    // Visiting cannot fail: the closures only add.
    let _ = plan.apply_with_subqueries(|node| {
        // A scan's filters repeat its `Filter`'s, or run in the store.
        if !matches!(node, LogicalPlan::TableScan(_)) {
            let _ = node.apply_expressions(|expr| {
                bytes = bytes.saturating_add(copied_constants(expr));
                Ok(TreeNodeRecursion::Continue)
            });
        }
        Ok(TreeNodeRecursion::Continue)
    });
    // Half the batch for the copies, half for the values of the rows themselves.
    let rows = MAX_CALL_BYTES / 2 / bytes.max(1);
    usize::try_from(rows)
        .unwrap_or(usize::MAX)
        .clamp(1, default.max(1))
}

/// The bytes of the constants in `expr` that a batch may be given copies of.
fn copied_constants(expr: &Expr) -> u64 {
    match expr {
        Expr::Literal(value, _) => literal_bytes(value),
        Expr::BinaryExpr(b) if compares(b.op) => [&b.left, &b.right]
            .into_iter()
            .filter(|side| !matches!(side.as_ref(), Expr::Literal(..)))
            .map(|side| copied_constants(side))
            .fold(0, u64::saturating_add),
        Expr::InList(list) => copied_constants(&list.expr),
        Expr::Like(like) | Expr::SimilarTo(like) => copied_constants(&like.expr),
        other => {
            let mut bytes: u64 = 0;
            let _ = other.apply_children(|child| {
                bytes = bytes.saturating_add(copied_constants(child));
                Ok(TreeNodeRecursion::Continue)
            });
            bytes
        }
    }
}

fn compares(op: Operator) -> bool {
    matches!(
        op,
        Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::IsDistinctFrom
            | Operator::IsNotDistinctFrom
    )
}

fn literal_bytes(value: &ScalarValue) -> u64 {
    if matches!(value.data_type(), t if variable_width(&t)) {
        scalar_len(value).unwrap_or(0)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::record_batch::RecordBatch;
    use datafusion::prelude::SessionContext;

    async fn run_in(ctx: &SessionContext, sql: &str, checked: bool) -> Result<Vec<RecordBatch>> {
        let mut state = ctx.state();
        if checked {
            crate::bounded_fns::register(ctx)?.install(&mut state, 64 * 1024 * 1024)?;
        }
        let plan = state.create_logical_plan(sql).await?;
        let physical = state.create_physical_plan(&plan).await?;
        let task = Arc::new(datafusion::execution::TaskContext::from(&state));
        datafusion::physical_plan::collect(physical, task).await
    }

    async fn run(sql: &str) -> Result<Vec<RecordBatch>> {
        run_in(&SessionContext::new(), sql, true).await
    }

    #[tokio::test]
    async fn checked_expressions_keep_their_names_types_and_values() {
        let sql = "SELECT 'a' || s, s || NULL, CAST(n AS VARCHAR) AS cn, upper(s) AS u, \
                   count(*) OVER (PARTITION BY s || 'x') AS c \
                   FROM (VALUES ('x', 1), (NULL, 2)) AS t(s, n) ORDER BY n";
        let checked = run(sql).await.expect("runs checked");
        let plain = run_in(&SessionContext::new(), sql, false)
            .await
            .expect("runs plain");
        assert_eq!(checked[0].schema(), plain[0].schema());
        let text = |b: &[RecordBatch]| {
            arrow::util::pretty::pretty_format_batches(b)
                .expect("format")
                .to_string()
        };
        assert_eq!(text(&checked), text(&plain));
        assert!(text(&checked).contains("ax"), "{}", text(&checked));
    }

    #[tokio::test]
    async fn a_doubling_chain_stops_at_the_limit() {
        let mut sql = "WITH t0 AS (SELECT repeat('x', 1000000) || CAST(value AS VARCHAR) AS s \
                       FROM generate_series(1, 10))"
            .to_owned();
        for i in 1..=40 {
            sql.push_str(&format!(", t{i} AS (SELECT s || s AS s FROM t{})", i - 1));
        }
        sql.push_str(" SELECT max(length(s)) FROM t40");
        let message = run(&sql).await.expect_err("refused").to_string();
        assert!(message.contains("bytes per batch"), "{message}");
    }

    #[test]
    fn large_constants_make_small_batches() {
        let plan = |literal_len: usize| {
            let ctx = SessionContext::new();
            let sql = format!("SELECT '{}' AS c", "x".repeat(literal_len));
            futures::executor::block_on(ctx.state().create_logical_plan(&sql)).expect("plan")
        };
        assert_eq!(batch_size_for(&plan(10), 8192), 8192);
        // Compared constants, IN lists and LIKE patterns are never copied; a constant used
        // twice is copied twice, and one inside a function of a filter is copied.
        let ctx = SessionContext::new();
        let long = "x".repeat(256 * 1024);
        let sql = format!(
            "SELECT '{long}' AS a, '{long}' AS b FROM (VALUES ('')) AS t(c) \
             WHERE c <> '{long}' AND c IN ('{long}', 'z') AND c LIKE '{long}%'"
        );
        let filtered =
            futures::executor::block_on(ctx.state().create_logical_plan(&sql)).expect("plan");
        assert_eq!(batch_size_for(&filtered, 8192), 64);
        let sql = format!("SELECT c FROM (VALUES ('')) AS t(c) WHERE coalesce(c, '{long}') <> ''");
        let in_a_function =
            futures::executor::block_on(ctx.state().create_logical_plan(&sql)).expect("plan");
        assert_eq!(batch_size_for(&in_a_function, 8192), 128);
        assert_eq!(batch_size_for(&plan(256 * 1024), 8192), 128);
        assert_eq!(batch_size_for(&plan(128 * 1024 * 1024), 8192), 1);
    }
}

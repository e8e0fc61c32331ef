//! Batches no larger than the query's batch size, and rows that stay small when copied.
//!
//! Constants are copied into every row of a batch that selects them, and
//! [`crate::checked::batch_size_for`] sizes a query's batches so those copies fit. That only
//! holds if every batch respects the batch size, and not every source does: `VALUES` is one
//! batch of all its rows, the embedded store's tail batches are whole group commits, and a
//! store's scan returns blocks of the store's own size. [`SliceLeafBatches`] cuts what every
//! leaf produces into slices of at most the batch size (slicing copies nothing).
//!
//! Joins and window functions copy a value from one row into many: a cross join repeats each
//! row of one side beside every row of the other, `first_value` or `max` over a partition
//! repeats one value in every row. The inputs of joins and windows are therefore guarded: a
//! row whose strings, binaries and lists take more than [`MAX_CALL_BYTES`] divided by the batch
//! size is refused before it is copied. `array_agg` and `string_agg` as window functions grow
//! with their frame, row by row, and are refused outright (see [`crate::checked`]).
//!
//! Written here because the limits are meterd's; DataFusion has no per-row size limit.

use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Statistics, exec_err};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::execution_plan::CardinalityEffect;
use datafusion::physical_plan::joins::{
    CrossJoinExec, HashJoinExec, NestedLoopJoinExec, PiecewiseMergeJoinExec, SortMergeJoinExec,
    SymmetricHashJoinExec,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowAggExec};
use datafusion::physical_plan::{
    ChildStats, ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan,
    PlanProperties, ReplaceChildrenOptions, StatisticsArgs,
};
use futures::StreamExt;

use crate::bounded_fns::{MAX_CALL_BYTES, array_bytes};

/// Wraps every leaf of the plan in a [`Guard`] that slices its batches, and every input of a
/// join or window in one that also checks its rows. Runs after DataFusion's own rules, so
/// nothing rearranges the plan afterwards.
#[derive(Debug, Default)]
pub(crate) struct SliceLeafBatches;

impl PhysicalOptimizerRule for SliceLeafBatches {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            if node.is::<Guard>() {
                return Ok(Transformed::no(node));
            }
            if node.children().is_empty() {
                return Ok(Transformed::yes(Guard::wrap(node, false)));
            }
            if copies_rows(node.as_ref()) {
                let children = node
                    .children()
                    .into_iter()
                    .map(|child| match child.downcast_ref::<Guard>() {
                        Some(guard) => Guard::wrap(Arc::clone(&guard.input), true),
                        None => Guard::wrap(Arc::clone(child), true),
                    })
                    .collect();
                return node
                    .replace_children(
                        children,
                        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
                    )
                    .map(Transformed::yes);
            }
            Ok(Transformed::no(node))
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "SliceLeafBatches"
    }

    fn schema_check(&self) -> bool {
        // The guard passes rows through unchanged.
        true
    }
}

/// Operators that copy a value of one input row into many output rows.
fn copies_rows(plan: &dyn ExecutionPlan) -> bool {
    plan.is::<CrossJoinExec>()
        || plan.is::<NestedLoopJoinExec>()
        || plan.is::<HashJoinExec>()
        || plan.is::<SortMergeJoinExec>()
        || plan.is::<SymmetricHashJoinExec>()
        || plan.is::<PiecewiseMergeJoinExec>()
        || plan.is::<WindowAggExec>()
        || plan.is::<BoundedWindowAggExec>()
}

/// Passes its input's batches on in slices of at most the batch size; with `check_rows`, first
/// refuses a batch holding a row too large to be copied into a whole batch.
#[derive(Debug)]
struct Guard {
    input: Arc<dyn ExecutionPlan>,
    check_rows: bool,
    properties: Arc<PlanProperties>,
}

impl Guard {
    fn wrap(input: Arc<dyn ExecutionPlan>, check_rows: bool) -> Arc<dyn ExecutionPlan> {
        let properties = Arc::clone(input.properties());
        Arc::new(Self {
            input,
            check_rows,
            properties,
        })
    }
}

impl DisplayAs for Guard {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.check_rows {
            write!(f, "GuardExec: slices, row sizes")
        } else {
            write!(f, "GuardExec: slices")
        }
    }
}

impl ExecutionPlan for Guard {
    fn name(&self) -> &str {
        "GuardExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match children.pop() {
            Some(input) if children.is_empty() => Ok(Guard::wrap(input, self.check_rows)),
            _ => exec_err!("GuardExec takes one input"),
        }
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let rows = context.session_config().batch_size().max(1);
        let check_rows = self.check_rows;
        let input = self.input.execute(partition, context)?;
        let schema = input.schema();
        let sliced = input.flat_map(move |batch| {
            let pieces: Vec<Result<RecordBatch>> = match batch {
                Err(e) => vec![Err(e)],
                Ok(batch) => match check_rows.then(|| check(&batch, rows)).transpose() {
                    Err(e) => vec![Err(e)],
                    Ok(_) => slices(&batch, rows).map(Ok).collect(),
                },
            };
            futures::stream::iter(pieces)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, sliced)))
    }

    fn child_stats_requests(&self, partition: Option<usize>) -> Vec<ChildStats> {
        vec![ChildStats::At(partition)]
    }

    fn statistics_from_inputs(
        &self,
        input_stats: &[Arc<Statistics>],
        _args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        match input_stats.first() {
            Some(stats) => Ok(Arc::clone(stats)),
            None => exec_err!("GuardExec takes one input"),
        }
    }

    fn cardinality_effect(&self) -> CardinalityEffect {
        CardinalityEffect::Equal
    }
}

/// `batch` in slices of at most `rows` rows.
fn slices(batch: &RecordBatch, rows: usize) -> impl Iterator<Item = RecordBatch> + use<> {
    let batch = batch.clone();
    let total = batch.num_rows();
    (0..total.div_ceil(rows).max(1)).map(move |i| {
        let offset = i * rows;
        batch.slice(offset, rows.min(total - offset))
    })
}

/// Refuses `batch` if one of its rows, copied into each row of a batch of `rows` rows, would
/// take more than [`MAX_CALL_BYTES`].
fn check(batch: &RecordBatch, rows: usize) -> Result<()> {
    let per_row = MAX_CALL_BYTES / rows as u64;
    // No row can be larger than all of them together.
    let columns: Vec<&ArrayRef> = batch
        .columns()
        .iter()
        .filter(|c| c.data_type().primitive_width().is_none())
        .collect();
    let total: u64 = columns.iter().map(|c| array_bytes(c)).sum();
    if total <= per_row {
        return Ok(());
    }
    for row in 0..batch.num_rows() {
        let bytes: u64 = columns.iter().map(|c| array_bytes(&c.slice(row, 1))).sum();
        if bytes > per_row {
            return exec_err!(
                "a row of {bytes} bytes would be copied into each row of a batch of up to {rows} rows, more than the limit of {MAX_CALL_BYTES} bytes per batch: join or window over smaller values"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn slices_cover_the_batch_in_order() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..10))])
                .expect("batch");
        let sizes: Vec<usize> = slices(&batch, 4).map(|b| b.num_rows()).collect();
        assert_eq!(sizes, [4, 4, 2]);
        let sizes: Vec<usize> = slices(&batch, 100).map(|b| b.num_rows()).collect();
        assert_eq!(sizes, [10]);
        let empty = batch.slice(0, 0);
        assert_eq!(slices(&empty, 4).count(), 1);
    }

    #[test]
    fn rows_too_large_to_copy_are_refused() {
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, false)]));
        let big = "x".repeat(20_000);
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from(vec!["a", big.as_str(), "b"]))],
        )
        .expect("batch");
        check(&batch, 1024).expect("20 KB times 1,024 rows is within 64 MiB");
        let message = check(&batch, 8192).expect_err("160 MB").to_string();
        assert!(message.contains("a row of 20"), "{message}");
    }
}

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
//! repeats one value in every row, and `unnest` repeats a row's other values once per element
//! of its list. Their inputs are therefore guarded: a row whose copies would take more than
//! [`MAX_CALL_BYTES`] is refused before it is copied. `array_agg` and `string_agg` as window functions grow
//! with their frame, row by row, and are refused outright (see [`crate::checked`]).
//!
//! Written here because the limits are meterd's; DataFusion has no per-row size limit.

use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, AsArray, OffsetSizeTrait, RecordBatch};
use arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Statistics, exec_err};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::coop::make_cooperative;
use datafusion::physical_plan::execution_plan::CardinalityEffect;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::unnest::UnnestExec;
use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowAggExec};
use datafusion::physical_plan::{
    ChildStats, ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan,
    PlanProperties, ReplaceChildrenOptions, StatisticsArgs,
};
use futures::StreamExt;

use crate::bounded_fns::MAX_CALL_BYTES;

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
        // Bottom up, so every leaf and every join, window and unnest at any depth is reached;
        // a guard over a guard (a nested plan, a rollup's, is guarded already) is merged.
        plan.transform_up(|node| {
            if let Some(guard) = node.downcast_ref::<Guard>() {
                return Ok(match guard.input.downcast_ref::<Guard>() {
                    Some(_) => {
                        Transformed::yes(Guard::wrap(Arc::clone(&guard.input), guard.check.clone()))
                    }
                    None => Transformed::no(node),
                });
            }
            if node.children().is_empty() {
                return Ok(Transformed::yes(Guard::wrap(node, Check::SLICE)));
            }
            let check = if copies_rows(node.as_ref()) {
                Check {
                    copies: true,
                    unnest: None,
                }
            } else if let Some(unnest) = node.downcast_ref::<UnnestExec>() {
                Check {
                    copies: false,
                    unnest: Some(
                        unnest
                            .list_column_indices()
                            .iter()
                            .map(|l| l.index_in_input_schema)
                            .collect(),
                    ),
                }
            } else {
                return Ok(Transformed::no(node));
            };
            let children = node
                .children()
                .into_iter()
                .map(|child| Guard::wrap(Arc::clone(child), check.clone()))
                .collect();
            node.replace_children(
                children,
                ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
            )
            .map(Transformed::yes)
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
    crate::coop::is_join(plan) || plan.is::<WindowAggExec>() || plan.is::<BoundedWindowAggExec>()
}

/// What a [`Guard`] checks before it passes a batch on in slices of at most the batch size.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Check {
    /// That no row, copied into every row of a batch, passes [`MAX_CALL_BYTES`] (the input of
    /// a join or a window).
    copies: bool,
    /// The columns `unnest` expands: that no row's other columns, copied once per element of
    /// its longest expanded list, pass [`MAX_CALL_BYTES`].
    unnest: Option<Vec<usize>>,
}

impl Check {
    /// Only slicing.
    const SLICE: Check = Check {
        copies: false,
        unnest: None,
    };

    /// Both checks.
    fn and(self, other: Check) -> Check {
        Check {
            copies: self.copies || other.copies,
            unnest: self.unnest.or(other.unnest),
        }
    }
}

/// Passes its input's batches on in slices of at most the batch size, after its [`Check`].
#[derive(Debug)]
struct Guard {
    input: Arc<dyn ExecutionPlan>,
    check: Check,
    properties: Arc<PlanProperties>,
}

impl Guard {
    fn wrap(input: Arc<dyn ExecutionPlan>, check: Check) -> Arc<dyn ExecutionPlan> {
        // A guard over a guard: one guard over the inner input, with both checks.
        let (input, check) = match input.downcast_ref::<Guard>() {
            Some(inner) => (Arc::clone(&inner.input), inner.check.clone().and(check)),
            None => (input, check),
        };
        let properties = Arc::clone(input.properties());
        Arc::new(Self {
            input,
            check,
            properties,
        })
    }
}

impl DisplayAs for Guard {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GuardExec: slices")?;
        if self.check.copies {
            write!(f, ", rows copied into a batch")?;
        }
        if self.check.unnest.is_some() {
            write!(f, ", rows copied per list element")?;
        }
        Ok(())
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
            Some(input) if children.is_empty() => Ok(Guard::wrap(input, self.check.clone())),
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
        let check = self.check.clone();
        let input = self.input.execute(partition, context)?;
        let schema = input.schema();
        let sliced = input.flat_map(move |batch| {
            let pieces: Vec<Result<RecordBatch>> = match batch.and_then(|b| {
                self::check(&b, &check, rows)?;
                Ok(b)
            }) {
                Err(e) => vec![Err(e)],
                Ok(batch) => slices(&batch, rows).map(Ok).collect(),
            };
            futures::stream::iter(pieces)
        });
        // Many slices from one batch of a source that yields per batch: each spends budget,
        // so the query stays cancellable between them.
        Ok(make_cooperative(Box::pin(RecordBatchStreamAdapter::new(
            schema, sliced,
        ))))
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

/// Refuses `batch` if one of its rows would be copied past [`MAX_CALL_BYTES`]: into each row of
/// a batch of `rows` rows ([`Check::copies`]), or once per element of its longest expanded list
/// ([`Check::unnest`]).
fn check(batch: &RecordBatch, check: &Check, rows: usize) -> Result<()> {
    let n = batch.num_rows();
    if n == 0 {
        return Ok(());
    }
    let mut verdicts: Vec<(Vec<u64>, Vec<u64>)> = Vec::new();
    if check.copies {
        // Fixed-width values are at most a few bytes a row, copied into a batch.
        let mut copied = vec![0u64; n];
        for column in batch.columns() {
            if column.data_type().primitive_width().is_none() {
                add(&mut copied, row_sizes(column.as_ref()));
            }
        }
        verdicts.push((copied, vec![rows as u64; n]));
    }
    if let Some(expanded) = &check.unnest {
        let mut copied = vec![0u64; n];
        let mut copies = vec![1u64; n];
        for (i, column) in batch.columns().iter().enumerate() {
            if expanded.contains(&i) {
                for (row, len) in list_lengths(column.as_ref()).into_iter().enumerate() {
                    copies[row] = copies[row].max(len);
                }
            } else {
                add(&mut copied, row_sizes(column.as_ref()));
            }
        }
        verdicts.push((copied, copies));
    }
    for (copied, copies) in verdicts {
        for row in 0..n {
            let (bytes, times) = (copied[row], copies[row]);
            if bytes.saturating_mul(times) > MAX_CALL_BYTES {
                return exec_err!(
                    "a row of {bytes} bytes would be copied {times} times, more than the limit of {MAX_CALL_BYTES} bytes per batch: join, window or unnest over smaller values"
                );
            }
        }
    }
    Ok(())
}

fn add(total: &mut [u64], more: Vec<u64>) {
    for (t, m) in total.iter_mut().zip(more) {
        *t = t.saturating_add(m);
    }
}

/// The number of elements of each row of a list column.
fn list_lengths(array: &dyn Array) -> Vec<u64> {
    match array.data_type() {
        DataType::List(_) => lengths(array.as_list::<i32>().value_offsets()),
        DataType::LargeList(_) => lengths(array.as_list::<i64>().value_offsets()),
        DataType::FixedSizeList(_, k) => vec![u64::try_from(*k).unwrap_or(0); array.len()],
        _ => vec![1; array.len()],
    }
}

fn lengths<O: OffsetSizeTrait>(offsets: &[O]) -> Vec<u64> {
    offsets
        .windows(2)
        .map(|w| (w[1] - w[0]).as_usize() as u64)
        .collect()
}

/// The bytes of each row's value in `array`, from its offsets and lengths (a slice of a list
/// keeps its whole child, so measuring a one-row slice would count every row's values).
fn row_sizes(array: &dyn Array) -> Vec<u64> {
    let n = array.len();
    match array.data_type() {
        DataType::Utf8 => lengths(array.as_string::<i32>().value_offsets()),
        DataType::LargeUtf8 => lengths(array.as_string::<i64>().value_offsets()),
        DataType::Binary => lengths(array.as_binary::<i32>().value_offsets()),
        DataType::LargeBinary => lengths(array.as_binary::<i64>().value_offsets()),
        DataType::Utf8View => view_lengths(array.as_string_view().views()),
        DataType::BinaryView => view_lengths(array.as_binary_view().views()),
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            grouped(&row_sizes(list.values().as_ref()), list.value_offsets())
        }
        DataType::LargeList(_) => {
            let list = array.as_list::<i64>();
            grouped(&row_sizes(list.values().as_ref()), list.value_offsets())
        }
        DataType::Map(..) => {
            let map = array.as_map();
            grouped(&row_sizes(map.entries()), map.value_offsets())
        }
        DataType::FixedSizeList(_, k) => {
            let list = array.as_fixed_size_list();
            let k = usize::try_from(*k).unwrap_or(0);
            let child = row_sizes(list.values().as_ref());
            let start = list.offset() * k;
            (0..n)
                .map(|row| {
                    let from = start + row * k;
                    child.get(from..from + k).map_or(0, |c| c.iter().sum())
                })
                .collect()
        }
        DataType::Struct(_) => {
            let mut sizes = vec![0u64; n];
            for child in array.as_struct().columns() {
                for (row, bytes) in row_sizes(child.as_ref()).into_iter().enumerate() {
                    sizes[row] = sizes[row].saturating_add(bytes);
                }
            }
            sizes
        }
        DataType::Dictionary(..) => {
            let dictionary = array.as_any_dictionary();
            let values = dictionary.values();
            if values.is_empty() {
                return vec![0; n];
            }
            let value_sizes = row_sizes(values.as_ref());
            dictionary
                .normalized_keys()
                .into_iter()
                .map(|key| value_sizes.get(key).copied().unwrap_or(0))
                .collect()
        }
        DataType::Null => vec![0; n],
        DataType::Boolean => vec![1; n],
        DataType::FixedSizeBinary(width) => vec![u64::try_from(*width).unwrap_or(0); n],
        other => match other.primitive_width() {
            Some(width) => vec![width as u64; n],
            // A type without offsets to read: every row counts the whole array.
            None => vec![array.get_array_memory_size() as u64; n],
        },
    }
}

fn view_lengths(views: &[u128]) -> Vec<u64> {
    views.iter().map(|view| u64::from(*view as u32)).collect()
}

/// The sum of `child` over each row's range of `offsets`.
fn grouped<O: OffsetSizeTrait>(child: &[u64], offsets: &[O]) -> Vec<u64> {
    let mut prefix = Vec::with_capacity(child.len() + 1);
    prefix.push(0u64);
    for bytes in child {
        let last = prefix.last().copied().unwrap_or(0);
        prefix.push(last.saturating_add(*bytes));
    }
    offsets
        .windows(2)
        .map(|w| {
            let (from, to) = (w[0].as_usize(), w[1].as_usize());
            match (prefix.get(to), prefix.get(from)) {
                (Some(to), Some(from)) => to.saturating_sub(*from),
                _ => 0,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, ListArray, MapBuilder, StringArray, StringBuilder};
    use arrow::datatypes::{Field, Int64Type, Schema};

    /// Every leaf is under a guard, and every input of a join at any depth is checked.
    #[tokio::test]
    async fn guards_reach_every_leaf_and_every_join() {
        let (ctx, _) = crate::session_context(&crate::QueryConfig::default()).expect("session");
        let plan = ctx
            .sql(
                "SELECT a.x FROM (VALUES (1), (2)) AS a(x) \
                 JOIN ((VALUES (1)) AS b(y) JOIN (VALUES (1)) AS c(z) ON b.y = c.z) \
                 ON a.x = b.y",
            )
            .await
            .expect("plan")
            .create_physical_plan()
            .await
            .expect("physical plan");
        let mut leaves = 0;
        let mut joins = 0;
        let mut stack = vec![plan];
        while let Some(node) = stack.pop() {
            for child in node.children() {
                if child.children().is_empty() {
                    leaves += 1;
                    assert!(node.is::<Guard>(), "a bare leaf under {}", node.name());
                }
                if copies_rows(node.as_ref()) {
                    let guard = child.downcast_ref::<Guard>().expect("a guarded join input");
                    assert!(guard.check.copies);
                }
            }
            if copies_rows(node.as_ref()) {
                joins += 1;
            }
            stack.extend(node.children().into_iter().cloned());
        }
        assert_eq!((leaves, joins), (3, 2));
    }

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
        let copies = Check {
            copies: true,
            unnest: None,
        };
        check(&batch, &copies, 1024).expect("20 KB times 1,024 rows is within 64 MiB");
        let message = check(&batch, &copies, 8192)
            .expect_err("160 MB")
            .to_string();
        assert!(message.contains("a row of 20000 bytes"), "{message}");
        check(&batch, &Check::SLICE, 8192).expect("slicing checks nothing");
    }

    /// Rows of a map or list column are measured by their own entries, not by the whole child
    /// array a slice keeps.
    #[test]
    fn rows_of_nested_columns_are_measured_alone() {
        let mut builder = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        for i in 0..1_000 {
            builder.keys().append_value(format!("key{i}"));
            builder.values().append_value("v".repeat(100));
            builder.append(true).expect("row");
        }
        let map = builder.finish();
        let sizes = row_sizes(&map);
        assert_eq!(sizes.len(), 1_000);
        assert!(sizes.iter().all(|&s| (100..200).contains(&s)), "{sizes:?}");
        let sliced = map.slice(500, 2);
        assert_eq!(row_sizes(&sliced), sizes[500..502]);

        let list = ListArray::from_iter_primitive::<Int64Type, _, _>(vec![
            Some(vec![Some(1), Some(2), Some(3)]),
            None,
            Some(vec![Some(4)]),
        ]);
        assert_eq!(row_sizes(&list), [24, 0, 8]);
        assert_eq!(list_lengths(&list), [3, 0, 1]);
        assert_eq!(row_sizes(&list.slice(2, 1)), [8]);
    }

    #[test]
    fn rows_unnested_into_many_are_refused() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("s", DataType::Utf8, false),
            Field::new(
                "l",
                DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true))),
                true,
            ),
        ]));
        let long: Vec<Option<i64>> = (0..100_000).map(Some).collect();
        let big = "x".repeat(1_000);
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["a", big.as_str()])),
                Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(vec![
                    Some(long.clone()),
                    Some(long),
                ])),
            ],
        )
        .expect("batch");
        let unnest = Check {
            copies: false,
            unnest: Some(vec![1]),
        };
        let message = check(&batch, &unnest, 8192)
            .expect_err("1 KB times 100,000")
            .to_string();
        assert!(message.contains("copied 100000 times"), "{message}");
        check(&batch.slice(0, 1), &unnest, 8192).expect("1 byte times 100,000");
    }
}

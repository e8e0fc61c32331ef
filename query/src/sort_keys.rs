//! A sort over batches without columns sorts computed keys, so its memory is accounted.
//!
//! DataFusion's `SortExec` reserves memory for the batches it buffers, then evaluates its sort
//! expressions when it sorts them, outside the reservation. Over batches that have rows but no
//! columns (`row_number() OVER (ORDER BY random())` reads no column) it buffers nothing that
//! counts and then builds all its keys at once: over 200 million rows that reached 3 GB with a
//! 512 MiB pool. This rule rewrites such a sort to sort on columns computed by a projection
//! below it and dropped by one above it, so the keys are in the buffered batches: the pool sees
//! them, and the sort spills or refuses within the limit.
//!
//! Only sorts over no columns are rewritten. Above the rewritten sort the plan no longer knows
//! its output is ordered by the expressions (only by the dropped key columns), and a window
//! partitioned by an expression needs to know that; over no columns such a window partitions by
//! a constant or a volatile value. Where the input has columns, the unaccounted keys are at most
//! a fixed size per row beside the accounted ones. A sort with a `fetch` (top-k) keeps only k
//! rows and is left as it is.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::{LexOrdering, PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::sorts::sort::SortExec;

/// The rule; runs after DataFusion's own, so nothing rearranges the plan afterwards.
#[derive(Debug, Default)]
pub(crate) struct MaterializeSortKeys;

impl PhysicalOptimizerRule for MaterializeSortKeys {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(sort) = node.downcast_ref::<SortExec>() else {
                return Ok(Transformed::no(node));
            };
            if sort.fetch().is_some()
                || !sort.input().schema().fields().is_empty()
                || sort.expr().iter().all(|e| is_column(&e.expr))
            {
                return Ok(Transformed::no(node));
            }
            Ok(Transformed::yes(rewrite(sort)?))
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "MaterializeSortKeys"
    }

    fn schema_check(&self) -> bool {
        // The projection above the sort gives back exactly the sort's input columns.
        true
    }
}

fn is_column(expr: &Arc<dyn PhysicalExpr>) -> bool {
    expr.downcast_ref::<Column>().is_some()
}

/// `Sort(keys) <- input` becomes `Project(input columns) <- Sort(key columns) <- Project(input
/// columns, keys)`.
fn rewrite(sort: &SortExec) -> Result<Arc<dyn ExecutionPlan>> {
    let input = sort.input();
    let schema = input.schema();
    let columns: Vec<(Arc<dyn PhysicalExpr>, String)> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            (
                Arc::new(Column::new(f.name(), i)) as Arc<dyn PhysicalExpr>,
                f.name().clone(),
            )
        })
        .collect();
    let mut computed = columns.clone();
    let mut keys = Vec::with_capacity(sort.expr().len());
    for (k, key) in sort.expr().iter().enumerate() {
        if is_column(&key.expr) {
            keys.push(key.clone());
            continue;
        }
        let name = format!("__meterd_sort_key_{k}");
        let column = Arc::new(Column::new(&name, computed.len())) as Arc<dyn PhysicalExpr>;
        computed.push((Arc::clone(&key.expr), name));
        keys.push(PhysicalSortExpr::new(column, key.options));
    }
    let with_keys = Arc::new(ProjectionExec::try_new(computed, Arc::clone(input))?);
    let Some(ordering) = LexOrdering::new(keys) else {
        // Unreachable: a sort has at least one key. Keep the plan as it was.
        return Ok(Arc::new(sort.clone()));
    };
    let sorted =
        SortExec::new(ordering, with_keys).with_preserve_partitioning(sort.preserve_partitioning());
    Ok(Arc::new(ProjectionExec::try_new(
        columns,
        Arc::new(sorted),
    )?))
}

#[cfg(test)]
mod tests {
    use arrow::array::AsArray;
    use arrow::datatypes::{Int64Type, UInt64Type};
    use datafusion::physical_plan::displayable;

    #[tokio::test]
    async fn sorts_over_no_columns_sort_computed_keys() {
        let (ctx, _) = crate::session_context(&crate::QueryConfig::default()).expect("session");
        let df = ctx
            .sql(
                "SELECT max(r) FROM (SELECT row_number() OVER (ORDER BY random()) AS r \
                 FROM generate_series(1, 5))",
            )
            .await
            .expect("plans");
        let plan = df
            .clone()
            .create_physical_plan()
            .await
            .expect("physical plan");
        let shown = displayable(plan.as_ref()).indent(true).to_string();
        assert!(shown.contains("__meterd_sort_key_0"), "{shown}");
        let batches = df.collect().await.expect("runs");
        assert_eq!(
            batches[0].column(0).as_primitive::<UInt64Type>().value(0),
            5
        );
    }

    #[tokio::test]
    async fn windows_partitioned_by_expressions_still_run() {
        for threads in [1, 2] {
            let config = crate::QueryConfig {
                threads,
                ..crate::QueryConfig::default()
            };
            let (ctx, _) = crate::session_context(&config).expect("session");
            let batches = ctx
                .sql(
                    "SELECT CAST(sum(v) AS BIGINT) FROM (SELECT sum(value) OVER \
                     (PARTITION BY value % 3 ORDER BY -value) AS v FROM generate_series(1, 6))",
                )
                .await
                .expect("plans")
                .collect()
                .await
                .expect("runs");
            // Running sums per class, largest value first: {6, 9} {5, 7} {4, 5}.
            let total = batches[0].column(0).as_primitive::<Int64Type>().value(0);
            assert_eq!(total, 36, "{threads} threads");
        }
    }
}

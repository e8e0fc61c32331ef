//! Makes queries cancellable at any point, so a timed-out query actually stops.
//!
//! A tokio task can only be aborted when it yields. DataFusion yields (through the task's coop
//! budget) each time a leaf scan or an exchange produces a batch, which is enough for operators
//! that emit at most as much as they read. Joins and `unnest` are different: a cross join of two
//! `generate_series` emits millions of batches per input batch, all inside one `poll`, and the
//! task would never reach a yield point. Wrapping those operators in `CooperativeExec` makes
//! every batch they emit spend budget too.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::joins::{
    CrossJoinExec, HashJoinExec, NestedLoopJoinExec, PiecewiseMergeJoinExec, SortMergeJoinExec,
    SymmetricHashJoinExec,
};
use datafusion::physical_plan::unnest::UnnestExec;

/// Wraps every row-multiplying operator in a `CooperativeExec`. Runs after DataFusion's own
/// rules, so nothing rearranges the plan afterwards.
#[derive(Debug, Default)]
pub(crate) struct CooperativeMultipliers;

impl PhysicalOptimizerRule for CooperativeMultipliers {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            if multiplies_rows(node.as_ref()) {
                Ok(Transformed::yes(
                    Arc::new(CooperativeExec::new(node)) as Arc<dyn ExecutionPlan>
                ))
            } else {
                Ok(Transformed::no(node))
            }
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "CooperativeMultipliers"
    }

    fn schema_check(&self) -> bool {
        // The wrapper passes batches through unchanged.
        true
    }
}

/// Operators that can emit many batches per batch they read.
fn multiplies_rows(plan: &dyn ExecutionPlan) -> bool {
    is_join(plan) || plan.is::<UnnestExec>()
}

/// Every join operator of DataFusion's.
pub(crate) fn is_join(plan: &dyn ExecutionPlan) -> bool {
    plan.is::<CrossJoinExec>()
        || plan.is::<NestedLoopJoinExec>()
        || plan.is::<HashJoinExec>()
        || plan.is::<SortMergeJoinExec>()
        || plan.is::<SymmetricHashJoinExec>()
        || plan.is::<PiecewiseMergeJoinExec>()
}

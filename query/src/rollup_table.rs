//! `usage_hourly` and `usage_daily` over the embedded store: each rollup computed from `events`
//! at query time, from the one definition in the rollups crate.
//!
//! A plain view would aggregate every event ever stored before a filter on `bucket` could
//! apply: `bucket` is `date_trunc(..., time)`, which row-group statistics cannot prune on. So
//! the table turns the bounds a query puts on `bucket` into bounds on `time` (a bucket holds the
//! times from its start to its start plus its width) and filters `events` on those before
//! aggregating; the query's own filters still apply above, exactly.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{
    Between, BinaryExpr, Expr, LogicalPlan, LogicalPlanBuilder, Operator,
    TableProviderFilterPushDown, col, lit,
};
use datafusion::physical_plan::ExecutionPlan;
use meterd_rollups::Rollup;

/// One rollup of the embedded store.
#[derive(Debug)]
pub(crate) struct RollupTable {
    rollup: &'static Rollup,
    /// The rollup's plan over `events`, planned once.
    plan: LogicalPlan,
    schema: SchemaRef,
}

impl RollupTable {
    /// Plans `rollup` over the `events` table registered in `state`.
    pub(crate) async fn new(state: &SessionState, rollup: &'static Rollup) -> Result<Self> {
        let plan = state
            .create_logical_plan(&meterd_rollups::datafusion::select_sql(rollup))
            .await?;
        let schema = Arc::new(plan.schema().as_arrow().clone());
        Ok(Self {
            rollup,
            plan,
            schema,
        })
    }

    /// The bounds on `time` implied by the filters on `bucket`, as conditions on `time`.
    fn implied_time_bounds(&self, filters: &[Expr]) -> Vec<Expr> {
        let width = self.rollup.width.micros();
        let mut bounds = Vec::new();
        for filter in filters {
            for (op, at) in bucket_comparisons(filter) {
                // A bucket starts at or before each of its times and ends `width` after its
                // start: `bucket >= x` keeps only times >= x, `bucket <= x` only times before
                // x + width.
                let bound = match op {
                    Operator::GtEq | Operator::Gt => Some(time_col().gt_eq(time_lit(at))),
                    Operator::LtEq | Operator::Lt => at
                        .checked_add(width)
                        .map(|end| time_col().lt(time_lit(end))),
                    Operator::Eq => at.checked_add(width).map(|end| {
                        time_col()
                            .gt_eq(time_lit(at))
                            .and(time_col().lt(time_lit(end)))
                    }),
                    // bucket_comparisons yields comparisons only.
                    _ => None,
                };
                bounds.extend(bound);
            }
        }
        bounds
    }
}

fn time_col() -> Expr {
    Expr::Column(Column::new(Some("events"), "time"))
}

fn time_lit(us: i64) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(
        Some(us),
        Some("UTC".into()),
    ))
}

/// The comparisons of `bucket` with a timestamp literal in `filter` (a conjunction), as
/// `bucket <op> micros`, the literal on the right.
fn bucket_comparisons(filter: &Expr) -> Vec<(Operator, i64)> {
    let mut out = Vec::new();
    match filter {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            out.extend(bucket_comparisons(left));
            out.extend(bucket_comparisons(right));
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if matches!(
                op,
                Operator::Eq | Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq
            ) =>
        {
            match (
                is_bucket(left),
                micros(right),
                is_bucket(right),
                micros(left),
            ) {
                (true, Some(at), _, _) => out.push((*op, at)),
                (_, _, true, Some(at)) => {
                    if let Some(swapped) = op.swap() {
                        out.push((swapped, at));
                    }
                }
                _ => {}
            }
        }
        Expr::Between(Between {
            expr,
            negated: false,
            low,
            high,
        }) if is_bucket(expr) => {
            out.extend(micros(low).map(|at| (Operator::GtEq, at)));
            out.extend(micros(high).map(|at| (Operator::LtEq, at)));
        }
        _ => {}
    }
    out
}

fn is_bucket(expr: &Expr) -> bool {
    matches!(expr, Expr::Column(c) if c.name == "bucket")
}

/// A timestamp literal in microseconds (rounded down from nanoseconds, which keeps `>=` bounds
/// safe: the implied bounds only ever widen).
fn micros(expr: &Expr) -> Option<i64> {
    let Expr::Literal(value, _) = expr else {
        return None;
    };
    match value {
        ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1_000_000),
        ScalarValue::TimestampMillisecond(Some(v), _) => v.checked_mul(1_000),
        ScalarValue::TimestampMicrosecond(Some(v), _) => Some(*v),
        ScalarValue::TimestampNanosecond(Some(v), _) => Some(v.div_euclid(1_000)),
        _ => None,
    }
}

/// Qualifiers dropped: the filters DataFusion hands a scan name the table (`usage_hourly.x`),
/// the rollup's plan has the bare column names.
fn unqualified(expr: Expr) -> Result<Expr> {
    expr.transform(|e| match e {
        Expr::Column(c) if c.relation.is_some() => {
            Ok(Transformed::yes(Expr::Column(Column::from_name(c.name))))
        }
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
}

#[async_trait]
impl TableProvider for RollupTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Inexact: they narrow the scan of events; DataFusion still applies them exactly.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let state = state
            .as_any()
            .downcast_ref::<SessionState>()
            .ok_or_else(|| DataFusionError::Internal("rollups need a SessionState".into()))?;
        let filters = filters
            .iter()
            .cloned()
            .map(unqualified)
            .collect::<Result<Vec<_>>>()?;
        let mut plan = self.plan.clone();
        if let Some(bounds) = conjunction(self.implied_time_bounds(&filters)) {
            // Below the aggregation: directly on the scan of `events`.
            plan = plan
                .transform_up(|node| match node {
                    LogicalPlan::TableScan(scan) if scan.table_name.table() == "events" => {
                        let filtered = LogicalPlanBuilder::from(LogicalPlan::TableScan(scan))
                            .filter(bounds.clone())?
                            .build()?;
                        Ok(Transformed::yes(filtered))
                    }
                    other => Ok(Transformed::no(other)),
                })?
                .data;
        }
        let mut builder = LogicalPlanBuilder::from(plan);
        if let Some(all) = conjunction(filters) {
            builder = builder.filter(all)?;
        }
        if let Some(projection) = projection {
            let columns: Vec<Expr> = projection
                .iter()
                .map(|&i| col(Column::from_name(self.schema.field(i).name())))
                .collect();
            builder = builder.project(columns)?;
        }
        if let Some(limit) = limit {
            builder = builder.limit(0, Some(limit))?;
        }
        state.create_physical_plan(&builder.build()?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(us: i64) -> Expr {
        lit(ScalarValue::TimestampMicrosecond(
            Some(us),
            Some("UTC".into()),
        ))
    }

    #[test]
    fn bucket_bounds_become_time_bounds() {
        let bucket = || col("bucket");
        let filter = bucket()
            .gt_eq(ts(3_600_000_000))
            .and(ts(7_200_000_000).gt(bucket()))
            .and(col("tenant").eq(lit("acme")));
        assert_eq!(
            bucket_comparisons(&filter),
            [
                (Operator::GtEq, 3_600_000_000),
                (Operator::Lt, 7_200_000_000)
            ]
        );
        let between = Expr::Between(Between::new(
            Box::new(bucket()),
            false,
            Box::new(ts(1)),
            Box::new(ts(2)),
        ));
        assert_eq!(
            bucket_comparisons(&between),
            [(Operator::GtEq, 1), (Operator::LtEq, 2)]
        );
        assert!(bucket_comparisons(&col("time").gt(ts(1))).is_empty());
        assert!(bucket_comparisons(&bucket().not_eq(ts(1))).is_empty());
    }
}

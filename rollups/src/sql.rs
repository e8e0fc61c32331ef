//! The rollups' expressions in the SQL both PostgreSQL and DataFusion read as it is: the
//! dimensions and the error rule. ClickHouse renders them in its own dialect
//! (`stores/clickhouse/src/rollups.rs`).

use crate::{DimensionExpr, Predicate};

/// A predicate in SQL both PostgreSQL and DataFusion read.
pub fn predicate_sql(p: &Predicate) -> String {
    match p {
        Predicate::IsError => "(type = 'api.request' AND status_code >= 500) \
             OR (type = 'llm.usage' AND status = 'error') \
             OR (type = 'agent.run' AND status IN ('failed', 'timeout'))"
            .to_owned(),
        Predicate::NotNull(c) => format!("{c} IS NOT NULL"),
        Predicate::AtMost(c, bound) => format!("{c} <= {bound}"),
    }
}

/// A dimension in SQL both PostgreSQL and DataFusion read.
pub fn dimension_sql(expr: &DimensionExpr) -> String {
    match expr {
        DimensionExpr::Column(c) => (*c).to_owned(),
        DimensionExpr::OrEmpty(c) => format!("coalesce({c}, '')"),
        DimensionExpr::StatusClass => "CASE WHEN type = 'api.request' \
             THEN (status_code / 100)::text || 'xx' ELSE coalesce(status, '') END"
            .to_owned(),
    }
}

//! What the SQL stores' table providers share when pushing filters down.

use datafusion::common::ScalarValue;
use datafusion::logical_expr::Expr;
use datafusion::logical_expr::expr::{Cast, TryCast};

/// The non-NULL value of a literal, or of a cast of one (which DataFusion may not have folded
/// yet), evaluated with DataFusion's cast so it means what it means there.
pub(crate) fn literal_value(expr: &Expr) -> Option<ScalarValue> {
    let value = match expr {
        Expr::Literal(value, _) => value.clone(),
        Expr::Cast(Cast { expr, field }) | Expr::TryCast(TryCast { expr, field }) => {
            let Expr::Literal(value, _) = expr.as_ref() else {
                return None;
            };
            value.cast_to(field.data_type()).ok()?
        }
        _ => return None,
    };
    (!value.is_null()).then_some(value)
}

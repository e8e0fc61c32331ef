//! What the SQL stores' dialects share when pushing filters down: literal values as they mean
//! in DataFusion.

use datafusion::common::ScalarValue;
use datafusion::logical_expr::Expr;
use datafusion::logical_expr::expr::{Cast, TryCast};

/// The non-NULL value of a literal, or of a cast of one (which DataFusion may not have folded
/// yet), evaluated with DataFusion's cast so it means what it means there.
pub fn literal_value(expr: &Expr) -> Option<ScalarValue> {
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

/// An integer literal as `i64`, if it is one and fits.
pub fn int_value(value: &ScalarValue) -> Option<i64> {
    match *value {
        ScalarValue::Int8(Some(v)) => Some(i64::from(v)),
        ScalarValue::Int16(Some(v)) => Some(i64::from(v)),
        ScalarValue::Int32(Some(v)) => Some(i64::from(v)),
        ScalarValue::Int64(Some(v)) => Some(v),
        ScalarValue::UInt8(Some(v)) => Some(i64::from(v)),
        ScalarValue::UInt16(Some(v)) => Some(i64::from(v)),
        ScalarValue::UInt32(Some(v)) => Some(i64::from(v)),
        ScalarValue::UInt64(Some(v)) => i64::try_from(v).ok(),
        _ => None,
    }
}

/// A string literal's text.
pub fn text_value(value: &ScalarValue) -> Option<&str> {
    match value {
        ScalarValue::Utf8(Some(text))
        | ScalarValue::LargeUtf8(Some(text))
        | ScalarValue::Utf8View(Some(text)) => Some(text),
        _ => None,
    }
}

/// A timestamp literal of any unit in Unix microseconds, rounded down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimestampLiteral {
    pub micros: i64,
    /// Whether the rounding lost nothing (only nanoseconds can lose something).
    pub exact: bool,
    /// Whether the literal has a time zone (any zone: it is then an instant).
    pub zoned: bool,
}

pub fn timestamp_value(value: &ScalarValue) -> Option<TimestampLiteral> {
    let (micros, exact, zone) = match value {
        ScalarValue::TimestampSecond(Some(v), tz) => (v.checked_mul(1_000_000)?, true, tz),
        ScalarValue::TimestampMillisecond(Some(v), tz) => (v.checked_mul(1_000)?, true, tz),
        ScalarValue::TimestampMicrosecond(Some(v), tz) => (*v, true, tz),
        ScalarValue::TimestampNanosecond(Some(v), tz) => {
            (v.div_euclid(1_000), v.rem_euclid(1_000) == 0, tz)
        }
        _ => return None,
    };
    Some(TimestampLiteral {
        micros,
        exact,
        zoned: zone.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_convert_exactly_or_not_at_all() {
        assert_eq!(int_value(&ScalarValue::UInt64(Some(u64::MAX))), None);
        assert_eq!(int_value(&ScalarValue::Int8(Some(-3))), Some(-3));
        assert_eq!(int_value(&ScalarValue::Utf8(Some("1".into()))), None);
        assert_eq!(
            text_value(&ScalarValue::Utf8View(Some("a".into()))),
            Some("a")
        );
        let nanos = ScalarValue::TimestampNanosecond(Some(-1_500), Some("UTC".into()));
        assert_eq!(
            timestamp_value(&nanos),
            Some(TimestampLiteral {
                micros: -2,
                exact: false,
                zoned: true
            })
        );
        let seconds = ScalarValue::TimestampSecond(Some(i64::MAX), None);
        assert_eq!(timestamp_value(&seconds), None);
    }
}

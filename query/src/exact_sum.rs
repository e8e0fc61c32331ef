//! `sum` that never wraps: over integers it adds exactly and answers `DECIMAL(38, 0)`, as
//! PostgreSQL answers `numeric` for `sum(bigint)`.
//!
//! DataFusion's own `sum` adds `BIGINT`s into a `BIGINT` with wrapping arithmetic, so two events
//! of 2^63-1 tokens sum to -2. Events allow any count up to 2^63-1, and billing reads these
//! sums, so meterd replaces `sum` in its sessions: integer arguments are cast to
//! `DECIMAL(38, 0)` and summed by DataFusion's decimal sum, which adds 128-bit values (the sum
//! of 2^64 events of 2^63-1 would still fit). Everything else (floats, decimals, intervals) is
//! DataFusion's `sum` unchanged. Written here because the choice of result type is meterd's
//! contract; the arithmetic is DataFusion's.

use arrow::datatypes::{DataType, FieldRef};
use datafusion::error::{DataFusionError, Result};
use datafusion::functions_aggregate::sum::Sum;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Documentation, GroupsAccumulator, ReversedUDAF,
    SetMonotonicity, Signature, Volatility,
};

/// The type integer sums are computed in and answered as.
pub(crate) const EXACT_SUM_TYPE: DataType = DataType::Decimal128(38, 0);

/// The `sum` aggregate meterd registers in place of DataFusion's.
pub(crate) fn exact_sum() -> AggregateUDF {
    AggregateUDF::new_from_impl(ExactSum::default())
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct ExactSum {
    inner: Sum,
    signature: Signature,
}

impl Default for ExactSum {
    fn default() -> Self {
        Self {
            inner: Sum::new(),
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

/// What an argument of `sum` is cast to before summing.
fn sum_input_type(arg: &DataType) -> Result<DataType> {
    match arg {
        DataType::Null
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => Ok(EXACT_SUM_TYPE),
        DataType::Float16 | DataType::Float32 | DataType::Float64 => Ok(DataType::Float64),
        DataType::Decimal32(..)
        | DataType::Decimal64(..)
        | DataType::Decimal128(..)
        | DataType::Decimal256(..)
        | DataType::Duration(_)
        | DataType::Interval(_) => Ok(arg.clone()),
        DataType::Dictionary(_, values) => sum_input_type(values),
        other => Err(DataFusionError::Plan(format!(
            "sum is not defined for {other}; it sums numbers, intervals and durations"
        ))),
    }
}

impl AggregateUDFImpl for ExactSum {
    fn name(&self) -> &str {
        "sum"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [arg] => Ok(vec![sum_input_type(arg)?]),
            _ => Err(DataFusionError::Plan(format!(
                "sum takes one argument, got {}",
                arg_types.len()
            ))),
        }
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        self.inner.accumulator(args)
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        self.inner.state_fields(args)
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        self.inner.groups_accumulator_supported(args)
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        self.inner.create_groups_accumulator(args)
    }

    fn create_sliding_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        self.inner.create_sliding_accumulator(args)
    }

    fn reverse_expr(&self) -> ReversedUDAF {
        self.inner.reverse_expr()
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        self.inner.order_sensitivity()
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn set_monotonicity(&self, data_type: &DataType) -> SetMonotonicity {
        self.inner.set_monotonicity(data_type)
    }

    fn value_from_stats(
        &self,
        statistics_args: &datafusion::logical_expr::StatisticsArgs,
    ) -> Option<datafusion::common::ScalarValue> {
        // DataFusion answers only from exact statistics; a value of another type than the
        // (decimal) result is not used.
        let value = self.inner.value_from_stats(statistics_args)?;
        (value.data_type() == *statistics_args.return_type).then_some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_sum_as_decimal_everything_else_as_before() {
        for t in [
            DataType::Int8,
            DataType::Int32,
            DataType::Int64,
            DataType::UInt64,
        ] {
            assert_eq!(sum_input_type(&t).expect("integer"), EXACT_SUM_TYPE);
        }
        assert_eq!(
            sum_input_type(&DataType::Float32).expect("float"),
            DataType::Float64
        );
        assert_eq!(
            sum_input_type(&DataType::Decimal128(10, 2)).expect("decimal"),
            DataType::Decimal128(10, 2)
        );
        assert!(sum_input_type(&DataType::Utf8).is_err());
        let sum = ExactSum::default();
        assert_eq!(
            sum.return_type(&[EXACT_SUM_TYPE]).expect("return type"),
            EXACT_SUM_TYPE
        );
    }
}

//! The billing sections of the configuration file (`[[prices]]`, `[[meters]]`, `[[plans]]`,
//! `[[customers]]`, `[[credits]]`), as written, and their checks. [`crate::Billing::new`]
//! turns them into the validated form the rest of the crate uses.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::money::Dec;

/// Everything billing reads from the configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    #[serde(default)]
    pub prices: Vec<PriceEntry>,
    #[serde(default)]
    pub meters: Vec<MeterConfig>,
    #[serde(default)]
    pub plans: Vec<PlanConfig>,
    #[serde(default)]
    pub customers: Vec<CustomerConfig>,
    #[serde(default)]
    pub credits: Vec<CreditConfig>,
}

/// One entry of the price book: the prices of one provider's model from `effective_from` until
/// the next entry of the same model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    pub provider: String,
    pub model: String,
    pub effective_from: DateTime<Utc>,
    /// ISO 4217; default USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    pub input_per_million: Dec,
    pub output_per_million: Dec,
    /// Default: the input price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_per_million: Option<Dec>,
    /// Default: the input price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_per_million: Option<Dec>,
}

impl PriceEntry {
    pub fn currency(&self) -> &str {
        self.currency.as_deref().unwrap_or("USD")
    }

    pub fn cached_input(&self) -> Dec {
        self.cached_input_per_million
            .unwrap_or(self.input_per_million)
    }

    pub fn cache_write(&self) -> Dec {
        self.cache_write_per_million
            .unwrap_or(self.input_per_million)
    }
}

/// How a meter aggregates the events it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// The sum of `field` (NULLs count as nothing).
    Sum,
    /// How many events.
    Count,
    /// How many distinct non-NULL values of `field`.
    UniqueCount,
    /// The largest value of `field`.
    Max,
    /// The value of `field` of the latest event that has one (by time, then id).
    Latest,
}

impl Aggregation {
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Sum => "sum",
            Aggregation::Count => "count",
            Aggregation::UniqueCount => "unique_count",
            Aggregation::Max => "max",
            Aggregation::Latest => "latest",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub aggregation: Aggregation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_by: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    pub name: String,
    pub currency: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_fee: Option<Dec>,
    /// The period's subtotal is raised to at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<Dec>,
    #[serde(default)]
    pub charges: Vec<ChargeConfig>,
}

/// How a charge prices its meter's quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeModel {
    PerUnit,
    Graduated,
    Volume,
    Package,
    LlmCost,
}

impl ChargeModel {
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeModel::PerUnit => "per_unit",
            ChargeModel::Graduated => "graduated",
            ChargeModel::Volume => "volume",
            ChargeModel::Package => "package",
            ChargeModel::LlmCost => "llm_cost",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChargeConfig {
    /// Shown on the invoice line; default: the meter's name (`llm_cost` for LLM cost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter: Option<String>,
    pub model: ChargeModel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_price: Option<Dec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers: Option<Vec<TierConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_price: Option<Dec>,
    /// Units of the period that are free; the models price what is left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub included: Option<u64>,
    /// For `llm_cost`: the share added to the price book's cost (`"0.20"` is 20%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub markup: Option<Dec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// The tier's last unit; absent for the last tier, which has no end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_to: Option<u64>,
    pub unit_price: Dec,
    /// Charged once when any unit falls in the tier (graduated) or when the total does
    /// (volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat_price: Option<Dec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerConfig {
    pub tenant: String,
    pub plan: String,
    /// IANA zone whose calendar months are the periods; default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// Prepaid credit granted to a tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditConfig {
    /// Names the grant on invoices; default `<tenant>-<n>`, its place among the tenant's
    /// grants (give ids when grants may be reordered or removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub tenant: String,
    pub amount: Dec,
    /// The grant pays for no period that starts at or after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime<Utc>>,
    /// Lower first; then earlier expiry first.
    #[serde(default)]
    pub priority: i64,
}

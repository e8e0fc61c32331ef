//! Rating: from quantities to exact amounts. Every line is computed exactly in decimal, then
//! rounded half to even to the currency's minor unit; the invoice adds rounded lines, so its
//! lines always add up to its subtotal.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::Currency;

/// One tier of a graduated or volume price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// The tier's last unit; `None` for the last tier.
    pub up_to: Option<Decimal>,
    pub unit_price: Decimal,
    pub flat_price: Decimal,
}

/// How a charge prices the billable units of its meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pricing {
    PerUnit {
        unit_price: Decimal,
    },
    /// Each unit at the price of the tier it falls in.
    Graduated {
        tiers: Vec<Tier>,
    },
    /// Every unit at the price of the tier the total falls in.
    Volume {
        tiers: Vec<Tier>,
    },
    /// Whole packages, rounded up.
    Package {
        size: Decimal,
        price: Decimal,
    },
}

/// The part of a line one tier or the packages account for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// 1-based; absent for packages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<usize>,
    /// The first and last unit the step covers (the last is absent for an open tier).
    pub from_unit: Decimal,
    pub up_to: Option<Decimal>,
    pub units: Decimal,
    pub unit_price: Decimal,
    #[serde(default, skip_serializing_if = "Decimal::is_zero")]
    pub flat_price: Decimal,
    /// For packages: how many were charged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packages: Option<Decimal>,
    /// Exact, before the line is rounded.
    pub amount: Decimal,
}

/// A priced quantity: the exact amount and how it came about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    pub billable: Decimal,
    /// The price of one unit where one price applies to all (per unit, volume, package).
    pub unit_price: Option<Decimal>,
    pub steps: Vec<Step>,
    pub exact: Decimal,
}

/// An amount too large for the 96-bit decimals meterd computes with (about 7.9 x 10^28).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an amount passed the largest decimal meterd computes with (about 7.9e28)")]
pub struct Overflow;

pub(crate) fn mul(a: Decimal, b: Decimal) -> Result<Decimal, Overflow> {
    a.checked_mul(b).ok_or(Overflow)
}

pub(crate) fn add(a: Decimal, b: Decimal) -> Result<Decimal, Overflow> {
    a.checked_add(b).ok_or(Overflow)
}

pub(crate) fn sub(a: Decimal, b: Decimal) -> Result<Decimal, Overflow> {
    a.checked_sub(b).ok_or(Overflow)
}

/// The sum of `items`, or [`Overflow`].
pub(crate) fn total(items: impl IntoIterator<Item = Decimal>) -> Result<Decimal, Overflow> {
    items.into_iter().try_fold(Decimal::ZERO, add)
}

/// Prices `quantity` units of which `included` are free.
pub fn price(pricing: &Pricing, quantity: Decimal, included: Decimal) -> Result<Priced, Overflow> {
    let billable = sub(quantity, included)?.max(Decimal::ZERO);
    Ok(match pricing {
        Pricing::PerUnit { unit_price } => Priced {
            billable,
            unit_price: Some(*unit_price),
            steps: Vec::new(),
            exact: mul(billable, *unit_price)?,
        },
        Pricing::Graduated { tiers } => {
            let mut steps = Vec::new();
            let mut below = Decimal::ZERO;
            for (i, tier) in tiers.iter().enumerate() {
                if billable <= below {
                    break;
                }
                let top = tier.up_to.map_or(billable, |u| u.min(billable));
                let units = sub(top, below)?;
                if units > Decimal::ZERO {
                    steps.push(Step {
                        tier: Some(i + 1),
                        from_unit: add(below, Decimal::ONE)?,
                        up_to: tier.up_to,
                        units,
                        unit_price: tier.unit_price,
                        flat_price: tier.flat_price,
                        packages: None,
                        amount: add(mul(units, tier.unit_price)?, tier.flat_price)?,
                    });
                }
                match tier.up_to {
                    Some(u) => below = u,
                    None => break,
                }
            }
            let exact = total(steps.iter().map(|s| s.amount))?;
            Priced {
                billable,
                unit_price: None,
                steps,
                exact,
            }
        }
        Pricing::Volume { tiers } => {
            if billable.is_zero() {
                return Ok(Priced {
                    billable,
                    unit_price: None,
                    steps: Vec::new(),
                    exact: Decimal::ZERO,
                });
            }
            let mut below = Decimal::ZERO;
            let mut chosen = None;
            for (i, tier) in tiers.iter().enumerate() {
                if tier.up_to.is_none_or(|u| billable <= u) {
                    chosen = Some((i, tier, below));
                    break;
                }
                below = tier.up_to.unwrap_or(below);
            }
            // Validation makes the last tier open, so a tier is always found.
            let Some((i, tier, below)) = chosen else {
                return Ok(Priced {
                    billable,
                    unit_price: None,
                    steps: Vec::new(),
                    exact: Decimal::ZERO,
                });
            };
            let amount = add(mul(billable, tier.unit_price)?, tier.flat_price)?;
            Priced {
                billable,
                unit_price: Some(tier.unit_price),
                steps: vec![Step {
                    tier: Some(i + 1),
                    from_unit: add(below, Decimal::ONE)?,
                    up_to: tier.up_to,
                    units: billable,
                    unit_price: tier.unit_price,
                    flat_price: tier.flat_price,
                    packages: None,
                    amount,
                }],
                exact: amount,
            }
        }
        Pricing::Package { size, price } => {
            let packages = (billable / size).ceil();
            let exact = mul(packages, *price)?;
            Priced {
                billable,
                unit_price: Some(*price),
                steps: if packages.is_zero() {
                    Vec::new()
                } else {
                    vec![Step {
                        tier: None,
                        from_unit: Decimal::ONE,
                        up_to: None,
                        units: billable,
                        unit_price: *price,
                        flat_price: Decimal::ZERO,
                        packages: Some(packages),
                        amount: exact,
                    }]
                },
                exact,
            }
        }
    })
}

/// Token counts of one provider's model in one stretch of time with one price.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    pub input: Decimal,
    pub output: Decimal,
    pub cached_input: Decimal,
    pub cache_write_input: Decimal,
}

/// Prices per million tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenPrices {
    pub input_per_million: Decimal,
    pub output_per_million: Decimal,
    pub cached_input_per_million: Decimal,
    pub cache_write_per_million: Decimal,
}

/// The exact list cost of `tokens`, with `markup` added (`0.20` adds 20%). Reasoning tokens
/// are part of the output tokens and are not priced again.
pub fn token_cost(
    tokens: &Tokens,
    prices: &TokenPrices,
    markup: Decimal,
) -> Result<Decimal, Overflow> {
    let million = Decimal::from(1_000_000);
    let cost = total([
        mul(tokens.input, prices.input_per_million)?,
        mul(tokens.output, prices.output_per_million)?,
        mul(tokens.cached_input, prices.cached_input_per_million)?,
        mul(tokens.cache_write_input, prices.cache_write_per_million)?,
    ])? / million;
    mul(cost, add(Decimal::ONE, markup)?)
}

/// A grant's part in paying an invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditUse {
    pub grant: String,
    pub amount: Decimal,
    pub balance_before: Decimal,
    pub balance_after: Decimal,
}

/// A grant as an invoice sees it: what is left of it after the closed invoices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Available {
    pub grant: String,
    pub balance: Decimal,
    pub priority: i64,
    pub expires: Option<chrono::DateTime<chrono::Utc>>,
}

/// Applies credits to `due` (already rounded): lowest priority first, then earliest expiry
/// (grants without one last), skipping grants expired at `period_start` and empty ones; never
/// below zero. Amounts are rounded to the currency (a balance given in finer units pays only
/// whole minor units).
pub fn apply_credits(
    due: Decimal,
    grants: &[Available],
    period_start: chrono::DateTime<chrono::Utc>,
    currency: Currency,
) -> Vec<CreditUse> {
    let mut order: Vec<&Available> = grants
        .iter()
        .filter(|g| g.expires.is_none_or(|e| e > period_start))
        .filter(|g| g.balance > Decimal::ZERO)
        .collect();
    order.sort_by_key(|g| (g.priority, g.expires.is_none(), g.expires));
    let mut left = due.max(Decimal::ZERO);
    let mut uses = Vec::new();
    for g in order {
        if left.is_zero() {
            break;
        }
        let usable = round_down(g.balance, currency);
        let amount = usable.min(left);
        if amount.is_zero() {
            continue;
        }
        left -= amount;
        uses.push(CreditUse {
            grant: g.grant.clone(),
            amount: currency.round(amount),
            balance_before: g.balance,
            balance_after: g.balance - amount,
        });
    }
    uses
}

fn round_down(amount: Decimal, currency: Currency) -> Decimal {
    amount.round_dp_with_strategy(
        currency.minor_digits(),
        rust_decimal::RoundingStrategy::ToZero,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str_exact(s).expect("decimal")
    }

    fn tiers() -> Vec<Tier> {
        vec![
            Tier {
                up_to: Some(d("1000")),
                unit_price: d("0"),
                flat_price: d("0"),
            },
            Tier {
                up_to: Some(d("10000")),
                unit_price: d("0.01"),
                flat_price: d("0"),
            },
            Tier {
                up_to: None,
                unit_price: d("0.005"),
                flat_price: d("0"),
            },
        ]
    }

    #[test]
    fn graduated_prices_each_unit_at_its_tier() {
        let g = Pricing::Graduated { tiers: tiers() };
        for (q, amount) in [
            ("0", "0"),
            ("1000", "0"),
            ("1001", "0.01"),
            ("10000", "90.00"),
            ("10001", "90.005"),
            ("20000", "140.000"),
        ] {
            let p = price(&g, d(q), Decimal::ZERO).expect("fits");
            assert_eq!(p.exact, d(amount), "{q}");
            assert_eq!(
                p.steps.iter().map(|s| s.units).sum::<Decimal>(),
                d(q),
                "{q}"
            );
        }
    }

    #[test]
    fn volume_prices_every_unit_at_the_tier_of_the_total() {
        let v = Pricing::Volume { tiers: tiers() };
        for (q, amount, tier) in [
            ("0", "0", None),
            ("1000", "0", Some(1)),
            ("1001", "10.01", Some(2)),
            ("10000", "100.00", Some(2)),
            ("10001", "50.005", Some(3)),
        ] {
            let p = price(&v, d(q), Decimal::ZERO).expect("fits");
            assert_eq!(p.exact, d(amount), "{q}");
            assert_eq!(p.steps.first().and_then(|s| s.tier), tier, "{q}");
        }
    }

    #[test]
    fn packages_round_up_after_the_included_units() {
        let p = Pricing::Package {
            size: d("100"),
            price: d("5"),
        };
        for (q, included, amount) in [
            ("0", "0", "0"),
            ("1", "0", "5"),
            ("100", "0", "5"),
            ("101", "0", "10"),
            ("150", "50", "5"),
            ("151", "50", "10"),
            ("40", "50", "0"),
        ] {
            assert_eq!(
                price(&p, d(q), d(included)).expect("fits").exact,
                d(amount),
                "{q} {included}"
            );
        }
    }

    #[test]
    fn credits_go_by_priority_then_expiry_and_never_below_zero() {
        let usd = Currency::from_code("USD").expect("USD");
        let at = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .expect("rfc3339")
                .with_timezone(&chrono::Utc)
        };
        let grant = |id: &str, balance: &str, priority: i64, expires: Option<&str>| Available {
            grant: id.to_owned(),
            balance: d(balance),
            priority,
            expires: expires.map(at),
        };
        let grants = [
            grant("never", "100", 1, None),
            grant("later", "10", 1, Some("2027-06-01T00:00:00Z")),
            grant("sooner", "10", 1, Some("2027-01-01T00:00:00Z")),
            grant("first", "5", 0, None),
            grant("expired", "1000", 0, Some("2026-10-01T00:00:00Z")),
        ];
        let uses = apply_credits(d("30.00"), &grants, at("2026-10-01T00:00:00Z"), usd);
        let got: Vec<(&str, String)> = uses
            .iter()
            .map(|u| (u.grant.as_str(), u.amount.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("first", "5.00".to_owned()),
                ("sooner", "10.00".to_owned()),
                ("later", "10.00".to_owned()),
                ("never", "5.00".to_owned())
            ]
        );
        assert_eq!(uses[3].balance_after, d("95"));
        assert!(apply_credits(d("0"), &grants, at("2026-10-01T00:00:00Z"), usd).is_empty());
    }

    #[test]
    fn amounts_past_the_decimal_range_are_an_error_not_a_panic() {
        let huge = Pricing::PerUnit {
            unit_price: Decimal::MAX,
        };
        assert_eq!(price(&huge, d("2"), Decimal::ZERO), Err(Overflow));
        let tokens = Tokens {
            input: Decimal::MAX,
            ..Tokens::default()
        };
        let prices = TokenPrices {
            input_per_million: d("2"),
            output_per_million: d("0"),
            cached_input_per_million: d("0"),
            cache_write_per_million: d("0"),
        };
        assert_eq!(token_cost(&tokens, &prices, Decimal::ZERO), Err(Overflow));
    }
}

//! Random usage under random plans, rated by the crate and by a naive rater written here that
//! walks unit by unit and package by package: they must agree to the last digit.

use std::collections::BTreeMap;

use meterd_billing::invoice::{Status, Terms, Usage, rate_invoice};
use meterd_billing::rate::{self, Available, Pricing, Tier};
use meterd_billing::usage::MeterValue;
use meterd_billing::{Billing, BillingConfig, Currency};
use proptest::prelude::*;
use rust_decimal::Decimal;

/// Prices with up to three decimals, as price lists are written.
fn price() -> impl Strategy<Value = Decimal> {
    (0i64..5_000).prop_map(|m| Decimal::new(m, 3))
}

fn tiers() -> impl Strategy<Value = Vec<Tier>> {
    (
        proptest::collection::vec((1u64..400, price(), price()), 0..4),
        price(),
        price(),
    )
        .prop_map(|(bounded, last_price, last_flat)| {
            let mut up_to = 0u64;
            let mut out: Vec<Tier> = bounded
                .into_iter()
                .map(|(width, unit_price, flat_price)| {
                    up_to += width;
                    Tier {
                        up_to: Some(Decimal::from(up_to)),
                        unit_price,
                        flat_price,
                    }
                })
                .collect();
            out.push(Tier {
                up_to: None,
                unit_price: last_price,
                flat_price: last_flat,
            });
            out
        })
}

fn pricing() -> impl Strategy<Value = Pricing> {
    prop_oneof![
        price().prop_map(|unit_price| Pricing::PerUnit { unit_price }),
        tiers().prop_map(|tiers| Pricing::Graduated { tiers }),
        tiers().prop_map(|tiers| Pricing::Volume { tiers }),
        ((1u64..50), price()).prop_map(|(size, price)| Pricing::Package {
            size: Decimal::from(size),
            price,
        }),
    ]
}

/// The tier a unit (1-based) falls in.
fn tier_of(tiers: &[Tier], unit: u64) -> usize {
    tiers
        .iter()
        .position(|t| t.up_to.is_none_or(|u| Decimal::from(unit) <= u))
        .unwrap_or(tiers.len() - 1)
}

/// Unit by unit, as a person would on paper.
fn naive(pricing: &Pricing, quantity: u64, included: u64) -> Decimal {
    let billable = quantity.saturating_sub(included);
    match pricing {
        Pricing::PerUnit { unit_price } => (0..billable).map(|_| *unit_price).sum(),
        Pricing::Graduated { tiers } => {
            let mut total = Decimal::ZERO;
            let mut touched = vec![false; tiers.len()];
            for unit in 1..=billable {
                let t = tier_of(tiers, unit);
                total += tiers[t].unit_price;
                touched[t] = true;
            }
            for (t, was) in touched.iter().enumerate() {
                if *was {
                    total += tiers[t].flat_price;
                }
            }
            total
        }
        Pricing::Volume { tiers } => {
            if billable == 0 {
                return Decimal::ZERO;
            }
            let t = &tiers[tier_of(tiers, billable)];
            (0..billable).map(|_| t.unit_price).sum::<Decimal>() + t.flat_price
        }
        Pricing::Package { size, price } => {
            let mut packages = Decimal::ZERO;
            let mut room = Decimal::ZERO;
            for _ in 0..billable {
                if room.is_zero() {
                    packages += Decimal::ONE;
                    room = *size;
                }
                room -= Decimal::ONE;
            }
            packages * price
        }
    }
}

/// Half to even by hand: look at the digits past the minor unit.
fn round_half_even(amount: Decimal, digits: u32) -> Decimal {
    let scale = Decimal::from(10i64.pow(digits));
    let scaled = amount * scale;
    let floor = scaled.floor();
    let rest = scaled - floor;
    let half = Decimal::new(5, 1);
    let up = rest > half || (rest == half && (floor % Decimal::TWO) != Decimal::ZERO);
    (if up { floor + Decimal::ONE } else { floor }) / scale
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_model_agrees_with_the_naive_rater(
        pricing in pricing(),
        quantity in 0u64..2_000,
        included in prop_oneof![Just(0u64), 0u64..500],
    ) {
        let priced = rate::price(&pricing, Decimal::from(quantity), Decimal::from(included))
            .expect("fits");
        prop_assert_eq!(priced.exact, naive(&pricing, quantity, included));
        prop_assert_eq!(priced.billable, Decimal::from(quantity.saturating_sub(included)));
        let usd = Currency::from_code("USD").expect("USD");
        prop_assert_eq!(usd.round(priced.exact), round_half_even(priced.exact, 2));
    }

    #[test]
    fn an_invoice_adds_up(
        quantity in 0u64..5_000,
        unit_price in price(),
        base in 0i64..10_000,
        minimum in 0i64..20_000,
        grants in proptest::collection::vec((1i64..5_000, -2i64..3), 0..4),
    ) {
        let config: BillingConfig = toml::from_str(&format!(
            r#"
            [[meters]]
            name = "runs"
            type = "agent.run"
            aggregation = "count"
            [[plans]]
            name = "p"
            currency = "USD"
            base_fee = "{}"
            minimum = "{}"
            [[plans.charges]]
            meter = "runs"
            model = "per_unit"
            unit_price = "{}"
            [[customers]]
            tenant = "t"
            plan = "p"
            "#,
            Decimal::new(base, 2),
            Decimal::new(minimum, 2),
            unit_price,
        ))
        .expect("parses");
        let billing = Billing::new(&config).expect("valid");
        let credits: Vec<Available> = grants
            .iter()
            .enumerate()
            .map(|(i, (cents, priority))| Available {
                grant: format!("g{i}"),
                balance: Decimal::new(*cents, 2),
                priority: *priority,
                expires: None,
            })
            .collect();
        let usage = Usage {
            values: BTreeMap::from([(0, MeterValue { events: quantity, value: Some(Decimal::from(quantity)) })]),
            llm: Vec::new(),
        };
        let invoice = rate_invoice(
            &billing,
            "t",
            chrono_tz::Tz::UTC,
            "2026-10".parse().expect("period"),
            Terms { plan: &billing.plans[0], prices: &billing.prices, status: Status::Draft },
            &usage,
            &credits,
            Vec::new(),
            "test",
        )
        .expect("rates");
        let line = round_half_even(Decimal::from(quantity) * unit_price, 2);
        let subtotal = line + Decimal::new(base, 2);
        let due = subtotal.max(Decimal::new(minimum, 2));
        // Credits by priority (stable for equal ones), each as much as is left.
        let mut order: Vec<&Available> = credits.iter().collect();
        order.sort_by_key(|g| g.priority);
        let mut left = due;
        let mut used = Decimal::ZERO;
        for g in order {
            let take = g.balance.min(left);
            left -= take;
            used += take;
        }
        prop_assert_eq!(invoice.subtotal, subtotal);
        prop_assert_eq!(invoice.subtotal + invoice.minimum_adjustment, due);
        prop_assert_eq!(invoice.credits_applied.iter().map(|c| c.amount).sum::<Decimal>(), used);
        prop_assert_eq!(invoice.total, due - used);
        prop_assert!(invoice.total >= Decimal::ZERO);
    }
}

//! Invoices rated from known usage: every charge model at and around its edges, included
//! units, the minimum, markup, cached and cache-write tokens, credits, a price change inside a
//! period and periods in zones other than UTC. Amounts here are worked out by hand.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use meterd_billing::invoice::{Status, Terms, Usage, rate_invoice};
use meterd_billing::rate::{Available, Tokens};
use meterd_billing::usage::{MeterValue, ModelTokens};
use meterd_billing::{Billing, BillingConfig, Invoice, Period};
use rust_decimal::Decimal;

const CONFIG: &str = r#"
[[prices]]
provider = "openai"
model = "gpt-4o"
effective_from = "2026-01-01T00:00:00Z"
input_per_million = "2.50"
output_per_million = "10.00"
cached_input_per_million = "1.25"
cache_write_per_million = "3.125"

[[prices]]
provider = "openai"
model = "gpt-4o"
effective_from = "2026-10-15T00:00:00Z"
input_per_million = "2.00"
output_per_million = "8.00"

[[prices]]
provider = "anthropic"
model = "claude-x"
effective_from = "2026-01-01T00:00:00Z"
input_per_million = "1.00"
output_per_million = "1.00"

[[meters]]
name = "agent_runs"
type = "agent.run"
aggregation = "count"
filter = "status = 'succeeded' AND agent <> 'test'"

[[meters]]
name = "api_bytes"
type = "api.request"
aggregation = "sum"
field = "response_bytes"

[[plans]]
name = "pro"
currency = "USD"
base_fee = "49.00"
minimum = "100.00"
[[plans.charges]]
meter = "agent_runs"
model = "graduated"
tiers = [{ up_to = 1000, unit_price = "0" }, { up_to = 10000, unit_price = "0.01" }, { unit_price = "0.005" }]
[[plans.charges]]
model = "llm_cost"
markup = "0.20"

[[plans]]
name = "volume"
currency = "USD"
[[plans.charges]]
meter = "agent_runs"
model = "volume"
tiers = [{ up_to = 100, unit_price = "0.10" }, { up_to = 1000, unit_price = "0.05", flat_price = "1.00" }, { unit_price = "0.01" }]

[[plans]]
name = "packages"
currency = "EUR"
[[plans.charges]]
meter = "api_bytes"
model = "package"
package_size = 1000000
package_price = "0.15"
included = 5000000
[[plans.charges]]
name = "runs"
meter = "agent_runs"
model = "per_unit"
unit_price = "0.0125"
included = 10

[[customers]]
tenant = "acme"
plan = "pro"
timezone = "America/Sao_Paulo"

[[customers]]
tenant = "globex"
plan = "volume"

[[customers]]
tenant = "initech"
plan = "packages"
timezone = "Asia/Kolkata"

[[credits]]
tenant = "acme"
amount = "25.00"
expires = "2026-12-31T00:00:00Z"
priority = 1

[[credits]]
id = "welcome"
tenant = "acme"
amount = "10.00"
priority = 0
"#;

fn billing() -> Billing {
    let config: BillingConfig = toml::from_str(CONFIG).expect("the configuration parses");
    Billing::new(&config).expect("the configuration is valid")
}

fn d(s: &str) -> Decimal {
    Decimal::from_str_exact(s).expect("decimal")
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("rfc3339")
        .with_timezone(&Utc)
}

fn meter_usage(billing: &Billing, values: &[(&str, u64, &str)]) -> Usage {
    let mut map = BTreeMap::new();
    for (name, events, value) in values {
        let index = billing
            .meters
            .iter()
            .position(|m| m.name == *name)
            .expect("meter");
        map.insert(
            index,
            MeterValue {
                events: *events,
                value: Some(d(value)),
            },
        );
    }
    Usage {
        values: map,
        llm: Vec::new(),
    }
}

fn rate(billing: &Billing, tenant: &str, period: &str, usage: &Usage) -> Invoice {
    let customer = &billing.customers[tenant];
    let plan = &billing.plans[customer.plan];
    let credits: Vec<Available> = billing
        .grants
        .iter()
        .filter(|g| g.tenant == tenant)
        .map(|g| Available {
            grant: g.id.clone(),
            balance: g.amount,
            priority: g.priority,
            expires: g.expires,
        })
        .collect();
    rate_invoice(
        billing,
        tenant,
        customer.timezone,
        period.parse().expect("period"),
        Terms {
            plan,
            prices: &billing.prices,
            status: Status::Draft,
        },
        usage,
        &credits,
        Vec::new(),
        "test",
    )
    .expect("rates")
}

#[test]
fn graduated_charge_at_each_tier_edge_with_minimum_and_credits() {
    let b = billing();
    // (runs, graduated amount)
    for (runs, amount) in [
        ("0", "0.00"),
        ("1000", "0.00"),
        ("1001", "0.01"),
        ("10000", "90.00"),
        ("10001", "90.00"), // 90.005 rounds half to even
        ("10003", "90.02"), // 90.015 rounds half to even
        ("20000", "140.00"),
    ] {
        let inv = rate(
            &b,
            "acme",
            "2026-10",
            &meter_usage(&b, &[("agent_runs", 1, runs)]),
        );
        assert_eq!(inv.lines[0].amount, d(amount), "{runs} runs");
        assert_eq!(
            inv.lines[0].amount.to_string(),
            amount,
            "{runs} runs: scale"
        );
        // Base fee 49 plus the runs, raised to the 100 minimum.
        let subtotal = d(amount) + d("49.00");
        assert_eq!(inv.subtotal, subtotal);
        assert_eq!(
            inv.minimum_adjustment,
            (d("100.00") - subtotal).max(Decimal::ZERO)
        );
        // Credits: the 10.00 "welcome" grant first (priority 0), then the 25.00 grant.
        let due = subtotal.max(d("100.00"));
        let applied: Vec<(String, Decimal)> = inv
            .credits_applied
            .iter()
            .map(|c| (c.grant.clone(), c.amount))
            .collect();
        assert_eq!(
            applied,
            [
                ("welcome".to_owned(), d("10.00")),
                ("acme-1".to_owned(), d("25.00"))
            ]
        );
        assert_eq!(inv.total, due - d("35.00"), "{runs} runs");
    }
}

#[test]
fn zero_usage_pays_the_base_fee_raised_to_the_minimum() {
    let b = billing();
    let inv = rate(&b, "acme", "2026-10", &Usage::default());
    assert_eq!(
        inv.lines.len(),
        1,
        "the metered line, at zero; no LLM lines"
    );
    assert_eq!(inv.lines[0].quantity, Decimal::ZERO);
    assert_eq!(inv.subtotal.to_string(), "49.00");
    assert_eq!(inv.minimum_adjustment.to_string(), "51.00");
    assert_eq!(inv.total.to_string(), "65.00");
    // Credits expired at the period's start are skipped.
    let inv = rate(&b, "acme", "2027-01", &Usage::default());
    assert_eq!(inv.credits_applied.len(), 1);
    assert_eq!(inv.total.to_string(), "90.00");
}

#[test]
fn volume_prices_all_units_at_the_tier_of_the_total() {
    let b = billing();
    for (runs, amount) in [
        ("0", "0.00"),
        ("1", "0.10"),
        ("100", "10.00"),
        ("101", "6.05"), // 101 x 0.05 + 1.00 flat
        ("1000", "51.00"),
        ("1001", "10.01"),
    ] {
        let inv = rate(
            &b,
            "globex",
            "2026-10",
            &meter_usage(&b, &[("agent_runs", 1, runs)]),
        );
        assert_eq!(inv.lines[0].amount.to_string(), amount, "{runs} runs");
        assert_eq!(inv.total.to_string(), amount, "{runs} runs");
    }
}

#[test]
fn packages_and_per_unit_after_included_units_in_another_currency() {
    let b = billing();
    for (bytes, runs, packages_amount, runs_amount) in [
        ("0", "0", "0.00", "0.00"),
        ("5000000", "10", "0.00", "0.00"),
        ("5000001", "11", "0.15", "0.01"), // 0.0125 rounds half to even to 0.01
        ("6000000", "12", "0.15", "0.02"), // 0.025 -> 0.02
        ("6000001", "13", "0.30", "0.04"), // 0.0375 -> 0.04
    ] {
        let usage = meter_usage(&b, &[("api_bytes", 1, bytes), ("agent_runs", 1, runs)]);
        let inv = rate(&b, "initech", "2026-10", &usage);
        assert_eq!(inv.currency, "EUR");
        assert_eq!(inv.lines[0].amount.to_string(), packages_amount, "{bytes}");
        assert_eq!(inv.lines[1].charge, "runs");
        assert_eq!(inv.lines[1].amount.to_string(), runs_amount, "{runs}");
        assert_eq!(inv.total, d(packages_amount) + d(runs_amount));
    }
}

#[test]
fn llm_cost_prices_each_direction_and_the_price_change_inside_the_period() {
    let b = billing();
    let tokens = |input: &str, output: &str, cached: &str, write: &str| Tokens {
        input: d(input),
        output: d(output),
        cached_input: d(cached),
        cache_write_input: d(write),
    };
    let start = at("2026-10-01T03:00:00Z");
    let change = at("2026-10-15T00:00:00Z");
    let end = at("2026-11-01T03:00:00Z");
    let usage = Usage {
        values: BTreeMap::new(),
        llm: vec![
            (
                start,
                change,
                ModelTokens {
                    provider: "openai".to_owned(),
                    model: "gpt-4o".to_owned(),
                    events: 3,
                    tokens: tokens("1000000", "500000", "2000000", "400000"),
                },
            ),
            (
                change,
                end,
                ModelTokens {
                    provider: "openai".to_owned(),
                    model: "gpt-4o".to_owned(),
                    events: 2,
                    tokens: tokens("1000000", "1000000", "1000000", "0"),
                },
            ),
        ],
    };
    let inv = rate(&b, "acme", "2026-10", &usage);
    let llm: Vec<&_> = inv.lines.iter().filter(|l| l.model == "llm_cost").collect();
    assert_eq!(llm.len(), 2);
    // Before the change: 2.50 + 5.00 + 2.50 (cached at 1.25) + 1.25 (writes at 3.125) = 11.25,
    // plus 20% = 13.50.
    assert_eq!(llm[0].amount.to_string(), "13.50");
    // After: 2.00 + 8.00 + 2.00 (cached defaults to the input price) = 12.00, plus 20%.
    assert_eq!(llm[1].amount.to_string(), "14.40");
    assert_eq!(inv.inputs.prices.len(), 2);
    assert_eq!(
        inv.inputs.prices[1].effective_from,
        "2026-10-15T00:00:00.000000Z"
    );
    // 49 + 13.50 + 14.40 = 76.90, raised to 100, less 35 of credits.
    assert_eq!(inv.subtotal.to_string(), "76.90");
    assert_eq!(inv.total.to_string(), "65.00");
}

#[test]
fn an_unpriced_model_is_an_error_not_a_free_line() {
    let b = billing();
    let customer = &b.customers["acme"];
    let usage = Usage {
        values: BTreeMap::new(),
        llm: vec![(
            at("2026-10-01T03:00:00Z"),
            at("2026-11-01T03:00:00Z"),
            ModelTokens {
                provider: "anthropic".to_owned(),
                model: "claude".to_owned(),
                events: 7,
                tokens: Tokens::default(),
            },
        )],
    };
    let e = rate_invoice(
        &b,
        "acme",
        customer.timezone,
        "2026-10".parse().expect("period"),
        Terms {
            plan: &b.plans[customer.plan],
            prices: &b.prices,
            status: Status::Draft,
        },
        &usage,
        &[],
        Vec::new(),
        "test",
    )
    .expect_err("no price");
    assert!(e.to_string().contains("anthropic/claude"), "{e}");
}

#[test]
fn periods_are_months_in_the_customers_zone() {
    let b = billing();
    let inv = rate(&b, "initech", "2026-10", &Usage::default());
    assert_eq!(inv.timezone, "Asia/Kolkata");
    assert_eq!(inv.period_start, "2026-09-30T18:30:00.000000Z");
    assert_eq!(inv.period_end, "2026-10-31T18:30:00.000000Z");
    let p: Period = "2026-10".parse().expect("period");
    assert_eq!(p.start(Tz::America__Sao_Paulo), at("2026-10-01T03:00:00Z"));
    // An event at 23:59:59.999 local on the last day is in the period, 00:00 local is not.
    let last = at("2026-10-31T18:29:59.999Z");
    assert_eq!(Period::containing(last, Tz::Asia__Kolkata), p);
    assert_eq!(
        Period::containing(at("2026-10-31T18:30:00Z"), Tz::Asia__Kolkata).to_string(),
        "2026-11"
    );
}

#[test]
fn the_invoice_json_shape() {
    let b = billing();
    let inv = rate(
        &b,
        "globex",
        "2026-10",
        &meter_usage(&b, &[("agent_runs", 150, "150")]),
    );
    let json = serde_json::to_value(&inv).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "tenant": "globex",
            "period": "2026-10",
            "timezone": "UTC",
            "period_start": "2026-10-01T00:00:00.000000Z",
            "period_end": "2026-11-01T00:00:00.000000Z",
            "plan": "volume",
            "currency": "USD",
            "status": "draft",
            "lines": [{
                "charge": "agent_runs",
                "model": "volume",
                "meter": "agent_runs",
                "quantity": "150",
                "included": "0",
                "billable": "150",
                "unit_price": "0.05",
                "breakdown": [{
                    "tier": 2,
                    "from_unit": "101",
                    "up_to": "1000",
                    "units": "150",
                    "unit_price": "0.05",
                    "flat_price": "1.00",
                    "amount": "8.50"
                }],
                "amount": "8.50"
            }],
            "base_fee": "0.00",
            "subtotal": "8.50",
            "minimum": "0.00",
            "minimum_adjustment": "0.00",
            "credits_applied": [],
            "total": "8.50",
            "inputs": {
                "source": "test",
                "meters": [{"meter": "agent_runs", "events": 150, "value": "150"}],
                "prices": []
            }
        })
    );
    assert_eq!(
        inv.lines_csv(),
        "tenant,period,currency,charge,model,meter,provider,llm_model,quantity,included,\
         billable,unit_price,amount\nglobex,2026-10,USD,agent_runs,volume,agent_runs,,,150,0,\
         150,0.05,8.50\n"
    );
}

#[test]
fn bad_configuration_names_the_entry() {
    for (patch, needle) in [
        (
            "[[plans]]\nname = \"x\"\ncurrency = \"USD\"\n[[plans.charges]]\nmeter = \"nope\"\nmodel = \"per_unit\"\nunit_price = \"1\"\n",
            "plans[3] (x): charges[0]: meter \"nope\" is not defined",
        ),
        (
            "[[plans]]\nname = \"x\"\ncurrency = \"USD\"\n[[plans.charges]]\nmeter = \"agent_runs\"\nmodel = \"graduated\"\ntiers = [{ up_to = 10, unit_price = \"1\" }, { up_to = 10, unit_price = \"1\" }, { unit_price = \"1\" }]\n",
            "plans[3] (x): charges[0]: tiers[1] up_to 10 overlaps",
        ),
        (
            "[[customers]]\ntenant = \"y\"\nplan = \"pro\"\ntimezone = \"Mars/Olympus\"\n",
            "customers[3] (y): timezone \"Mars/Olympus\" is not an IANA zone",
        ),
        (
            "[[meters]]\nname = \"m\"\ntype = \"llm.usage\"\naggregation = \"count\"\nfilter = \"colour = 'red'\"\n",
            "meters[2] (m): filter: events has no column \"colour\"",
        ),
        (
            "[[meters]]\nname = \"m\"\ntype = \"llm.usage\"\naggregation = \"sum\"\nfield = \"model\"\n",
            "meters[2] (m): field: a sum needs an integer column",
        ),
        (
            "[[plans]]\nname = \"x\"\ncurrency = \"ABC\"\n",
            "plans[3] (x): currency \"ABC\" is not an ISO 4217 currency",
        ),
        (
            "[[credits]]\ntenant = \"nobody\"\namount = \"1\"\n",
            "credits[2] (nobody-1): tenant \"nobody\" is not a customer",
        ),
    ] {
        let config: BillingConfig =
            toml::from_str(&format!("{CONFIG}\n{patch}")).expect("the configuration parses");
        let e = Billing::new(&config).expect_err(needle).to_string();
        assert!(e.contains(needle), "{e}\nexpected {needle}");
    }
    // A price as a TOML float is refused while parsing, naming the key.
    let float = CONFIG.replace("input_per_million = \"2.50\"", "input_per_million = 2.50");
    let e = toml::from_str::<BillingConfig>(&float)
        .expect_err("a float")
        .to_string();
    assert!(
        e.contains("never a number") && e.contains("input_per_million"),
        "{e}"
    );
}

#[test]
fn another_models_price_change_does_not_split_a_line() {
    let b = billing();
    let tokens = Tokens {
        input: d("5000"),
        ..Tokens::default()
    };
    let stretch = |from: &str, to: &str| {
        (
            at(from),
            at(to),
            ModelTokens {
                provider: "anthropic".to_owned(),
                model: "claude-x".to_owned(),
                events: 1,
                tokens: tokens.clone(),
            },
        )
    };
    // gpt-4o's price change on the 15th cuts the month; claude-x's price is the same in both.
    let usage = Usage {
        values: BTreeMap::new(),
        llm: vec![
            stretch("2026-10-01T03:00:00Z", "2026-10-15T00:00:00Z"),
            stretch("2026-10-15T00:00:00Z", "2026-11-01T03:00:00Z"),
        ],
    };
    let inv = rate(&b, "acme", "2026-10", &usage);
    let llm: Vec<_> = inv.lines.iter().filter(|l| l.model == "llm_cost").collect();
    // 10,000 tokens at 1.00 per million, plus 20%: 0.012, one line rounded once to 0.01 (two
    // lines of 0.006 would round to 0.01 each).
    assert_eq!(llm.len(), 1);
    assert_eq!(llm[0].amount.to_string(), "0.01");
    assert_eq!(llm[0].quantity, d("10000"));
    assert_eq!(inv.inputs.prices[0].events, 2);
}

//! Money and other exact decimals in the configuration: written as strings (`"2.50"`), never as
//! TOML or JSON numbers, which readers parse as binary floats; and the currencies' minor units.

use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// An exact decimal read from a string: a price, an amount, a markup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Dec(pub Decimal);

impl Dec {
    pub const ZERO: Dec = Dec(Decimal::ZERO);

    pub fn get(self) -> Decimal {
        self.0
    }
}

impl From<Decimal> for Dec {
    fn from(d: Decimal) -> Self {
        Dec(d)
    }
}

impl fmt::Display for Dec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Dec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        // Plain decimal notation only: no exponent, no thousands separators, no NaN.
        let plain = !t.is_empty()
            && t.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_digit() || c == '.' || (i == 0 && (c == '-' || c == '+')));
        if !plain || t != s {
            return Err(format!("{s:?} is not a decimal number such as \"2.50\""));
        }
        Decimal::from_str_exact(t)
            .map(Dec)
            .map_err(|e| format!("{s:?} is not a decimal number: {e}"))
    }
}

impl Serialize for Dec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Dec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Dec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal string such as \"2.50\" (money is never a number, which would be read as a float)")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dec, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// A currency: its ISO 4217 code and the digits of its minor unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Currency {
    code: iso_currency::Currency,
    minor_digits: u32,
}

impl Currency {
    /// The currency of an ISO 4217 code; `None` for an unknown code or one without a minor
    /// unit that money can be rounded to (gold, SDR).
    pub fn from_code(code: &str) -> Option<Currency> {
        let c = iso_currency::Currency::from_code(code)?;
        let minor_digits = u32::from(c.exponent()?);
        Some(Currency {
            code: c,
            minor_digits,
        })
    }

    pub fn code(&self) -> &'static str {
        self.code.code()
    }

    /// Digits after the point in the currency's minor unit: 2 for USD, 0 for JPY, 3 for KWD.
    pub fn minor_digits(&self) -> u32 {
        self.minor_digits
    }

    /// `amount` rounded half to even to the minor unit (banker's rounding: 0.125 -> 0.12,
    /// 0.135 -> 0.14), and shown with exactly that many digits.
    pub fn round(&self, amount: Decimal) -> Decimal {
        let mut rounded =
            amount.round_dp_with_strategy(self.minor_digits, RoundingStrategy::MidpointNearestEven);
        rounded.rescale(self.minor_digits);
        rounded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_strings_in_plain_notation() {
        assert_eq!(
            "2.50".parse::<Dec>().map(Dec::get),
            Ok(Decimal::new(250, 2))
        );
        assert_eq!("-1".parse::<Dec>().map(Dec::get), Ok(Decimal::NEGATIVE_ONE));
        for bad in ["", "1e3", "1,000", "NaN", " 1", "0x10", "1.2.3"] {
            assert!(bad.parse::<Dec>().is_err(), "{bad:?}");
        }
        #[derive(Debug, Deserialize)]
        struct Price {
            #[allow(dead_code)]
            p: Dec,
        }
        let float = serde_json::from_str::<Price>(r#"{"p": 2.5}"#).expect_err("a float");
        assert!(float.to_string().contains("never a number"), "{float}");
    }

    #[test]
    fn rounding_is_half_to_even_at_the_minor_unit() {
        let usd = Currency::from_code("USD").expect("USD");
        let jpy = Currency::from_code("JPY").expect("JPY");
        let kwd = Currency::from_code("KWD").expect("KWD");
        let d = |s: &str| Decimal::from_str_exact(s).expect("decimal");
        assert_eq!(usd.round(d("0.125")).to_string(), "0.12");
        assert_eq!(usd.round(d("0.135")).to_string(), "0.14");
        assert_eq!(usd.round(d("0.1251")).to_string(), "0.13");
        assert_eq!(usd.round(d("-0.125")).to_string(), "-0.12");
        assert_eq!(usd.round(d("7")).to_string(), "7.00");
        assert_eq!(jpy.round(d("2.5")).to_string(), "2");
        assert_eq!(jpy.round(d("3.5")).to_string(), "4");
        assert_eq!(kwd.round(d("1.0005")).to_string(), "1.000");
        assert!(Currency::from_code("XAU").is_none());
        assert!(Currency::from_code("ABC").is_none());
    }
}

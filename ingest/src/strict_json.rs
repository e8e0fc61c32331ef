//! JSON parsing that refuses an object holding the same key twice.
//!
//! `serde_json` keeps the last of duplicate keys, so `{"tenant": "acme", ..., "tenant": "evil"}`
//! would be stored for `evil` while a proxy or log that reads the first sees `acme`. RFC 8259
//! leaves duplicates undefined; for events meterd refuses them. serde_json has no option for
//! this, so the `Value` is built here by a visitor that checks each key as it is inserted (the
//! parsing itself, its recursion limit included, is serde_json's).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Number, Value};

/// Parses `bytes` as one JSON value, refusing duplicate keys at any depth.
pub fn from_slice(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = StrictValue.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// Parses `text` as one JSON value, refusing duplicate keys at any depth.
pub fn from_str(text: &str) -> Result<Value, serde_json::Error> {
    from_slice(text.as_bytes())
}

/// Seeds the deserialization of one value.
#[derive(Clone, Copy)]
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // serde_json never produces a non-finite number; `Null` as serde_json's own `Value` does.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            match object.entry(key) {
                Entry::Vacant(slot) => {
                    slot.insert(map.next_value_seed(self)?);
                }
                Entry::Occupied(taken) => {
                    let shown: String = taken.key().chars().take(64).collect();
                    return Err(de::Error::custom(format_args!(
                        "duplicate key {shown:?}; each key may appear once in an object"
                    )));
                }
            }
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn values_parse_as_serde_json_parses_them() {
        let text = r#"{"a": [1, -2, 3.5, "x", null, true, {"b": {}}], "c": 18446744073709551615}"#;
        assert_eq!(
            from_str(text).expect("valid"),
            serde_json::from_str::<Value>(text).expect("valid")
        );
        assert!(from_str("{} x").is_err(), "trailing characters");
        assert!(from_str(&"[".repeat(10_000)).is_err(), "recursion limit");
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let e = from_str(r#"{"tenant": "acme", "id": "1", "tenant": "evil"}"#).expect_err("dup");
        assert!(e.to_string().contains("duplicate key \"tenant\""), "{e}");
        let e = from_str(r#"[{"data": {"model": "a", "model": "b"}}]"#).expect_err("nested");
        assert!(e.to_string().contains("duplicate key \"model\""), "{e}");
        assert_eq!(
            from_str(r#"{"a": {"k": 1}, "b": {"k": 2}}"#).expect("same key in two objects"),
            json!({"a": {"k": 1}, "b": {"k": 2}})
        );
    }
}

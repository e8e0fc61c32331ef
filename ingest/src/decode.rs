//! Request bodies into JSON values: content negotiation, gzip with a bound on the inflated size,
//! and the four framings (one object or an array, NDJSON, a CloudEvent, a CloudEvents batch).

use std::io::Read;

use serde_json::Value;

/// How the events in a body are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `application/json`: one v1 event or an array of them.
    Json,
    /// `application/x-ndjson`: one v1 event per line.
    Ndjson,
    /// `application/cloudevents+json`: one CloudEvent.
    CloudEvent,
    /// `application/cloudevents-batch+json`: an array of CloudEvents.
    CloudEventsBatch,
}

impl Framing {
    /// Whether items are CloudEvents rather than native events.
    pub fn is_cloudevents(self) -> bool {
        matches!(self, Framing::CloudEvent | Framing::CloudEventsBatch)
    }
}

/// Why a body could not be turned into events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "unsupported content type {0:?}; use application/json, application/x-ndjson, application/cloudevents+json or application/cloudevents-batch+json"
    )]
    UnsupportedMediaType(String),
    #[error("unsupported content encoding {0:?}; use gzip or none")]
    UnsupportedEncoding(String),
    #[error("body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("body is not valid gzip: {0}")]
    BadGzip(String),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("event {index} (line {line}) is malformed JSON: {reason}")]
    MalformedLine {
        index: usize,
        line: usize,
        reason: String,
    },
    #[error("{0}")]
    WrongShape(String),
    #[error("the body holds no events")]
    Empty,
    #[error("header {name}: {reason}")]
    BadHeader { name: String, reason: String },
    #[error(
        "CloudEvents binary mode: data of type {0:?} is not supported; send application/json data"
    )]
    UnsupportedDataContentType(String),
}

/// Picks the framing from a `Content-Type` header value. A missing header means JSON.
pub fn framing(content_type: Option<&str>) -> Result<Framing, DecodeError> {
    let Some(ct) = content_type else {
        return Ok(Framing::Json);
    };
    match essence(ct).as_str() {
        "application/json" => Ok(Framing::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(Framing::Ndjson),
        "application/cloudevents+json" => Ok(Framing::CloudEvent),
        "application/cloudevents-batch+json" => Ok(Framing::CloudEventsBatch),
        _ => Err(DecodeError::UnsupportedMediaType(
            ct.chars().take(100).collect(),
        )),
    }
}

/// The header that marks a CloudEvents binary-mode request (HTTP protocol binding 3.1.3).
pub const CE_SPECVERSION_HEADER: &str = "ce-specversion";

/// Whether a request is a CloudEvent in binary mode: a `ce-specversion` header on a body that is
/// not a structured CloudEvent (which the content type would say). Many SDKs send binary mode
/// by default.
pub fn is_binary_cloudevent(content_type: Option<&str>, has_ce_specversion: bool) -> bool {
    has_ce_specversion
        && !matches!(
            framing(content_type),
            Ok(Framing::CloudEvent | Framing::CloudEventsBatch)
        )
}

/// Rebuilds a binary-mode CloudEvent as its structured form: each `ce-<name>` header is the
/// attribute `<name>` (percent-decoded, as the HTTP binding asks), the body is `data`, and the
/// `Content-Type` is `datacontenttype`. A `ce-dimensions` header holds a JSON object.
pub fn binary_cloudevent<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Value, DecodeError> {
    let mut event = serde_json::Map::new();
    for (name, raw) in headers {
        let Some(attribute) = name.strip_prefix("ce-") else {
            continue;
        };
        let bad = |reason: String| DecodeError::BadHeader {
            name: truncate(name, 64),
            reason,
        };
        let decoded: Vec<u8> = percent_encoding::percent_decode(raw).collect();
        // HTTP header values were ISO-8859-1 before UTF-8 and percent-encoding took over; an
        // SDK that sends `é` as the single byte 0xE9 means that.
        let text = String::from_utf8(decoded)
            .unwrap_or_else(|e| e.as_bytes().iter().map(|&b| char::from(b)).collect());
        let value = if attribute == "dimensions" {
            crate::strict_json::from_str(&text)
                .map_err(|e| bad(format!("must hold a JSON object of strings ({e})")))?
        } else {
            Value::String(text)
        };
        if event.insert(attribute.to_owned(), value).is_some() {
            return Err(bad("given more than once".into()));
        }
    }
    if let Some(ct) = content_type {
        let essence = essence(ct);
        match essence.as_str() {
            "application/json" => {
                event.insert("datacontenttype".into(), Value::String(essence));
            }
            // What curl and Python's urllib send when the caller set no type (SDKs leave it
            // unset when the event has no datacontenttype): the body must still be JSON.
            "application/x-www-form-urlencoded" => {}
            _ => return Err(DecodeError::UnsupportedDataContentType(truncate(ct, 100))),
        }
    }
    let data: Value = crate::strict_json::from_slice(body)
        .map_err(|e| DecodeError::MalformedJson(e.to_string()))?;
    event.insert("data".into(), data);
    Ok(Value::Object(event))
}

/// A media type without its parameters, lower case (`application/json; charset=utf-8` is
/// `application/json`).
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// At most `max` bytes of `s` (on a character boundary), for echoing a sender's value back.
fn truncate(s: &str, max: usize) -> String {
    s[..s.floor_char_boundary(max)].to_owned()
}

/// Inflates a gzip body if `Content-Encoding` says so, never past `limit` bytes.
pub fn inflate(
    body: bytes::Bytes,
    content_encoding: Option<&str>,
    limit: usize,
) -> Result<bytes::Bytes, DecodeError> {
    match content_encoding.map(|e| e.trim().to_ascii_lowercase()) {
        None => Ok(body),
        Some(e) if e.is_empty() || e == "identity" => Ok(body),
        Some(e) if e == "gzip" || e == "x-gzip" => {
            let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
            // Reading one byte past the limit tells "exactly at the limit" from "over it",
            // without ever inflating a bomb further than that.
            let mut decoder = flate2::read::MultiGzDecoder::new(&body[..]).take(limit as u64 + 1);
            decoder
                .read_to_end(&mut out)
                .map_err(|e| DecodeError::BadGzip(e.to_string()))?;
            if out.len() > limit {
                return Err(DecodeError::TooLarge { limit });
            }
            Ok(out.into())
        }
        Some(e) => Err(DecodeError::UnsupportedEncoding(
            e.chars().take(50).collect(),
        )),
    }
}

/// Splits a body into one JSON value per event.
pub fn items(body: &[u8], framing: Framing) -> Result<Vec<Value>, DecodeError> {
    let items = match framing {
        Framing::Json | Framing::CloudEvent | Framing::CloudEventsBatch => {
            let v: Value = crate::strict_json::from_slice(body)
                .map_err(|e| DecodeError::MalformedJson(e.to_string()))?;
            match (framing, v) {
                (Framing::Json, Value::Array(items))
                | (Framing::CloudEventsBatch, Value::Array(items)) => items,
                (Framing::Json, v @ Value::Object(_))
                | (Framing::CloudEvent, v @ Value::Object(_)) => vec![v],
                (Framing::CloudEventsBatch, _) => {
                    return Err(DecodeError::WrongShape(
                        "a CloudEvents batch must be a JSON array".into(),
                    ));
                }
                (Framing::CloudEvent, _) => {
                    return Err(DecodeError::WrongShape(
                        "a CloudEvent must be a JSON object".into(),
                    ));
                }
                (_, _) => {
                    return Err(DecodeError::WrongShape(
                        "the body must be an event object or an array of them".into(),
                    ));
                }
            }
        }
        Framing::Ndjson => {
            let mut out = Vec::new();
            for (line_no, line) in body.split(|b| *b == b'\n').enumerate() {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let v = crate::strict_json::from_slice(line).map_err(|e| {
                    DecodeError::MalformedLine {
                        index: out.len(),
                        line: line_no + 1,
                        reason: e.to_string(),
                    }
                })?;
                out.push(v);
            }
            out
        }
    };
    if items.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8]) -> bytes::Bytes {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).expect("write");
        enc.finish().expect("finish").into()
    }

    #[test]
    fn framings() {
        assert_eq!(framing(None), Ok(Framing::Json));
        assert_eq!(
            framing(Some("application/json; charset=utf-8")),
            Ok(Framing::Json)
        );
        assert_eq!(framing(Some("application/x-ndjson")), Ok(Framing::Ndjson));
        assert_eq!(
            framing(Some("Application/CloudEvents+JSON")),
            Ok(Framing::CloudEvent)
        );
        assert!(matches!(
            framing(Some("text/plain")),
            Err(DecodeError::UnsupportedMediaType(_))
        ));
    }

    #[test]
    fn items_by_framing() {
        assert_eq!(
            items(br#"{"a":1}"#, Framing::Json).expect("object").len(),
            1
        );
        assert_eq!(
            items(br#"[{"a":1},{"a":2}]"#, Framing::Json)
                .expect("array")
                .len(),
            2
        );
        assert_eq!(
            items(b"{\"a\":1}\r\n\n{\"a\":2}\n", Framing::Ndjson)
                .expect("ndjson")
                .len(),
            2
        );
        assert!(matches!(
            items(b"[]", Framing::Json),
            Err(DecodeError::Empty)
        ));
        assert!(matches!(
            items(b"{\"a\":", Framing::Json),
            Err(DecodeError::MalformedJson(_))
        ));
        assert!(matches!(
            items(b"3", Framing::Json),
            Err(DecodeError::WrongShape(_))
        ));
        assert!(matches!(
            items(br#"{"a":1}"#, Framing::CloudEventsBatch),
            Err(DecodeError::WrongShape(_))
        ));
        assert_eq!(
            items(b"{\"a\":1}\n\n{oops}\n", Framing::Ndjson),
            Err(DecodeError::MalformedLine {
                index: 1,
                line: 3,
                reason: "key must be a string at line 1 column 2".into()
            })
        );
    }

    #[test]
    fn binary_mode_is_rebuilt_as_a_structured_event() {
        assert!(is_binary_cloudevent(Some("application/json"), true));
        assert!(is_binary_cloudevent(None, true));
        assert!(!is_binary_cloudevent(Some("application/json"), false));
        assert!(!is_binary_cloudevent(
            Some("application/cloudevents+json"),
            true
        ));
        let headers: Vec<(&str, &[u8])> = vec![
            ("ce-specversion", b"1.0"),
            ("ce-id", b"c1"),
            ("ce-source", b"bot"),
            ("ce-type", b"llm.usage"),
            ("ce-tenant", b"caf%C3%A9 %22Corp%22"),
            ("ce-dimensions", br#"{"team":"a"}"#),
            ("user-agent", b"sdk"),
        ];
        let event = binary_cloudevent(
            headers,
            Some("application/json; charset=utf-8"),
            br#"{"model":"m"}"#,
        )
        .expect("binary");
        assert_eq!(
            event,
            serde_json::json!({"specversion": "1.0", "id": "c1", "source": "bot",
                "type": "llm.usage", "tenant": "café \"Corp\"", "dimensions": {"team": "a"},
                "datacontenttype": "application/json", "data": {"model": "m"}})
        );
        assert!(matches!(
            binary_cloudevent(vec![("ce-id", b"x" as &[u8])], Some("text/plain"), b"hi"),
            Err(DecodeError::UnsupportedDataContentType(_))
        ));
        let defaulted = binary_cloudevent(
            vec![("ce-id", b"x" as &[u8])],
            Some("application/x-www-form-urlencoded"),
            b"{}",
        )
        .expect("a client's default type with a JSON body");
        assert!(defaulted.get("datacontenttype").is_none());
        let latin1 = binary_cloudevent(vec![("ce-tenant", b"caf\xe9" as &[u8])], None, b"{}")
            .expect("ISO-8859-1 header");
        assert_eq!(latin1["tenant"], "café");
        assert!(matches!(
            binary_cloudevent(vec![("ce-id", b"1" as &[u8]), ("ce-id", b"2")], None, b"{}"),
            Err(DecodeError::BadHeader { .. })
        ));
    }

    #[test]
    fn gzip_is_bounded() {
        let data = vec![b' '; 10_000];
        assert_eq!(
            inflate(gzip(&data), Some("gzip"), 10_000)
                .expect("fits")
                .len(),
            10_000
        );
        assert_eq!(
            inflate(gzip(&data), Some("gzip"), 9_999),
            Err(DecodeError::TooLarge { limit: 9_999 })
        );
        assert!(matches!(
            inflate(bytes::Bytes::from_static(b"nope"), Some("gzip"), 100),
            Err(DecodeError::BadGzip(_))
        ));
        assert!(matches!(
            inflate(bytes::Bytes::new(), Some("br"), 100),
            Err(DecodeError::UnsupportedEncoding(_))
        ));
        assert_eq!(
            inflate(bytes::Bytes::from_static(b"x"), None, 100)
                .expect("plain")
                .len(),
            1
        );
    }
}

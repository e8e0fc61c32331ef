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
}

/// Picks the framing from a `Content-Type` header value. A missing header means JSON.
pub fn framing(content_type: Option<&str>) -> Result<Framing, DecodeError> {
    let Some(ct) = content_type else {
        return Ok(Framing::Json);
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(Framing::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(Framing::Ndjson),
        "application/cloudevents+json" => Ok(Framing::CloudEvent),
        "application/cloudevents-batch+json" => Ok(Framing::CloudEventsBatch),
        _ => Err(DecodeError::UnsupportedMediaType(
            ct.chars().take(100).collect(),
        )),
    }
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
            let v: Value = serde_json::from_slice(body)
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
                let v = serde_json::from_slice(line).map_err(|e| DecodeError::MalformedLine {
                    index: out.len(),
                    line: line_no + 1,
                    reason: e.to_string(),
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

//! Small readers for raw `redis::Value` replies.
//!
//! Stream replies are nested arrays; we read them by hand rather than through
//! typed conversions so that a value that is not UTF-8 reaches the consumer as
//! bytes and can be dead-lettered with a reason instead of failing a whole
//! batch.

use redis::Value;

/// The bytes of a string-like value.
pub fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

/// A string-like value as an owned `String` (lossless only for UTF-8).
pub fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::Int(i) => Some(i.to_string()),
        _ => as_bytes(v).map(|b| String::from_utf8_lossy(b).into_owned()),
    }
}

/// An integer value, also when Redis sends it as a string.
pub fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => as_bytes(v).and_then(|b| std::str::from_utf8(b).ok()?.parse().ok()),
    }
}

/// The elements of an array value.
pub fn as_array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

/// A flat `[k1, v1, k2, v2, ...]` array (RESP2) or a map (RESP3) as pairs,
/// with keys as strings.
pub fn map_pairs(v: &Value) -> Option<Vec<(String, Value)>> {
    match v {
        Value::Map(pairs) => Some(
            pairs
                .iter()
                .filter_map(|(k, v)| Some((as_string(k)?, v.clone())))
                .collect(),
        ),
        Value::Array(items) => Some(
            items
                .chunks(2)
                .filter_map(|kv| match kv {
                    [k, v] => Some((as_string(k)?, v.clone())),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}

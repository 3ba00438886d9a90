//! Reading streams and groups: `XRANGE` and `XREAD` entries, `XINFO GROUPS`
//! and `XINFO STREAM`.
//!
//! Replies are read as RESP2 or RESP3. A stream that does not exist reads
//! as empty (no groups, no info) rather than as an error, in one place:
//! [`is_no_such_key`].

use redis::streams::{StreamInfoGroup, StreamInfoGroupsReply};
use redis::{Connection, Value};

/// A stream entry with its fields as bytes, as Redis keeps them.
#[derive(Debug, Clone)]
pub struct RawEntry {
    /// The entry ID.
    pub id: String,
    /// Field/value pairs in order.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RawEntry {
    /// The raw value of a field.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// A field as text (lossily decoded).
    pub fn text(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// Whether `e` says the key does not exist (`XINFO` of a missing stream).
pub fn is_no_such_key(e: &redis::RedisError) -> bool {
    e.to_string().contains("no such key")
}

/// `XRANGE stream start end` (all entries with `-`, `+`); panics on an
/// error.
pub fn xrange(conn: &mut Connection, stream: &str, start: &str, end: &str) -> Vec<RawEntry> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg(start)
        .arg(end)
        .query(conn)
        .unwrap_or_else(|e| panic!("XRANGE {stream} {start} {end}: {e}"));
    parse_entries(&reply)
}

/// The entries of an `XRANGE` reply (or of one stream of an `XREAD`
/// reply); what is not an entry is skipped.
pub fn parse_entries(reply: &Value) -> Vec<RawEntry> {
    let Value::Array(entries) = reply else {
        return Vec::new();
    };
    entries.iter().filter_map(parse_entry).collect()
}

fn parse_entry(e: &Value) -> Option<RawEntry> {
    let Value::Array(parts) = e else { return None };
    let [Value::BulkString(id), fields, ..] = parts.as_slice() else {
        return None;
    };
    let bytes = |v: &Value| match v {
        Value::BulkString(b) => b.clone(),
        Value::SimpleString(s) => s.clone().into_bytes(),
        other => format!("{other:?}").into_bytes(),
    };
    let fields = match fields {
        Value::Array(kv) => kv
            .chunks_exact(2)
            .map(|p| (bytes(&p[0]), bytes(&p[1])))
            .collect(),
        Value::Map(kv) => kv.iter().map(|(k, v)| (bytes(k), bytes(v))).collect(),
        _ => return None,
    };
    Some(RawEntry {
        id: String::from_utf8_lossy(id).into_owned(),
        fields,
    })
}

/// The entries of an `XREAD` reply, every stream's in turn: a map of
/// streams in RESP3, an array of `[name, entries]` in RESP2.
pub fn read_reply_entries(reply: &Value) -> Vec<RawEntry> {
    let per_stream: Vec<&Value> = match reply {
        Value::Map(streams) => streams.iter().map(|(_, v)| v).collect(),
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(pair) => pair.get(1),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    per_stream.into_iter().flat_map(parse_entries).collect()
}

/// `XINFO GROUPS stream` (empty when the stream does not exist); panics on
/// any other error.
pub fn groups(conn: &mut Connection, stream: &str) -> Vec<StreamInfoGroup> {
    try_groups(conn, stream).unwrap_or_else(|e| panic!("{e}"))
}

/// [`groups`], with the failure as an error.
pub fn try_groups(conn: &mut Connection, stream: &str) -> Result<Vec<StreamInfoGroup>, String> {
    let reply: redis::RedisResult<StreamInfoGroupsReply> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query(conn);
    match reply {
        Ok(r) => Ok(r.groups),
        Err(e) if is_no_such_key(&e) => Ok(Vec::new()),
        Err(e) => Err(format!("XINFO GROUPS {stream}: {e}")),
    }
}

/// The group `name` of `stream`, if it exists.
pub fn group(conn: &mut Connection, stream: &str, name: &str) -> Option<StreamInfoGroup> {
    groups(conn, stream).into_iter().find(|g| g.name == name)
}

/// The groups of an `XINFO GROUPS` reply read elsewhere (in a pipeline).
pub fn parse_groups(reply: &Value) -> Result<Vec<StreamInfoGroup>, String> {
    redis::from_redis_value_ref::<StreamInfoGroupsReply>(reply)
        .map(|r| r.groups)
        .map_err(|e| format!("XINFO GROUPS: {e}"))
}

/// What the load tool reads of `XINFO STREAM`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamInfo {
    /// `length`.
    pub length: u64,
    /// `entries-added` (Redis 7 and later), which trimming does not lower.
    pub entries_added: Option<u64>,
    /// `last-generated-id`.
    pub last_generated_id: String,
}

impl StreamInfo {
    /// Entries ever added, or the length where Redis does not tell.
    pub fn added(&self) -> u64 {
        self.entries_added.unwrap_or(self.length)
    }
}

/// `XINFO STREAM stream`; `None` when the stream does not exist.
pub fn try_stream_info(conn: &mut Connection, stream: &str) -> Result<Option<StreamInfo>, String> {
    let reply: redis::RedisResult<Value> =
        redis::cmd("XINFO").arg("STREAM").arg(stream).query(conn);
    match reply {
        Ok(v) => Ok(Some(parse_stream_info(&v))),
        Err(e) if is_no_such_key(&e) => Ok(None),
        Err(e) => Err(format!("XINFO STREAM {stream}: {e}")),
    }
}

/// The fields of an `XINFO STREAM` reply (a map in RESP3, a flat array of
/// names and values in RESP2); a missing field reads as 0 or empty.
pub fn parse_stream_info(reply: &Value) -> StreamInfo {
    let pairs: Vec<(&Value, &Value)> = match reply {
        Value::Map(kv) => kv.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(kv) => kv.chunks_exact(2).map(|p| (&p[0], &p[1])).collect(),
        _ => Vec::new(),
    };
    let field = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some(name))
            .map(|(_, v)| *v)
    };
    let number = |name: &str| field(name).and_then(|v| redis::from_redis_value_ref::<u64>(v).ok());
    StreamInfo {
        length: number("length").unwrap_or(0),
        entries_added: number("entries-added"),
        last_generated_id: field("last-generated-id")
            .and_then(text)
            .unwrap_or_default(),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[(&str, &str)]) -> Value {
        let kv = fields
            .iter()
            .flat_map(|(k, v)| [bulk(k), bulk(v)])
            .collect();
        Value::Array(vec![bulk(id), Value::Array(kv)])
    }

    #[test]
    fn xread_replies_read_alike_in_resp2_and_resp3() {
        let entries = Value::Array(vec![
            entry("1-0", &[("orderId", "0-1")]),
            entry("2-0", &[("userId", "u")]),
        ]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("payment-events"),
            entries.clone(),
        ])]);
        let resp3 = Value::Map(vec![(bulk("payment-events"), entries)]);
        for reply in [resp2, resp3] {
            let read = read_reply_entries(&reply);
            let ids: Vec<_> = read
                .iter()
                .map(|e| (e.id.as_str(), e.text("orderId")))
                .collect();
            assert_eq!(ids, [("1-0", Some("0-1".to_string())), ("2-0", None)]);
        }
    }

    #[test]
    fn stream_info_without_entries_added_counts_the_length() {
        let reply = Value::Array(vec![
            bulk("length"),
            Value::Int(3),
            bulk("last-generated-id"),
            bulk("5-0"),
        ]);
        let info = parse_stream_info(&reply);
        assert_eq!(info.added(), 3);
        assert_eq!(info.last_generated_id, "5-0");
        let reply = Value::Map(vec![
            (bulk("length"), Value::Int(1)),
            (bulk("entries-added"), Value::Int(7)),
        ]);
        assert_eq!(parse_stream_info(&reply).added(), 7);
    }
}

//! Decoding `XREADGROUP` and `XAUTOCLAIM` replies, RESP2 or RESP3, without
//! ever panicking on what Redis (or something posing as it) sends.

use redis::Value;

use crate::record::Fields;
use crate::value;

/// Entries of an `XREADGROUP` reply (RESP2 array or RESP3 map); `None`
/// fields mark an entry deleted from the stream while pending.
pub(crate) fn parse_read_reply(reply: &Value) -> Vec<(String, Option<Fields>)> {
    let streams: Vec<Value> = match reply {
        Value::Nil => return Vec::new(),
        Value::Map(pairs) => pairs.iter().map(|(_, v)| v.clone()).collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(|s| value::as_array(s).and_then(|kv| kv.get(1)).cloned())
            .collect(),
        _ => return Vec::new(),
    };
    streams
        .iter()
        .flat_map(|entries| parse_entries(value::as_array(entries).unwrap_or_default()))
        .collect()
}

/// Entries of an `XRANGE`-shaped list (also `XAUTOCLAIM`'s second element).
pub(crate) fn parse_entries(entries: &[Value]) -> Vec<(String, Option<Fields>)> {
    entries
        .iter()
        .filter_map(|e| {
            let [id, fields, ..] = value::as_array(e)? else {
                return None;
            };
            let id = value::as_string(id)?;
            let fields = value::as_array(fields).map(|kv| {
                Fields(
                    kv.chunks(2)
                        .filter_map(|p| match p {
                            [k, v] => {
                                Some((value::as_bytes(k)?.to_vec(), value::as_bytes(v)?.to_vec()))
                            }
                            _ => None,
                        })
                        .collect(),
                )
            });
            Some((id, fields))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_xreadgroup_replies() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("order-events"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("userId"), bulk("u1")]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = parse_read_reply(&reply);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0, "1-0");
        assert_eq!(
            entries[0].1.as_ref().and_then(|f| f.get("userId")),
            Some(&b"u1"[..])
        );
        assert!(entries[1].1.is_none());
        assert!(parse_read_reply(&Value::Nil).is_empty());
    }

    mod properties {
        //! Whatever Redis (or something posing as it) replies, reading it
        //! never panics, and well-formed replies read back exactly. A long
        //! run: `PROPTEST_CASES=100000 cargo test --lib consumer`.

        use super::*;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            let mut config = ProptestConfig::default();
            if std::env::var_os("PROPTEST_CASES").is_none() {
                config.cases = 256;
            }
            config
        }

        fn any_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Nil),
                Just(Value::Okay),
                any::<i64>().prop_map(Value::Int),
                proptest::collection::vec(any::<u8>(), 0..12).prop_map(Value::BulkString),
                "[ -~]{0,8}".prop_map(Value::SimpleString),
                any::<f64>().prop_map(Value::Double),
                any::<bool>().prop_map(Value::Boolean),
            ];
            leaf.prop_recursive(4, 64, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Set),
                    proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Value::Map),
                ]
            })
        }

        type Entry = (String, Option<Vec<(Vec<u8>, Vec<u8>)>>);

        fn entry() -> impl Strategy<Value = Entry> {
            (
                "[0-9]{1,13}-[0-9]{1,3}",
                proptest::option::of(proptest::collection::vec(
                    (
                        proptest::collection::vec(any::<u8>(), 0..10),
                        proptest::collection::vec(any::<u8>(), 0..10),
                    ),
                    0..5,
                )),
            )
        }

        fn reply(stream: &str, entries: &[Entry], resp3: bool) -> Value {
            let items = entries
                .iter()
                .map(|(id, fields)| {
                    let fields = match fields {
                        None => Value::Nil,
                        Some(kv) => Value::Array(
                            kv.iter()
                                .flat_map(|(k, v)| {
                                    [Value::BulkString(k.clone()), Value::BulkString(v.clone())]
                                })
                                .collect(),
                        ),
                    };
                    Value::Array(vec![Value::BulkString(id.clone().into_bytes()), fields])
                })
                .collect();
            let name = Value::BulkString(stream.as_bytes().to_vec());
            if resp3 {
                Value::Map(vec![(name, Value::Array(items))])
            } else {
                Value::Array(vec![Value::Array(vec![name, Value::Array(items)])])
            }
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn arbitrary_replies_never_panic(reply in any_value()) {
                let entries = parse_read_reply(&reply);
                if let Some(items) = value::as_array(&reply) {
                    let _ = parse_entries(items);
                }
                for fields in entries.iter().filter_map(|(_, f)| f.as_ref()) {
                    let _ = crate::record::Order::from_fields(fields);
                    let _ = crate::record::Payment::from_fields(fields);
                }
            }

            #[test]
            fn well_formed_replies_read_back_exactly(
                entries in proptest::collection::vec(entry(), 0..6),
                resp3 in any::<bool>(),
            ) {
                let got = parse_read_reply(&reply("order-events", &entries, resp3));
                prop_assert_eq!(got.len(), entries.len());
                for ((id, fields), (want_id, want)) in got.iter().zip(&entries) {
                    prop_assert_eq!(id, want_id);
                    prop_assert_eq!(fields.as_ref().map(|f| f.0.clone()), want.clone());
                }
            }
        }
    }
}

//! Dead letters: entries that will never be handled, kept with the reason.
//!
//! An entry is dead-lettered after `MAX_DELIVERIES` failed deliveries, or at
//! once when it can never succeed (a required field missing, a price that is
//! not a number, a value that is not UTF-8). It is copied to `<stream>:dlq`
//! with its original fields followed by [`META_FIELDS`], and acknowledged,
//! in one Lua script: there is no moment at which it is in neither place,
//! nor in both for the group.

use redis::{Connection, RedisError, Script};

use crate::record::Fields;

/// The fields a dead letter carries after the original ones, in order.
pub const META_FIELDS: [&str; 6] = [
    "originalId",
    "originalStream",
    "group",
    "consumer",
    "error",
    "deliveries",
];

/// Copies the entry to the dead-letter stream and acknowledges it, only if it
/// is still pending for the group (someone else may have handled it since),
/// and forgets its failure count (KEYS[3], see
/// [`crate::topology::failures_key`]).
const MOVE: &str = r#"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
redis.call('HDEL', KEYS[3], ARGV[2])
if #pending == 0 then return 0 end
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
fields[#fields + 1] = 'originalId';     fields[#fields + 1] = ARGV[2]
fields[#fields + 1] = 'originalStream'; fields[#fields + 1] = KEYS[1]
fields[#fields + 1] = 'group';          fields[#fields + 1] = ARGV[1]
fields[#fields + 1] = 'consumer';       fields[#fields + 1] = ARGV[3]
fields[#fields + 1] = 'error';          fields[#fields + 1] = ARGV[4]
fields[#fields + 1] = 'deliveries';     fields[#fields + 1] = ARGV[5]
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

/// One entry to dead-letter.
pub struct DeadLetter<'a> {
    /// The stream it was read from.
    pub stream: &'a str,
    /// The group that gives up on it.
    pub group: &'a str,
    /// The consumer that gives up on it.
    pub consumer: &'a str,
    /// Its ID in `stream`.
    pub id: &'a str,
    /// Its original fields.
    pub fields: &'a Fields,
    /// Why it is given up.
    pub error: &'a str,
    /// How often it failed (1 for an entry that can never succeed).
    pub deliveries: u64,
}

/// Moves one entry to `<stream>:dlq` and acknowledges it. `Ok(false)` if it
/// was no longer pending (handled elsewhere meanwhile): nothing written.
pub fn move_to_dlq(conn: &mut Connection, letter: &DeadLetter<'_>) -> Result<bool, RedisError> {
    let script = Script::new(MOVE);
    let mut invocation = script.key(letter.stream);
    invocation
        .key(crate::topology::dlq_stream(letter.stream))
        .key(crate::topology::failures_key(letter.stream, letter.group))
        .arg(letter.group)
        .arg(letter.id)
        .arg(letter.consumer)
        .arg(letter.error)
        .arg(letter.deliveries)
        .arg("");
    for (k, v) in &letter.fields.0 {
        invocation.arg(k.as_slice()).arg(v.as_slice());
    }
    let moved: i64 = invocation.invoke(conn)?;
    Ok(moved == 1)
}

/// Splits a dead letter's fields into the original fields and the metadata
/// we appended (by name, from the end).
pub fn split_fields(fields: &Fields) -> (Fields, Vec<(String, String)>) {
    let mut original = fields.0.clone();
    let mut meta = Vec::new();
    for name in META_FIELDS.iter().rev() {
        match original.last() {
            Some((k, _)) if k.as_slice() == name.as_bytes() => {
                let (k, v) = original.pop().unwrap_or_default();
                meta.push((
                    String::from_utf8_lossy(&k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                ));
            }
            _ => break,
        }
    }
    meta.reverse();
    (Fields(original), meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_recovers_original_fields() {
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"userId".to_vec(), b"u".to_vec()),
            (b"error".to_vec(), b"x".to_vec()),
        ];
        for name in META_FIELDS {
            pairs.push((name.as_bytes().to_vec(), b"m".to_vec()));
        }
        let (original, meta) = split_fields(&Fields(pairs));
        assert_eq!(
            original.0.len(),
            2,
            "an original field named like ours stays"
        );
        assert_eq!(meta.len(), META_FIELDS.len());
        assert_eq!(meta[0].0, "originalId");
    }
}

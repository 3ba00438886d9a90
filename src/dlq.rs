//! Dead letters: entries that will never be handled, kept with the reason.
//!
//! An entry is dead-lettered after `MAX_DELIVERIES` failed deliveries, or at
//! once when it can never succeed (a required field missing, a price that is
//! not a number, a value that is not UTF-8). It is copied to `<stream>:dlq`
//! with its original fields followed by [`META_FIELDS`], and acknowledged,
//! in one Lua script: there is no moment at which it is in neither place,
//! nor in both for the group.
//!
//! # One dead letter per entry
//!
//! Every group of a stream may give up on the same entry (a poison order is
//! refused by payment-service and by notification-service alike). The
//! entry is written to the DLQ once: `<stream>:dlq:index` (a hash, field =
//! the original entry ID) holds `<dead-letter ID>,<group>[,<group>...]`, the
//! letter and every group that gave up on it. A group that finds the entry
//! there adds its name to the list and acknowledges, writing nothing, even
//! when the letter itself was evicted meanwhile (it was dead-lettered; a
//! second letter would bring it back as the newest). `streamctl dlq
//! redrive` reads the list to know which groups the redriven entry is for,
//! and deletes the field. The index is bounded by the stream: trimming an
//! entry deletes its field (see [`crate::trim`]); no group can give up on
//! an entry that is gone.
//!
//! # Redriven entries
//!
//! A redriven entry is a new entry of the stream carrying, after its
//! original fields, [`REDRIVE_GROUP`] (the groups that gave up on it,
//! comma-separated) and [`REDRIVEN_FROM`] (the ID of the entry first
//! written, kept over repeated redrives). A consumer of any other group
//! acknowledges it without acting ([`is_for_other_group`]): the others
//! handled the original already.
//!
//! # Bounded
//!
//! After each new letter the DLQ is cut to its newest `DLQ_RETAIN_ENTRIES`
//! (`XTRIM MAXLEN =`), in the same script; [`Moved::Written`] says how many
//! were evicted.

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

/// Field of a redriven entry: the groups it is for, comma-separated.
pub const REDRIVE_GROUP: &str = "redriveGroup";
/// Field of a redriven entry: the ID of the entry first written.
pub const REDRIVEN_FROM: &str = "redrivenFrom";

/// KEYS[1] stream, KEYS[2] its DLQ, KEYS[3] the DLQ's index, KEYS[4] the
/// group's failure counts ([`crate::topology::failures_key`], whose field
/// for the entry goes in any case). ARGV[1] group,
/// ARGV[2] entry ID, ARGV[3] consumer, ARGV[4] error, ARGV[5] deliveries,
/// ARGV[6] letters kept, ARGV[7..] original fields.
/// Returns {0} not pending, {1, evicted} written, {2} joined a letter
/// another group wrote.
const MOVE: &str = r#"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
redis.call('HDEL', KEYS[4], ARGV[2])
if #pending == 0 then return {0} end
local known = redis.call('HGET', KEYS[3], ARGV[2])
if known then
  local letter = string.match(known, '^[^,]+') or ''
  local listed = false
  for g in string.gmatch(string.sub(known, #letter + 2), '[^,]+') do
    if g == ARGV[1] then listed = true end
  end
  if not listed then redis.call('HSET', KEYS[3], ARGV[2], known .. ',' .. ARGV[1]) end
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return {2}
end
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
fields[#fields + 1] = 'originalId';     fields[#fields + 1] = ARGV[2]
fields[#fields + 1] = 'originalStream'; fields[#fields + 1] = KEYS[1]
fields[#fields + 1] = 'group';          fields[#fields + 1] = ARGV[1]
fields[#fields + 1] = 'consumer';       fields[#fields + 1] = ARGV[3]
fields[#fields + 1] = 'error';          fields[#fields + 1] = ARGV[4]
fields[#fields + 1] = 'deliveries';     fields[#fields + 1] = ARGV[5]
local letter = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('HSET', KEYS[3], ARGV[2], letter .. ',' .. ARGV[1])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return {1, redis.call('XTRIM', KEYS[2], 'MAXLEN', '=', ARGV[6])}
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
    /// Letters the DLQ keeps (`DLQ_RETAIN_ENTRIES`), the newest.
    pub retain: u64,
}

/// What [`move_to_dlq`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// It was no longer pending (handled elsewhere meanwhile): nothing written.
    NotPending,
    /// Written and acknowledged; `evicted` oldest letters went to keep the
    /// DLQ at `retain`.
    Written {
        /// Letters deleted to make room.
        evicted: u64,
    },
    /// Another group had dead-lettered it already: this group was added to
    /// that letter (or to the record of it, if it was evicted since), and
    /// the entry acknowledged.
    Joined,
}

/// Moves one entry to `<stream>:dlq` (once for all groups) and acknowledges
/// it for the group.
pub fn move_to_dlq(conn: &mut Connection, letter: &DeadLetter<'_>) -> Result<Moved, RedisError> {
    let script = Script::new(MOVE);
    let mut invocation = script.key(letter.stream);
    invocation
        .key(crate::topology::dlq_stream(letter.stream))
        .key(crate::topology::dlq_index(letter.stream))
        .key(crate::topology::failures_key(letter.stream, letter.group))
        .arg(letter.group)
        .arg(letter.id)
        .arg(letter.consumer)
        .arg(letter.error)
        .arg(letter.deliveries)
        .arg(letter.retain.max(1));
    for (k, v) in &letter.fields.0 {
        invocation.arg(k.as_slice()).arg(v.as_slice());
    }
    let reply: Vec<i64> = invocation.invoke(conn)?;
    Ok(match reply.as_slice() {
        [1, evicted, ..] => Moved::Written {
            evicted: (*evicted).max(0) as u64,
        },
        [2, ..] => Moved::Joined,
        _ => Moved::NotPending,
    })
}

/// Whether `fields` are those of a redriven entry meant for other groups
/// than `group` (it carries [`REDRIVE_GROUP`] and `group` is not listed).
///
/// ```
/// use streamline::dlq::is_for_other_group;
/// use streamline::record::Fields;
///
/// let redriven = Fields(vec![
///     (b"userId".to_vec(), b"u1".to_vec()),
///     (b"redriveGroup".to_vec(), b"notification-service-group".to_vec()),
/// ]);
/// assert!(is_for_other_group(&redriven, "payment-service-group"));
/// assert!(!is_for_other_group(&redriven, "notification-service-group"));
/// assert!(!is_for_other_group(&Fields(vec![]), "payment-service-group"));
/// ```
pub fn is_for_other_group(fields: &Fields, group: &str) -> bool {
    match fields.get(REDRIVE_GROUP) {
        None => false,
        Some(groups) => !groups.split(|b| *b == b',').any(|g| g == group.as_bytes()),
    }
}

/// The ID of the entry first written, for a redriven entry; `None` for any
/// other.
pub fn redriven_from(fields: &Fields) -> Option<String> {
    fields
        .get(REDRIVEN_FROM)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
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

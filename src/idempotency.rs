//! Idempotent intake: the `Idempotency-Key` request header of `GET /order`
//! and `POST /orders` (CONTRACT "Idempotent intake", after the IETF httpapi
//! draft "The Idempotency-Key HTTP Header Field").
//!
//! # What is stored, and when
//!
//! The first request with a key writes its order and remembers the key, in
//! one Lua script call (so one atomic step): `XADD` to the order stream,
//! then `SET <stream>:idem:<key> "<status>|<orderId>|<fingerprint>" EX
//! IDEMPOTENCY_TTL_S`. The fingerprint is the SHA-1 (hex, Redis's
//! `redis.sha1hex`) of `userId`, `productId` and `price` joined by `\n`
//! (the fields can hold no control character, so the join is unambiguous).
//! A later request with the same key finds it in the same script: the same
//! fingerprint is a replay (nothing written; the stored status and orderId
//! are answered with `Idempotent-Replayed: true`), another fingerprint a
//! conflict (`422`, nothing written).
//!
//! # Group commit
//!
//! Keyed orders ride the same batches as the rest
//! ([`crate::producer`]). A batch with no keyed order is written exactly as
//! before (pipelined `XADD`s, no script); a batch with at least one is
//! written by **one** `EVALSHA` of [`WRITE_BATCH`] (`SCRIPT LOAD` and again
//! on `NOSCRIPT`), which handles the keyed orders as above and `XADD`s the
//! others, in the batch's order, all in one round trip.
//!
//! # Concurrent requests with one key
//!
//! Redis runs one script at a time, and a script checks and writes a key in
//! one step, so of any number of requests with one key, in one batch or in
//! batches of different writers (or of different order-service
//! instances), exactly one writes the order; every other one finds the key
//! and is answered with that order's ID as a replay. No request with a key
//! ever has to be answered `409`: there is no moment at which a key is held
//! without its order.
//!
//! # Redis Cluster and partitioned streams (later)
//!
//! The key is named after the stream its order is written to:
//! [`key_name`]`(stream, key)` is `<stream>:idem:<key>`. With partitioned
//! streams (`order-events:{p}`, CONTRACT "Scale-out") that is
//! `order-events:{p}:idem:<key>`: the hash tag is the first `{...}` of the
//! name, which is the partition's, so the key and its order are in one slot
//! and the script stays one atomic step on one node. A batch must then be
//! split by partition (one script call per partition); a retry carries the
//! same `userId`, so it reaches the same partition and finds its key. One
//! limit follows: a key reused with *another* `userId` that hashes to
//! another partition is not seen there, so that misuse is a second order
//! rather than a `422` (the same `userId` with other product or price is
//! still a `422`). ACL patterns become `~order-events:{*}:idem:*`.

use redis::{Connection, RedisResult, Script, Value};
use std::sync::LazyLock;
use tiny_http::Header;

use crate::record::Order;

/// The request header.
pub const HEADER: &str = "Idempotency-Key";
/// The answer header of a replay (value `true`).
pub const REPLAYED: &str = "Idempotent-Replayed";
/// Longest key, in characters (bytes: it is ASCII).
pub const MAX_KEY_LEN: usize = 255;
/// What follows the stream name in a key's name.
pub const INFIX: &str = ":idem:";

/// The Redis key that remembers `key` for orders written to `stream`.
///
/// ```
/// use streamline::idempotency::key_name;
/// assert_eq!(key_name("order-events", "a1"), "order-events:idem:a1");
/// assert_eq!(key_name("order-events:{3}", "a1"), "order-events:{3}:idem:a1");
/// ```
pub fn key_name(stream: &str, key: &str) -> String {
    format!("{stream}{INFIX}{key}")
}

/// The `SCAN MATCH` pattern of every key of `stream`.
pub fn key_pattern(stream: &str) -> String {
    format!("{stream}{INFIX}*")
}

/// What a valid key is, as every [`BadKey`] message ends.
const RULE: &str = "it must be 1 to 255 visible ASCII characters (0x21-0x7E)";

/// Why an `Idempotency-Key` header is refused (a `400`); `Display` names
/// the header, what is wrong and what a valid key is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadKey {
    /// An empty value.
    #[error("{HEADER} is empty: {RULE}")]
    Empty,
    /// A character that is not visible ASCII, at a 1-based position.
    #[error("{HEADER} contains {} at position {position}: {RULE}", describe(*.character))]
    Character {
        /// The character.
        character: char,
        /// Where it is, counting characters from 1.
        position: usize,
    },
    /// More than [`MAX_KEY_LEN`] characters.
    #[error("{HEADER} is {0} characters long: {RULE}")]
    TooLong(usize),
    /// The header more than once in one request.
    #[error("{HEADER} is given more than once")]
    Repeated,
}

fn describe(c: char) -> String {
    match c {
        ' ' => "a space".to_string(),
        '\t' => "a tab".to_string(),
        c if c.is_ascii() => format!("control character 0x{:02X}", c as u32),
        c => format!("the non-ASCII character {c:?}"),
    }
}

/// Checks one `Idempotency-Key` value: 1–255 visible ASCII characters
/// (`0x21`–`0x7E`). The error names what is wrong.
///
/// ```
/// use streamline::idempotency::{check_key, BadKey};
/// assert!(check_key("order-7f3a").is_ok());
/// assert_eq!(check_key(""), Err(BadKey::Empty));
/// assert!(check_key("a b").unwrap_err().to_string().contains("a space at position 2"));
/// ```
pub fn check_key(value: &str) -> Result<(), BadKey> {
    if value.is_empty() {
        return Err(BadKey::Empty);
    }
    if let Some((i, c)) = value
        .chars()
        .enumerate()
        .find(|(_, c)| !matches!(c, '!'..='~'))
    {
        return Err(BadKey::Character {
            character: c,
            position: i + 1,
        });
    }
    if value.len() > MAX_KEY_LEN {
        return Err(BadKey::TooLong(value.len()));
    }
    Ok(())
}

/// The `Idempotency-Key` of a request: `None` without the header, the key
/// when it is valid, else why it is refused (a `400`).
pub fn key_of(headers: &[Header]) -> Result<Option<String>, BadKey> {
    let mut found = headers.iter().filter(|h| h.field.equiv(HEADER));
    let Some(first) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return Err(BadKey::Repeated);
    }
    let value = first.value.as_str();
    check_key(value)?;
    Ok(Some(value.to_string()))
}

/// The answer header of a replay.
pub fn replayed_header() -> Header {
    // Both ASCII literals of ours: this cannot fail.
    Header::from_bytes(REPLAYED, "true").expect("valid header")
}

/// One order of a batch written by [`write_batch`].
pub struct Item<'a> {
    /// The order.
    pub order: &'a Order,
    /// Its key, if the request had one.
    pub key: Option<&'a str>,
    /// The status its request is answered with (`200` or `201`): stored
    /// with the key, so a replay gets the first answer.
    pub status: u16,
}

/// KEYS[1] the order stream, KEYS[2..] the key names of the keyed orders.
/// ARGV[1] the TTL in seconds; then five per order, in batch order: the
/// index of its key name in KEYS (`0`: no key), the status to remember,
/// `userId`, `productId`, `price`.
///
/// One reply per order: the new entry ID; `false` (nil) when the stream is
/// missing (`NOMKSTREAM`: nothing written, key not stored); `{'replay',
/// status, orderId}`; `{'conflict'}`.
pub const WRITE_BATCH: &str = r#"
local stream, ttl = KEYS[1], ARGV[1]
local out = {}
for i = 2, #ARGV, 5 do
  local k = tonumber(ARGV[i])
  local status, user, product, price = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local reply
  if k == 0 then
    reply = redis.call('XADD', stream, 'NOMKSTREAM', '*', 'userId', user, 'productId', product, 'price', price)
  else
    local fp = redis.sha1hex(user .. '\n' .. product .. '\n' .. price)
    local held = redis.call('GET', KEYS[k])
    if held then
      local s, id, f = string.match(held, '^(%d+)|([^|]+)|(.*)$')
      if f == fp then reply = {'replay', s, id} else reply = {'conflict'} end
    else
      reply = redis.call('XADD', stream, 'NOMKSTREAM', '*', 'userId', user, 'productId', product, 'price', price)
      if reply then
        redis.call('SET', KEYS[k], status .. '|' .. reply .. '|' .. fp, 'EX', ttl)
      end
    end
  end
  out[#out + 1] = reply
end
return out
"#;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(WRITE_BATCH));

/// Writes a batch that holds keyed orders in one script call (one round
/// trip, one atomic step): one reply per item, for [`Outcome::of`].
pub fn write_batch(
    conn: &mut Connection,
    stream: &str,
    ttl_s: u64,
    items: &[Item<'_>],
) -> RedisResult<Vec<Value>> {
    let mut call = SCRIPT.prepare_invoke();
    call.key(stream).arg(ttl_s);
    let mut next_key = 2;
    for item in items {
        match item.key {
            Some(key) => {
                call.key(key_name(stream, key)).arg(next_key);
                next_key += 1;
            }
            None => {
                call.arg(0);
            }
        }
        call.arg(item.status)
            .arg(&item.order.user_id)
            .arg(&item.order.product_id)
            .arg(&item.order.price);
    }
    call.invoke(conn)
}

/// Loads [`write_batch`]'s script (`SCRIPT LOAD`), for connections that
/// send [`add_batch_eval`]'s `EVALSHA` without waiting for its reply.
pub fn load_script(conn: &mut Connection) -> RedisResult<()> {
    SCRIPT.load(conn).map(drop)
}

/// Adds [`write_batch`]'s script call to `pipe` as an `EVALSHA`, for a
/// connection whose replies are read by another thread ([`crate::wire`]);
/// that thread loads the script first ([`load_script`]) and again on
/// `NOSCRIPT`. (Not `EVAL`: the shipped ACL lets order-service run only
/// scripts it loaded, not any text.) One reply: the array [`write_batch`]
/// returns.
pub fn add_batch_eval(pipe: &mut redis::Pipeline, stream: &str, ttl_s: u64, items: &[Item<'_>]) {
    let mut keys = vec![stream.to_string()];
    let mut args: Vec<String> = vec![ttl_s.to_string()];
    for item in items {
        match item.key {
            Some(key) => {
                keys.push(key_name(stream, key));
                args.push((keys.len()).to_string());
            }
            None => args.push("0".into()),
        }
        args.push(item.status.to_string());
        args.push(item.order.user_id.clone());
        args.push(item.order.product_id.clone());
        args.push(item.order.price.clone());
    }
    pipe.cmd("EVALSHA")
        .arg(SCRIPT.get_hash())
        .arg(keys.len())
        .arg(&keys)
        .arg(&args);
}

/// What became of one order of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written now, with this entry ID.
    Written(String),
    /// Its key was held by an order with the same fields: answer as that
    /// one was.
    Replayed {
        /// The first request's status.
        status: u16,
        /// The first request's order.
        order_id: String,
    },
    /// Its key was held by an order with other fields.
    Conflict,
    /// The stream is gone: nothing written.
    StreamMissing,
    /// A reply this code does not know.
    Unexpected,
}

impl Outcome {
    /// Reads one reply of a pipelined `XADD` or of [`write_batch`].
    pub fn of(reply: &Value) -> Outcome {
        use crate::value::{as_array, as_string};
        if matches!(reply, Value::Nil) {
            return Outcome::StreamMissing;
        }
        let Some(parts) = as_array(reply) else {
            return as_string(reply).map_or(Outcome::Unexpected, Outcome::Written);
        };
        let text: Vec<String> = parts.iter().filter_map(as_string).collect();
        match text.as_slice() {
            [kind, status, id] if kind == "replay" => match status.parse() {
                Ok(status) => Outcome::Replayed {
                    status,
                    order_id: id.clone(),
                },
                Err(_) => Outcome::Unexpected,
            },
            [kind] if kind == "conflict" => Outcome::Conflict,
            _ => Outcome::Unexpected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_to_255_visible_ascii_characters() {
        assert!(check_key("!").is_ok());
        assert!(check_key("~").is_ok());
        assert!(check_key(&"k".repeat(255)).is_ok());
        assert!(check_key("\"quoted\"").is_ok());
        let long = check_key(&"k".repeat(256)).unwrap_err().to_string();
        assert!(long.contains("256 characters long"), "{long}");
        assert!(check_key("a\tb")
            .unwrap_err()
            .to_string()
            .contains("a tab at position 2"));
        assert!(check_key("ab\u{1}")
            .unwrap_err()
            .to_string()
            .contains("control character 0x01 at position 3"));
        assert!(check_key("ab\u{7f}")
            .unwrap_err()
            .to_string()
            .contains("0x7F"));
        assert!(check_key("clé")
            .unwrap_err()
            .to_string()
            .contains("non-ASCII"));
    }

    #[test]
    fn a_repeated_header_is_refused() {
        let h = |v: &str| Header::from_bytes("idempotency-key", v).unwrap();
        assert_eq!(key_of(&[]), Ok(None));
        assert_eq!(key_of(&[h("k1")]), Ok(Some("k1".into())));
        assert!(key_of(&[h("k1"), h("k1")])
            .unwrap_err()
            .to_string()
            .contains("more than once"));
    }

    #[test]
    fn replies_are_read() {
        let s = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        assert_eq!(Outcome::of(&s("1-0")), Outcome::Written("1-0".into()));
        assert_eq!(Outcome::of(&Value::Nil), Outcome::StreamMissing);
        assert_eq!(
            Outcome::of(&Value::Array(vec![s("replay"), s("201"), s("5-1")])),
            Outcome::Replayed {
                status: 201,
                order_id: "5-1".into()
            }
        );
        assert_eq!(
            Outcome::of(&Value::Array(vec![s("conflict")])),
            Outcome::Conflict
        );
        assert_eq!(Outcome::of(&Value::Int(3)), Outcome::Written("3".into()));
        assert_eq!(
            Outcome::of(&Value::Array(vec![s("replay"), s("x"), s("5-1")])),
            Outcome::Unexpected
        );
    }

    #[test]
    fn the_script_writes_the_fields_an_order_has() {
        let order = Order::new("u".into(), "p".into(), "1".into()).unwrap();
        let names: Vec<&str> = order.fields().iter().map(|(k, _)| *k).collect();
        assert_eq!(names, ["userId", "productId", "price"]);
        for name in names {
            assert!(WRITE_BATCH.contains(&format!("'{name}'")), "{name}");
        }
    }
}

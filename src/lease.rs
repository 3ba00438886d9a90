//! Keeping the entries an instance holds from looking idle to the others.
//!
//! Another instance claims an entry (`XAUTOCLAIM`) once it has been idle for
//! `CLAIM_IDLE_MS`: that is how the entries of a dead consumer are finished.
//! But a live instance behind a slow webhook receiver may hold entries much
//! longer than that, read and waiting their turn in its queue, and a claim
//! would then call the webhook a second time for each. So a reader renews
//! what its instance holds every third of `CLAIM_IDLE_MS`: `XCLAIM ...
//! JUSTID` to itself resets an entry's idle time without counting a
//! delivery. Only entries still owned by this consumer are renewed (checked
//! in the same script), so a renewal never takes an entry back from an
//! instance that claimed it while this one was frozen.

use std::sync::LazyLock;

use redis::{Connection, RedisResult, Script};

/// `KEYS[1]` the stream; `ARGV[1]` the group, `ARGV[2]` the consumer,
/// `ARGV[3..]` entry IDs. Returns how many were renewed.
const RENEW: &str = r"
local renewed = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    renewed = renewed + 1
  end
end
return renewed
";

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW));

/// Most IDs per script call, so one call never holds Redis for long.
const CHUNK: usize = 256;

/// Resets the idle time of those of `ids` that `consumer` still owns in
/// `group` on `stream`. Returns how many it renewed.
pub fn renew(
    conn: &mut Connection,
    stream: &str,
    group: &str,
    consumer: &str,
    ids: &[String],
) -> RedisResult<u64> {
    let mut renewed = 0;
    for chunk in ids.chunks(CHUNK) {
        let mut call = SCRIPT.prepare_invoke();
        call.key(stream).arg(group).arg(consumer);
        for id in chunk {
            call.arg(id);
        }
        let n: u64 = call.invoke(conn)?;
        renewed += n;
    }
    Ok(renewed)
}

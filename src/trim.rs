//! Safe trimming: keep streams bounded without removing anything a group of
//! the topology has not acknowledged.
//!
//! Redis 7.0 has no `XTRIM ... ACKED`, so the bound is computed, inside one
//! Lua script so nothing changes between computing and trimming. For each
//! group of the topology that reads the stream, the entries it no longer
//! needs are those before both its last-delivered ID (entries after it are
//! unread) and its oldest pending entry (delivered, not acknowledged). The
//! stream is trimmed (`XTRIM MINID`) to the smallest of those bounds over
//! all groups, and never below the newest `RETAIN_ENTRIES` entries. A group
//! of the topology that does not exist stops trimming altogether: its
//! entries are not known to be read.
//!
//! Each call removes at most [`CHUNK`] entries, so Redis is never blocked for
//! long; [`trim_stream`] repeats it until nothing more may go.

use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Receiver;
use redis::{Connection, RedisError, Script};

use crate::connection::{self, Link, Redis, COMMAND_TIMEOUT};
use crate::topology;

/// Most entries removed per script call.
pub const CHUNK: u64 = 1000;

/// KEYS[1] stream; ARGV[1] retain, ARGV[2] chunk, ARGV[3] dry run (1/0),
/// ARGV[4..] the groups that must have acknowledged an entry.
/// Returns {removed (or removable), bound ID or '', reason}.
const TRIM: &str = r#"
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  if am ~= bm then return am < bm end
  return as < bs
end
local retain = tonumber(ARGV[1])
local chunk = tonumber(ARGV[2])
local dry = ARGV[3] == '1'
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, '', 'no stream'} end
local len = redis.call('XLEN', KEYS[1])
if len <= retain then return {0, '', 'within RETAIN_ENTRIES'} end
local infos = redis.call('XINFO', 'GROUPS', KEYS[1])
local bound = nil
for i = 4, #ARGV do
  local info = nil
  for _, g in ipairs(infos) do
    local f = {}
    for j = 1, #g, 2 do f[g[j]] = g[j + 1] end
    if f['name'] == ARGV[i] then info = f end
  end
  if info == nil then return {0, '', 'group ' .. ARGV[i] .. ' missing'} end
  local b = info['last-delivered-id']
  if info['pending'] > 0 then
    local summary = redis.call('XPENDING', KEYS[1], ARGV[i])
    if summary[2] and less(summary[2], b) then b = summary[2] end
  end
  if bound == nil or less(b, bound) then bound = b end
end
if bound == nil then return {0, '', 'no groups'} end
local n = math.min(len - retain, chunk)
local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', n + 1)
local keep = head[#head][1]
if #head == n + 1 and less(keep, bound) then bound = keep end
local removable = 0
for _, e in ipairs(head) do
  if less(e[1], bound) then removable = removable + 1 end
end
if dry or removable == 0 then return {removable, bound, 'ok'} end
return {redis.call('XTRIM', KEYS[1], 'MINID', bound), bound, 'ok'}
"#;

/// What one trimming pass did (or, dry, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trimmed {
    /// Entries removed (or removable).
    pub removed: u64,
    /// The MINID used: entries before it went.
    pub bound: Option<String>,
    /// Why it stopped where it did.
    pub reason: String,
}

/// One script call: removes up to `chunk` entries of `stream` that every
/// group of the topology has acknowledged, keeping the newest `retain`.
pub fn trim_once(
    conn: &mut Connection,
    stream: &str,
    retain: u64,
    chunk: u64,
    dry_run: bool,
) -> Result<Trimmed, RedisError> {
    let script = Script::new(TRIM);
    let mut call = script.key(stream);
    call.arg(retain)
        .arg(chunk)
        .arg(if dry_run { "1" } else { "0" });
    for g in topology::groups_of(stream) {
        call.arg(*g);
    }
    let (removed, bound, reason): (u64, String, String) = call.invoke(conn)?;
    Ok(Trimmed {
        removed,
        bound: (!bound.is_empty()).then_some(bound),
        reason,
    })
}

/// Trims `stream` as far as is safe, chunk by chunk. Returns the total.
pub fn trim_stream(conn: &mut Connection, stream: &str, retain: u64) -> Result<u64, RedisError> {
    let mut total = 0;
    loop {
        let t = trim_once(conn, stream, retain, CHUNK, false)?;
        total += t.removed;
        if t.removed < CHUNK {
            return Ok(total);
        }
    }
}

/// Starts the `trim:<stream>` thread: trims every `interval` until shutdown.
pub fn spawn(
    redis: Redis,
    stream: &'static str,
    retain: u64,
    interval: Duration,
    shutdown: &Receiver<()>,
) -> std::io::Result<JoinHandle<()>> {
    let shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name(format!("trim:{stream}"))
        .spawn(move || {
            let mut link = Link::new(redis, COMMAND_TIMEOUT, connection::nothing);
            while !crate::shutdown::wait(&shutdown, interval) {
                match link.run(|c| trim_stream(c, stream, retain)) {
                    Ok(0) => {}
                    Ok(n) => log::info!("trimmed {n} acknowledged entries from {stream}"),
                    Err(e) => log::warn!("trimming {stream} failed: {e}"),
                }
            }
        })
}

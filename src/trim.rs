//! Safe trimming: keep streams bounded without removing anything a group
//! reading the stream has not acknowledged: the topology's groups, and any
//! other group on the stream (a service of one's own built on
//! [`crate::consumer::run`], an audit group made with `XGROUP CREATE`).
//!
//! Redis 7.0 has no `XTRIM ... ACKED`, so the bound is computed, inside one
//! Lua script so nothing changes between computing and trimming. For each
//! group that reads the stream, the entries it no longer
//! needs are those before both its last-delivered ID (entries after it are
//! unread) and its oldest pending entry (delivered, not acknowledged). The
//! stream is trimmed (`XTRIM MINID`) to the smallest of those bounds over
//! all groups, and never below the newest `RETAIN_ENTRIES` entries. A group
//! of the topology that does not exist stops trimming altogether: its
//! entries are not known to be read.
//!
//! When a group holds trimming back (the stream stays longer than
//! `RETAIN_ENTRIES` because that group has not read or acknowledged its
//! entries; typically a group no running service reads with), the pass
//! says which group and how many entries it keeps: [`Pass::held_back`]. The
//! trimming thread logs it and sets the `trim_held_back_entries` gauge, and
//! `streamctl status` shows it.
//!
//! `payment-events` carries payment-service's paid markers
//! ([`crate::services::payment::PAID_KEY`]): trimming a payment deletes its
//! order's marker, and stops at the first payment whose order is still in
//! `order-events` (such an order can still be read again, and must find its
//! marker). Payments follow their orders, so this costs nothing while
//! `order-events` is trimmed too.
//!
//! Trimming an entry also deletes its field in the index of dead letters
//! (`<stream>:dlq:index`, see [`crate::dlq`]): that is what bounds it.
//!
//! Each call removes at most [`CHUNK`] entries, so Redis is never blocked for
//! long; [`trim_stream`] repeats it until nothing more may go.

use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Receiver;
use redis::{Connection, RedisError, Script};

use crate::connection::{self, Link, Redis, COMMAND_TIMEOUT};
use crate::metrics;
use crate::services::payment::PAID_KEY;
use crate::topology::{self, ORDER_EVENTS, PAYMENT_EVENTS};

/// Most entries removed per script call.
pub const CHUNK: u64 = 1000;

/// KEYS[1] stream, KEYS[2] paid markers (or the stream again: none),
/// KEYS[3] the stream the markers' orders are in, KEYS[4] the index of the
/// stream's dead letters (a field per trimmed entry goes); ARGV[1] retain, ARGV[2]
/// chunk, ARGV[3] dry run (1/0), ARGV[4] markers (1/0), ARGV[5..] the groups
/// that must exist and have acknowledged an entry (every other group on the
/// stream must have acknowledged it too).
/// Returns {removed (or removable), bound ID or '', reason, holding group
/// or '', entries beyond retain that stay}.
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
local markers = ARGV[4] == '1'
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, '', 'no stream', '', 0} end
local len = redis.call('XLEN', KEYS[1])
if len <= retain then return {0, '', 'within RETAIN_ENTRIES', '', 0} end
local infos = redis.call('XINFO', 'GROUPS', KEYS[1])
local bound = nil
local holder = ''
-- The topology's groups (they must exist), then every other group on the
-- stream (a user's own consumer, an operator's audit group).
local names, seen = {}, {}
for i = 5, #ARGV do names[#names + 1] = ARGV[i]; seen[ARGV[i]] = true end
local by_name = {}
for _, g in ipairs(infos) do
  local f = {}
  for j = 1, #g, 2 do f[g[j]] = g[j + 1] end
  by_name[f['name']] = f
  if not seen[f['name']] then names[#names + 1] = f['name']; seen[f['name']] = true end
end
for _, name in ipairs(names) do
  local info = by_name[name]
  if info == nil then return {0, '', 'group ' .. name .. ' missing', name, len - retain} end
  local b = info['last-delivered-id']
  if info['pending'] > 0 then
    local summary = redis.call('XPENDING', KEYS[1], name)
    if summary[2] and less(summary[2], b) then b = summary[2] end
  end
  if bound == nil or less(b, bound) then bound = b; holder = name end
end
if bound == nil then return {0, '', 'no groups', '', 0} end
local n = math.min(len - retain, chunk)
local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', n + 1)
local keep = head[#head][1]
if #head == n + 1 and less(keep, bound) then bound = keep; holder = '' end
local removable = 0
local paid = {}
local reason = 'ok'
local oldest = nil
if markers then
  local first = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
  if #first > 0 then oldest = first[1][1] end
end
for _, e in ipairs(head) do
  if not less(e[1], bound) then break end
  if markers then
    local f = e[2]
    local order = nil
    for j = 1, #f, 2 do if f[j] == 'orderId' then order = f[j + 1] end end
    local entry = order and redis.call('HGET', KEYS[2], order)
    if entry and oldest and not less(entry, oldest) then
      bound = e[1]; holder = ''; reason = 'order still in ' .. KEYS[3]
      break
    end
    if entry then paid[#paid + 1] = order end
  end
  removable = removable + 1
end
local held = 0
if holder ~= '' then held = len - retain - removable end
if dry or removable == 0 then return {removable, bound, reason, holder, held} end
for _, order in ipairs(paid) do redis.call('HDEL', KEYS[2], order) end
if redis.call('HLEN', KEYS[4]) > 0 then
  for i = 1, removable do redis.call('HDEL', KEYS[4], head[i][1]) end
end
return {redis.call('XTRIM', KEYS[1], 'MINID', bound), bound, reason, holder, held}
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
    /// The group whose unread or unacknowledged entries stopped it, and
    /// how many entries beyond `retain` stay for it (`None`: no group did).
    pub held_back: Option<(String, u64)>,
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
    let markers = stream == PAYMENT_EVENTS;
    let mut call = script.key(stream);
    call.key(if markers { PAID_KEY } else { stream })
        .key(ORDER_EVENTS)
        .key(topology::dlq_index(stream))
        .arg(retain)
        .arg(chunk)
        .arg(if dry_run { "1" } else { "0" })
        .arg(if markers { "1" } else { "0" });
    for g in topology::groups_of(stream) {
        call.arg(*g);
    }
    let (removed, bound, reason, holder, held): (u64, String, String, String, u64) =
        call.invoke(conn)?;
    Ok(Trimmed {
        removed,
        bound: (!bound.is_empty()).then_some(bound),
        reason,
        held_back: (!holder.is_empty() && held > 0).then_some((holder, held)),
    })
}

/// What [`trim_stream`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Entries removed.
    pub removed: u64,
    /// As [`Trimmed::held_back`], after the last chunk.
    pub held_back: Option<(String, u64)>,
}

/// Trims `stream` as far as is safe, chunk by chunk.
pub fn trim_stream(conn: &mut Connection, stream: &str, retain: u64) -> Result<Pass, RedisError> {
    let mut removed = 0;
    loop {
        let t = trim_once(conn, stream, retain, CHUNK, false)?;
        removed += t.removed;
        if t.removed < CHUNK {
            return Ok(Pass {
                removed,
                held_back: t.held_back,
            });
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
            let mut reported: Option<(String, u64)> = None;
            while !crate::shutdown::wait(&shutdown, interval) {
                match link.run(|c| trim_stream(c, stream, retain)) {
                    Ok(pass) => {
                        if pass.removed > 0 {
                            log::info!(
                                "trimmed {} acknowledged entries from {stream}",
                                pass.removed
                            );
                        }
                        report_held_back(stream, retain, &pass.held_back, &mut reported);
                        metrics::trim_held_back(
                            stream,
                            pass.held_back.as_ref().map(|(g, n)| (g.as_str(), *n)),
                        );
                    }
                    Err(e) => log::warn!("trimming {stream} failed: {e}"),
                }
            }
        })
}

/// Logs a hold-back when it starts, when another group causes it, and each
/// time it doubles; and once when it ends. A group that never reads holds
/// back a stream that grows without bound: that must not go unseen, nor
/// fill the log.
fn report_held_back(
    stream: &str,
    retain: u64,
    now: &Option<(String, u64)>,
    reported: &mut Option<(String, u64)>,
) {
    match (now, reported.as_ref()) {
        (Some((group, n)), last) => {
            let news = match last {
                Some((g, m)) => g != group || *n >= m.saturating_mul(2),
                None => true,
            };
            if news {
                log::warn!(
                    "trimming {stream} is held back by group {group}: {n} entries beyond \
                     RETAIN_ENTRIES ({retain}) are kept because it has not read or acknowledged \
                     them (is a service reading with that group? see streamctl status)"
                );
                *reported = Some((group.clone(), *n));
            }
        }
        (None, Some((group, _))) => {
            log::info!("trimming {stream} is no longer held back by group {group}");
            *reported = None;
        }
        (None, None) => {}
    }
}

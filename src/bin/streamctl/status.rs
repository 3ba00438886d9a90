//! `streamctl status`: every stream of the topology, its groups and their
//! consumers, its dead letters, and whether some group holds trimming back.

use redis::streams::{StreamInfoConsumersReply, StreamInfoGroup, StreamInfoGroupsReply};
use redis::{Connection, RedisError, Value};
use serde::Serialize;
use streamline::config::redact;
use streamline::topology::{self, StreamSpec, TOPOLOGY};
use streamline::{idempotency, trim, value};

use crate::error::{failed, Error};
use crate::report::{human_idle, or_dash, Report};
use crate::table::Table;

/// `status`: every stream of the topology.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    redis: String,
    /// With sentinels: the master's name as they know it.
    #[serde(skip_serializing_if = "Option::is_none")]
    sentinel_master: Option<String>,
    /// With sentinels: the address of the master in use, `host:port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    master: Option<String>,
    streams: Vec<StreamStatus>,
    idempotency_keys: IdempotencyKeys,
}

/// The `Idempotency-Key`s order-service holds (each until its TTL).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct IdempotencyKeys {
    /// The `SCAN MATCH` pattern counted.
    pattern: String,
    held: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StreamStatus {
    stream: String,
    exists: bool,
    length: Option<u64>,
    first_id: Option<String>,
    last_id: Option<String>,
    groups: Vec<GroupStatus>,
    dlq: DlqStatus,
    /// A group that keeps trimming from reaching the newest `retain`.
    trim_held_back: Option<HeldBack>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct HeldBack {
    group: String,
    /// Entries beyond `retain` that stay for it.
    entries: u64,
    retain: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GroupStatus {
    group: String,
    exists: bool,
    /// Whether the topology declares it (other groups are shown too).
    in_topology: bool,
    /// `None` when Redis cannot tell (after deletions, say) or the group is
    /// missing.
    lag: Option<u64>,
    pending: Option<u64>,
    entries_read: Option<u64>,
    last_delivered_id: Option<String>,
    consumers: Vec<ConsumerStatus>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ConsumerStatus {
    name: String,
    pending: u64,
    idle_ms: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DlqStatus {
    stream: String,
    length: u64,
}

/// The fields of an `XINFO` reply, looked up by name.
/// The fields of an `XINFO STREAM` reply, looked up by name. Read by hand
/// rather than as `redis::streams::StreamInfoStreamReply`: that one decodes
/// the first and last entries' fields as UTF-8 text, and a stream holding a
/// malformed entry (the very case an operator looks at) would then have no
/// status at all; only their IDs are shown.
struct Info(Vec<(String, Value)>);

impl Info {
    fn from_value(v: &Value) -> Info {
        Info(value::map_pairs(v).unwrap_or_default())
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    fn count(&self, name: &str) -> Option<u64> {
        self.get(name)
            .and_then(value::as_i64)
            .and_then(|n| u64::try_from(n).ok())
    }

    /// The ID of an entry-valued field (`first-entry`), `None` when nil.
    fn entry_id(&self, name: &str) -> Option<String> {
        let entry = value::as_array(self.get(name)?)?;
        entry.first().and_then(value::as_string)
    }
}

/// Gathers the status of every stream of the topology; `master` is the
/// sentinels' master name and address, when they were asked.
pub fn status(
    conn: &mut Connection,
    url: &str,
    retain: u64,
    master: Option<(String, Option<String>)>,
) -> Result<StatusReport, Error> {
    let streams = TOPOLOGY
        .iter()
        .map(|spec| stream_status(conn, spec, retain))
        .collect::<Result<_, _>>()?;
    let (sentinel_master, master) = master.map_or((None, None), |(n, a)| (Some(n), a));
    Ok(StatusReport {
        redis: redact(url),
        sentinel_master,
        master,
        streams,
        idempotency_keys: idempotency_keys(conn, topology::ORDER_EVENTS)?,
    })
}

/// Counts the keys of `stream` with `SCAN MATCH <stream>:idem:* COUNT
/// 1000`: exact, and free for the write path (no counter to keep, no
/// memory), but it walks the whole keyspace, in steps of a few
/// milliseconds of Redis time each: a million keys took 12.6 s on the
/// loaded 2-vCPU machine of `BENCHMARKS.md` (6.2 ms per step).
fn idempotency_keys(conn: &mut Connection, stream: &str) -> Result<IdempotencyKeys, Error> {
    let pattern = idempotency::key_pattern(stream);
    let mut cursor = 0u64;
    let mut held = 0u64;
    loop {
        let (next, keys): (u64, Vec<Value>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query(conn)
            .map_err(failed(format!("SCAN MATCH {pattern}")))?;
        held += keys.len() as u64;
        if next == 0 {
            return Ok(IdempotencyKeys { pattern, held });
        }
        cursor = next;
    }
}

fn stream_status(
    conn: &mut Connection,
    spec: &StreamSpec,
    retain: u64,
) -> Result<StreamStatus, Error> {
    let dlq_key = topology::dlq_stream(spec.stream);
    let dlq = DlqStatus {
        length: xlen(conn, &dlq_key)?,
        stream: dlq_key,
    };
    let info = match redis::cmd("XINFO")
        .arg("STREAM")
        .arg(spec.stream)
        .query::<Value>(conn)
    {
        Ok(v) => Some(Info::from_value(&v)),
        Err(e) if no_such_key(&e) => None,
        Err(e) => return Err(failed(format!("XINFO STREAM {}", spec.stream))(e)),
    };
    let groups = match info {
        Some(_) => group_statuses(conn, spec)?,
        None => spec
            .groups
            .iter()
            .map(|g| GroupStatus::missing(g))
            .collect(),
    };
    Ok(StreamStatus {
        stream: spec.stream.to_string(),
        exists: info.is_some(),
        length: info.as_ref().and_then(|i| i.count("length")),
        first_id: info.as_ref().and_then(|i| i.entry_id("first-entry")),
        last_id: info.as_ref().and_then(|i| i.entry_id("last-entry")),
        groups,
        dlq,
        trim_held_back: held_back(conn, spec.stream, retain)?,
    })
}

/// Which group keeps trimming of `stream` from its newest `retain`, if
/// any: a dry run of one chunk, as the services trim. When a whole chunk is
/// removable, trimming is under way and nothing is held back (yet).
fn held_back(conn: &mut Connection, stream: &str, retain: u64) -> Result<Option<HeldBack>, Error> {
    let plan = trim::trim_once(conn, stream, retain, trim::CHUNK, true)
        .map_err(failed(format!("dry-run trim of {stream}")))?;
    Ok(plan
        .held_back
        .filter(|_| plan.removed < trim::CHUNK)
        .map(|(group, entries)| HeldBack {
            group,
            entries,
            retain,
        }))
}

/// The topology's groups of the stream (missing ones marked), then any other
/// group found on it: an unknown group is worth seeing too.
/// The topology's groups of the stream (missing ones marked), then any other
/// group found on it: an unknown group is worth seeing too.
fn group_statuses(conn: &mut Connection, spec: &StreamSpec) -> Result<Vec<GroupStatus>, Error> {
    let infos: StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(spec.stream)
        .query(conn)
        .map_err(failed(format!("XINFO GROUPS {}", spec.stream)))?;
    let infos = infos.groups;
    let mut out = Vec::new();
    for group in spec.groups {
        match infos.iter().find(|i| i.name == *group) {
            Some(info) => out.push(group_status(conn, spec.stream, info, true)?),
            None => out.push(GroupStatus::missing(group)),
        }
    }
    for info in infos
        .iter()
        .filter(|i| !spec.groups.contains(&i.name.as_str()))
    {
        out.push(group_status(conn, spec.stream, info, false)?);
    }
    Ok(out)
}

fn group_status(
    conn: &mut Connection,
    stream: &str,
    info: &StreamInfoGroup,
    in_topology: bool,
) -> Result<GroupStatus, Error> {
    let count = |n: usize| u64::try_from(n).ok();
    Ok(GroupStatus {
        consumers: consumers(conn, stream, &info.name)?,
        exists: true,
        in_topology,
        lag: info.lag.and_then(count),
        pending: count(info.pending),
        entries_read: info.entries_read.and_then(count),
        last_delivered_id: Some(info.last_delivered_id.clone()),
        group: info.name.clone(),
    })
}

fn consumers(
    conn: &mut Connection,
    stream: &str,
    group: &str,
) -> Result<Vec<ConsumerStatus>, Error> {
    let infos: StreamInfoConsumersReply = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query(conn)
        .map_err(failed(format!("XINFO CONSUMERS {stream} {group}")))?;
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    Ok(infos
        .consumers
        .into_iter()
        .map(|c| ConsumerStatus {
            name: c.name,
            pending: count(c.pending),
            idle_ms: count(c.idle),
        })
        .collect())
}

impl GroupStatus {
    fn missing(group: &str) -> GroupStatus {
        GroupStatus {
            group: group.to_string(),
            exists: false,
            in_topology: true,
            lag: None,
            pending: None,
            entries_read: None,
            last_delivered_id: None,
            consumers: Vec::new(),
        }
    }
}

/// `XLEN` (0 for a missing key).
/// `XLEN` (0 for a missing key).
pub fn xlen(conn: &mut Connection, stream: &str) -> Result<u64, Error> {
    redis::cmd("XLEN")
        .arg(stream)
        .query(conn)
        .map_err(failed(format!("XLEN {stream}")))
}

impl Report for StatusReport {
    fn text(&self) -> String {
        let mut streams = Table::new(&["STREAM", "LENGTH", "FIRST-ID", "LAST-ID", "DEAD-LETTERS"]);
        let mut groups = Table::new(&[
            "STREAM",
            "GROUP",
            "LAG",
            "PENDING",
            "ENTRIES-READ",
            "LAST-DELIVERED-ID",
            "CONSUMERS",
        ]);
        let mut consumers = Table::new(&["STREAM", "GROUP", "CONSUMER", "PENDING", "IDLE"]);
        for s in &self.streams {
            streams.row(vec![
                s.stream.clone(),
                s.length.map_or_else(|| "missing".into(), |n| n.to_string()),
                or_dash(s.first_id.as_deref()),
                or_dash(s.last_id.as_deref()),
                format!("{} ({})", s.dlq.length, s.dlq.stream),
            ]);
            for g in &s.groups {
                groups.row(group_row(&s.stream, g));
                for c in &g.consumers {
                    consumers.row(vec![
                        s.stream.clone(),
                        g.group.clone(),
                        c.name.clone(),
                        c.pending.to_string(),
                        human_idle(c.idle_ms),
                    ]);
                }
            }
        }
        let mut out = format!("Redis {}\n", self.redis);
        if let (Some(name), Some(addr)) = (&self.sentinel_master, &self.master) {
            out.push_str(&format!(
                "Master {name} at {addr} (named by the sentinels)\n"
            ));
        }
        out.push('\n');
        out.push_str(&streams.render());
        for s in &self.streams {
            if let Some(h) = &s.trim_held_back {
                out.push_str(&format!(
                    "trimming of {} is held back by {}: {} entries beyond the newest {} kept, not read or acknowledged by it\n",
                    s.stream,
                    h.group,
                    h.entries,
                    h.retain
                ));
            }
        }
        out.push_str(&format!(
            "idempotency keys held: {} ({}, counted with SCAN)\n",
            self.idempotency_keys.held, self.idempotency_keys.pattern
        ));
        out.push('\n');
        out.push_str(&groups.render());
        out.push('\n');
        if consumers.is_empty() {
            out.push_str("no consumers\n");
        } else {
            out.push_str(&consumers.render());
        }
        out
    }
}

fn group_row(stream: &str, g: &GroupStatus) -> Vec<String> {
    let name = if g.in_topology {
        g.group.clone()
    } else {
        format!("{} (not in topology)", g.group)
    };
    if !g.exists {
        return vec![stream.to_string(), name, "missing".into()];
    }
    let num = |n: Option<u64>| n.map_or_else(|| "?".into(), |n| n.to_string());
    vec![
        stream.to_string(),
        name,
        num(g.lag),
        num(g.pending),
        num(g.entries_read),
        or_dash(g.last_delivered_id.as_deref()),
        g.consumers.len().to_string(),
    ]
}

/// Whether Redis said the key does not exist (`XINFO` on a missing stream).
fn no_such_key(e: &RedisError) -> bool {
    e.code() == Some("ERR") && e.to_string().to_ascii_lowercase().contains("no such key")
}

//! `streamctl pending`: the oldest entries a group has been delivered and
//! not yet acknowledged, who holds them and for how long.

use redis::streams::{StreamPendingCountReply, StreamPendingId, StreamPendingReply};
use redis::{Connection, RedisError};
use serde::Serialize;
use streamline::topology;

use crate::error::{failed, Error};
use crate::report::{human_idle, Report};
use crate::table::Table;

/// `pending`: the oldest entries a group has been delivered and not acked.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingReport {
    stream: String,
    group: String,
    total: u64,
    entries: Vec<PendingEntry>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PendingEntry {
    id: String,
    consumer: String,
    idle_ms: u64,
    deliveries: u64,
}

/// Gathers the `count` oldest pending entries of `group` on `stream`, and
/// how many there are in all.
pub fn pending(
    conn: &mut Connection,
    stream: &str,
    group: &str,
    count: u64,
) -> Result<PendingReport, Error> {
    let nogroup = |e: RedisError| {
        if topology::is_nogroup(&e) {
            Error::NoGroup {
                stream: stream.to_string(),
                group: group.to_string(),
            }
        } else {
            failed(format!("XPENDING {stream} {group}"))(e)
        }
    };
    let summary: StreamPendingReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query(conn)
        .map_err(nogroup)?;
    let rows: StreamPendingCountReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(count)
        .query(conn)
        .map_err(nogroup)?;
    Ok(PendingReport {
        stream: stream.to_string(),
        group: group.to_string(),
        total: to_u64(summary.count()),
        entries: rows.ids.into_iter().map(pending_entry).collect(),
    })
}

/// One row of the extended `XPENDING` form.
fn pending_entry(row: StreamPendingId) -> PendingEntry {
    PendingEntry {
        id: row.id,
        consumer: row.consumer,
        idle_ms: to_u64(row.last_delivered_ms),
        deliveries: to_u64(row.times_delivered),
    }
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl Report for PendingReport {
    fn text(&self) -> String {
        let head = format!("{} / {}", self.stream, self.group);
        if self.entries.is_empty() {
            return format!("{head}: nothing pending\n");
        }
        let mut table = Table::new(&["ID", "CONSUMER", "IDLE", "DELIVERIES"]);
        for e in &self.entries {
            table.row(vec![
                e.id.clone(),
                e.consumer.clone(),
                human_idle(e.idle_ms),
                e.deliveries.to_string(),
            ]);
        }
        format!(
            "{head}: {} pending, the oldest {}:\n{}",
            self.total,
            self.entries.len(),
            table.render()
        )
    }
}

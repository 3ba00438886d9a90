//! `streamctl trim`: trims every stream of the topology as the services do
//! (never an entry some group still needs, never the newest `retain`), or
//! with `--dry-run` says what would go, up to which MINID, and why it stops
//! there. What is safe to remove is decided by [`streamline::trim`] alone.

use redis::Connection;
use serde::Serialize;
use streamline::topology::TOPOLOGY;
use streamline::trim;

use crate::error::{failed, Error};
use crate::report::{or_dash, Report};
use crate::status::xlen;
use crate::table::Table;

/// `trim`: per stream, what went (or would go) and where it stopped.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrimReport {
    dry_run: bool,
    retain: u64,
    streams: Vec<TrimRow>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TrimRow {
    stream: String,
    length: u64,
    /// Dry run only.
    #[serde(skip_serializing_if = "Option::is_none")]
    removable: Option<u64>,
    /// Real run only.
    #[serde(skip_serializing_if = "Option::is_none")]
    removed: Option<u64>,
    /// Real run only: the length after trimming.
    #[serde(skip_serializing_if = "Option::is_none")]
    length_after: Option<u64>,
    /// The MINID: entries before it went (or would go).
    bound: Option<String>,
    reason: String,
}

/// Trims (or, dry, plans trimming of) every stream of the topology.
pub fn trim(conn: &mut Connection, dry_run: bool, retain: u64) -> Result<TrimReport, Error> {
    let streams = TOPOLOGY
        .iter()
        .map(|spec| {
            if dry_run {
                trim_dry(conn, spec.stream, retain)
            } else {
                trim_real(conn, spec.stream, retain)
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(TrimReport {
        dry_run,
        retain,
        streams,
    })
}

/// One dry-run pass over the whole stream (a chunk as large as the stream),
/// so the count is all that trimming would remove, not just its first chunk.
fn trim_dry(conn: &mut Connection, stream: &str, retain: u64) -> Result<TrimRow, Error> {
    let length = xlen(conn, stream)?;
    let plan = trim::trim_once(conn, stream, retain, length.max(1), true)
        .map_err(failed(format!("dry-run trim of {stream}")))?;
    Ok(TrimRow {
        stream: stream.to_string(),
        length,
        removable: Some(plan.removed),
        removed: None,
        length_after: None,
        reason: explain(&plan, length.saturating_sub(plan.removed), retain),
        bound: plan.bound,
    })
}

/// Trims chunk by chunk as the services do, then asks (dry, one chunk) where
/// it stopped: after a full trim nothing before the bound is left, so one
/// chunk is enough to find it.
fn trim_real(conn: &mut Connection, stream: &str, retain: u64) -> Result<TrimRow, Error> {
    let length = xlen(conn, stream)?;
    let removed = trim::trim_stream(conn, stream, retain)
        .map_err(failed(format!("trimming {stream}")))?
        .removed;
    let after = xlen(conn, stream)?;
    let plan = trim::trim_once(conn, stream, retain, trim::CHUNK, true)
        .map_err(failed(format!("dry-run trim of {stream}")))?;
    Ok(TrimRow {
        stream: stream.to_string(),
        length,
        removable: None,
        removed: Some(removed),
        length_after: Some(after),
        reason: explain(&plan, after, retain),
        bound: plan.bound,
    })
}

/// Why trimming stops where it does, in words. `kept` is what is (or would
/// be) left; if that is exactly `retain`, the retention limit decided,
/// otherwise some group's unread or unacknowledged entry did.
fn explain(plan: &trim::Trimmed, kept: u64, retain: u64) -> String {
    match plan.reason.as_str() {
        "no stream" => "the stream does not exist".into(),
        "within RETAIN_ENTRIES" => format!("within the newest {retain}, which are always kept"),
        "ok" if kept <= retain => format!("keeps the newest {retain} entries"),
        "ok" => match plan.bound.as_deref() {
            Some("0-0") | None => "a group has read nothing yet".into(),
            Some(b) => format!("a group has not read or acknowledged everything from {b} on"),
        },
        other if other.starts_with("order still in ") => format!(
            "keeps the payments of orders still in {} (their paid markers go with them)",
            &other["order still in ".len()..]
        ),
        other if other.starts_with("group ") => {
            format!("{other}: its entries are not known to be read")
        }
        other => other.to_string(),
    }
}

impl Report for TrimReport {
    fn text(&self) -> String {
        let mut table = match self.dry_run {
            true => Table::new(&["STREAM", "LENGTH", "REMOVABLE", "MINID", "REASON"]),
            false => Table::new(&["STREAM", "LENGTH", "REMOVED", "NOW", "MINID", "REASON"]),
        };
        for r in &self.streams {
            let mut row = vec![r.stream.clone(), r.length.to_string()];
            let counts = [r.removable, r.removed, r.length_after];
            row.extend(counts.iter().flatten().map(u64::to_string));
            row.push(or_dash(r.bound.as_deref()));
            row.push(r.reason.clone());
            table.row(row);
        }
        let head = match self.dry_run {
            true => format!("dry run, nothing removed (retain {}):\n", self.retain),
            false => format!("trimmed (retain {}):\n", self.retain),
        };
        head + &table.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_reasons_say_what_stopped_it() {
        let plan = |reason: &str, bound: Option<&str>| trim::Trimmed {
            removed: 0,
            bound: bound.map(str::to_string),
            reason: reason.into(),
            held_back: None,
        };
        assert!(explain(&plan("ok", Some("5-0")), 10, 2).contains("from 5-0 on"));
        let kept = explain(&plan("order still in order-events", Some("5-0")), 10, 2);
        assert!(kept.contains("orders still in order-events"), "{kept}");
        assert!(explain(&plan("ok", Some("0-0")), 10, 2).contains("read nothing"));
        assert!(explain(&plan("ok", Some("5-0")), 2, 2).contains("newest 2"));
        assert!(explain(&plan("no stream", None), 0, 2).contains("does not exist"));
        assert!(explain(&plan("group g missing", None), 9, 2).contains("group g missing"));
    }
}

//! `streamctl dlq list` and `dlq redrive`: the dead letters of a stream, and
//! putting them back on it.
//!
//! The dead-letter format (which fields are ours, how a redriven entry is
//! marked) is the library's, [`streamline::dlq`], so this tool and the
//! services always agree on what a dead letter is.

use redis::{Connection, Script, Value};
use serde::{Serialize, Serializer};
use streamline::record::Fields;
use streamline::{dlq, topology, value};

use crate::args::Redrive;
use crate::error::{failed, Error};
use crate::report::{or_dash, plural, Report};
use crate::status::xlen;
use crate::table::Table;

/// Dead letters read per round trip by `dlq redrive --all`.
const REDRIVE_BATCH: u64 = 100;

/// `dlq list`: the oldest dead letters of a stream.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DlqReport {
    dlq: String,
    length: u64,
    entries: Vec<DeadLetterView>,
}

/// A dead letter split into our metadata and the entry's original fields.
/// Metadata that is absent (a letter written by someone else) is `None`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DeadLetterView {
    id: String,
    original_id: Option<String>,
    original_stream: Option<String>,
    group: Option<String>,
    consumer: Option<String>,
    error: Option<String>,
    deliveries: Option<u64>,
    fields: FieldList,
}

/// Field/value pairs in stream order, serialized as a JSON object in that
/// order (a map type would sort them).
#[derive(Debug)]
struct FieldList(Vec<(String, String)>);

impl Serialize for FieldList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl FieldList {
    /// Lossy text: the tool shows fields, it never writes them back from
    /// this form (redrive uses the raw bytes).
    fn from_fields(fields: &Fields) -> FieldList {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        FieldList(fields.0.iter().map(|(k, v)| (text(k), text(v))).collect())
    }

    /// `k=v k2="v 2"`: values with spaces or quotes are quoted.
    fn render(&self) -> String {
        let quote = |s: &str| {
            let plain = !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c == '"');
            if plain {
                s.to_string()
            } else {
                format!("{s:?}")
            }
        };
        let pairs: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| format!("{}={}", quote(k), quote(v)))
            .collect();
        pairs.join(" ")
    }
}

impl DeadLetterView {
    fn new(id: String, fields: &Fields) -> DeadLetterView {
        let (original, meta) = dlq::split_fields(fields);
        let get = |name: &str| meta.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        DeadLetterView {
            id,
            original_id: get("originalId"),
            original_stream: get("originalStream"),
            group: get("group"),
            consumer: get("consumer"),
            error: get("error"),
            deliveries: get("deliveries").and_then(|d| d.parse().ok()),
            fields: FieldList::from_fields(&original),
        }
    }
}

/// Gathers the `count` oldest dead letters of `stream` and how many there are.
pub fn dlq_list(conn: &mut Connection, stream: &str, count: u64) -> Result<DlqReport, Error> {
    let dlq = topology::dlq_stream(stream);
    let length = xlen(conn, &dlq)?;
    let entries = xrange(conn, &dlq, "-", "+", count)?
        .into_iter()
        .map(|(id, fields)| DeadLetterView::new(id, &fields))
        .collect();
    Ok(DlqReport {
        dlq,
        length,
        entries,
    })
}

/// `XRANGE stream start end COUNT count`, as IDs and raw fields.
fn xrange(
    conn: &mut Connection,
    stream: &str,
    start: &str,
    end: &str,
    count: u64,
) -> Result<Vec<(String, Fields)>, Error> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(count)
        .query(conn)
        .map_err(failed(format!("XRANGE {stream}")))?;
    Ok(parse_entries(&reply))
}

/// Entries of an `XRANGE` reply: `[[id, [k, v, ...]], ...]`.
fn parse_entries(reply: &Value) -> Vec<(String, Fields)> {
    let pairs = |kv: &[Value]| -> Vec<(Vec<u8>, Vec<u8>)> {
        kv.chunks(2)
            .filter_map(|p| match p {
                [k, v] => Some((value::as_bytes(k)?.to_vec(), value::as_bytes(v)?.to_vec())),
                _ => None,
            })
            .collect()
    };
    value::as_array(reply)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let [id, fields, ..] = value::as_array(e)? else {
                return None;
            };
            let fields = Fields(pairs(value::as_array(fields).unwrap_or_default()));
            Some((value::as_string(id)?, fields))
        })
        .collect()
}

impl Report for DlqReport {
    fn text(&self) -> String {
        if self.entries.is_empty() {
            return format!("{}: no dead letters\n", self.dlq);
        }
        let mut table = Table::new(&[
            "DLQ-ID",
            "ORIGINAL-ID",
            "GROUP",
            "DELIVERIES",
            "ERROR",
            "FIELDS",
        ]);
        for e in &self.entries {
            table.row(vec![
                e.id.clone(),
                or_dash(e.original_id.as_deref()),
                or_dash(e.group.as_deref()),
                e.deliveries.map_or_else(|| "-".into(), |d| d.to_string()),
                or_dash(e.error.as_deref()),
                e.fields.render(),
            ]);
        }
        format!(
            "{}: {}, the oldest {}:\n{}",
            self.dlq,
            plural(self.length, "dead letter"),
            self.entries.len(),
            table.render()
        )
    }
}

// ---------------------------------------------------------------------------
// dlq redrive
// ---------------------------------------------------------------------------

/// Re-adds one dead letter to its stream and deletes it from the DLQ (and
/// its index), all or nothing. KEYS[1] the DLQ, KEYS[2] the stream, KEYS[3]
/// the DLQ's index; ARGV[1] the dead letter's ID, ARGV[2] its original ID
/// (or ''), ARGV[3] the group it names (or ''), ARGV[4] the ID first
/// written (or ''), ARGV[5..] the original fields. The groups the entry is
/// for come from the index (every group that gave up on it), else from the
/// letter. Returns {new ID, groups}, or nil if the dead letter is gone
/// (someone else redrove or deleted it since we read it: it must not be
/// added twice).
const REDRIVE: &str = r#"
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return false end
local groups = ARGV[3]
if ARGV[2] ~= '' then
  local known = redis.call('HGET', KEYS[3], ARGV[2])
  if known then
    local letter, rest = string.match(known, '^([^,]+),?(.*)$')
    if letter == ARGV[1] then
      if rest ~= '' then groups = rest end
      redis.call('HDEL', KEYS[3], ARGV[2])
    end
  end
end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
if groups ~= '' then
  fields[#fields + 1] = 'redriveGroup'; fields[#fields + 1] = groups
end
if ARGV[4] ~= '' then
  fields[#fields + 1] = 'redrivenFrom'; fields[#fields + 1] = ARGV[4]
end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[1])
return {id, groups}
"#;

/// `dlq redrive`: what went back, what was not there, what was refused.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RedriveReport {
    stream: String,
    dlq: String,
    redriven: Vec<Redriven>,
    not_found: Vec<String>,
    skipped: Vec<Skipped>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Redriven {
    dlq_id: String,
    original_id: Option<String>,
    new_id: String,
    /// The groups it is for (`redriveGroup`); empty: every group.
    redrive_group: String,
    /// The ID first written (`redrivenFrom`).
    redriven_from: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Skipped {
    dlq_id: String,
    reason: String,
}

/// Puts back the dead letters `which` names, each in one atomic step.
pub fn redrive(
    conn: &mut Connection,
    stream: &str,
    which: &Redrive,
) -> Result<RedriveReport, Error> {
    let dlq = topology::dlq_stream(stream);
    let mut report = RedriveReport {
        stream: stream.to_string(),
        dlq: dlq.clone(),
        redriven: Vec::new(),
        not_found: Vec::new(),
        skipped: Vec::new(),
    };
    match which {
        Redrive::Ids(ids) => {
            for id in ids {
                match xrange(conn, &dlq, id, id, 1)?.into_iter().next() {
                    Some((id, fields)) => redrive_entry(conn, &id, &fields, &mut report)?,
                    None => report.not_found.push(id.clone()),
                }
            }
        }
        Redrive::All => redrive_all(conn, &mut report)?,
    }
    Ok(report)
}

/// Redrives the dead letters up to the newest one present now. Stopping
/// there matters: an entry that fails again while we work is dead-lettered
/// anew, after that bound, and chasing it would loop for as long as the
/// cause of the failure lasts.
fn redrive_all(conn: &mut Connection, report: &mut RedriveReport) -> Result<(), Error> {
    let dlq = report.dlq.clone();
    let newest: Value = redis::cmd("XREVRANGE")
        .arg(&dlq)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(conn)
        .map_err(failed(format!("XREVRANGE {dlq}")))?;
    let Some((last, _)) = parse_entries(&newest).into_iter().next() else {
        return Ok(());
    };
    let mut start = "-".to_string();
    loop {
        let batch = xrange(conn, &dlq, &start, &last, REDRIVE_BATCH)?;
        for (id, fields) in &batch {
            redrive_entry(conn, id, fields, report)?;
        }
        match batch.last() {
            Some((id, _)) if batch.len() as u64 == REDRIVE_BATCH => start = format!("({id}"),
            _ => return Ok(()),
        }
    }
}

/// Puts one dead letter back with its original fields, marked for the
/// groups that gave up on it (see [`streamline::dlq`]): the metadata we appended
/// (original ID, error, ...) would otherwise become fields of a new order
/// or payment. Marks of an earlier redrive are replaced, `redrivenFrom`
/// kept: it names the entry first written, whatever the number of rounds.
fn redrive_entry(
    conn: &mut Connection,
    id: &str,
    fields: &Fields,
    report: &mut RedriveReport,
) -> Result<(), Error> {
    let (original, meta) = dlq::split_fields(fields);
    let get = |name: &str| meta.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let skip = |reason: String| Skipped {
        dlq_id: id.to_string(),
        reason,
    };
    if original.0.is_empty() {
        report.skipped.push(skip("no original fields".into()));
        return Ok(());
    }
    if let Some(from) = get("originalStream").filter(|s| *s != report.stream) {
        let reason = format!("dead-lettered from {from}, not {}", report.stream);
        report.skipped.push(skip(reason));
        return Ok(());
    }
    let original_id = get("originalId");
    let first = dlq::redriven_from(&original).or_else(|| original_id.clone());
    let script = Script::new(REDRIVE);
    let mut call = script.key(&report.dlq);
    call.key(&report.stream)
        .key(topology::dlq_index(&report.stream))
        .arg(id)
        .arg(original_id.as_deref().unwrap_or_default())
        .arg(get("group").unwrap_or_default())
        .arg(first.as_deref().unwrap_or_default());
    let marks = [dlq::REDRIVE_GROUP.as_bytes(), dlq::REDRIVEN_FROM.as_bytes()];
    for (k, v) in original
        .0
        .iter()
        .filter(|(k, _)| !marks.contains(&k.as_slice()))
    {
        call.arg(k.as_slice()).arg(v.as_slice());
    }
    let added: Option<(String, String)> = call
        .invoke(conn)
        .map_err(failed(format!("redriving {id} from {}", report.dlq)))?;
    match added {
        Some((new_id, redrive_group)) => report.redriven.push(Redriven {
            dlq_id: id.to_string(),
            original_id,
            new_id,
            redrive_group,
            redriven_from: first,
        }),
        None => report.not_found.push(id.to_string()),
    }
    Ok(())
}

impl Report for RedriveReport {
    fn text(&self) -> String {
        let mut out = String::new();
        for r in &self.redriven {
            let original = r.original_id.as_deref().unwrap_or("unknown");
            let groups = match r.redrive_group.as_str() {
                "" => "every group".to_string(),
                g => g.to_string(),
            };
            out.push_str(&format!(
                "redriven {} (originalId {original}): re-added as {} on {}, for {groups}\n",
                r.dlq_id, r.new_id, self.stream
            ));
        }
        for id in &self.not_found {
            out.push_str(&format!("not found {id}: no such entry in {}\n", self.dlq));
        }
        for s in &self.skipped {
            out.push_str(&format!("skipped {}: {}\n", s.dlq_id, s.reason));
        }
        out.push_str(&format!(
            "{} redriven, {} not found, {} skipped",
            self.redriven.len(),
            self.not_found.len(),
            self.skipped.len()
        ));
        if !self.redriven.is_empty() {
            out.push_str(&format!(
                ". Redriven entries are new entries of {}: other groups than those named \
                 acknowledge them without acting.",
                self.stream
            ));
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_render_quoted_when_needed_and_serialize_in_order() {
        let f = FieldList(vec![
            ("z".into(), "1".into()),
            ("a".into(), "two words".into()),
        ]);
        assert_eq!(f.render(), "z=1 a=\"two words\"");
        assert_eq!(
            serde_json::to_string(&f).unwrap_or_default(),
            r#"{"z":"1","a":"two words"}"#
        );
    }
}

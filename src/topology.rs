//! The stream topology, declared once: which streams exist, which consumer
//! groups read them, and how to make sure the groups are there.
//!
//! Every service calls [`ensure_groups`] before doing anything else, and again
//! whenever Redis answers `NOGROUP`. That is what makes the contract's promise
//! hold whatever order the services start in: no order that order-service
//! accepts is ever invisible to a group.
//!
//! # Why groups are created at ID `0`
//!
//! `XGROUP CREATE <stream> <group> 0 MKSTREAM` makes a new group start at the
//! beginning of the stream, not at its end (`$`). Three situations make `$`
//! lose events:
//!
//! * an entry written straight into `order-events` (by `redis-cli XADD`, or the
//!   seed's Java order service) before any of our services ever started;
//! * Redis came back without the group but with the stream (for instance an
//!   old snapshot): entries written in between would be skipped;
//! * `FLUSHALL` while order-service is writing: the stream can be recreated
//!   by a producer a moment before a consumer recreates its group.
//!
//! Starting at `0` means a new group sees every entry still in the stream.
//! Replays are harmless: payment-service writes exactly one payment per order
//! (its atomic step checks the order is still pending), and notifications
//! carry an `Idempotency-Key`.

use redis::streams::StreamInfoGroupsReply;
use redis::{Connection, RedisError};

/// The stream order-service writes one entry to per accepted order.
pub const ORDER_EVENTS: &str = "order-events";
/// The stream payment-service writes one entry to per paid order.
pub const PAYMENT_EVENTS: &str = "payment-events";
/// The group payment-service reads `order-events` with.
pub const PAYMENT_GROUP: &str = "payment-service-group";
/// The group notification-service reads both streams with.
pub const NOTIFICATION_GROUP: &str = "notification-service-group";

/// One stream and the consumer groups of the topology that read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSpec {
    /// The stream key.
    pub stream: &'static str,
    /// Every group that must see every entry of this stream.
    pub groups: &'static [&'static str],
}

/// The whole topology. Trimming and readiness are computed from this table,
/// so a group added here is protected everywhere at once.
pub const TOPOLOGY: &[StreamSpec] = &[
    StreamSpec {
        stream: ORDER_EVENTS,
        groups: &[PAYMENT_GROUP, NOTIFICATION_GROUP],
    },
    StreamSpec {
        stream: PAYMENT_EVENTS,
        groups: &[NOTIFICATION_GROUP],
    },
];

/// The groups of the topology that read `stream` (empty for unknown streams).
pub fn groups_of(stream: &str) -> &'static [&'static str] {
    TOPOLOGY
        .iter()
        .find(|s| s.stream == stream)
        .map_or(&[], |s| s.groups)
}

/// The dead-letter stream of `stream`: `<stream>:dlq`.
///
/// ```
/// use streamline::topology::{dlq_stream, groups_of, ORDER_EVENTS};
///
/// assert_eq!(dlq_stream(ORDER_EVENTS), "order-events:dlq");
/// assert_eq!(groups_of(ORDER_EVENTS), ["payment-service-group", "notification-service-group"]);
/// ```
pub fn dlq_stream(stream: &str) -> String {
    format!("{stream}:dlq")
}

/// The hash in which `group`'s failed deliveries of `stream` entries are
/// counted (field: entry ID, value: failures so far):
/// `<stream>:failures:<group>`. Only a handler that tried and failed adds
/// to it; a reconnect, a restart or a claim does not. The count is removed
/// when the entry is acknowledged or dead-lettered. With a hash tag in the
/// stream name (`order-events:{0}`) it lives in the stream's slot.
///
/// ```
/// use streamline::topology::{failures_key, NOTIFICATION_GROUP, ORDER_EVENTS};
///
/// assert_eq!(
///     failures_key(ORDER_EVENTS, NOTIFICATION_GROUP),
///     "order-events:failures:notification-service-group"
/// );
/// ```
pub fn failures_key(stream: &str, group: &str) -> String {
    format!("{stream}:failures:{group}")
}

/// The index of `stream`'s dead letters: `<stream>:dlq:index`, a hash from
/// original entry ID to `<dead-letter ID>,<group>,...` (see [`crate::dlq`]).
pub fn dlq_index(stream: &str) -> String {
    format!("{stream}:dlq:index")
}

/// Creates every group of the topology that does not exist yet (and its
/// stream), at ID `0`. `BUSYGROUP` (the group exists) is success.
pub fn ensure_groups(conn: &mut Connection) -> Result<(), RedisError> {
    for spec in TOPOLOGY {
        for group in spec.groups {
            ensure_group(conn, spec.stream, group)?;
        }
    }
    Ok(())
}

/// Creates `group` on `stream` (and the stream) at ID `0` unless it exists:
/// what [`ensure_groups`] does for each group of the topology, and the
/// consumer runtime for a group of its own outside it (a shipping-service).
pub fn ensure_group(conn: &mut Connection, stream: &str, group: &str) -> Result<(), RedisError> {
    let created: Result<(), RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query(conn);
    match created {
        Ok(()) => log::info!("created group {group} on {stream} at 0"),
        Err(e) if e.code() == Some("BUSYGROUP") => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Whether every group of the topology exists, read from `gauges` (what
/// [`group_gauges`] found). Used by `/readyz`.
pub fn groups_present(gauges: &[crate::metrics::GroupGauge]) -> bool {
    TOPOLOGY.iter().all(|spec| {
        spec.groups.iter().all(|g| {
            gauges
                .iter()
                .any(|x| x.stream == spec.stream && x.group == *g)
        })
    })
}

/// Whether an error says a group (or its stream) is missing.
pub fn is_nogroup(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

/// Lag and pending count of every group of the topology (`XINFO GROUPS`).
/// Streams that do not exist are left out.
pub fn group_gauges(conn: &mut Connection) -> Result<Vec<crate::metrics::GroupGauge>, RedisError> {
    let mut out = Vec::new();
    for spec in TOPOLOGY {
        let reply: StreamInfoGroupsReply = match redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(spec.stream)
            .query(conn)
        {
            Ok(v) => v,
            Err(e) if e.code() == Some("ERR") => continue,
            Err(e) => return Err(e),
        };
        out.extend(
            reply
                .groups
                .into_iter()
                .map(|g| crate::metrics::GroupGauge {
                    stream: spec.stream.to_string(),
                    group: g.name,
                    // `lag` is nil when Redis cannot tell, absent before Redis 7.
                    lag: g.lag.map(|n| n as u64),
                    pending: Some(g.pending as u64),
                }),
        );
    }
    Ok(out)
}

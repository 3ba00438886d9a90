//! "Trimming never removes an entry that a group reading the stream has not
//! acknowledged", for a group that is not one of the topology's: a service
//! of one's own, or an operator's audit group.

use crate::support::flow::{start_ready, xadd_orders, xlen, DEADLINE, ORDER_EVENTS};
use crate::support::{wait_until, RedisServer};

/// Keep this many (README: `RETAIN_ENTRIES`, here set small).
const RETAIN: usize = 10;

/// Reads everything `group` has not read yet on `order-events` and
/// acknowledges it, as a consumer that did its work would.
fn read_and_ack(conn: &mut redis::Connection, group: &str) -> usize {
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg("test-reader")
        .arg("COUNT")
        .arg(10_000)
        .arg("STREAMS")
        .arg(ORDER_EVENTS)
        .arg(">")
        .query(conn)
        .expect("XREADGROUP");
    let ids: Vec<String> = reply
        .keys
        .iter()
        .flat_map(|k| k.ids.iter().map(|e| e.id.clone()))
        .collect();
    if !ids.is_empty() {
        let _: i64 = redis::cmd("XACK")
            .arg(ORDER_EVENTS)
            .arg(group)
            .arg(&ids)
            .query(conn)
            .expect("XACK");
    }
    ids.len()
}

#[test]
fn trimming_waits_for_a_group_outside_the_topology() {
    let redis = RedisServer::start();
    let retain = RETAIN.to_string();
    let order = start_ready(
        "order-service",
        &redis,
        &[
            ("RETAIN_ENTRIES", retain.as_str()),
            ("TRIM_INTERVAL_MS", "100"),
        ],
    );
    let mut conn = redis.conn();
    // An audit group an operator made, next to the topology's.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(ORDER_EVENTS)
        .arg("audit-group")
        .arg("0")
        .query(&mut conn)
        .expect("XGROUP CREATE audit-group");
    xadd_orders(&mut conn, "trim", 50);
    // The topology's groups have done their work; the audit group has not.
    for g in ["payment-service-group", "notification-service-group"] {
        assert_eq!(read_and_ack(&mut conn, g), 50, "{g} read every order");
    }
    // Held back: trimming still runs (every 100 ms) and says so.
    wait_until(
        "order-service reports audit-group holding trimming back",
        DEADLINE,
        || order.log().contains("audit-group"),
    );
    assert_eq!(
        xlen(&mut conn, ORDER_EVENTS),
        50,
        "nothing audit-group has not read may be trimmed"
    );
    // Once it has read and acknowledged them, the stream is trimmed to
    // RETAIN_ENTRIES.
    assert_eq!(read_and_ack(&mut conn, "audit-group"), 50);
    wait_until("order-events trimmed to RETAIN_ENTRIES", DEADLINE, || {
        xlen(&mut conn, ORDER_EVENTS) == RETAIN
    });
}

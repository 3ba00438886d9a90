//! Faults are not failures (issue 10, item 5, the counting part).
//!
//! `MAX_DELIVERIES` counts failed deliveries: a handler that tried and
//! failed. A dropped connection, a restart, re-reading one's own pending
//! entries or claiming them is not a failure, and must not bring a healthy
//! entry closer to the dead-letter stream. And claiming must reach every
//! idle entry of a long pending list, not only its head.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::flow::{
    drained, env, ms, start_ready, xadd_orders_range, xlen, xrange, Ledger, Load, Notified,
    ALL_GROUPS, DEADLINE, NOTIFICATION_GROUP, ORDER_DLQ, ORDER_EVENTS, PAYMENT_DLQ, PAYMENT_EVENTS,
};
use crate::support::{RedisServer, Service, WebhookSink};

fn all_drained(conn: &mut redis::Connection) -> bool {
    ALL_GROUPS.iter().all(|(s, g)| drained(conn, s, g))
}

fn wait_or_fail(svc: &Service, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        svc.check(start.elapsed() < DEADLINE, || {
            format!("{what}: not within {DEADLINE:?}")
        });
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every client connection dropped every 0.25 s for 8 s
/// (`CLIENT KILL TYPE normal`) while orders keep coming, with
/// `MAX_DELIVERIES=2`: nothing failed, so nothing is dead-lettered, every
/// order is paid exactly once and every order and payment is notified
/// once.
#[test]
fn dropped_connections_never_dead_letter_a_healthy_entry() {
    const DROPS: usize = 32;
    const EVERY: Duration = Duration::from_millis(250);
    let redis = RedisServer::start();
    let sink = WebhookSink::start();
    let url = sink.url();
    let order = start_ready("order-service", &redis, &[("TRIM_INTERVAL_MS", "0")]);
    let payment = start_ready("payment-service", &redis, &env(&[("MAX_DELIVERIES", "2")]));
    let notification = start_ready(
        "notification-service",
        &redis,
        &env(&[
            ("MAX_DELIVERIES", "2"),
            ("NOTIFY_WEBHOOK_URL", url.as_str()),
        ]),
    );
    let load = Load::start(&order, "kill", 2);
    let mut killer = redis.conn();
    let started = Instant::now();
    let mut killed = 0i64;
    for _ in 0..DROPS {
        std::thread::sleep(EVERY);
        // SKIPME yes (the default): the test's own connection survives.
        let n: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query(&mut killer)
            .expect("CLIENT KILL TYPE normal");
        killed += n;
    }
    let faults_for = started.elapsed();
    let placed = load.stop();
    let accepted = placed.iter().filter(|p| p.ok()).count();

    let mut conn = redis.conn();
    wait_or_fail(&notification, "every group drained", || {
        all_drained(&mut conn)
    });
    let orders = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    let payments = xrange(&mut conn, PAYMENT_EVENTS, "-", "+");
    let ledger = Ledger::of(&orders, &payments);
    let wanted = orders.len() + payments.len();
    wait_or_fail(&notification, "every order and payment notified", || {
        Notified::check(&sink.accepted(), &orders, &payments)
            .missing
            .is_empty()
    });
    let notified = Notified::check(&sink.accepted(), &orders, &payments);
    let dead = (xlen(&mut conn, ORDER_DLQ), xlen(&mut conn, PAYMENT_DLQ));
    let summary = format!(
        "drops={DROPS} every={}ms for={}ms connections_killed={killed} orders={} accepted={accepted} dead_letters={}+{} {ledger} {notified}",
        ms(EVERY),
        ms(faults_for),
        orders.len(),
        dead.0,
        dead.1
    );
    notification.check(dead == (0, 0), || {
        format!(
            "healthy entries dead-lettered: {summary}\n{:#?}",
            xrange(&mut conn, ORDER_DLQ, "-", "+")
        )
    });
    payment.check(ledger.exactly_once(), || summary.clone());
    notification.check(notified.complete(), || summary.clone());
    // A dropped link costs a reconnect, not a repeated webhook call: the
    // acknowledgement of finished work is tried again on a new connection.
    notification.check(notified.duplicates == 0, || {
        let mut seen = std::collections::HashSet::new();
        let again: Vec<String> = sink
            .accepted()
            .iter()
            .filter_map(|r| r.idempotency_key.clone())
            .filter(|k| !seen.insert(k.clone()))
            .take(5)
            .collect();
        format!("notified more than once ({again:?}): {summary}")
    });
    assert!(
        orders.len() >= 10 && accepted > 0,
        "orders kept coming: {summary}"
    );
    assert!(
        killed >= DROPS as i64,
        "connections were dropped: {summary}"
    );
    println!("{summary} notifications_wanted={wanted}");
}

/// A long pending list, many `XAUTOCLAIM` pages: at its head 400 entries a
/// live consumer keeps working on (never idle long), at its tail 20 left
/// by a consumer that died. A second instance claims and notifies all 20.
#[test]
fn claiming_reaches_the_tail_of_a_long_pending_list() {
    const BUSY: usize = 400;
    const LEFT: usize = 20;
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    create_notification_group(&mut conn);
    let busy = xadd_orders_range(&mut conn, "busy", 0..BUSY);
    read_as(&mut conn, "live-instance", BUSY);
    // The live consumer is working through its entries: each was touched
    // moments ago, so none is idle long enough to be claimed.
    let stop = Arc::new(AtomicBool::new(false));
    let toucher = {
        let (stop, busy) = (Arc::clone(&stop), busy.clone());
        let mut conn = redis.conn();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let _: redis::Value = redis::cmd("XCLAIM")
                    .arg(ORDER_EVENTS)
                    .arg(NOTIFICATION_GROUP)
                    .arg("live-instance")
                    .arg(0)
                    .arg(&busy)
                    .arg("JUSTID")
                    .query(&mut conn)
                    .expect("XCLAIM ... JUSTID");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let left = xadd_orders_range(&mut conn, "left", 0..LEFT);
    read_as(&mut conn, "dead-instance", LEFT);

    let sink = WebhookSink::start();
    let url = sink.url();
    let started = Instant::now();
    let notification = start_ready(
        "notification-service",
        &redis,
        &env(&[
            ("NOTIFY_WEBHOOK_URL", url.as_str()),
            ("CLAIM_IDLE_MS", "1000"),
            ("BATCH_SIZE", "2"),
            ("CONSUMER_NAME", "second-instance"),
        ]),
    );
    let orders: Vec<_> = xrange(&mut conn, ORDER_EVENTS, "-", "+")
        .into_iter()
        .filter(|o| left.contains(&o.id))
        .collect();
    let deadline = Duration::from_secs(30);
    let start = Instant::now();
    let mut notified = Notified::check(&sink.accepted(), &orders, &[]);
    while !notified.missing.is_empty() && start.elapsed() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        notified = Notified::check(&sink.accepted(), &orders, &[]);
    }
    let claimed_in = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let _ = toucher.join();
    let busy_notified = sink
        .accepted()
        .iter()
        .filter(|r| {
            r.body["userId"]
                .as_str()
                .is_some_and(|u| u.starts_with("busy"))
        })
        .count();
    let summary = format!(
        "pending_list={} xautoclaim_count=2 tail={LEFT} tail_notified={}/{LEFT} in={}ms busy_head_notified={busy_notified}",
        BUSY + LEFT,
        LEFT - notified.missing.len(),
        ms(claimed_in)
    );
    notification.check(notified.complete(), || summary.clone());
    notification.check(busy_notified == 0, || {
        format!("entries a live consumer was working on were claimed: {summary}")
    });
    println!("{summary}");
}

/// `XREADGROUP` of `n` new entries as `consumer`, never acknowledged.
fn read_as(conn: &mut redis::Connection, consumer: &str, n: usize) {
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(NOTIFICATION_GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(n)
        .arg("STREAMS")
        .arg(ORDER_EVENTS)
        .arg(">")
        .query(conn)
        .expect("XREADGROUP");
}

/// A restart with many of its own entries pending and idle past
/// `CLAIM_IDLE_MS`: both the claim pass and the re-read of its own pending
/// entries see them, and each must be notified by one path only.
#[test]
fn a_restart_notifies_each_of_its_own_pending_entries_once() {
    const HELD: usize = 600;
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    create_notification_group(&mut conn);
    let held = xadd_orders_range(&mut conn, "held", 0..HELD);
    read_as(&mut conn, "restarted", HELD);
    std::thread::sleep(Duration::from_millis(600));
    let sink = WebhookSink::start();
    let url = sink.url();
    let notification = start_ready(
        "notification-service",
        &redis,
        &env(&[
            ("NOTIFY_WEBHOOK_URL", url.as_str()),
            ("CLAIM_IDLE_MS", "500"),
            ("BATCH_SIZE", "16"),
            ("CONSUMER_NAME", "restarted"),
        ]),
    );
    let orders: Vec<_> = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    wait_or_fail(
        &notification,
        "every held entry notified and acknowledged",
        || {
            drained(&mut conn, ORDER_EVENTS, NOTIFICATION_GROUP)
                && Notified::check(&sink.accepted(), &orders, &[])
                    .missing
                    .is_empty()
        },
    );
    let notified = Notified::check(&sink.accepted(), &orders, &[]);
    let summary = format!("held={} {notified}", held.len());
    notification.check(notified.complete() && notified.duplicates == 0, || {
        summary.clone()
    });
    println!("{summary}");
}

/// `notification-service-group` on `order-events` (made with the stream),
/// before any instance starts, so the test can read as a consumer first.
fn create_notification_group(conn: &mut redis::Connection) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(ORDER_EVENTS)
        .arg(NOTIFICATION_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(conn)
        .expect("XGROUP CREATE");
}

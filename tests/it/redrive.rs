//! Dead letters put back, and what must not happen twice (issue 10, item 3
//! and the DLQ part of item 5): a redriven entry reaches only the groups
//! that gave up on it, an order is never paid twice whatever the route, a
//! dead letter is written once, `<stream>:dlq` keeps only its newest
//! `DLQ_RETAIN_ENTRIES`, and a group that never reads holding trimming back
//! is seen (log, metric, `streamctl status`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::Connection;
use serde_json::Value;

use crate::support::flow::{
    describe_groups, drained, env, start_ready, xadd_orders, xadd_raw, xlen, xrange, Metrics,
    RawEntry, DEADLINE, NOTIFICATION_GROUP, ORDER_DLQ, ORDER_EVENTS, PAYMENT_DLQ, PAYMENT_EVENTS,
    PAYMENT_GROUP,
};
use crate::support::{run_to_exit, wait_until, Finished, RedisServer, Service, WebhookSink};

/// Runs `streamctl --redis-url URL ARGS...` to its end; panics with the
/// whole run unless it exits 0.
fn streamctl(redis: &RedisServer, env: &[(&str, &str)], args: &[&str]) -> Finished {
    let url = redis.url();
    let mut all = vec!["--redis-url", url.as_str()];
    all.extend_from_slice(args);
    let run = run_to_exit("streamctl", env, &all, Duration::from_secs(30));
    assert_eq!(run.status.code(), Some(0), "streamctl failed:\n{run}");
    run
}

fn json(run: &Finished) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{run}"))
}

/// The payments in `payment-events`, per order ID: the `paymentProcessId`s
/// written for it (a redriven copy of a payment repeats its ID).
fn payments_per_order(conn: &mut Connection) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in xrange(conn, PAYMENT_EVENTS, "-", "+") {
        out.entry(p.text("orderId").unwrap_or_default())
            .or_default()
            .insert(p.text("paymentProcessId").unwrap_or_default());
    }
    out
}

fn all_drained(conn: &mut Connection) -> bool {
    drained(conn, ORDER_EVENTS, PAYMENT_GROUP)
        && drained(conn, ORDER_EVENTS, NOTIFICATION_GROUP)
        && drained(conn, PAYMENT_EVENTS, NOTIFICATION_GROUP)
}

/// The story of the issue: a webhook fails until 6 orders and their
/// payments are dead-lettered by notification-service-group; the receiver
/// is fixed and both DLQs are redriven. Each order is paid exactly once and
/// notified (order and payment) at least once.
#[test]
fn a_redrive_after_a_webhook_outage_pays_every_order_once_and_notifies_every_one() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let broken = Arc::new(AtomicBool::new(true));
    let sink = {
        let broken = broken.clone();
        WebhookSink::options()
            .fail_when(move |_| broken.load(Ordering::SeqCst))
            .start()
    };
    let url = sink.url();
    let settings = env(&[
        ("MAX_DELIVERIES", "2"),
        ("NOTIFY_WEBHOOK_URL", &url),
        ("WEBHOOK_TIMEOUT_MS", "2000"),
    ]);
    let payment = start_ready("payment-service", &redis, &settings);
    let notification = start_ready("notification-service", &redis, &settings);

    let orders = xadd_orders(&mut conn, "redrive", 6);
    wait_until(
        "6 orders and their 6 payments are dead-lettered by notification-service-group",
        DEADLINE,
        || xlen(&mut conn, ORDER_DLQ) == 6 && xlen(&mut conn, PAYMENT_DLQ) == 6,
    );
    assert_eq!(xlen(&mut conn, PAYMENT_EVENTS), 6, "one payment per order");

    broken.store(false, Ordering::SeqCst);
    let first = streamctl(
        &redis,
        &[],
        &["--json", "dlq", "redrive", ORDER_EVENTS, "--all"],
    );
    let second = streamctl(
        &redis,
        &[],
        &["--json", "dlq", "redrive", PAYMENT_EVENTS, "--all"],
    );
    for run in [&first, &second] {
        let report = json(run);
        assert_eq!(
            report["redriven"].as_array().map(Vec::len),
            Some(6),
            "{run}"
        );
    }

    // Every order and every payment notified, and nothing left to do.
    let user_of: BTreeMap<String, String> = xrange(&mut conn, ORDER_EVENTS, "-", "+")
        .iter()
        .filter(|e| orders.contains(&e.id))
        .map(|e| (e.id.clone(), e.text("userId").unwrap_or_default()))
        .collect();
    let notified = |kind: &str| -> BTreeSet<String> {
        sink.accepted()
            .iter()
            .filter(|r| r.body["kind"] == kind)
            .filter_map(|r| r.body["userId"].as_str().map(str::to_string))
            .collect()
    };
    let users: BTreeSet<String> = user_of.values().cloned().collect();
    wait_until(
        "every order and every payment is notified and every group is drained",
        DEADLINE,
        || notified("order") == users && notified("payment") == users && all_drained(&mut conn),
    );

    let payments = payments_per_order(&mut conn);
    let entries = xrange(&mut conn, PAYMENT_EVENTS, "-", "+");
    let copies = entries
        .iter()
        .filter(|e| e.get("redrivenFrom").is_some())
        .count();
    let distinct: usize = payments.values().map(BTreeSet::len).sum();
    println!(
        "after the redrive: {} payment-events entries ({copies} of them redriven copies), \
         {distinct} payments (distinct paymentProcessId) for {} orders",
        entries.len(),
        orders.len()
    );
    assert_eq!(
        payments.keys().cloned().collect::<BTreeSet<_>>(),
        orders.iter().cloned().collect::<BTreeSet<_>>(),
        "payments name exactly the orders: {payments:?}"
    );
    for (order, ids) in &payments {
        assert_eq!(
            ids.len(),
            1,
            "order {order} paid {} times: {payments:?}",
            ids.len()
        );
    }
    assert_eq!(
        entries.len() - copies,
        6,
        "6 payments written, plus marked copies"
    );

    // The redriven orders went to notification-service-group only: payment
    // acknowledged them without paying; each was notified with the key
    // the contract gives every entry, `<stream>:<entry ID>`.
    let copies_of_orders: Vec<RawEntry> = xrange(&mut conn, ORDER_EVENTS, "-", "+")
        .into_iter()
        .filter(|e| !orders.contains(&e.id))
        .collect();
    assert_eq!(copies_of_orders.len(), 6);
    for copy in &copies_of_orders {
        assert_eq!(
            copy.text("redriveGroup").as_deref(),
            Some(NOTIFICATION_GROUP)
        );
        let from = copy.text("redrivenFrom").unwrap_or_default();
        assert!(orders.contains(&from), "redrivenFrom {from} is an order");
        let key = format!("{ORDER_EVENTS}:{}", copy.id);
        assert!(
            sink.accepted()
                .iter()
                .any(|r| r.idempotency_key.as_deref() == Some(key.as_str())),
            "no accepted notification with Idempotency-Key {key}"
        );
    }
    let skipped = Metrics::of(&payment).sum(
        "events_handled_total",
        &["outcome=\"skipped\"", &format!("group=\"{PAYMENT_GROUP}\"")],
    );
    assert_eq!(
        skipped, 6.0,
        "payment-service skipped the 6 redriven orders"
    );
    drop(notification);
}

/// An order read again after its payment group was destroyed and recreated
/// at `0` (as `XGROUP CREATE ... 0` after an operator's mistake, or Redis
/// restored from an old snapshot) is not paid again.
#[test]
fn a_payment_group_destroyed_and_recreated_pays_nothing_again() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let payment = start_ready("payment-service", &redis, &env(&[]));
    let orders = xadd_orders(&mut conn, "recreate", 5);
    wait_until("5 orders paid", DEADLINE, || {
        xlen(&mut conn, PAYMENT_EVENTS) == 5 && drained(&mut conn, ORDER_EVENTS, PAYMENT_GROUP)
    });

    let destroyed: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(ORDER_EVENTS)
        .arg(PAYMENT_GROUP)
        .query(&mut conn)
        .expect("XGROUP DESTROY");
    assert_eq!(destroyed, 1);
    let duplicates = || {
        Metrics::of(&payment)
            .get(
                "events_handled_total",
                &[
                    "outcome=\"duplicate\"",
                    &format!("group=\"{PAYMENT_GROUP}\""),
                ],
            )
            .unwrap_or(0.0)
    };
    wait_until(
        "payment-service recreated its group and read the 5 orders again",
        DEADLINE,
        || drained(&mut conn, ORDER_EVENTS, PAYMENT_GROUP),
    );
    let payments = payments_per_order(&mut conn);
    println!(
        "after XGROUP DESTROY and recreate: {} payments for {} orders, {} refused as duplicate",
        xlen(&mut conn, PAYMENT_EVENTS),
        orders.len(),
        duplicates()
    );
    assert_eq!(xlen(&mut conn, PAYMENT_EVENTS), 5, "{payments:?}");
    assert_eq!(payments.len(), 5, "{payments:?}");
    assert_eq!(
        duplicates(),
        5.0,
        "each order read again counted as duplicate"
    );
}

/// 150 entries that can never succeed (no price), both groups running,
/// `DLQ_RETAIN_ENTRIES=100`: each is dead-lettered once (not once per
/// group), the DLQ keeps the newest 100, and the 50 deleted are counted.
/// A redriven poison letter is for both groups that gave up on it.
#[test]
fn poison_entries_are_dead_lettered_once_and_the_dlq_keeps_the_newest() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let settings = env(&[("DLQ_RETAIN_ENTRIES", "100")]);
    let payment = start_ready("payment-service", &redis, &settings);
    let notification = start_ready("notification-service", &redis, &settings);

    let poison = |conn: &mut Connection, range: std::ops::Range<usize>| -> Vec<String> {
        range
            .map(|i| {
                let user = format!("poison-u{i}");
                xadd_raw(
                    conn,
                    ORDER_EVENTS,
                    &[(b"userId", user.as_bytes()), (b"productId", b"p1")],
                )
            })
            .collect()
    };
    // 100 first, then 50 more: the 50 newest letters are then known.
    let settled = |conn: &mut Connection| {
        drained(conn, ORDER_EVENTS, PAYMENT_GROUP)
            && drained(conn, ORDER_EVENTS, NOTIFICATION_GROUP)
    };
    let older = poison(&mut conn, 0..100);
    wait_until("both groups have settled the first 100", DEADLINE, || {
        settled(&mut conn)
    });
    assert_eq!(xlen(&mut conn, ORDER_DLQ), 100, "one letter per entry");
    let newer = poison(&mut conn, 100..150);
    wait_until("both groups have settled the next 50", DEADLINE, || {
        settled(&mut conn)
    });

    let letters = xrange(&mut conn, ORDER_DLQ, "-", "+");
    // Over both services: one of them may have evicted nothing.
    let sum = |name: &str| {
        [&payment, &notification]
            .iter()
            .map(|svc| Metrics::of(svc).get(name, &[]).unwrap_or(0.0))
            .sum::<f64>()
    };
    let evicted = || sum("dlq_evicted_total") as usize;
    println!(
        "150 poison entries, 2 groups, DLQ_RETAIN_ENTRIES=100: {} dead letters kept, \
         {} written, {} evicted; dead_lettered_total {}",
        letters.len(),
        letters.len() + evicted(),
        evicted(),
        sum("dead_lettered_total")
    );
    let kept: BTreeSet<String> = letters
        .iter()
        .map(|l| l.text("originalId").unwrap_or_default())
        .collect();
    assert_eq!(letters.len(), 100, "DLQ_RETAIN_ENTRIES");
    assert_eq!(kept.len(), 100, "each entry once");
    assert_eq!(evicted(), 50, "one letter per entry: 150 written, 100 kept");
    for svc in [&payment, &notification] {
        let given_up = Metrics::of(svc).sum("dead_lettered_total", &[]);
        assert_eq!(given_up, 150.0, "each group gave up on each entry");
    }
    assert!(
        newer.iter().all(|id| kept.contains(id)),
        "the newest letters are kept"
    );
    assert_eq!(
        older.iter().filter(|id| kept.contains(*id)).count(),
        50,
        "the 50 oldest letters went"
    );
    let index = |conn: &mut Connection| -> usize {
        redis::cmd("HLEN")
            .arg("order-events:dlq:index")
            .query(conn)
            .expect("HLEN")
    };
    assert_eq!(index(&mut conn), 150, "one index field per entry given up");

    // Both groups gave up on the newest: redriven, it is for both, and
    // (still poison) given up by both again: one new letter.
    let newest = letters.last().expect("a letter").id.clone();
    let run = streamctl(
        &redis,
        &[],
        &["--json", "dlq", "redrive", ORDER_EVENTS, "--id", &newest],
    );
    let report = json(&run);
    let groups: BTreeSet<&str> = report["redriven"][0]["redriveGroup"]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .collect();
    assert_eq!(
        groups,
        BTreeSet::from([PAYMENT_GROUP, NOTIFICATION_GROUP]),
        "{run}"
    );
    wait_until(
        "both groups gave up on the redriven entry",
        DEADLINE,
        || settled(&mut conn),
    );
    // It left the DLQ when redriven and came back once, as the newest.
    assert_eq!(xlen(&mut conn, ORDER_DLQ), 100);
    assert_eq!(evicted(), 50);
    let again = xrange(&mut conn, ORDER_DLQ, "-", "+");
    assert_eq!(
        again.last().and_then(|l| l.text("originalId")).as_deref(),
        report["redriven"][0]["newId"].as_str(),
        "{run}"
    );

    // The index goes with the entries when the stream is trimmed (all but
    // the last entry read, which trimming always keeps: a valid order).
    xadd_orders(&mut conn, "last", 1);
    wait_until("the last order is handled", DEADLINE, || settled(&mut conn));
    streamctl(&redis, &[], &["trim", "--retain", "0"]);
    assert_eq!(xlen(&mut conn, ORDER_EVENTS), 1);
    assert_eq!(
        index(&mut conn),
        0,
        "index fields of trimmed entries remain"
    );
}

/// Only order-service and payment-service run: notification-service-group
/// exists but nobody reads with it, so order-events cannot be trimmed to
/// `RETAIN_ENTRIES`. That is logged, counted on `/metrics` and shown by
/// `streamctl status`; and it ends when notification-service starts.
#[test]
fn trimming_held_back_by_a_group_that_never_reads_is_logged_counted_and_shown() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let trim = env(&[("RETAIN_ENTRIES", "10"), ("TRIM_INTERVAL_MS", "200")]);
    let order = start_ready("order-service", &redis, &trim);
    let _payment = start_ready("payment-service", &redis, &env(&[]));
    xadd_orders(&mut conn, "held", 50);
    wait_until("payment-service paid the 50 orders", DEADLINE, || {
        drained(&mut conn, ORDER_EVENTS, PAYMENT_GROUP)
    });

    let held = |svc: &Service| {
        Metrics::of(svc).get(
            "trim_held_back_entries",
            &[
                "stream=\"order-events\"",
                &format!("group=\"{NOTIFICATION_GROUP}\""),
            ],
        )
    };
    wait_until(
        "order-service reports 40 entries held back",
        DEADLINE,
        || held(&order) == Some(40.0),
    );
    assert_eq!(xlen(&mut conn, ORDER_EVENTS), 50, "nothing unread removed");
    let log = order.log();
    assert!(
        log.contains("held back by group notification-service-group"),
        "no log line says trimming is held back:\n{log}"
    );
    let status = streamctl(&redis, &[("RETAIN_ENTRIES", "10")], &["--json", "status"]);
    let report = json(&status);
    let orders = report["streams"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["stream"] == ORDER_EVENTS))
        .unwrap_or_else(|| panic!("no order-events in {status}"));
    assert_eq!(
        orders["trimHeldBack"]["group"], NOTIFICATION_GROUP,
        "{status}"
    );
    assert_eq!(orders["trimHeldBack"]["entries"], 40, "{status}");
    let text = streamctl(&redis, &[("RETAIN_ENTRIES", "10")], &["status"]);
    assert!(
        text.stdout
            .contains("trimming of order-events is held back by notification-service-group"),
        "{text}"
    );

    let _notification = start_ready("notification-service", &redis, &env(&[]));
    wait_until(
        "order-events is trimmed to 10 once the group reads",
        DEADLINE,
        || xlen(&mut conn, ORDER_EVENTS) == 10 && held(&order) == Some(0.0),
    );
    let status = json(&streamctl(
        &redis,
        &[("RETAIN_ENTRIES", "10")],
        &["--json", "status"],
    ));
    assert!(
        status["streams"][0]["trimHeldBack"].is_null(),
        "{status:#}\n{}",
        describe_groups(&mut conn)
    );
}

/// The paid markers are bounded by the payments: trimming a payment
/// deletes its order's marker, and a payment whose order is still in
/// `order-events` is kept (that order could be read again).
#[test]
fn paid_markers_go_with_the_payments_trimmed_and_only_after_their_orders() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let _payment = start_ready("payment-service", &redis, &env(&[]));
    let _notification = start_ready("notification-service", &redis, &env(&[]));
    xadd_orders(&mut conn, "markers", 20);
    wait_until("20 orders paid and notified", DEADLINE, || {
        xlen(&mut conn, PAYMENT_EVENTS) == 20 && all_drained(&mut conn)
    });
    let markers = |conn: &mut Connection| -> usize {
        redis::cmd("HLEN")
            .arg("payment-service:paid")
            .query(conn)
            .expect("HLEN")
    };
    assert_eq!(markers(&mut conn), 20);

    let dry = json(&streamctl(
        &redis,
        &[],
        &["--json", "trim", "--dry-run", "--retain", "0"],
    ));
    let payments = &dry["streams"][1];
    assert_eq!(payments["stream"], PAYMENT_EVENTS, "{dry:#}");
    assert_eq!(payments["removable"], 0, "orders still there: {dry:#}");
    assert!(
        payments["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("orders still in order-events"),
        "{dry:#}"
    );

    // Trimming order-events first (as streamctl does, and order-service
    // every TRIM_INTERVAL_MS) lets the payments and their markers go; the
    // last order, which trimming always keeps, keeps its payment (and the
    // payments written after it: two handler threads may pay out of order).
    streamctl(&redis, &[], &["trim", "--retain", "0"]);
    let payments = xlen(&mut conn, PAYMENT_EVENTS);
    println!(
        "after trimming: order-events {}, payment-events {payments}, markers {}",
        xlen(&mut conn, ORDER_EVENTS),
        markers(&mut conn)
    );
    assert_eq!(xlen(&mut conn, ORDER_EVENTS), 1);
    assert!((1..20).contains(&payments), "payments trimmed: {payments}");
    assert_eq!(markers(&mut conn), payments, "a marker per payment kept");
    let kept = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    let paid: bool = redis::cmd("HEXISTS")
        .arg("payment-service:paid")
        .arg(&kept[0].id)
        .query(&mut conn)
        .expect("HEXISTS");
    assert!(paid, "the order still in order-events keeps its marker");
}

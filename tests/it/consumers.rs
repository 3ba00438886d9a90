//! payment-service and notification-service end to end (issue 3): real
//! binaries, a real `redis-server` per test, a webhook sink standing in for
//! the notification receiver.
//!
//! What is checked is the contract's delivery guarantees as a user of the
//! streams sees them: one `payment-events` entry per order whatever happens
//! to payment-service, one accepted notification per entry with the right
//! `Idempotency-Key`, nothing left pending, and entries written by the seed's
//! Java services (or `redis-cli`) handled like our own.
//!
//! Every test prints the figures it measured on one line (`cargo test --
//! --nocapture` shows them).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::flow::{
    drained, env, group, http_orders, ms, pending, pending_of, start_ready, unread, xadd_orders,
    xadd_orders_range, xadd_raw, xlen, xrange, Ledger, Metrics, Notified, ALL_GROUPS, DEADLINE,
    NOTIFICATION_GROUP, ORDER_DLQ, ORDER_EVENTS, PAYMENT_EVENTS, PAYMENT_GROUP,
};
use crate::support::{wait_until, Gate, RedisProxy, RedisServer, Service, WebhookSink};

/// Waits until every group of the topology has nothing unread and nothing
/// pending, and `payment-events` holds `payments` entries.
fn wait_all_drained(conn: &mut redis::Connection, payments: usize) {
    wait_until(
        &format!("{payments} payments and every group drained"),
        DEADLINE,
        || {
            xlen(conn, PAYMENT_EVENTS) >= payments
                && ALL_GROUPS.iter().all(|(s, g)| drained(conn, s, g))
        },
    );
}

/// Issue 3, test 1: the happy path over HTTP, counted exactly.
#[test]
fn http_orders_are_paid_once_and_notified_once_with_idempotency_keys() {
    const ORDERS: usize = 1000;
    let redis = RedisServer::start();
    let sink = WebhookSink::start();
    let url = sink.url();
    let order = start_ready("order-service", &redis, &[("TRIM_INTERVAL_MS", "0")]);
    let _payment = start_ready("payment-service", &redis, &env(&[]));
    let _notification = start_ready(
        "notification-service",
        &redis,
        &env(&[("NOTIFY_WEBHOOK_URL", &url)]),
    );

    let started = Instant::now();
    let ids = http_orders(&order, "happy", ORDERS, 4);
    let placed_in = started.elapsed();
    let mut conn = redis.conn();
    wait_all_drained(&mut conn, ORDERS);
    let received = sink.wait_accepted(2 * ORDERS, DEADLINE);
    let done_in = started.elapsed();

    let orders = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    let payments = xrange(&mut conn, PAYMENT_EVENTS, "-", "+");
    let stream_ids: HashSet<&str> = orders.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(ids.len(), ORDERS);
    assert_eq!(
        ids.iter().map(String::as_str).collect::<HashSet<_>>(),
        stream_ids,
        "the orderIds answered are exactly the order-events entries"
    );
    let ledger = Ledger::of(&orders, &payments);
    assert!(ledger.exactly_once(), "{ledger}");
    let notified = Notified::check(&received, &orders, &payments);
    assert!(notified.complete(), "{notified}");
    assert_eq!(notified.duplicates, 0, "{notified}");
    assert_eq!(sink.count(), 2 * ORDERS, "no failed or extra webhook calls");
    for (stream, name) in ALL_GROUPS {
        let g = group(&mut conn, stream, name).expect("the group exists");
        assert_eq!(g.pending, 0, "{stream}/{name} pending");
        assert_eq!(g.lag, Some(0), "{stream}/{name} lag");
    }
    println!(
        "orders={ORDERS} {ledger} {notified} placed_in={}ms all_done_in={}ms",
        ms(placed_in),
        ms(done_in)
    );
}

/// Issue 3, test 2: payment-service SIGKILLed three times while orders come
/// in over HTTP, restarted each time (same port, so same consumer name).
#[test]
fn payment_service_killed_repeatedly_pays_each_order_exactly_once() {
    const ORDERS: usize = 1000;
    let redis = RedisServer::start();
    let order = start_ready("order-service", &redis, &[("TRIM_INTERVAL_MS", "0")]);
    let mut payment = start_ready("payment-service", &redis, &env(&[]));
    let mut conn = redis.conn();

    let started = Instant::now();
    let mut kills = Vec::new();
    let ids = std::thread::scope(|s| {
        let client = s.spawn(|| http_orders(&order, "killed", ORDERS, 2));
        for threshold in [300, 600, 900] {
            wait_until(&format!("{threshold} payments"), DEADLINE, || {
                xlen(&mut conn, PAYMENT_EVENTS) >= threshold
            });
            payment.sigkill();
            let paid = xlen(&mut conn, PAYMENT_EVENTS);
            let orphaned = pending(&mut conn, ORDER_EVENTS, PAYMENT_GROUP).0;
            kills.push(format!("paid={paid},pending={orphaned}"));
            payment.restart();
            payment.wait_ready();
        }
        client.join().expect("the order client panicked")
    });
    wait_until("every order paid", DEADLINE, || {
        xlen(&mut conn, PAYMENT_EVENTS) >= ORDERS && drained(&mut conn, ORDER_EVENTS, PAYMENT_GROUP)
    });
    let recovered_in = started.elapsed();

    let payments = xrange(&mut conn, PAYMENT_EVENTS, "-", "+");
    let orders = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    assert_eq!(orders.len(), ORDERS);
    let ledger = Ledger::of(&orders, &payments);
    assert!(ledger.exactly_once(), "{ledger}");
    assert_eq!(
        Ledger::of_ids(&ids, &payments).lost.len(),
        0,
        "every orderId answered is paid"
    );
    println!(
        "{ledger} kills=3 at [{}] all_paid_in={}ms",
        kills.join(" "),
        ms(recovered_in)
    );
}

/// Issue 3, test 3: SIGTERM with a backlog in flight. Each consumer is
/// signalled while it holds entries it read and has not acknowledged, with
/// more waiting behind them; it must exit 0 within 5 s with nothing pending
/// under its name. Started again, they finish the backlog with no payment
/// or notification repeated.
///
/// The test holds each one still with its entries in hand, rather than
/// hoping to catch it mid-run: payment-service talks to Redis through a
/// proxy the test freezes, notification-service's webhook is gated.
#[test]
fn sigterm_finishes_and_acknowledges_the_work_in_hand() {
    const ORDERS: usize = 3000;
    const EXIT_WITHIN: Duration = Duration::from_secs(5);
    let redis = RedisServer::start();
    let proxy = RedisProxy::start(&redis);
    let proxy_url = proxy.url();
    let gate = Gate::closed();
    let sink = WebhookSink::options().gate(&gate).start();
    let url = sink.url();
    let mut conn = redis.conn();
    let ids = xadd_orders(&mut conn, "term", ORDERS);
    let mut payment = Service::spawn(
        "payment-service",
        &redis,
        &env(&[
            ("REDIS_URL", &proxy_url),
            ("CONSUMER_NAME", "pay-term"),
            ("BATCH_SIZE", "4"),
            ("HANDLER_THREADS", "1"),
        ]),
    );
    let mut notification = Service::spawn(
        "notification-service",
        &redis,
        &env(&[
            ("CONSUMER_NAME", "notify-term"),
            ("NOTIFY_WEBHOOK_URL", &url),
            ("WEBHOOK_TIMEOUT_MS", "60000"),
        ]),
    );

    // payment-service frozen (its Redis held) while it holds entries.
    let held_by = |conn: &mut redis::Connection, streams: &[&str], group: &str, who: &str| {
        streams
            .iter()
            .map(|s| pending_of(conn, s, group, who))
            .sum::<usize>()
    };
    let mut held_payments = 0;
    wait_until(
        "payment-service frozen with entries in hand",
        DEADLINE,
        || {
            proxy.hold();
            held_payments = held_by(&mut conn, &[ORDER_EVENTS], PAYMENT_GROUP, "pay-term");
            if held_payments == 0 {
                proxy.release();
            }
            held_payments > 0
        },
    );
    // notification-service waiting on the gated webhook with entries in hand.
    sink.wait_arrived(1, DEADLINE);
    let held_notifications = held_by(
        &mut conn,
        &[ORDER_EVENTS, PAYMENT_EVENTS],
        NOTIFICATION_GROUP,
        "notify-term",
    );

    let mut report = Vec::new();
    let release_redis = || proxy.release();
    let open_gate = || gate.open();
    for (svc, streams, group, held_at_sigterm, let_go) in [
        (
            &mut payment,
            &[ORDER_EVENTS][..],
            PAYMENT_GROUP,
            held_payments,
            &release_redis as &dyn Fn(),
        ),
        (
            &mut notification,
            &[ORDER_EVENTS, PAYMENT_EVENTS][..],
            NOTIFICATION_GROUP,
            held_notifications,
            &open_gate as &dyn Fn(),
        ),
    ] {
        let consumer = svc
            .var("CONSUMER_NAME")
            .expect("a consumer name")
            .to_string();
        svc.check(held_at_sigterm > 0, || {
            format!("{consumer} held nothing when signalled")
        });
        svc.sigterm();
        // Let it go on with what it holds.
        let_go();
        let signalled = Instant::now();
        let status = svc.wait_exit(EXIT_WITHIN);
        let exited_in = signalled.elapsed();
        svc.check(status.success(), || {
            format!("exit status {status} after SIGTERM")
        });
        let left = held_by(&mut conn, streams, group, &consumer);
        svc.check(left == 0, || {
            format!("{left} entries still pending for {consumer} after a clean stop")
        });
        let unread: usize = streams
            .iter()
            .map(|s| unread(&mut conn, s, group).unwrap_or(0))
            .sum();
        svc.check(unread > 0, || {
            format!("{consumer} went on through its backlog after SIGTERM")
        });
        report.push(format!(
            "{}: pending_at_sigterm={held_at_sigterm} exited_in={}ms pending_after=0 backlog_left={unread}",
            svc.name(),
            ms(exited_in)
        ));
    }
    let paid_at_stop = xlen(&mut conn, PAYMENT_EVENTS);
    let notified_at_stop = sink.count();

    payment.restart();
    payment.wait_ready();
    notification.restart();
    notification.wait_ready();
    wait_all_drained(&mut conn, ORDERS);
    let received = sink.wait_accepted(2 * ORDERS, DEADLINE);
    let orders = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    let payments = xrange(&mut conn, PAYMENT_EVENTS, "-", "+");
    assert_eq!(orders.len(), ids.len());
    let ledger = Ledger::of(&orders, &payments);
    assert!(ledger.exactly_once(), "{ledger}");
    let notified = Notified::check(&received, &orders, &payments);
    assert!(notified.complete(), "{notified}");
    assert_eq!(
        notified.duplicates, 0,
        "an entry notified before SIGTERM was notified again: it was not acknowledged. {notified}"
    );
    println!(
        "{} | paid_at_stop={paid_at_stop} notified_at_stop={notified_at_stop} | after restart: {ledger} {notified}",
        report.join(" | ")
    );
}

/// Issue 3, test 4: entries in the seed's shape, written by hand.
#[test]
fn seed_entries_are_paid_and_notified() {
    let redis = RedisServer::start();
    let sink = WebhookSink::start();
    let url = sink.url();
    let mut conn = redis.conn();
    // Before any of our services ever ran: no group exists yet.
    let early = xadd_raw(
        &mut conn,
        ORDER_EVENTS,
        &[
            (b"userId", b"u1"),
            (b"productId", b"p1"),
            (b"price", b"100"),
        ],
    );
    let _payment = start_ready("payment-service", &redis, &env(&[]));
    let _notification = start_ready(
        "notification-service",
        &redis,
        &env(&[("NOTIFY_WEBHOOK_URL", &url)]),
    );
    // `redis-cli XADD order-events * userId u2 productId p2 price 100`.
    let late = xadd_raw(
        &mut conn,
        ORDER_EVENTS,
        &[
            (b"userId", b"u2"),
            (b"productId", b"p2"),
            (b"price", b"100"),
        ],
    );
    // What the seed's Java payment service writes: no orderId.
    let seed_payment = xadd_raw(
        &mut conn,
        PAYMENT_EVENTS,
        &[
            (b"userId", b"u3"),
            (b"productId", b"p3"),
            (b"price", b"300"),
            (b"paymentProcessId", b"0"),
        ],
    );
    wait_all_drained(&mut conn, 3);
    let received = sink.wait_accepted(5, DEADLINE);

    let orders = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    let payments = xrange(&mut conn, PAYMENT_EVENTS, "-", "+");
    let ours: Vec<_> = payments
        .iter()
        .filter(|p| p.id != seed_payment)
        .cloned()
        .collect();
    let ledger = Ledger::of(&orders, &ours);
    assert!(ledger.exactly_once(), "{ledger}");
    let notified = Notified::check(&received, &orders, &payments);
    assert!(notified.complete(), "{notified}");
    let seed_note = received
        .iter()
        .find(|r| {
            // IDs are per stream: an order may have the same one.
            r.body["stream"] == PAYMENT_EVENTS && r.body["eventId"] == seed_payment.as_str()
        })
        .expect("the seed's payment was notified");
    assert!(
        seed_note.body.get("orderId").is_none_or(|v| v.is_null()),
        "orderId of a payment without one: {}",
        seed_note.raw
    );
    assert_eq!(seed_note.body["paymentProcessId"], "0", "{}", seed_note.raw);
    assert_eq!(xlen(&mut conn, ORDER_DLQ), 0, "nothing dead-lettered");
    println!(
        "seed orders [{early} before the services, {late} after] {ledger} {notified} seed_payment_body={}",
        seed_note.raw
    );
}

/// Issue 3, test 5: a consumer that comes back under its old name handles
/// its own pending entries first, without waiting for a claim.
#[test]
fn restarted_consumer_rereads_its_own_pending_entries_first() {
    const HELD: usize = 20;
    const NEW: usize = 10;
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(ORDER_EVENTS)
        .arg(PAYMENT_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .exec(&mut conn)
        .expect("XGROUP CREATE");
    let held = xadd_orders_range(&mut conn, "held", 0..HELD);
    // What a payment-service named X had read when it died.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(PAYMENT_GROUP)
        .arg("X")
        .arg("COUNT")
        .arg(HELD)
        .arg("STREAMS")
        .arg(ORDER_EVENTS)
        .arg(">")
        .query(&mut conn)
        .expect("XREADGROUP as X");
    assert_eq!(
        pending_of(&mut conn, ORDER_EVENTS, PAYMENT_GROUP, "X"),
        HELD
    );
    let fresh = xadd_orders_range(&mut conn, "fresh", HELD..HELD + NEW);

    // One handler thread, so payments are written in the order entries
    // were handed over; a claim idle time no test waits for.
    let started = Instant::now();
    let payment = start_ready(
        "payment-service",
        &redis,
        &env(&[
            ("CONSUMER_NAME", "X"),
            ("CLAIM_IDLE_MS", "600000"),
            ("HANDLER_THREADS", "1"),
        ]),
    );
    wait_until("every order paid", DEADLINE, || {
        xlen(&mut conn, PAYMENT_EVENTS) >= HELD + NEW
            && drained(&mut conn, ORDER_EVENTS, PAYMENT_GROUP)
    });
    let paid_in = started.elapsed();

    let payments = xrange(&mut conn, PAYMENT_EVENTS, "-", "+");
    let all: Vec<String> = held.iter().chain(&fresh).cloned().collect();
    let ledger = Ledger::of_ids(&all, &payments);
    assert!(ledger.exactly_once(), "{ledger}");
    let first: Vec<String> = payments[..HELD]
        .iter()
        .map(|p| p.text("orderId").unwrap_or_default())
        .collect();
    assert_eq!(first, held, "the held entries are paid first, in order");
    let log = payment.log();
    payment.check(!log.contains("claimed"), || {
        "the held entries were claimed, not re-read".into()
    });
    let redelivered = Metrics::of(&payment).sum("redeliveries_total", &[]);
    payment.check(redelivered >= HELD as f64, || {
        format!("redeliveries_total is {redelivered}, expected at least {HELD}")
    });
    println!(
        "held={HELD} new={NEW} {ledger} held_paid_first=true redeliveries_total={redelivered} paid_in={}ms",
        ms(paid_in)
    );
}

/// Issue 3, test 6: a webhook that fails the first two attempts for every
/// tenth order. Those entries stay pending, are retried after
/// `CLAIM_IDLE_MS`, and arrive; nothing is dead-lettered or left pending.
#[test]
fn failed_webhook_deliveries_are_retried_until_accepted() {
    const ORDERS: usize = 200;
    const FAILS: usize = 2;
    let redis = RedisServer::start();
    let attempts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let sink = {
        let attempts = Arc::clone(&attempts);
        WebhookSink::options()
            .fail_when(move |body| {
                let user = body["userId"].as_str().unwrap_or_default();
                if !user.ends_with('3') {
                    return false;
                }
                let key = body["eventId"].as_str().unwrap_or_default().to_string();
                let mut attempts = attempts.lock().unwrap_or_else(|e| e.into_inner());
                let n = attempts.entry(key).or_default();
                *n += 1;
                *n <= FAILS
            })
            .start()
    };
    let url = sink.url();
    let notification = start_ready(
        "notification-service",
        &redis,
        &env(&[("NOTIFY_WEBHOOK_URL", &url), ("CLAIM_IDLE_MS", "500")]),
    );
    let mut conn = redis.conn();
    let started = Instant::now();
    xadd_orders(&mut conn, "flaky", ORDERS);
    let received = sink.wait_accepted(ORDERS, DEADLINE);
    wait_until("the order-events group drained", DEADLINE, || {
        drained(&mut conn, ORDER_EVENTS, NOTIFICATION_GROUP)
    });
    let done_in = started.elapsed();

    let orders = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    let notified = Notified::check(&received, &orders, &[]);
    assert!(notified.complete(), "{notified}");
    let all = sink.received();
    let flaky: Vec<&str> = orders
        .iter()
        .filter(|o| o.text("userId").is_some_and(|u| u.ends_with('3')))
        .map(|o| o.id.as_str())
        .collect();
    assert_eq!(flaky.len(), ORDERS / 10);
    for id in &flaky {
        let tries: Vec<u16> = all
            .iter()
            .filter(|r| r.body["eventId"] == *id)
            .map(|r| r.answered)
            .collect();
        assert_eq!(tries, [500, 500, 200], "attempts for {id}");
        // Every attempt, failed or not, carries the same key, so the
        // receiver can tell a retry from a new notification.
        let key = format!("{ORDER_EVENTS}:{id}");
        for r in all.iter().filter(|r| r.body["eventId"] == *id) {
            assert_eq!(
                r.idempotency_key.as_deref(),
                Some(key.as_str()),
                "Idempotency-Key of an attempt answered {}: {r:?}",
                r.answered
            );
        }
    }
    let failed = all.iter().filter(|r| !r.accepted()).count();
    assert_eq!(failed, FAILS * flaky.len());
    assert_eq!(
        all.len(),
        ORDERS + failed,
        "one attempt for every other entry"
    );
    assert_eq!(xlen(&mut conn, ORDER_DLQ), 0, "nothing dead-lettered");
    // A batch's redeliveries are counted once the whole batch is handed
    // to the handlers, which may be after its last entry was acknowledged.
    let wanted = (FAILS * flaky.len()) as f64;
    let counted = |m: &Metrics| {
        m.sum("redeliveries_total", &[]) >= wanted
            && m.sum("events_handled_total", &["outcome=\"failed\""]) >= wanted
    };
    wait_until(
        "the failed attempts and redeliveries counted",
        DEADLINE,
        || counted(&Metrics::of(&notification)),
    );
    let m = Metrics::of(&notification);
    let redelivered = m.sum("redeliveries_total", &[]);
    let failures = m.sum("events_handled_total", &["outcome=\"failed\""]);
    assert!(
        redelivered >= wanted,
        "redeliveries_total {redelivered}, expected at least {wanted}\n{}",
        m.text
    );
    assert!(
        failures >= wanted,
        "events_handled_total{{outcome=\"failed\"}} {failures}, expected at least {wanted}"
    );
    println!(
        "orders={ORDERS} flaky={} failed_attempts={failed} {notified} redeliveries_total={redelivered} failed_outcomes={failures} all_delivered_in={}ms",
        flaky.len(),
        ms(done_in)
    );
}

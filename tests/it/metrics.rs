//! What an operator scraping `/metrics` sees: every family the contract
//! lists is there, and each moves with what happened.

use std::time::Duration;

use crate::support::flow::{self, start_ready, Metrics, NOTIFICATION_GROUP, ORDER_EVENTS};
use crate::support::{wait_until, Gate, RedisServer, Service, WebhookSink};

const ORDERS: usize = 20;

fn place(svc: &Service, i: usize) -> u16 {
    svc.get(&format!("/order?userId=m{i}&productId=p&price=1"))
        .status
}

/// Orders (some refused), a poison entry, a webhook held back by the test
/// and then failing once: the counters of requests by status, events by
/// outcome, latency, redeliveries, dead letters, group lag and pending
/// (non-zero while the webhook is held, equal to `XPENDING`) all show it;
/// a Redis restart shows in the reconnect counter. Every service is ready
/// (`/readyz` 200) before the first order.
#[test]
fn every_metric_of_the_contract_moves_with_what_happened() {
    let mut redis = RedisServer::options()
        .port(crate::support::free_port())
        .start();
    let gate = Gate::closed();
    let sink = WebhookSink::options().gate(&gate).fail_first(1).start();
    let order = start_ready("order-service", &redis, &[]);
    let fast = [("CLAIM_IDLE_MS", "300")];
    let mut payment = start_ready("payment-service", &redis, &fast);
    let hook = sink.url();
    let notification = start_ready(
        "notification-service",
        &redis,
        &[
            ("CLAIM_IDLE_MS", "300"),
            // The gate is held for as long as the test needs.
            ("WEBHOOK_TIMEOUT_MS", "60000"),
            ("NOTIFY_WEBHOOK_URL", hook.as_str()),
        ],
    );

    for i in 0..ORDERS {
        assert_eq!(place(&order, i), 200);
    }
    assert_eq!(order.get("/order?userId=&productId=p&price=1").status, 400);
    assert_eq!(order.get("/nowhere").status, 404);
    let mut conn = redis.conn();
    let _: String = redis::cmd("XADD")
        .arg("order-events")
        .arg("*")
        .arg("userId")
        .arg("poison")
        .arg("price")
        .arg("1")
        .query(&mut conn)
        .expect("XADD poison");

    // While the webhook is held, notification-service holds the entries it
    // read: group_pending shows them, as many as XPENDING says.
    sink.wait_arrived(1, Duration::from_secs(20));
    let mut shown = (0.0, 0);
    wait_until(
        "group_pending of notification-service-group on order-events equals XPENDING, non-zero",
        Duration::from_secs(20),
        || {
            let m = Metrics::of(&notification);
            let metric = m.get(
                "group_pending",
                &[
                    "stream=\"order-events\"",
                    "group=\"notification-service-group\"",
                ],
            );
            let actual = flow::pending(&mut conn, ORDER_EVENTS, NOTIFICATION_GROUP).0;
            shown = (metric.unwrap_or(-1.0), actual);
            metric == Some(actual as f64) && actual > 0
        },
    );
    println!("group_pending while the webhook is held: {shown:?}");
    gate.open();

    // 20 orders notified, 20 payments notified; the failed first attempt
    // comes back after CLAIM_IDLE_MS.
    let notified = 2 * ORDERS;
    sink.wait_accepted(notified, Duration::from_secs(20));

    let m = Metrics::of(&order);
    assert!(
        m.sum("http_requests_total", &["status=\"200\""]) >= ORDERS as f64,
        "{}",
        m.text
    );
    assert!(
        m.sum("http_requests_total", &["status=\"400\""]) >= 1.0,
        "{}",
        m.text
    );
    assert!(
        m.sum("http_requests_total", &["status=\"404\""]) >= 1.0,
        "{}",
        m.text
    );
    assert!(m.has("group_lag") && m.has("group_pending"), "{}", m.text);

    let pay_group = ["stream=\"order-events\"", "group=\"payment-service-group\""];
    wait_until(
        "payment-service counts every order",
        Duration::from_secs(10),
        || {
            let m = Metrics::of(&payment);
            m.sum(
                "events_handled_total",
                &[pay_group[0], pay_group[1], "outcome=\"ok\""],
            ) == ORDERS as f64
                && m.sum("dead_lettered_total", &pay_group) == 1.0
        },
    );
    let m = Metrics::of(&payment);
    assert!(
        m.sum("handler_duration_seconds_count", &pay_group) >= ORDERS as f64,
        "{}",
        m.text
    );
    assert!(m.has("handler_duration_seconds_bucket"), "{}", m.text);
    assert_eq!(
        m.sum("events_handled_total", &["outcome=\"dead_lettered\""]),
        1.0,
        "{}",
        m.text
    );

    let note = ["group=\"notification-service-group\""];
    wait_until(
        "notification-service's groups drained",
        Duration::from_secs(10),
        || {
            let m = Metrics::of(&notification);
            m.sum("group_pending", &note) == 0.0 && m.sum("group_lag", &note) == 0.0
        },
    );
    let m = Metrics::of(&notification);
    assert!(
        m.sum("redeliveries_total", &note) >= 1.0,
        "the failed webhook call: {}",
        m.text
    );
    assert!(
        m.sum(
            "events_handled_total",
            &["stream=\"payment-events\"", "outcome=\"ok\""]
        ) == ORDERS as f64,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum("dead_lettered_total", &note),
        1.0,
        "the poison entry: {}",
        m.text
    );

    // Lag shows unread entries while nobody reads them.
    payment.sigterm();
    payment.wait_exit(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(place(&order, 100 + i), 200);
    }
    let m = Metrics::of(&order);
    assert_eq!(m.sum("group_lag", &pay_group), 3.0, "{}", m.text);

    // A Redis restart: the next order reconnects and is counted.
    let before = Metrics::of(&order).sum("redis_reconnects_total", &[]);
    redis.stop();
    redis.start_again();
    wait_until(
        "an order succeeds after the restart",
        Duration::from_secs(15),
        || place(&order, 200) == 200,
    );
    let after = Metrics::of(&order).sum("redis_reconnects_total", &[]);
    assert!(after > before, "redis_reconnects_total {before} -> {after}");
}

/// The connection payment-service sends its payments on is dropped (an
/// operator's `CLIENT KILL`): the next order is still paid, and
/// `redis_reconnects_total` on payment-service counts the new connection.
#[test]
fn a_dropped_payment_connection_is_reopened_and_counted() {
    let redis = RedisServer::start();
    let payment = start_ready("payment-service", &redis, &[]);
    let mut conn = redis.conn();
    flow::xadd_orders(&mut conn, "drop-pay", 1);
    wait_until("the first order paid", flow::DEADLINE, || {
        flow::xlen(&mut conn, flow::PAYMENT_EVENTS) == 1
    });
    let before = Metrics::of(&payment).sum("redis_reconnects_total", &[]);
    // The connection whose last command was the payment script.
    let killed = flow::kill_clients(&mut conn, |l| l.contains(" cmd=evalsha "));
    assert!(killed > 0, "no connection ran EVALSHA");
    // The next orders are paid: the first finds the connection gone (and
    // is paid on another), the one after goes out on a new connection.
    for n in 2..=3 {
        flow::xadd_orders(&mut conn, &format!("drop-pay-{n}"), 1);
        wait_until("the next order paid", flow::DEADLINE, || {
            flow::xlen(&mut conn, flow::PAYMENT_EVENTS) == n
        });
    }
    wait_until("the reconnect counted", Duration::from_secs(5), || {
        Metrics::of(&payment).sum("redis_reconnects_total", &[]) > before
    });
}

//! "Ordering" (`CONTRACT.md`): the orders of one `userId` are paid and
//! notified in the order they were written. A user places orders in quick
//! succession while several handler threads work on small batches and the
//! webhook receiver takes a moment per call: each user's payments, and each
//! user's notifications, must come in the order of that user's orders.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use crate::support::flow::{
    drained, env, kill_clients, start_ready, xrange, RawEntry, DEADLINE, ORDER_EVENTS,
    PAYMENT_EVENTS, PAYMENT_GROUP,
};
use crate::support::{wait_until, RedisServer, WebhookSink};

const USERS: usize = 5;
const ORDERS: usize = 300;

/// Groups `(user, id)` pairs by user, keeping their order.
fn by_user(items: impl IntoIterator<Item = (String, String)>) -> HashMap<String, Vec<String>> {
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for (user, id) in items {
        map.entry(user).or_default().push(id);
    }
    map
}

/// Writes orders `range` for `users` users (`<prefix>-u<i % users>`), in
/// one pipeline: each user's orders interleaved with the others'.
fn xadd_users(conn: &mut redis::Connection, prefix: &str, range: Range<usize>, users: usize) {
    let mut pipe = redis::pipe();
    for i in range {
        pipe.cmd("XADD")
            .arg(ORDER_EVENTS)
            .arg("*")
            .arg("userId")
            .arg(format!("{prefix}-u{}", i % users))
            .arg("productId")
            .arg(format!("p{i}"))
            .arg("price")
            .arg("9.99");
    }
    let _: Vec<String> = pipe.query(conn).expect("XADD the orders");
}

fn user_of(e: &RawEntry) -> String {
    e.text("userId").unwrap_or_default()
}

/// Waits until payment-service paid everything, checks that there is one
/// payment per order and each user's orders were paid in the order written;
/// returns each user's orders (IDs, in order) and the payments.
fn paid_in_each_users_order(
    conn: &mut redis::Connection,
    orders_written: usize,
    context: &str,
) -> (HashMap<String, Vec<String>>, Vec<RawEntry>) {
    wait_until("every order paid", DEADLINE, || {
        drained(conn, ORDER_EVENTS, PAYMENT_GROUP)
    });
    let orders = xrange(conn, ORDER_EVENTS, "-", "+");
    let payments = xrange(conn, PAYMENT_EVENTS, "-", "+");
    assert_eq!(payments.len(), orders_written, "one payment per order");
    let written = by_user(orders.iter().map(|o| (user_of(o), o.id.clone())));
    let paid = by_user(
        payments
            .iter()
            .map(|p| (user_of(p), p.text("orderId").unwrap_or_default())),
    );
    for (user, ids) in &written {
        assert_eq!(
            paid.get(user),
            Some(ids),
            "{user}'s orders paid out of order{context}"
        );
    }
    (written, payments)
}

#[test]
fn the_orders_of_one_user_are_paid_and_notified_in_the_order_they_were_written() {
    let redis = RedisServer::start();
    let sink = WebhookSink::options()
        .delay(Duration::from_micros(300))
        .start();
    let url = sink.url();
    // Four handler threads taking four entries at a time: plenty of
    // chances for two threads to hold one user's orders at once.
    let consumers = env(&[
        ("HANDLER_THREADS", "4"),
        ("BATCH_SIZE", "4"),
        ("NOTIFY_WEBHOOK_URL", &url),
    ]);
    let _payment = start_ready("payment-service", &redis, &consumers);
    let _notification = start_ready("notification-service", &redis, &consumers);

    let mut conn = redis.conn();
    xadd_users(&mut conn, "ordering", 0..ORDERS, USERS);

    let received = sink.wait_accepted(2 * ORDERS, DEADLINE);
    let (written, payments) = paid_in_each_users_order(&mut conn, ORDERS, "");
    assert_eq!(written.len(), USERS);

    let notified = |kind: &str| {
        by_user(
            received
                .iter()
                .filter(|r| r.accepted() && r.body["kind"] == kind)
                .map(|r| {
                    let user = r.body["userId"].as_str().unwrap_or_default();
                    let id = r.body["eventId"].as_str().unwrap_or_default();
                    (user.to_string(), id.to_string())
                }),
        )
    };
    for (user, ids) in &written {
        assert_eq!(
            notified("order").get(user),
            Some(ids),
            "{user}'s orders notified out of order"
        );
    }
    let payment_ids = by_user(payments.iter().map(|p| (user_of(p), p.id.clone())));
    for (user, ids) in &payment_ids {
        assert_eq!(
            notified("payment").get(user),
            Some(ids),
            "{user}'s payments notified out of order"
        );
    }
}

/// The same promise while Redis drops every client connection again and
/// again (`CLIENT KILL ID`, payment-service's) as orders come in: payments are
/// handled again after each drop, and still each user's come in order.
#[test]
fn dropped_connections_do_not_reorder_a_users_payments() {
    const ORDERS: usize = 600;
    let redis = RedisServer::start();
    let _payment = start_ready("payment-service", &redis, &env(&[("BATCH_SIZE", "8")]));
    let mut conn = redis.conn();
    let feeder_id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query(&mut conn)
        .expect("CLIENT ID");
    let feeder = std::thread::spawn(move || {
        for chunk in 0..ORDERS / 20 {
            xadd_users(&mut conn, "drops", chunk * 20..(chunk + 1) * 20, 3);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    // Every connection but the test's own: payment-service's.
    let feeder_line = format!("id={feeder_id} ");
    let mut killer = redis.conn();
    let mut killed = 0;
    while !feeder.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        killed += kill_clients(&mut killer, |l| !l.starts_with(&feeder_line));
    }
    feeder.join().expect("the feeder");
    assert!(killed > 0, "no connection was dropped");

    let mut conn = redis.conn();
    let context = format!(" ({killed} connections dropped)");
    paid_in_each_users_order(&mut conn, ORDERS, &context);
}

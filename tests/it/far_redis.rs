//! Redis a WAN link away (issue 14): an order costs one round trip to
//! Redis, however many orders are already on their way, and the consumers
//! follow the stream without waiting for each read to cross the link.
//!
//! Redis sits behind the load tool's delay proxy (this kernel has no
//! `netem`), with a round trip long enough (400 ms) that a loaded CI
//! machine's scheduling noise is small beside it.

use std::time::{Duration, Instant};

use crate::support::flow::{order_fields, start_ready, xlen, ORDER_EVENTS, PAYMENT_EVENTS};
use crate::support::{order_path, wait_for, wait_until, RedisServer};
use testkit::stream::read_reply_entries;

#[path = "../../benches/load/delay.rs"]
#[allow(dead_code)]
mod delay;

const RTT: Duration = Duration::from_millis(400);

fn far_url(redis: &RedisServer) -> (delay::DelayProxy, String) {
    let upstream = format!("127.0.0.1:{}", redis.port())
        .parse()
        .expect("an address");
    let proxy = delay::DelayProxy::start(upstream, RTT).expect("the delay proxy starts");
    let url = format!("redis://{}", proxy.addr);
    (proxy, url)
}

#[test]
fn orders_sent_while_others_are_on_their_way_each_wait_one_round_trip() {
    let redis = RedisServer::start();
    let (_proxy, url) = far_url(&redis);
    let order = start_ready("order-service", &redis, &[("REDIS_URL", &url)]);
    // Connected and warm: the first order opens the connection.
    wait_for(
        "a first order through the far link",
        Duration::from_secs(20),
        || (order.get(&order_path("warm", "p", "1")).status == 200).then_some(()),
    );

    // Eight clients, one order each, 50 ms apart: when the third starts,
    // two batches are already on their way. With two connections each
    // waiting for its reply (before issue 14), it waited for one of them
    // to come back first: nearly two round trips.
    let started = Instant::now();
    let took: Vec<(usize, Duration, u16)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let order = &order;
                s.spawn(move || {
                    let start_at = started + Duration::from_millis(50 * i as u64);
                    std::thread::sleep(start_at.saturating_duration_since(Instant::now()));
                    let sent = Instant::now();
                    let status = order.get(&order_path(&format!("far-{i}"), "p", "1")).status;
                    (i, sent.elapsed(), status)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a client thread"))
            .collect()
    });
    for (i, elapsed, status) in &took {
        assert_eq!(*status, 200, "order {i} was answered {status}");
        // One round trip, plus room for a loaded machine; two would be 800.
        assert!(
            *elapsed < RTT * 3 / 2,
            "order {i} took {elapsed:?} with Redis {RTT:?} away: it waited for \
             earlier batches, not only for its own round trip (all: {took:?})"
        );
    }
}

/// payment-service with Redis far away, one handler thread, orders every
/// 150 ms: before issue 14 the thread sent a batch, waited a round trip for
/// its reply, then sent what had queued meanwhile, so an order could wait
/// nearly a round trip before its own round trip began (up to 2 RTT from
/// order to payment). Now each batch is sent as soon as it is read, while
/// the batches before it are still on their way: an order is paid one round
/// trip after it was read.
#[test]
fn orders_read_while_payments_are_on_their_way_are_paid_without_waiting_for_them() {
    // Fewer than READ_AHEAD orders per round trip, so that the readers
    // keep a read waiting at Redis and what is measured is the handling.
    const ORDERS: usize = 24;
    const EVERY: Duration = Duration::from_millis(150);
    let redis = RedisServer::start();
    let (_proxy, url) = far_url(&redis);
    let _payment = start_ready(
        "payment-service",
        &redis,
        &[("REDIS_URL", &url), ("HANDLER_THREADS", "1")],
    );
    let mut conn = redis.conn();
    // Warm: past its start (own pending entries, over the far link) and
    // reading new entries.
    crate::support::flow::xadd_orders(&mut conn, "far-warm", 1);
    wait_until("a first order paid", Duration::from_secs(30), || {
        xlen(&mut conn, PAYMENT_EVENTS) == 1
    });
    let mut watcher = redis.conn();
    let stop = std::sync::atomic::AtomicBool::new(false);

    let (written, seen) = std::thread::scope(|s| {
        // Watches payment-events, next to Redis: when each payment appears.
        let watch = s.spawn(|| {
            let mut seen = std::collections::HashMap::new();
            let mut last = "$".to_string();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply: redis::Value = redis::cmd("XREAD")
                    .arg("BLOCK")
                    .arg(50)
                    .arg("STREAMS")
                    .arg(PAYMENT_EVENTS)
                    .arg(&last)
                    .query(&mut watcher)
                    .expect("XREAD payment-events");
                let at = Instant::now();
                for e in read_reply_entries(&reply) {
                    seen.insert(e.text("orderId").unwrap_or_default(), at);
                    last = e.id;
                }
            }
            seen
        });
        // Let the watcher's first read reach Redis.
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        let mut written = Vec::new();
        for i in 0..ORDERS {
            let at = started + EVERY * i as u32;
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            let fields = order_fields("far-pay", i);
            let mut cmd = redis::cmd("XADD");
            cmd.arg(ORDER_EVENTS).arg("*");
            for (k, v) in &fields {
                cmd.arg(*k).arg(v);
            }
            let sent = Instant::now();
            let id: String = cmd.query(&mut conn).expect("XADD an order");
            written.push((id, sent));
        }
        wait_until("every order paid", Duration::from_secs(30), || {
            xlen(&mut conn, PAYMENT_EVENTS) > ORDERS
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (written, watch.join().expect("the watcher"))
    });

    // The first half warms the readers up (reads kept outstanding once
    // entries keep coming); after it, each order is paid one round trip
    // after it was read: 1 to 1.25 RTT. 1.5 leaves room for a loaded host.
    let took: Vec<Duration> = written[ORDERS / 2..]
        .iter()
        .map(|(id, sent)| {
            let paid = seen
                .get(id)
                .unwrap_or_else(|| panic!("no payment seen for {id}"));
            paid.duration_since(*sent)
        })
        .collect();
    for (t, (id, _)) in took.iter().zip(&written[ORDERS / 2..]) {
        assert!(
            *t < RTT * 3 / 2,
            "order {id} was paid {t:?} after it was written, Redis {RTT:?} away: \
             it waited for earlier payments (all: {took:?})"
        );
    }
}

/// A backlog (payment-service was down while orders came in) with Redis
/// far away: each read crossing the link brings as much as the handlers can
/// take, not one batch, so the backlog drains in a few round trips. Before,
/// every read brought `BATCH_SIZE` (64) entries and 3,000 orders took about
/// twelve round trips.
#[test]
fn a_backlog_behind_a_far_link_is_read_in_a_few_round_trips() {
    const ORDERS: usize = 3000;
    let redis = RedisServer::start();
    let (_proxy, url) = far_url(&redis);
    let mut conn = redis.conn();
    crate::support::flow::xadd_orders(&mut conn, "far-backlog", ORDERS);
    let _payment = start_ready("payment-service", &redis, &[("REDIS_URL", &url)]);
    wait_until("a first payment", Duration::from_secs(30), || {
        xlen(&mut conn, PAYMENT_EVENTS) > 0
    });
    let first = Instant::now();
    wait_until("every order paid", Duration::from_secs(60), || {
        xlen(&mut conn, PAYMENT_EVENTS) >= ORDERS
    });
    let took = first.elapsed();
    assert!(
        took < RTT * 6,
        "the backlog took {took:?} to drain after the first payment, Redis {RTT:?} away: \
         more than six round trips"
    );
}

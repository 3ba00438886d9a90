//! Promises of the README ("Guarantees", "Security") that had no test
//! (issue 11), each told as what a user or operator would see. Backlogs and
//! slow parts are held by the test (a gated webhook, SIGSTOP, a frozen
//! proxy), never paced by sleeps.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::flow::{
    drained, env, group, pending_entries, start_ready, unread, xadd_orders, xlen, xrange, Ledger,
    DEADLINE, NOTIFICATION_GROUP, ORDER_EVENTS, PAYMENT_EVENTS, PAYMENT_GROUP,
};
use crate::support::secure::Certs;
use crate::support::{raw_request, wait_for, wait_until, Gate, RedisServer, Service, WebhookSink};

/// "A crash between a webhook call and the acknowledgement repeats the
/// call with the same `Idempotency-Key`": notification-service is
/// SIGKILLed while its call is held at the receiver, which then answers
/// 200 (it did get the notification). Restarted under the same name, it
/// calls again with the same key, and acknowledges.
#[test]
fn a_crash_between_webhook_call_and_ack_repeats_the_call_with_the_same_key() {
    let redis = RedisServer::start();
    let gate = Gate::closed();
    let sink = WebhookSink::options().gate(&gate).start();
    let url = sink.url();
    let mut notification = start_ready(
        "notification-service",
        &redis,
        &env(&[
            ("CONSUMER_NAME", "notify-crash"),
            ("NOTIFY_WEBHOOK_URL", &url),
            ("WEBHOOK_TIMEOUT_MS", "60000"),
        ]),
    );
    let mut conn = redis.conn();
    let id = xadd_orders(&mut conn, "crash", 1).remove(0);
    sink.wait_arrived(1, DEADLINE);
    notification.sigkill();
    // The receiver handles the call the dead process made.
    gate.open();
    sink.wait_accepted(1, DEADLINE);
    assert_eq!(
        pending_entries(&mut conn, ORDER_EVENTS, NOTIFICATION_GROUP, "notify-crash").len(),
        1,
        "the entry stays pending: it was never acknowledged"
    );

    notification.restart();
    notification.wait_ready();
    let received = sink.wait_accepted(2, DEADLINE);
    wait_until("the entry acknowledged", DEADLINE, || {
        drained(&mut conn, ORDER_EVENTS, NOTIFICATION_GROUP)
    });
    let key = format!("{ORDER_EVENTS}:{id}");
    let calls: Vec<_> = received
        .iter()
        .filter(|r| r.body["eventId"] == id.as_str())
        .collect();
    assert_eq!(
        calls.len(),
        2,
        "one call before the crash, one after: {received:#?}"
    );
    for r in &calls {
        assert_eq!(r.idempotency_key.as_deref(), Some(key.as_str()), "{r:?}");
        assert_eq!(r.body["kind"], "order", "{r:?}");
    }
    assert_eq!(
        calls[0].raw, calls[1].raw,
        "the repeat is the same notification"
    );
}

/// "Writing the payment and acknowledging the order is one Lua script,
/// which skips orders that are no longer pending": instance A is frozen
/// (SIGSTOP) with orders in hand; B claims them after `CLAIM_IDLE_MS` and
/// pays them; A, resumed, finds them paid and writes nothing.
#[test]
fn a_resumed_instance_skips_the_orders_another_has_claimed_and_paid() {
    const ORDERS: usize = 400;
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let mut a = start_ready(
        "payment-service",
        &redis,
        &env(&[
            ("CONSUMER_NAME", "pay-stopped"),
            ("CLAIM_IDLE_MS", "600000"),
            ("BATCH_SIZE", "4"),
            ("HANDLER_THREADS", "1"),
            ("RUST_LOG", "info,streamline::services::payment=debug"),
        ]),
    );
    xadd_orders(&mut conn, "skip", ORDERS);
    // Frozen at a moment it holds entries (each try: stop, look, go on).
    let held = wait_for("pay-stopped frozen with orders in hand", DEADLINE, || {
        a.sigstop();
        let held = pending_entries(&mut conn, ORDER_EVENTS, PAYMENT_GROUP, "pay-stopped");
        if held.is_empty() {
            a.sigcont();
            return None;
        }
        Some(held)
    });
    let b = start_ready(
        "payment-service",
        &redis,
        &env(&[("CONSUMER_NAME", "pay-live"), ("CLAIM_IDLE_MS", "500")]),
    );
    wait_until("pay-live claimed and paid everything", DEADLINE, || {
        drained(&mut conn, ORDER_EVENTS, PAYMENT_GROUP) && xlen(&mut conn, PAYMENT_EVENTS) >= ORDERS
    });
    a.sigcont();
    // A goes on with the orders it had read: those B paid meanwhile are
    // skipped, not paid again. (An order whose payment A had already sent
    // when it froze is A's own payment: the PEL read above can race with
    // it, so not every held order must be skipped, but the ledger below
    // must still be exactly once.)
    let skipped = wait_for("pay-stopped skipped an order B had paid", DEADLINE, || {
        let log = a.log();
        let n = held
            .iter()
            .filter(|(id, _)| log.contains(&format!("order {id} was already paid")))
            .count();
        (n > 0).then_some(n)
    });
    wait_until("everything settled after the resume", DEADLINE, || {
        drained(&mut conn, ORDER_EVENTS, PAYMENT_GROUP)
    });
    let orders = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    let payments = xrange(&mut conn, PAYMENT_EVENTS, "-", "+");
    let ledger = Ledger::of(&orders, &payments);
    assert!(ledger.exactly_once(), "{ledger}");
    let alive = a.is_running();
    a.check(alive, || "pay-stopped died after SIGCONT".into());
    drop(b);
    println!(
        "held_by_stopped={} skipped_after_resume={skipped} {ledger}",
        held.len()
    );
}

/// "`XADD ... NOMKSTREAM` never creates the stream": after `FLUSHALL`,
/// order-service alone (no consumer to repair anything) recreates the
/// groups before it writes, so the first order after the flush is seen by
/// every group.
#[test]
fn after_flushall_order_service_alone_recreates_the_groups_before_writing() {
    let redis = RedisServer::start();
    let order = start_ready("order-service", &redis, &[("TRIM_INTERVAL_MS", "0")]);
    order.expect_status(&order.get("/order?userId=u0&productId=p&price=1"), 200);
    let mut conn = redis.conn();
    let _: () = redis::cmd("FLUSHALL").query(&mut conn).expect("FLUSHALL");
    let resp = order.get("/order?userId=u1&productId=p&price=1");
    order.expect_status(&resp, 200);
    let id = resp.json_str("orderId").expect("orderId").to_string();
    let entries = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    assert_eq!(
        entries.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()],
        "the new order alone in the recreated stream"
    );
    for g in [PAYMENT_GROUP, NOTIFICATION_GROUP] {
        assert!(
            group(&mut conn, ORDER_EVENTS, g).is_some(),
            "{g} exists after the first order"
        );
        assert_eq!(
            unread(&mut conn, ORDER_EVENTS, g),
            Some(1),
            "{g} will read the order written after the flush"
        );
    }
}

/// payment-service pays 5 orders; then `payment-service-group` is destroyed
/// (the stream stays, so only `NOGROUP` tells) and recreated by the service.
fn five_paid_then_group_destroyed() -> (RedisServer, Service) {
    let redis = RedisServer::start();
    let payment = start_ready("payment-service", &redis, &env(&[]));
    let mut conn = redis.conn();
    xadd_orders(&mut conn, "before", 5);
    wait_until("the first orders paid", DEADLINE, || {
        xlen(&mut conn, PAYMENT_EVENTS) == 5 && drained(&mut conn, ORDER_EVENTS, PAYMENT_GROUP)
    });
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(ORDER_EVENTS)
        .arg(PAYMENT_GROUP)
        .query(&mut conn)
        .expect("XGROUP DESTROY");
    wait_until("payment-service-group exists again", DEADLINE, || {
        group(&mut conn, ORDER_EVENTS, PAYMENT_GROUP).is_some()
    });
    (redis, payment)
}

/// "...and again when Redis answers `NOGROUP`": the group is destroyed
/// while the stream stays (so only `NOGROUP` tells). payment-service
/// recreates it and pays the orders written afterwards.
#[test]
fn a_destroyed_group_is_recreated_and_new_orders_are_paid() {
    let (redis, _payment) = five_paid_then_group_destroyed();
    let mut conn = redis.conn();
    let after = crate::support::flow::xadd_orders_range(&mut conn, "after", 0..5);
    wait_until("the orders after the destroy paid", DEADLINE, || {
        let payments = xrange(&mut conn, PAYMENT_EVENTS, "-", "+");
        after.iter().all(|id| {
            payments
                .iter()
                .any(|p| p.text("orderId").as_deref() == Some(id.as_str()))
        })
    });
}

/// The same, and no order paid before the destroy is paid again: exactly
/// one payment per order.
#[test]
fn a_destroyed_group_does_not_pay_earlier_orders_again() {
    let (redis, _payment) = five_paid_then_group_destroyed();
    let mut conn = redis.conn();
    crate::support::flow::xadd_orders_range(&mut conn, "after", 0..5);
    wait_until("everything paid", DEADLINE, || {
        drained(&mut conn, ORDER_EVENTS, PAYMENT_GROUP) && xlen(&mut conn, PAYMENT_EVENTS) >= 10
    });
    let ledger = Ledger::of(
        &xrange(&mut conn, ORDER_EVENTS, "-", "+"),
        &xrange(&mut conn, PAYMENT_EVENTS, "-", "+"),
    );
    assert!(ledger.exactly_once(), "{ledger}");
}

/// The README's "a 10 s deadline ... for its body": a client that sends a
/// head announcing 100 bytes, then 10 of them, then nothing, loses its
/// connection about 10 s after it opened it (not much sooner: the deadline
/// is the documented one; not much later). Nothing is written.
#[test]
fn a_body_that_never_completes_is_cut_at_the_10_s_deadline() {
    const DEADLINE_S: Duration = Duration::from_secs(10);
    let redis = RedisServer::start();
    let order = start_ready("order-service", &redis, &[]);
    let opened = Instant::now();
    let mut s = TcpStream::connect(order.addr()).expect("connect");
    s.write_all(
        b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"userId\":",
    )
    .expect("send the head and 10 bytes");
    s.set_read_timeout(Some(DEADLINE_S * 3))
        .expect("read timeout");
    let mut answer = Vec::new();
    let read = s.read_to_end(&mut answer);
    let closed_after = opened.elapsed();
    order.check(
        !matches!(&read, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        || format!("still open after {closed_after:?}"),
    );
    order.check(
        closed_after >= DEADLINE_S - Duration::from_secs(1)
            && closed_after < DEADLINE_S + Duration::from_secs(5),
        || {
            format!(
                "connection closed after {closed_after:?}, expected about {DEADLINE_S:?}: {:?}",
                String::from_utf8_lossy(&answer)
            )
        },
    );
    let mut conn = redis.conn();
    assert_eq!(xlen(&mut conn, ORDER_EVENTS), 0, "nothing written");
    println!("slow body cut after {closed_after:?}");
}

/// The README's "100 headers (`431`)": a head of exactly 100 header lines
/// is served, one of 101 is refused with `431`.
#[test]
fn a_head_of_101_headers_is_refused_with_431_and_100_are_served() {
    let redis = RedisServer::start();
    let order = start_ready("order-service", &redis, &[]);
    let head = |headers: usize| {
        let mut h = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        for i in 2..headers {
            h.push_str(&format!("X-Filler-{i}: {i}\r\n"));
        }
        h.push_str("\r\n");
        h
    };
    let at_limit =
        raw_request(order.addr(), head(100).as_bytes()).unwrap_or_else(|e| order.fail(e));
    order.expect_status(&at_limit, 200);
    let over = raw_request(order.addr(), head(101).as_bytes()).unwrap_or_else(|e| order.fail(e));
    order.expect_status(&over, 431);
    order.check(over.json.is_some(), || {
        format!("431 with a JSON error: {over}")
    });
}

/// "There is no way to switch verification off": a `rediss://` URL that
/// asks the client library to skip it (`#insecure`) against a server whose
/// certificate does not verify connects to nothing: the service refuses
/// the URL, or stays unready and `/readyz` says why (today: the client
/// library is built without its insecure mode); orders get 503; nothing
/// reaches Redis.
#[test]
fn a_rediss_url_asking_to_skip_verification_is_refused() {
    let certs = Certs::generate();
    let redis = RedisServer::options()
        .tls(&certs.cert(), &certs.key(), &certs.ca())
        .start();
    let url = format!("{}/#insecure", redis.url());
    let mut svc = Service::spawn_env("order-service", &[("REDIS_URL", url.as_str())], &[]);
    // Either it exits at once (a bad configuration), or it runs and says
    // why it is not ready.
    let outcome = wait_for("order-service refuses or reports", DEADLINE, || {
        if !svc.is_running() {
            return Some(None);
        }
        let ready = crate::support::request("GET", &svc.url("/readyz"), &[], None).ok()?;
        svc.check(ready.status != 200, || {
            format!("ready with verification off: {ready}")
        });
        let body = ready.body.to_lowercase();
        let says_why = body.contains("insecure") || body.contains("certificate");
        (ready.status == 503 && says_why).then_some(Some(ready))
    });
    match outcome {
        None => {
            let status = svc.wait_exit(Duration::from_secs(5));
            svc.check(status.code() == Some(2), || {
                format!("refused with exit status {status}, the README says 2")
            });
            svc.check(svc.log().contains("REDIS_URL"), || {
                "the refusal names REDIS_URL".into()
            });
        }
        Some(ready) => {
            let resp = svc.get("/order?userId=u&productId=p&price=1");
            svc.expect_status(&resp, 503);
            println!("refused: {ready}");
        }
    }
    let mut conn = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(keys.is_empty(), "nothing may reach Redis: {keys:?}");
}

/// The README's "at most 256 connections (the one that waited longest for
/// its client is evicted)": 256 idle connections, then one more that
/// sends an order. The order is served, the first connection is closed by
/// the server, the other 255 stay open.
#[test]
fn at_the_connection_cap_the_longest_waiting_connection_is_evicted() {
    const CAP: usize = crate::security::MAX_CONNECTIONS;
    let redis = RedisServer::start();
    let order = start_ready("order-service", &redis, &[]);
    let mut idle: Vec<TcpStream> = (0..CAP)
        .map(|i| {
            let s = TcpStream::connect(order.addr())
                .unwrap_or_else(|e| order.fail(format!("connection {i}: {e}")));
            s
        })
        .collect();
    let resp = raw_request(
        order.addr(),
        b"GET /order?userId=cap&productId=p&price=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap_or_else(|e| order.fail(e));
    order.expect_status(&resp, 200);

    // The oldest is closed by the server: end of stream or a reset.
    idle[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    let first = idle[0].read(&mut buf);
    order.check(
        matches!(first, Ok(0)) || matches!(&first, Err(e) if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        || format!("the longest-waiting connection was not evicted: {first:?}"),
    );
    // The others are still open.
    let mut closed = Vec::new();
    for (i, s) in idle.iter_mut().enumerate().skip(1) {
        s.set_nonblocking(true).expect("nonblocking");
        match s.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => closed.push(format!("{i}: {other:?}")),
        }
    }
    order.check(closed.is_empty(), || {
        format!("newer connections were closed instead: {closed:?}")
    });
}

/// "Faults are not failures", and a pause is not even a fault: a consumer
/// frozen (SIGSTOP, as a debugger or an overloaded host does) and thawed
/// while blocked reading keeps its Redis connection; no reconnect, no lost
/// connection in the log, and it goes on paying.
#[test]
#[ignore = "kept as a reconnect on purpose: after SIGCONT a read with SO_RCVTIMEO fails with EINTR, possibly in the middle of a reply, and redis-rs cannot then promise its parser is in step; a new connection (not counted as a failure, own pending re-read) is the safe answer"]
fn a_consumer_stopped_and_continued_keeps_its_connection() {
    let redis = RedisServer::start();
    let payment = start_ready(
        "payment-service",
        &redis,
        &env(&[("BLOCK_MS", "1000"), ("CONSUMER_NAME", "pay-paused")]),
    );
    let mut conn = redis.conn();
    xadd_orders(&mut conn, "first", 1);
    wait_until("the first order paid", DEADLINE, || {
        xlen(&mut conn, PAYMENT_EVENTS) == 1
    });
    let reconnects =
        |svc: &Service| crate::support::flow::Metrics::of(svc).sum("redis_reconnects_total", &[]);
    let before = reconnects(&payment);
    for _ in 0..5 {
        payment.sigstop();
        payment.sigcont();
    }
    crate::support::flow::xadd_orders_range(&mut conn, "second", 0..1);
    wait_until("the order written after SIGCONT paid", DEADLINE, || {
        xlen(&mut conn, PAYMENT_EVENTS) == 2
    });
    let after = reconnects(&payment);
    let lost = payment.log().contains("lost the Redis connection");
    payment.check(after == before && !lost, || {
        format!("SIGSTOP/SIGCONT cost a connection: redis_reconnects_total {before} -> {after}, lost-connection line in the log: {lost}")
    });
}

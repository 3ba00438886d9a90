//! A fourth service written on the library: `examples/shipping_service.rs`
//! reads `payment-events` in its own group and books a shipment per paid
//! order with a carrier. Orders go in through order-service and
//! payment-service, as in production; the carrier is a webhook sink.

use std::collections::{BTreeMap, BTreeSet};

use crate::support::flow::{drained, env, http_orders, start_ready, DEADLINE, PAYMENT_EVENTS};
use crate::support::{wait_until, RedisServer, Service, WebhookSink};

const SHIPPING_GROUP: &str = "shipping-service-group";
const PAYMENT_DLQ: &str = "payment-events:dlq";

/// The example, ready, booking shipments with `carrier`.
fn shipping_service(redis: &RedisServer, carrier: &WebhookSink, extra: &[(&str, &str)]) -> Service {
    let url = carrier.url();
    let mut vars = env(&[("CARRIER_URL", url.as_str())]);
    vars.extend_from_slice(extra);
    let mut svc = Service::spawn("shipping_service", redis, &vars);
    svc.wait_ready();
    svc.wait_readyz();
    svc
}

#[test]
fn the_shipping_example_ships_each_paid_order_once_and_acknowledges_it() {
    let redis = RedisServer::start();
    let carrier = WebhookSink::start();
    let shipping = shipping_service(&redis, &carrier, &[]);
    let _payment = start_ready("payment-service", &redis, &env(&[]));
    let order = start_ready("order-service", &redis, &[]);

    let orders = http_orders(&order, "ship", 20, 4);
    carrier.wait_accepted(orders.len(), DEADLINE);
    let mut conn = redis.conn();
    wait_until(
        "shipping-service-group has acknowledged every payment",
        DEADLINE,
        || drained(&mut conn, PAYMENT_EVENTS, SHIPPING_GROUP),
    );

    let payments = redis.entries(PAYMENT_EVENTS);
    assert_eq!(payments.len(), orders.len(), "one payment per order");
    let mut calls: BTreeMap<String, usize> = BTreeMap::new();
    for r in carrier.received() {
        *calls
            .entry(r.idempotency_key.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let expected: BTreeSet<String> = payments
        .iter()
        .map(|p| format!("{PAYMENT_EVENTS}:{}", p.id))
        .collect();
    assert_eq!(
        calls.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "one carrier call per payment, keyed by its entry"
    );
    assert!(
        calls.values().all(|&n| n == 1),
        "each payment shipped once: {calls:?}\n{}",
        shipping.log()
    );
    let shipped: BTreeSet<String> = carrier
        .received()
        .iter()
        .filter_map(|r| r.body["orderId"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        shipped,
        orders.iter().cloned().collect::<BTreeSet<_>>(),
        "every order shipped"
    );
}

#[test]
fn a_carrier_that_keeps_failing_dead_letters_the_payment_after_max_deliveries() {
    let redis = RedisServer::start();
    let carrier = WebhookSink::options().fail_when(|_| true).start();
    let shipping = shipping_service(&redis, &carrier, &[("MAX_DELIVERIES", "2")]);
    let _payment = start_ready("payment-service", &redis, &env(&[]));
    let order = start_ready("order-service", &redis, &[]);

    http_orders(&order, "lost", 1, 1);
    let mut conn = redis.conn();
    wait_until(
        "the payment is dead-lettered by shipping-service-group",
        DEADLINE,
        || {
            redis
                .entries(PAYMENT_DLQ)
                .iter()
                .any(|l| l.get("group") == Some(SHIPPING_GROUP))
        },
    );
    wait_until(
        "shipping-service-group has nothing pending",
        DEADLINE,
        || drained(&mut conn, PAYMENT_EVENTS, SHIPPING_GROUP),
    );

    let payment = &redis.entries(PAYMENT_EVENTS)[0];
    let letters = redis.entries(PAYMENT_DLQ);
    assert_eq!(letters.len(), 1, "one dead letter: {letters:?}");
    assert_eq!(letters[0].get("originalId"), Some(payment.id.as_str()));
    assert!(
        letters[0]
            .get("error")
            .is_some_and(|e| e.contains("carrier answered 500")),
        "the dead letter says why: {letters:?}"
    );
    assert_eq!(
        carrier.received().len(),
        2,
        "tried MAX_DELIVERIES times, then dead-lettered\n{}",
        shipping.log()
    );
}

//! Property tests ("fuzzing" with proptest) on everything that takes bytes
//! from outside: a request target through query decoding and validation,
//! a `POST /orders` body through JSON parsing and validation, raw bytes
//! thrown at a live order-service, and a stream entry's raw fields through
//! the consumers' decoding and the dead-letter format. The consumers' reply
//! parsing has its own properties next to it (`src/consumer.rs`).
//!
//! `cargo test` makes a short run (256 cases each, a few seconds). For a
//! long one, set `PROPTEST_CASES`:
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test --release --test it fuzz
//! PROPTEST_CASES=100000 cargo test --release --lib -- properties
//! ```
//!
//! A failure prints the smallest input found; proptest also saves it
//! under `proptest-regressions/` so the next run tries it first.

use proptest::prelude::*;

use streamline::dlq::split_fields;
use streamline::http::{path, query};
use streamline::record::{Fields, Order, Payment};
use streamline::services::order::order_from_json;

/// 256 cases, or `PROPTEST_CASES` when set.
fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 256;
    }
    config
}

/// What the contract says an identifier may be, written independently of
/// `src/record.rs`: 1 to 128 bytes, no control character.
fn valid_text(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control)
}

/// A price: 1 to 12 digits, optionally a point and 1 to 8 digits.
fn valid_price(s: &str) -> bool {
    let (int, frac) = s.split_once('.').map_or((s, None), |(i, f)| (i, Some(f)));
    let digits =
        |d: &str, max: usize| (1..=max).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit());
    digits(int, 12) && frac.is_none_or(|f| digits(f, 8))
}

use crate::support::flow::README_META_FIELDS;

/// Whether an order of these fields is valid, by the rules above.
fn valid_order(user: &str, product: &str, price: &str) -> bool {
    valid_text(user) && valid_text(product) && valid_price(price)
}

/// Text that is often near the rules' edges: control characters, lengths
/// around 128, digits and points, multi-byte characters.
fn edgy_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9.]{0,24}",
        "[a-z\\x00-\\x1f\\x7f\\u{80}-\\u{9f}é用]{0,8}",
        (120usize..136, any::<char>()).prop_map(|(n, c)| {
            let mut s = "u".repeat(n);
            if c.is_control() {
                s.insert(n / 2, c);
            }
            s
        }),
    ]
}

/// Percent-encodes every byte.
fn encode_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

proptest! {
    #![proptest_config(config())]

    /// Validation accepts exactly what the rules allow, and names the
    /// field it refuses.
    #[test]
    fn orders_are_accepted_exactly_when_every_field_is_valid(
        user in edgy_text(),
        product in edgy_text(),
        price in edgy_text(),
    ) {
        let expected = valid_text(&user) && valid_text(&product) && valid_price(&price);
        match Order::new(user.clone(), product.clone(), price.clone()) {
            Ok(order) => {
                prop_assert!(expected, "accepted {user:?} {product:?} {price:?}");
                prop_assert_eq!(order.fields(), [
                    ("userId", user.as_str()),
                    ("productId", product.as_str()),
                    ("price", price.as_str()),
                ]);
            }
            Err(e) => {
                prop_assert!(!expected, "refused a valid order: {e}");
                prop_assert!(["userId", "productId", "price"].contains(&e.field));
                prop_assert!(e.to_string().starts_with(e.field));
            }
        }
    }

    /// Any request target decodes without panicking, and what it decodes
    /// to is validated by the same rules; an encoded value comes back
    /// exactly.
    #[test]
    fn request_targets_decode_and_validate(
        raw in "[ -~]{0,80}",
        user in edgy_text(),
    ) {
        let _ = path(&raw);
        if let Ok(q) = query(&raw) {
            let get = |k: &str| q.get(k).cloned().unwrap_or_default();
            let (u, p, price) = (get("userId"), get("productId"), get("price"));
            prop_assert_eq!(
                Order::new(u.clone(), p.clone(), price.clone()).is_ok(),
                valid_order(&u, &p, &price),
                "{:?} decoded to {:?} {:?} {:?}", raw, u, p, price
            );
        }
        let url = format!("/order?userId={}&productId=p&price=1", encode_all(&user));
        let q = query(&url).expect("UTF-8 text, percent-encoded, decodes");
        prop_assert_eq!(&q["userId"], &user);
        prop_assert_eq!(
            Order::new(q["userId"].clone(), "p".into(), "1".into()).is_ok(),
            valid_text(&user)
        );
    }

    /// Any `POST /orders` body, JSON or not: never a panic, only valid
    /// orders come out, and a refusal says what is wrong.
    #[test]
    fn order_bodies_yield_valid_orders_or_a_reason(
        user in edgy_text(),
        product in edgy_text(),
        price in prop_oneof![edgy_text().prop_map(serde_json::Value::String), any::<f64>().prop_map(|f| serde_json::json!(f)), any::<i64>().prop_map(|i| serde_json::json!(i))],
        junk in proptest::collection::vec(any::<u8>(), 0..64),
        cut in any::<usize>(),
    ) {
        // A price given as a string or a non-negative integer is valid
        // exactly when its text is; other numbers are not judged here.
        let price_text = match &price {
            serde_json::Value::String(p) => Some(p.clone()),
            serde_json::Value::Number(n) if n.is_i64() => Some(n.to_string()),
            _ => None,
        };
        let body = serde_json::json!({"userId": user, "productId": product, "price": price}).to_string();
        match order_from_json(body.as_bytes()) {
            Ok(order) => {
                prop_assert!(valid_text(&order.user_id) && valid_text(&order.product_id));
                prop_assert!(valid_price(&order.price));
                prop_assert_eq!(&order.user_id, &user);
            }
            Err(e) => {
                prop_assert!(!e.is_empty());
                if let Some(p) = &price_text {
                    prop_assert!(!valid_order(&user, &product, p), "refused a valid order {}: {}", body, e);
                }
            }
        }
        let mut raw = body.into_bytes();
        let at = cut % (raw.len() + 1);
        raw.splice(at..at, junk);
        if let Ok(order) = order_from_json(&raw) {
            prop_assert!(valid_text(&order.user_id) && valid_text(&order.product_id));
            prop_assert!(valid_price(&order.price));
        }
    }

    /// Any entry a consumer may read (any field names, any bytes) decodes
    /// to a valid order or payment, or to an error naming a field; never
    /// a panic.
    #[test]
    fn stream_entries_decode_to_valid_records_or_a_named_error(
        pairs in proptest::collection::vec(
            (
                prop_oneof![
                    Just(b"userId".to_vec()),
                    Just(b"productId".to_vec()),
                    Just(b"price".to_vec()),
                    Just(b"paymentProcessId".to_vec()),
                    Just(b"orderId".to_vec()),
                    proptest::collection::vec(any::<u8>(), 0..8),
                ],
                prop_oneof![
                    edgy_text().prop_map(String::into_bytes),
                    proptest::collection::vec(any::<u8>(), 0..140),
                ],
            ),
            0..8,
        ),
    ) {
        let fields = Fields(pairs);
        let text = |k: &str| fields.get(k).and_then(|v| std::str::from_utf8(v).ok());
        let expect_order = matches!(
            (text("userId"), text("productId"), text("price")),
            (Some(u), Some(p), Some(price)) if valid_order(u, p, price)
        );
        prop_assert_eq!(Order::from_fields(&fields).is_ok(), expect_order, "{:?}", fields.0);
        match Order::from_fields(&fields) {
            Ok(o) => {
                prop_assert!(valid_text(&o.user_id) && valid_text(&o.product_id));
                prop_assert!(valid_price(&o.price));
                prop_assert_eq!(fields.get("userId"), Some(o.user_id.as_bytes()));
            }
            Err(e) => prop_assert!(e.to_string().starts_with(e.field)),
        }
        match Payment::from_fields(&fields) {
            Ok(p) => {
                prop_assert!(valid_text(&p.user_id) && valid_text(&p.payment_process_id));
                prop_assert!(p.order_id.as_deref().is_none_or(valid_text));
            }
            Err(e) => prop_assert!(e.to_string().starts_with(e.field)),
        }
    }

    /// A dead letter's original fields come back exactly, whatever they
    /// were named (even like the metadata).
    #[test]
    fn dead_letters_split_back_into_their_original_fields(
        original in proptest::collection::vec(
            (
                prop_oneof![
                    Just(b"error".to_vec()),
                    Just(b"deliveries".to_vec()),
                    proptest::collection::vec(any::<u8>(), 0..8),
                ],
                proptest::collection::vec(any::<u8>(), 0..16),
            ),
            0..6,
        ),
        meta in proptest::collection::vec("[ -~]{0,12}", README_META_FIELDS.len()),
    ) {
        let mut all = original.clone();
        for (name, value) in README_META_FIELDS.iter().zip(&meta) {
            all.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        }
        let (back, got) = split_fields(&Fields(all));
        prop_assert_eq!(back.0, original);
        let mut names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        let mut documented = README_META_FIELDS.to_vec();
        documented.sort_unstable();
        prop_assert_eq!(names, documented);
    }
}

/// Random and mutated requests, sent as raw bytes to a live order-service
/// (whose HTTP layer is the patched tiny_http): whatever arrives, it keeps
/// running, keeps answering, and writes only valid orders.
#[test]
fn a_live_order_service_survives_random_requests() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use crate::support::RedisServer;

    let redis = RedisServer::start();
    let mut svc = crate::support::flow::start_ready("order-service", &redis, &[]);
    let addr = svc.addr();
    let seeds: [&[u8]; 4] = [
        b"GET /order?userId=u&productId=p&price=1 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 42\r\n\r\n{\"userId\":\"u\",\"productId\":\"p\",\"price\":\"1\"}",
        b"POST /orders HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            config().cases
        } else {
            64
        },
        ..config()
    });
    // Unmutated, each seed gets the answer the contract gives it.
    for (seed, status) in seeds.iter().zip([200, 201, 400, 200]) {
        let mut raw = seed.to_vec();
        if !raw.windows(17).any(|w| w == b"Connection: close") {
            // After the request line.
            let at = raw
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a request line")
                + 2;
            raw.splice(at..at, b"Connection: close\r\n".iter().copied());
        }
        let resp = crate::support::raw_request(addr, &raw).unwrap_or_else(|e| svc.fail(e));
        svc.expect_status(&resp, status);
    }
    let request = (
        0..seeds.len(),
        proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..8),
        proptest::collection::vec(any::<u8>(), 0..32),
    );
    runner
        .run(&request, |(seed, edits, tail)| {
            // Mutate a well-formed request: replace, insert or drop bytes.
            let mut raw = seeds[seed].to_vec();
            for (at, byte, op) in edits {
                let at = at % (raw.len() + 1);
                match op {
                    0 if at < raw.len() => raw[at] = byte,
                    1 => raw.insert(at, byte),
                    _ if at < raw.len() => {
                        raw.remove(at);
                    }
                    _ => {}
                }
            }
            raw.extend_from_slice(&tail);
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(300))).ok();
            let _ = s.write_all(&raw);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer);
            // Nothing, or answers that are HTTP with a status the server
            // means (never a 500 of a panic).
            if !answer.is_empty() {
                let text = String::from_utf8_lossy(&answer);
                let status: Option<u16> = text
                    .strip_prefix("HTTP/1.")
                    .and_then(|r| r.get(2..5))
                    .and_then(|c| c.parse().ok());
                prop_assert!(
                    status.is_some_and(|s| (100..600).contains(&s) && s != 500),
                    "answer to {:?}: {:?}",
                    String::from_utf8_lossy(&raw),
                    text
                );
            }
            Ok(())
        })
        .unwrap_or_else(|e| svc.fail(format!("property failed: {e}")));
    let running = svc.is_running();
    svc.check(running, || {
        "order-service died under random requests".into()
    });
    svc.expect_status(&svc.get("/healthz"), 200);
    svc.expect_status(&svc.get("/order?userId=after&productId=p&price=1"), 200);
    let mut conn = redis.conn();
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("order-events")
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .expect("XRANGE");
    for (id, fields) in entries {
        let get = |k: &str| {
            fields
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        svc.check(
            valid_order(&get("userId"), &get("productId"), &get("price")),
            || format!("an invalid order was written: {id} {fields:?}"),
        );
    }
}

//! Property tests ("fuzzing" with proptest) on everything that takes bytes
//! from outside: a request target through query decoding and validation,
//! a whole raw request through the HTTP parser and on to an order, and a
//! stream entry's raw fields through the consumers' decoding and the
//! dead-letter format. The HTTP parser itself has its own properties next
//! to it (`src/http/wire.rs`), as does the consumers' reply parsing
//! (`src/consumer.rs`).
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

use streamline::dlq::{split_fields, META_FIELDS};
use streamline::http::wire::Incoming;
use streamline::http::{path, query};
use streamline::record::{Fields, Order, Payment};

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
            let _ = Order::new(get("userId"), get("productId"), get("price"));
        }
        let url = format!("/order?userId={}&productId=p&price=1", encode_all(&user));
        let q = query(&url).expect("UTF-8 text, percent-encoded, decodes");
        prop_assert_eq!(&q["userId"], &user);
        prop_assert_eq!(
            Order::new(q["userId"].clone(), "p".into(), "1".into()).is_ok(),
            valid_text(&user)
        );
    }

    /// Raw bytes, as a client sends them, through the HTTP parser and on
    /// to an order: never a panic, and only valid orders come out.
    #[test]
    fn raw_requests_never_yield_an_invalid_order(
        target in "/order\\?[ -~]{0,60}",
        junk in proptest::collection::vec(any::<u8>(), 0..64),
        cut in any::<usize>(),
    ) {
        let mut raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
        let at = cut % (raw.len() + 1);
        raw.splice(at..at, junk);
        let mut incoming = Incoming::new(raw.as_slice());
        while let Ok(head) = incoming.read_head() {
            if let Ok(q) = query(&head.target) {
                let get = |k: &str| q.get(k).cloned().unwrap_or_default();
                if let Ok(order) = Order::new(get("userId"), get("productId"), get("price")) {
                    prop_assert!(valid_text(&order.user_id) && valid_text(&order.product_id));
                    prop_assert!(valid_price(&order.price));
                }
            }
            let Ok(framing) = head.framing() else { break };
            if incoming.read_body(framing, 1024).is_err() {
                break;
            }
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
        meta in proptest::collection::vec("[ -~]{0,12}", META_FIELDS.len()),
    ) {
        let mut all = original.clone();
        for (name, value) in META_FIELDS.iter().zip(&meta) {
            all.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        }
        let (back, got) = split_fields(&Fields(all));
        prop_assert_eq!(back.0, original);
        let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        prop_assert_eq!(names, META_FIELDS.to_vec());
    }
}

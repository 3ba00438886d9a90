//! order-service over HTTP, row by row of the contract's table: what a
//! client sends, what it gets back, and what lands in `order-events` (or,
//! for every rejected request, that nothing does).
//!
//! Each test has its own Redis and its own order-service.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{order_path, wait_for, wait_until, RedisServer, Response, Service};

const ORDER_EVENTS: &str = "order-events";
const PAYMENT_EVENTS: &str = "payment-events";
const PAYMENT_GROUP: &str = "payment-service-group";
const NOTIFICATION_GROUP: &str = "notification-service-group";

/// The contract's limit on a request body.
const MAX_BODY: usize = 64 * 1024;

/// How long an order may take when Redis is down, from the client's side:
/// the default `REQUEST_TIMEOUT_MS` (2 s) plus room for a slow machine.
/// The client itself gives up after 10 s, so a hang fails the test.
const UNAVAILABLE_WITHIN: Duration = Duration::from_secs(5);

/// Redis and an order-service that is ready (its groups exist).
fn start() -> (RedisServer, Service) {
    let redis = RedisServer::start();
    let svc = start_service(&redis, &[]);
    (redis, svc)
}

fn start_service(redis: &RedisServer, env: &[(&str, &str)]) -> Service {
    let mut svc = Service::spawn("order-service", redis, env);
    svc.wait_ready();
    svc.wait_readyz();
    svc
}

/// Places orders (each with the path `path()` gives) until one is accepted
/// with 200, and returns its `orderId`. Until the service is ready, `503`
/// is the right answer and is retried; anything else fails the test.
fn accepted_once_ready(svc: &Service, what: &str, mut path: impl FnMut() -> String) -> String {
    wait_for(what, Duration::from_secs(15), || {
        let resp = svc.get(&path());
        match resp.status {
            503 => None,
            _ => Some(expect_accepted(svc, &resp, 200)),
        }
    })
}

/// Checks an accepted order's answer (`status` is 200 or 201) and returns
/// its `orderId`.
fn expect_accepted(svc: &Service, resp: &Response, status: u16) -> String {
    svc.expect_status(resp, status);
    expect_json(svc, resp);
    svc.check(resp.json_str("status") == Some("ok"), || {
        format!("expected \"status\":\"ok\" in {resp}")
    });
    let id = resp
        .json_str("orderId")
        .unwrap_or_else(|| svc.fail(format!("no string orderId in {resp}")));
    svc.check(is_entry_id(id), || {
        format!("orderId {id:?} is not a stream entry ID in {resp}")
    });
    id.to_string()
}

/// Checks a refusal: `status`, a JSON `{"error": "..."}` whose message
/// names `field` (when given).
fn expect_refused(svc: &Service, resp: &Response, status: u16, field: Option<&str>) {
    svc.expect_status(resp, status);
    expect_json(svc, resp);
    let error = resp
        .json_str("error")
        .unwrap_or_else(|| svc.fail(format!("no string \"error\" in {resp}")));
    svc.check(!error.trim().is_empty(), || {
        format!("empty error in {resp}")
    });
    if let Some(field) = field {
        svc.check(error.contains(field), || {
            format!("the error should name {field:?}: {resp}")
        });
    }
}

fn expect_json(svc: &Service, resp: &Response) {
    svc.check(
        resp.header("content-type")
            .is_some_and(|ct| ct.starts_with("application/json")),
        || format!("expected Content-Type application/json: {resp}"),
    );
    svc.check(resp.json.is_some(), || format!("body is not JSON: {resp}"));
}

fn is_entry_id(id: &str) -> bool {
    let mut parts = id.split('-');
    let ok =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// Orders entry IDs numerically (`ms-seq`).
fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').expect("an entry ID");
    (ms.parse().expect("ms"), seq.parse().expect("seq"))
}

/// Panics (with the service log) if `order-events` does not hold exactly
/// `expected` entries.
fn expect_xlen(redis: &RedisServer, svc: &Service, expected: usize, after: &str) {
    let len = redis.xlen(ORDER_EVENTS);
    svc.check(len == expected, || {
        format!(
            "after {after}: XLEN {ORDER_EVENTS} is {len}, expected {expected}; entries: {:#?}",
            redis.entries(ORDER_EVENTS)
        )
    });
}

/// The one entry with ID `id`, checked to carry exactly these values.
fn expect_entry(
    redis: &RedisServer,
    svc: &Service,
    id: &str,
    user: &str,
    product: &str,
    price: &str,
) {
    let entries = redis.entries(ORDER_EVENTS);
    let entry = entries
        .iter()
        .find(|e| e.id == id)
        .unwrap_or_else(|| svc.fail(format!("no entry {id} in {ORDER_EVENTS}: {entries:#?}")));
    let expected = [("userId", user), ("productId", product), ("price", price)];
    for (field, value) in expected {
        svc.check(entry.get(field) == Some(value), || {
            format!("entry {id}: expected {field}={value:?}, got {entry:#?}")
        });
    }
}

/// A good order placed after refusals: it must be the only entry, which
/// also catches a refused order written late (after its 400).
fn expect_only_good_order_lands(redis: &RedisServer, svc: &Service) {
    expect_xlen(redis, svc, 0, "the refused requests");
    let resp = svc.get(&order_path("good-user", "good-product", "1"));
    let id = expect_accepted(svc, &resp, 200);
    expect_xlen(redis, svc, 1, "one good order after the refused ones");
    expect_entry(redis, svc, &id, "good-user", "good-product", "1");
}

fn order_json(user: &str, product: &str, price: Value) -> String {
    json!({"userId": user, "productId": product, "price": price}).to_string()
}

#[test]
fn get_order_writes_one_entry_and_answers_its_id() {
    let (redis, svc) = start();

    // The seed's call, exactly as its users make it.
    let resp = svc.get("/order?userId=user-1&productId=product-7&price=12.50");

    let id = expect_accepted(&svc, &resp, 200);
    expect_xlen(&redis, &svc, 1, "one order");
    expect_entry(&redis, &svc, &id, "user-1", "product-7", "12.50");
}

#[test]
fn get_order_stores_values_exactly_as_sent() {
    let (redis, svc) = start();
    // Percent-encoded UTF-8, reserved characters, a plus sign, and a price
    // with more significant digits than a float keeps.
    let cases = [
        ("élève+1", "p x&y=z", "123456789012.12345678"),
        ("用户", "product/42?", "0"),
        ("u", "p", "0.00"),
        ("u", "p", "100"),
    ];
    for (user, product, price) in cases {
        let resp = svc.get(&order_path(user, product, price));
        let id = expect_accepted(&svc, &resp, 200);
        expect_entry(&redis, &svc, &id, user, product, price);
    }
    expect_xlen(&redis, &svc, cases.len(), "the orders");
}

#[test]
fn post_orders_accepts_price_as_string_and_as_number() {
    let (redis, svc) = start();

    let as_string = svc.post_json("/orders", &order_json("u-1", "p-1", json!("12.50")));
    let as_integer = svc.post_json("/orders", &order_json("u-2", "p-2", json!(100)));
    let as_decimal = svc.post_json("/orders", &order_json("u-3", "p-3", json!(12.5)));

    let ids = [
        expect_accepted(&svc, &as_string, 201),
        expect_accepted(&svc, &as_integer, 201),
        expect_accepted(&svc, &as_decimal, 201),
    ];
    expect_xlen(&redis, &svc, 3, "three orders");
    expect_entry(&redis, &svc, &ids[0], "u-1", "p-1", "12.50");
    expect_entry(&redis, &svc, &ids[1], "u-2", "p-2", "100");
    expect_entry(&redis, &svc, &ids[2], "u-3", "p-3", "12.5");
    // One client placing orders one after the other sees them in order.
    svc.check(
        id_key(&ids[0]) < id_key(&ids[1]) && id_key(&ids[1]) < id_key(&ids[2]),
        || format!("order IDs not increasing: {ids:?}"),
    );
}

#[test]
fn missing_fields_are_refused_naming_the_field() {
    let (redis, svc) = start();
    let get_cases = [
        ("userId", "/order?productId=p&price=1"),
        ("productId", "/order?userId=u&price=1"),
        ("price", "/order?userId=u&productId=p"),
    ];
    for (field, path) in get_cases {
        expect_refused(&svc, &svc.get(path), 400, Some(field));
    }
    let post_cases = [
        ("userId", json!({"productId": "p", "price": "1"})),
        ("productId", json!({"userId": "u", "price": "1"})),
        ("price", json!({"userId": "u", "productId": "p"})),
        (
            "userId",
            json!({"userId": null, "productId": "p", "price": "1"}),
        ),
        (
            "productId",
            json!({"userId": "u", "productId": null, "price": "1"}),
        ),
        (
            "price",
            json!({"userId": "u", "productId": "p", "price": null}),
        ),
    ];
    for (field, body) in post_cases {
        let resp = svc.post_json("/orders", &body.to_string());
        expect_refused(&svc, &resp, 400, Some(field));
    }
    expect_only_good_order_lands(&redis, &svc);
}

#[test]
fn empty_fields_are_refused_naming_the_field() {
    let (redis, svc) = start();
    let get_cases = [
        ("userId", "/order?userId=&productId=p&price=1"),
        ("productId", "/order?userId=u&productId=&price=1"),
        ("price", "/order?userId=u&productId=p&price="),
    ];
    for (field, path) in get_cases {
        expect_refused(&svc, &svc.get(path), 400, Some(field));
    }
    let post_cases = [
        ("userId", order_json("", "p", json!("1"))),
        ("productId", order_json("u", "", json!("1"))),
        ("price", order_json("u", "p", json!(""))),
    ];
    for (field, body) in post_cases {
        expect_refused(&svc, &svc.post_json("/orders", &body), 400, Some(field));
    }
    expect_only_good_order_lands(&redis, &svc);
}

#[test]
fn prices_that_are_not_non_negative_decimals_are_refused() {
    let (redis, svc) = start();
    let bad = [
        "-1", "-0.01", "abc", "1.2.3", " ", "12,50", "1 000", "NaN", "inf", "-inf", "0x10",
        "12.50€", "$5",
    ];
    for price in bad {
        let resp = svc.get(&order_path("u", "p", price));
        expect_refused(&svc, &resp, 400, Some("price"));
        let resp = svc.post_json("/orders", &order_json("u", "p", json!(price)));
        expect_refused(&svc, &resp, 400, Some("price"));
    }
    // A JSON price that is a number must be non-negative; any other JSON
    // type is not a price.
    for price in [
        json!(-1),
        json!(-0.5),
        json!(true),
        json!([1]),
        json!({"amount": 1}),
    ] {
        let resp = svc.post_json("/orders", &order_json("u", "p", price));
        expect_refused(&svc, &resp, 400, Some("price"));
    }
    expect_only_good_order_lands(&redis, &svc);
}

/// Scientific notation is what a float parser takes and a decimal price is
/// not (and the seed's consumers would have to parse it): refused. Kept in
/// a test of its own because it is a judgment call on "non-negative
/// decimal".
#[test]
fn price_in_scientific_notation_is_refused() {
    let (redis, svc) = start();
    for price in ["1e5", "1E5", "1.5e2"] {
        let resp = svc.get(&order_path("u", "p", price));
        expect_refused(&svc, &resp, 400, Some("price"));
        let resp = svc.post_json("/orders", &order_json("u", "p", json!(price)));
        expect_refused(&svc, &resp, 400, Some("price"));
    }
    expect_only_good_order_lands(&redis, &svc);
}

#[test]
fn bad_json_is_refused() {
    let (redis, svc) = start();
    let bodies = [
        "",
        "not json",
        "{\"userId\":",
        "{\"userId\":\"u\",\"productId\":\"p\",\"price\":\"1\"",
        "{\"userId\":\"u\",\"productId\":\"p\",\"price\":\"1\"} trailing",
        "[]",
        "[{\"userId\":\"u\",\"productId\":\"p\",\"price\":\"1\"}]",
        "\"an order\"",
        "null",
        "42",
    ];
    for body in bodies {
        let resp = svc.post_json("/orders", body);
        expect_refused(&svc, &resp, 400, None);
    }
    expect_only_good_order_lands(&redis, &svc);
}

#[test]
fn non_utf8_body_is_refused() {
    let (redis, svc) = start();
    let bodies: [&[u8]; 3] = [
        b"{\"userId\":\"\xff\xfe\",\"productId\":\"p\",\"price\":\"1\"}",
        b"{\"userId\":\"u\",\"productId\":\"\xc3\",\"price\":\"1\"}",
        b"\xef\xbb\xbf\xff{}",
    ];
    for body in bodies {
        let resp = svc.request(
            "POST",
            "/orders",
            &[("Content-Type", "application/json")],
            Some(body),
        );
        expect_refused(&svc, &resp, 400, None);
    }
    expect_only_good_order_lands(&redis, &svc);
}

#[test]
fn non_utf8_query_is_refused() {
    let (redis, svc) = start();
    let cases = [
        ("userId", "/order?userId=%FF&productId=p&price=1"),
        ("productId", "/order?userId=u&productId=%C3&price=1"),
        ("productId", "/order?userId=u&productId=a%C3%28&price=1"),
        ("price", "/order?userId=u&productId=p&price=1%FF"),
    ];
    for (field, path) in cases {
        let resp = svc.get(path);
        // Which field is named is a nicety here; that it is refused is not.
        expect_refused(&svc, &resp, 400, None);
        let error = resp.json_str("error").unwrap_or_default();
        svc.check(error.contains(field) || error.contains("UTF-8"), || {
            format!("the error should say what is wrong ({field} or UTF-8): {resp}")
        });
    }
    expect_only_good_order_lands(&redis, &svc);
}

/// Pads a valid order with trailing spaces (valid JSON) to `len` bytes.
fn padded_order(len: usize) -> Vec<u8> {
    let mut body = order_json("big-user", "big-product", json!("1")).into_bytes();
    assert!(body.len() <= len);
    body.resize(len, b' ');
    body
}

#[test]
fn body_over_64_kib_is_refused_with_413_and_64_kib_is_not() {
    let (redis, svc) = start();
    let json = [("Content-Type", "application/json")];

    let over = svc.request("POST", "/orders", &json, Some(&padded_order(MAX_BODY + 1)));
    svc.expect_status(&over, 413);
    let far_over = svc.request("POST", "/orders", &json, Some(&padded_order(1024 * 1024)));
    svc.expect_status(&far_over, 413);
    expect_xlen(&redis, &svc, 0, "bodies over 64 KiB");

    // The limit is the limit, not one byte less.
    let at_limit = svc.request("POST", "/orders", &json, Some(&padded_order(MAX_BODY)));
    let id = expect_accepted(&svc, &at_limit, 201);
    expect_xlen(&redis, &svc, 1, "a body of exactly 64 KiB");
    expect_entry(&redis, &svc, &id, "big-user", "big-product", "1");
}

#[test]
fn chunked_body_over_64_kib_is_refused_with_413() {
    // Without Content-Length the service only finds out by reading: it must
    // stop at the limit rather than trust the client.
    let (redis, svc) = start();
    let body = padded_order(MAX_BODY + 4096);
    let mut raw = format!(
        "POST /orders HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        svc.addr()
    )
    .into_bytes();
    for chunk in body.chunks(8192) {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");

    let resp = crate::support::raw_request(svc.addr(), &raw).unwrap_or_else(|e| svc.fail(e));

    svc.expect_status(&resp, 413);
    expect_xlen(&redis, &svc, 0, "a chunked body over 64 KiB");
}

#[test]
fn unknown_paths_answer_404() {
    let (redis, svc) = start();
    let cases = [
        ("GET", "/"),
        ("GET", "/nope"),
        ("GET", "/ORDER?userId=u&productId=p&price=1"),
        ("GET", "/order/1?userId=u&productId=p&price=1"),
        ("GET", "/orders/1"),
        ("POST", "/order/1"),
        ("POST", "/nope"),
        ("DELETE", "/nope"),
    ];
    for (method, path) in cases {
        let body = (method == "POST").then_some(order_json("u", "p", json!("1")).into_bytes());
        let resp = svc.request(
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_deref(),
        );
        svc.expect_status(&resp, 404);
    }
    expect_only_good_order_lands(&redis, &svc);
}

#[test]
fn wrong_methods_answer_405() {
    let (redis, svc) = start();
    let order = order_json("u", "p", json!("1")).into_bytes();
    let query = "?userId=u&productId=p&price=1";
    let cases: [(&str, String, Option<&[u8]>); 7] = [
        ("POST", format!("/order{query}"), Some(&order)),
        ("PUT", format!("/order{query}"), Some(&order)),
        ("DELETE", format!("/order{query}"), None),
        ("GET", "/orders".to_string(), None),
        ("GET", format!("/orders{query}"), None),
        ("PUT", "/orders".to_string(), Some(&order)),
        ("DELETE", "/orders".to_string(), None),
    ];
    for (method, path, body) in cases {
        let resp = svc.request(method, &path, &[("Content-Type", "application/json")], body);
        svc.expect_status(&resp, 405);
    }
    expect_only_good_order_lands(&redis, &svc);
}

#[test]
fn health_and_readiness_answer_200_while_redis_is_up() {
    let (_redis, svc) = start();
    svc.expect_status(&svc.get("/healthz"), 200);
    svc.expect_status(&svc.get("/readyz"), 200);
}

/// Every order gets its own entry when many arrive at once (the producer
/// may batch them), and each answer names the entry holding its values.
#[test]
fn concurrent_orders_each_get_their_own_entry() {
    let (redis, svc) = start();
    let threads = 4;
    let per_thread = 25;
    let answers: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let svc = &svc;
                s.spawn(move || {
                    (0..per_thread)
                        .map(|i| {
                            let user = format!("user-{t}-{i}");
                            let resp = if i % 2 == 0 {
                                let r = svc.get(&order_path(&user, "p", &format!("{i}.5")));
                                (r, 200)
                            } else {
                                let body = order_json(&user, "p", json!(format!("{i}.5")));
                                (svc.post_json("/orders", &body), 201)
                            };
                            (user, expect_accepted(svc, &resp.0, resp.1))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("an order thread panicked"))
            .collect()
    });

    let total = threads * per_thread;
    let ids: BTreeSet<&str> = answers.iter().map(|(_, id)| id.as_str()).collect();
    svc.check(ids.len() == total, || {
        format!("{total} orders got {} distinct IDs", ids.len())
    });
    expect_xlen(&redis, &svc, total, "the concurrent orders");
    let by_id: BTreeMap<String, String> = redis
        .entries(ORDER_EVENTS)
        .into_iter()
        .map(|e| {
            (
                e.id.clone(),
                e.get("userId").unwrap_or_default().to_string(),
            )
        })
        .collect();
    for (user, id) in &answers {
        svc.check(by_id.get(id) == Some(user), || {
            format!(
                "order of {user} answered {id}, which holds {:?}",
                by_id.get(id)
            )
        });
    }
}

/// The contract: every group of the topology exists before order-service
/// accepts its first order, whatever order the services start in. Here
/// only order-service runs: the order must still be waiting for both
/// groups of `order-events`, and `payment-events` must have its group too.
#[test]
fn groups_exist_before_the_first_order_with_only_order_service_running() {
    let redis = RedisServer::start();
    let mut svc = Service::spawn("order-service", &redis, &[]);
    svc.wait_ready();
    // No wait for /readyz: a client does not wait for it either. Until the
    // groups exist, the service must not accept (503), so retry that.
    let id = accepted_once_ready(&svc, "order-service accepts an order", || {
        order_path("first-user", "first-product", "5")
    });

    expect_order_visible_to_groups(&redis, &svc, &id);
}

/// Both groups of `order-events` exist and have not read `id`;
/// `payment-events` has its group.
fn expect_order_visible_to_groups(redis: &RedisServer, svc: &Service, id: &str) {
    for group in [PAYMENT_GROUP, NOTIFICATION_GROUP] {
        let info = redis.group(ORDER_EVENTS, group).unwrap_or_else(|| {
            svc.fail(format!(
                "no group {group} on {ORDER_EVENTS} after order {id}: {:#?}",
                redis.groups(ORDER_EVENTS)
            ))
        });
        // Nobody reads: nothing delivered, and the order is still ahead of
        // the group (lag counts it).
        svc.check(
            id_key(&info.last_delivered_id) < id_key(id) && info.pending == 0,
            || format!("group {group} is past order {id}: {info:#?}"),
        );
        svc.check(info.lag == Some(1), || {
            format!("group {group} should have exactly the order {id} to read: {info:#?}")
        });
    }
    svc.check(
        redis.group(PAYMENT_EVENTS, NOTIFICATION_GROUP).is_some(),
        || {
            format!(
                "no group {NOTIFICATION_GROUP} on {PAYMENT_EVENTS}: {:#?}",
                redis.groups(PAYMENT_EVENTS)
            )
        },
    );
}

/// Redis goes away (killed) and comes back on the same port with its data
/// (append-only file). Meanwhile order-service answers 503 quickly, says it
/// is not ready, stays alive, and serves again without a restart. Only
/// answered orders are in the stream.
///
/// `appendfsync always`: with Redis's default `everysec` a SIGKILL may lose
/// the last second of writes (the README's durability table), and on a
/// loaded machine the order before the kill sometimes was.
#[test]
fn redis_down_answers_503_quickly_and_recovers_without_restart() {
    let mut redis = RedisServer::options()
        .appendonly(true)
        .arg("--appendfsync")
        .arg("always")
        .start();
    let mut svc = start_service(&redis, &[]);
    let before = svc.get(&order_path("before", "p", "1"));
    let before_id = expect_accepted(&svc, &before, 200);

    redis.stop();

    let resp = svc.get(&order_path("during-get", "p", "1"));
    expect_refused(&svc, &resp, 503, None);
    svc.check(resp.elapsed < UNAVAILABLE_WITHIN, || {
        format!("503 should come within {UNAVAILABLE_WITHIN:?}: {resp}")
    });
    let resp = svc.post_json("/orders", &order_json("during-post", "p", json!("1")));
    expect_refused(&svc, &resp, 503, None);
    svc.check(resp.elapsed < UNAVAILABLE_WITHIN, || {
        format!("503 should come within {UNAVAILABLE_WITHIN:?}: {resp}")
    });
    let ready = svc.get("/readyz");
    svc.expect_status(&ready, 503);
    svc.check(ready.elapsed < UNAVAILABLE_WITHIN, || {
        format!("/readyz should answer within {UNAVAILABLE_WITHIN:?}: {ready}")
    });
    svc.expect_status(&svc.get("/healthz"), 200);
    let running = svc.is_running();
    svc.check(running, || "order-service died with Redis".into());

    redis.start_again();

    let mut attempt = 0;
    let after_id = accepted_once_ready(&svc, "order-service accepts orders again", || {
        attempt += 1;
        order_path(&format!("after-{attempt}"), "p", "1")
    });
    let running = svc.is_running();
    svc.check(running, || "order-service exited".into());
    let users: Vec<(String, String)> = redis
        .entries(ORDER_EVENTS)
        .into_iter()
        .map(|e| {
            (
                e.id.clone(),
                e.get("userId").unwrap_or_default().to_string(),
            )
        })
        .collect();
    let expected = vec![
        (before_id, "before".to_string()),
        (after_id, format!("after-{attempt}")),
    ];
    svc.check(users == expected, || {
        format!(
            "the stream should hold the two answered orders only: {users:?}, expected {expected:?}"
        )
    });
    wait_until("/readyz answers 200 again", Duration::from_secs(15), || {
        svc.get("/readyz").status == 200
    });
}

/// Redis restarted empty (no persistence): the groups are gone with the
/// stream. The next order must not land in a stream that no group reads:
/// order-service recreates the topology first.
#[test]
fn redis_restarted_empty_gets_its_groups_back_before_the_next_order() {
    let mut redis = RedisServer::start();
    let svc = start_service(&redis, &[]);

    redis.stop();
    redis.start_again();
    assert_eq!(
        redis.xlen(ORDER_EVENTS),
        0,
        "Redis should have come back empty"
    );

    let id = accepted_once_ready(&svc, "order-service accepts orders again", || {
        order_path("after", "p", "1")
    });
    expect_order_visible_to_groups(&redis, &svc, &id);
    wait_until("/readyz answers 200 again", Duration::from_secs(15), || {
        svc.get("/readyz").status == 200
    });
}

/// A Redis that accepts connections but never answers (frozen with
/// SIGSTOP) is the case where a missing timeout turns into a hang.
#[test]
fn frozen_redis_answers_503_within_the_request_timeout() {
    let redis = RedisServer::start();
    let svc = start_service(&redis, &[("REQUEST_TIMEOUT_MS", "1000")]);
    expect_accepted(&svc, &svc.get(&order_path("before", "p", "1")), 200);

    redis.pause();

    let resp = svc.get(&order_path("frozen", "p", "1"));
    expect_refused(&svc, &resp, 503, None);
    // 1 s of request timeout, plus slack for a loaded 2-core machine; a
    // missing timeout would hang until the client's own 10 s.
    let within = Duration::from_millis(3500);
    println!("frozen Redis: 503 after {:?}", resp.elapsed);
    svc.check(resp.elapsed < within, || {
        format!("503 should come within {within:?} (REQUEST_TIMEOUT_MS=1000): {resp}")
    });
    let health = svc.get("/healthz");
    svc.expect_status(&health, 200);
    svc.check(health.elapsed < Duration::from_secs(3), || {
        format!("/healthz must not wait for Redis: {health}")
    });
    let ready = svc.get("/readyz");
    svc.expect_status(&ready, 503);
    svc.check(ready.elapsed < UNAVAILABLE_WITHIN, || {
        format!("/readyz should answer within {UNAVAILABLE_WITHIN:?}: {ready}")
    });

    redis.resume();

    wait_until(
        "order-service accepts orders again",
        Duration::from_secs(15),
        || svc.get(&order_path("after", "p", "1")).status == 200,
    );
}

/// order-service started before Redis (a reboot where Redis comes up
/// late) serves health, refuses orders with 503, and serves once Redis is
/// there, groups first.
#[test]
fn order_service_started_before_redis_serves_once_redis_is_up() {
    let port = crate::support::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let mut svc = Service::spawn_env("order-service", &[("REDIS_URL", &url)], &[]);
    svc.wait_ready();
    svc.expect_status(&svc.get("/readyz"), 503);
    let resp = svc.get(&order_path("too-early", "p", "1"));
    expect_refused(&svc, &resp, 503, None);
    svc.check(resp.elapsed < UNAVAILABLE_WITHIN, || {
        format!("503 should come within {UNAVAILABLE_WITHIN:?}: {resp}")
    });

    let redis = RedisServer::options().port(port).start();

    svc.wait_readyz();
    let id = accepted_once_ready(&svc, "order-service accepts an order", || {
        order_path("on-time", "p", "1")
    });
    expect_order_visible_to_groups(&redis, &svc, &id);
    let users: Vec<String> = redis
        .entries(ORDER_EVENTS)
        .iter()
        .map(|e| e.get("userId").unwrap_or_default().to_string())
        .collect();
    svc.check(users == ["on-time"], || {
        format!("only the answered order belongs in the stream: {users:?}")
    });
}

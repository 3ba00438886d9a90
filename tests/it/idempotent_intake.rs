//! Idempotent intake (issue 13, CONTRACT "Idempotent intake"): a client
//! that retries with the same `Idempotency-Key` never makes a second order,
//! from its retry all the way to the payment.
//!
//! The key's name in Redis, `order-events:idem:<key>`, is the one README
//! ("Retrying safely") documents.

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use redis::Value;

use crate::support::flow::{self, start_ready, ORDER_EVENTS, PAYMENT_EVENTS, PAYMENT_GROUP};
use crate::support::secure::{self, AclRedis};
use crate::support::{
    agent, bin, order_path, raw_request, request_with, wait_for, wait_until, RedisServer, Response,
    Service,
};

const KEY_HEADER: &str = "Idempotency-Key";
const REPLAYED: &str = "idempotent-replayed";

/// README: where a key is remembered.
fn key_name(key: &str) -> String {
    format!("order-events:idem:{key}")
}

fn order_service(redis: &RedisServer, env: &[(&str, &str)]) -> Service {
    start_ready("order-service", redis, env)
}

fn get_with_key(svc: &Service, path: &str, key: &str) -> Response {
    svc.request("GET", path, &[(KEY_HEADER, key)], None)
}

fn post_with_key(svc: &Service, body: &str, key: &str) -> Response {
    svc.request(
        "POST",
        "/orders",
        &[("Content-Type", "application/json"), (KEY_HEADER, key)],
        Some(body.as_bytes()),
    )
}

/// The `orderId` of an accepted order, checking status and that it is not
/// a replay.
fn first_answer(svc: &Service, resp: &Response, status: u16) -> String {
    svc.expect_status(resp, status);
    svc.check(resp.header(REPLAYED).is_none(), || {
        format!("a first request is no replay: {resp}")
    });
    resp.json_str("orderId")
        .unwrap_or_else(|| svc.fail(format!("no orderId in {resp}")))
        .to_string()
}

/// Checks a replay: the first answer's status and orderId, and
/// `Idempotent-Replayed: true`.
fn expect_replay(svc: &Service, resp: &Response, status: u16, order_id: &str) {
    svc.expect_status(resp, status);
    svc.check(resp.header(REPLAYED) == Some("true"), || {
        format!("expected {REPLAYED}: true on {resp}")
    });
    svc.check(resp.json_str("orderId") == Some(order_id), || {
        format!("expected the first orderId {order_id} in {resp}")
    });
    svc.check(resp.json_str("status") == Some("ok"), || {
        format!("expected \"status\":\"ok\" in {resp}")
    });
}

/// Entries of `order-events` placed by `user`.
fn orders_of(redis: &RedisServer, user: &str) -> Vec<String> {
    redis
        .entries(ORDER_EVENTS)
        .into_iter()
        .filter(|e| e.get("userId") == Some(user))
        .map(|e| e.id)
        .collect()
}

/// Every key under `order-events:idem:` (SCAN).
fn held_keys(conn: &mut redis::Connection) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg("order-events:idem:*")
        .arg("COUNT")
        .arg(10_000)
        .query::<(u64, Vec<String>)>(conn)
        .expect("SCAN")
        .1;
    keys.sort();
    keys
}

#[test]
fn a_retried_get_is_answered_with_the_first_order_and_writes_nothing() {
    let redis = RedisServer::start();
    let order = order_service(&redis, &[]);
    let path = order_path("retry-get", "p1", "100");

    let first = get_with_key(&order, &path, "get-key-1");
    let id = first_answer(&order, &first, 200);
    for _ in 0..3 {
        let again = get_with_key(&order, &path, "get-key-1");
        expect_replay(&order, &again, 200, &id);
    }
    assert_eq!(orders_of(&redis, "retry-get"), std::slice::from_ref(&id));

    // Remembered for IDEMPOTENCY_TTL_S, default one day (README).
    let ttl: i64 = redis::cmd("TTL")
        .arg(key_name("get-key-1"))
        .query(&mut redis.conn())
        .unwrap();
    assert!((86_000..=86_400).contains(&ttl), "TTL of the key: {ttl}");

    // Another key is another order, even with the same fields.
    let other = get_with_key(&order, &path, "get-key-2");
    let other_id = first_answer(&order, &other, 200);
    assert_ne!(other_id, id);
    assert_eq!(orders_of(&redis, "retry-get").len(), 2);
}

#[test]
fn a_retried_post_is_answered_201_with_the_first_order() {
    let redis = RedisServer::start();
    let order = order_service(&redis, &[]);

    let body = r#"{"userId":"retry-post","productId":"p1","price":100}"#;
    let first = post_with_key(&order, body, "post-key");
    let id = first_answer(&order, &first, 201);
    // The same fields: price 100 as a number or as a string is one price.
    let again = post_with_key(
        &order,
        r#"{"price":"100","productId":"p1","userId":"retry-post"}"#,
        "post-key",
    );
    expect_replay(&order, &again, 201, &id);
    // The first answer is the answer, whichever route the retry takes.
    let by_get = get_with_key(&order, &order_path("retry-post", "p1", "100"), "post-key");
    expect_replay(&order, &by_get, 201, &id);
    assert_eq!(orders_of(&redis, "retry-post"), [id]);
}

#[test]
fn the_same_key_with_other_fields_is_422_and_writes_nothing() {
    let redis = RedisServer::start();
    let order = order_service(&redis, &[]);
    let first = get_with_key(&order, &order_path("reuse", "p1", "100"), "reused");
    let id = first_answer(&order, &first, 200);

    for path in [
        order_path("reuse", "p1", "101"),
        order_path("reuse", "p2", "100"),
        order_path("reuse-other", "p1", "100"),
        order_path("reuse", "p1", "100.0"),
    ] {
        let resp = get_with_key(&order, &path, "reused");
        order.expect_status(&resp, 422);
        let error = resp.json_str("error").unwrap_or_default();
        order.check(error.contains(KEY_HEADER), || {
            format!("the error must name {KEY_HEADER}: {resp}")
        });
        order.check(resp.header(REPLAYED).is_none(), || format!("{resp}"));
    }
    let post = post_with_key(
        &order,
        r#"{"userId":"reuse","productId":"p1","price":"99"}"#,
        "reused",
    );
    order.expect_status(&post, 422);

    assert_eq!(orders_of(&redis, "reuse"), std::slice::from_ref(&id));
    assert!(orders_of(&redis, "reuse-other").is_empty());
    // The key still answers for the order it was made for.
    let again = get_with_key(&order, &order_path("reuse", "p1", "100"), "reused");
    expect_replay(&order, &again, 200, &id);
}

#[test]
fn malformed_keys_are_400_naming_the_problem_and_write_nothing() {
    let redis = RedisServer::start();
    let order = order_service(&redis, &[]);
    let path = order_path("malformed", "p1", "100");
    let raw = |header_lines: &str| {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{header_lines}Connection: close\r\n\r\n");
        raw_request(order.addr(), request.as_bytes()).unwrap_or_else(|e| order.fail(e))
    };
    let long = "k".repeat(256);
    let cases: Vec<(Response, &str)> = vec![
        (raw("Idempotency-Key: \r\n"), "empty"),
        (raw("Idempotency-Key: a b\r\n"), "a space at position 2"),
        (raw("Idempotency-Key: a\tb\r\n"), "a tab at position 2"),
        (raw("Idempotency-Key: ab\x01\r\n"), "control character 0x01"),
        (raw("Idempotency-Key: ab\x7f\r\n"), "control character 0x7F"),
        (
            raw("Idempotency-Key: k1\r\nIdempotency-Key: k2\r\n"),
            "more than once",
        ),
        (get_with_key(&order, &path, &long), "256 characters"),
        (
            post_with_key(
                &order,
                r#"{"userId":"malformed","productId":"p1","price":"1"}"#,
                "a b",
            ),
            "a space",
        ),
    ];
    for (resp, problem) in &cases {
        order.expect_status(resp, 400);
        let error = resp.json_str("error").unwrap_or_default();
        order.check(
            error.contains(KEY_HEADER) && error.contains(problem),
            || format!("the error must name {KEY_HEADER} and say {problem:?}: {resp}"),
        );
    }
    assert_eq!(redis.xlen(ORDER_EVENTS), 0, "a 400 writes nothing");
    assert!(held_keys(&mut redis.conn()).is_empty());

    // The longest key allowed, and every visible ASCII character, are fine.
    let max = "k".repeat(255);
    first_answer(&order, &get_with_key(&order, &path, &max), 200);
    let visible: String = ('!'..='~').collect();
    first_answer(&order, &get_with_key(&order, &path, &visible), 200);
    assert_eq!(orders_of(&redis, "malformed").len(), 2);
}

/// 16 clients send the same keyed order at the same instant, five times
/// over with fresh keys: each time exactly one order is written, and every
/// client is answered with its ID (or 409), whether the requests met in one
/// batch or in batches of both writers.
#[test]
fn sixteen_concurrent_requests_with_one_key_make_one_order() {
    const CLIENTS: usize = 16;
    let redis = RedisServer::start();
    let order = order_service(&redis, &[]);
    let url = order.url(&order_path("crowd", "p1", "100"));
    let healthz = order.url("/healthz");
    for round in 0..5 {
        let key = format!("crowd-{round}");
        let barrier = Arc::new(Barrier::new(CLIENTS));
        let answers: Vec<Response> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    let (barrier, url, key, healthz) = (Arc::clone(&barrier), &url, &key, &healthz);
                    s.spawn(move || {
                        let agent = agent(Duration::from_secs(10));
                        // Connected before the barrier, so all go at once.
                        request_with(&agent, "GET", healthz, &[], None)
                            .unwrap_or_else(|e| panic!("{e}"));
                        barrier.wait();
                        request_with(&agent, "GET", url, &[(KEY_HEADER, key)], None)
                            .unwrap_or_else(|e| panic!("{e}"))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let written: Vec<&Response> = answers
            .iter()
            .filter(|r| r.status == 200 && r.header(REPLAYED).is_none())
            .collect();
        let ids: BTreeSet<&str> = answers
            .iter()
            .filter_map(|r| r.json_str("orderId"))
            .collect();
        let all: Vec<String> = answers.iter().map(|r| r.to_string()).collect();
        order.check(
            answers.iter().all(|r| r.status == 200 || r.status == 409),
            || {
                format!(
                    "round {round}: only 200 and 409 expected:\n{}",
                    all.join("\n")
                )
            },
        );
        order.check(written.len() == 1 && ids.len() == 1, || {
            format!(
                "round {round}: one order written, one orderId for all:\n{}",
                all.join("\n")
            )
        });
    }
    assert_eq!(orders_of(&redis, "crowd").len(), 5, "one order per key");
}

/// Redis freezes (SIGSTOP): the order is answered 503 in time, and may or
/// may not be applied when Redis thaws. The client retries with its key
/// until it gets an answer: exactly one order, paid exactly once.
#[test]
fn a_503_from_a_frozen_redis_then_retries_with_the_key_make_one_order_and_one_payment() {
    let redis = RedisServer::start();
    let order = order_service(&redis, &[("REQUEST_TIMEOUT_MS", "1000")]);
    let payment = start_ready("payment-service", &redis, &[]);
    let path = order_path("frozen", "p1", "100");
    // Warm: the writers are connected and the script is loaded.
    first_answer(&order, &get_with_key(&order, &path, "warm-up"), 200);
    let key = "frozen-key";

    redis.pause();
    let sent = Instant::now();
    let refused = get_with_key(&order, &path, key);
    let took = sent.elapsed();
    let retry_while_frozen = get_with_key(&order, &path, key);
    redis.resume();
    order.expect_status(&refused, 503);
    order.expect_status(&retry_while_frozen, 503);
    order.check(took < Duration::from_secs(5), || {
        format!("503 within the request timeout, not after {took:?}")
    });

    redis.wait_pong(Duration::from_secs(10));
    let answer = wait_for(
        "a retry with the key is accepted",
        Duration::from_secs(20),
        || {
            let resp = get_with_key(&order, &path, key);
            match resp.status {
                503 => {
                    std::thread::sleep(Duration::from_millis(50));
                    None
                }
                _ => Some(resp),
            }
        },
    );
    order.expect_status(&answer, 200);
    let id = answer.json_str("orderId").unwrap().to_string();
    // Whether Redis applied the frozen request after it thawed (the retry
    // is then a replay of it) or not (the retry wrote it): one order both
    // ways, which is the point.
    eprintln!(
        "frozen: 503 after {} ms; first accepted retry {}",
        flow::ms(took),
        if answer.header(REPLAYED).is_some() {
            "replayed the order Redis applied after it thawed"
        } else {
            "wrote the order"
        }
    );
    // Once more, for good measure: a replay of the same order.
    expect_replay(&order, &get_with_key(&order, &path, key), 200, &id);

    let placed = orders_of(&redis, "frozen");
    assert_eq!(
        placed.len(),
        2,
        "the warm-up and exactly one more: {placed:?}"
    );
    assert!(placed.contains(&id), "{id} not in {placed:?}");

    let mut conn = redis.conn();
    wait_until(
        "payment-service paid everything",
        Duration::from_secs(20),
        || flow::drained(&mut conn, ORDER_EVENTS, PAYMENT_GROUP),
    );
    let payments = flow::xrange(&mut conn, PAYMENT_EVENTS, "-", "+");
    let for_it = payments
        .iter()
        .filter(|p| p.text("orderId").as_deref() == Some(id.as_str()))
        .count();
    payment.check(for_it == 1, || {
        format!("exactly one payment for {id}, found {for_it}")
    });
    assert_eq!(payments.len(), 2, "one payment per order");
}

#[test]
fn keys_expire_after_the_ttl() {
    let redis = RedisServer::start();
    // Short, but long enough that a stalled machine still reads the TTL
    // before the key is gone.
    let order = order_service(&redis, &[("IDEMPOTENCY_TTL_S", "3")]);
    let mut conn = redis.conn();
    let path = order_path("expiry", "p1", "100");
    let first = get_with_key(&order, &path, "short-lived");
    let id = first_answer(&order, &first, 200);
    let ttl: i64 = redis::cmd("TTL")
        .arg(key_name("short-lived"))
        .query(&mut conn)
        .unwrap();
    assert!((1..=3).contains(&ttl), "TTL {ttl}, IDEMPOTENCY_TTL_S=3");

    wait_until("the key expired", Duration::from_secs(15), || {
        let exists: u64 = redis::cmd("EXISTS")
            .arg(key_name("short-lived"))
            .query(&mut conn)
            .unwrap();
        exists == 0
    });
    // Forgotten: the key is free again, even for other fields.
    let reused = get_with_key(&order, &order_path("expiry", "p2", "5"), "short-lived");
    let new_id = first_answer(&order, &reused, 200);
    assert_ne!(new_id, id);
    assert_eq!(orders_of(&redis, "expiry").len(), 2);
}

#[test]
fn without_a_key_nothing_changes() {
    let redis = RedisServer::start();
    let order = order_service(&redis, &[]);
    let path = order_path("plain", "p1", "100");
    let a = first_answer(&order, &order.get(&path), 200);
    let b = first_answer(&order, &order.get(&path), 200);
    let body = r#"{"userId":"plain","productId":"p1","price":"100"}"#;
    let c = first_answer(&order, &order.post_json("/orders", body), 201);
    let d = first_answer(&order, &order.post_json("/orders", body), 201);
    let ids: BTreeSet<&String> = [&a, &b, &c, &d].into_iter().collect();
    assert_eq!(ids.len(), 4, "four requests, four orders");
    assert_eq!(orders_of(&redis, "plain").len(), 4);
    assert!(held_keys(&mut redis.conn()).is_empty(), "no key stored");
}

fn streamctl(url: &str, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(bin("streamctl"))
        .args(args)
        .env_clear()
        .env("REDIS_URL", url)
        .output()
        .expect("run streamctl");
    assert!(
        out.status.success(),
        "streamctl {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn streamctl_status_counts_the_keys_held() {
    let redis = RedisServer::start();
    let order = order_service(&redis, &[]);
    for i in 0..3 {
        let path = order_path(&format!("counted-{i}"), "p1", "1");
        first_answer(&order, &get_with_key(&order, &path, &format!("k{i}")), 200);
        first_answer(&order, &order.get(&path), 200);
    }
    let out = streamctl(&redis.url(), &["--json", "status"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["idempotencyKeys"]["held"], 3, "{json:#}");
    assert_eq!(json["idempotencyKeys"]["pattern"], "order-events:idem:*");
    let text = String::from_utf8_lossy(&streamctl(&redis.url(), &["status"]).stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.to_lowercase().contains("idempotency keys"))
        .unwrap_or_else(|| panic!("no idempotency keys line:\n{text}"));
    assert!(line.contains(" 3 "), "{line}");
}

/// Under the shipped ACL file (passwords filled in), order-service writes
/// keys and replays from them without one refused command; no other user
/// may read or write them.
#[test]
fn under_the_shipped_acl_only_order_service_writes_keys() {
    let redis = AclRedis::start(&secure::acl_with_passwords());
    let url = secure::user_url("order-service", redis.port());
    let mut order = Service::spawn_env("order-service", &[("REDIS_URL", url.as_str())], &[]);
    order.wait_ready();
    order.wait_readyz();

    let path = order_path("acl-keyed", "p1", "100");
    let id = first_answer(&order, &get_with_key(&order, &path, "acl-key"), 200);
    expect_replay(&order, &get_with_key(&order, &path, "acl-key"), 200, &id);
    let other = get_with_key(&order, &order_path("acl-keyed", "p1", "7"), "acl-key");
    order.expect_status(&other, 422);
    first_answer(&order, &order.get(&path), 200);

    let mut admin = redis.conn_as("admin").unwrap();
    let refusals = crate::support::secure::acl_refusals(&mut admin);
    assert!(refusals.is_empty(), "refused:\n{}", refusals.join("\n"));

    let key = key_name("acl-key");
    for user in ["payment-service", "notification-service", "streamctl"] {
        let mut conn = redis.conn_as(user).unwrap();
        for cmd in [
            vec!["GET", key.as_str()],
            vec!["SET", key.as_str(), "x"],
            vec!["DEL", key.as_str()],
            vec!["EXPIRE", key.as_str(), "1"],
        ] {
            let mut c = redis::cmd(cmd[0]);
            for a in &cmd[1..] {
                c.arg(*a);
            }
            match c.query::<Value>(&mut conn) {
                Err(e) if e.code() == Some("NOPERM") => {}
                other => redis.fail(&format!("{user} must be refused {cmd:?}, got {other:?}")),
            }
        }
    }
    // Nor may order-service itself touch them outside its script.
    let mut conn = redis.conn_as("order-service").unwrap();
    let del: redis::RedisResult<Value> = redis::cmd("DEL").arg(&key).query(&mut conn);
    assert!(
        matches!(&del, Err(e) if e.code() == Some("NOPERM")),
        "{del:?}"
    );

    // streamctl, as its own user, counts them.
    let out = streamctl(
        &secure::user_url("streamctl", redis.port()),
        &["--json", "status"],
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["idempotencyKeys"]["held"], 1, "{json:#}");
}

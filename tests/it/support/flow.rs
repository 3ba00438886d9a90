//! Helpers for the tests of events flowing through the consumers: writing
//! orders straight into `order-events`, reading what the services wrote
//! back (bytes and all), per-consumer pending counts, the exactly-once
//! ledger, and `/metrics` parsed.
//!
//! Polling helpers take a `&mut redis::Connection` the test keeps, rather
//! than opening a connection per poll: a suite that polls every 20 ms for
//! minutes would otherwise leave thousands of sockets in `TIME_WAIT`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use redis::streams::StreamInfoGroup;
use redis::{Connection, Value};

use super::{agent, request_with, RedisServer, Service};

/// The stream order-service writes.
pub const ORDER_EVENTS: &str = "order-events";
/// The stream payment-service writes.
pub const PAYMENT_EVENTS: &str = "payment-events";
/// Dead letters of `order-events`.
pub const ORDER_DLQ: &str = "order-events:dlq";
/// Dead letters of `payment-events`.
pub const PAYMENT_DLQ: &str = "payment-events:dlq";
/// payment-service's group on `order-events`.
pub const PAYMENT_GROUP: &str = "payment-service-group";
/// notification-service's group on both streams.
pub const NOTIFICATION_GROUP: &str = "notification-service-group";

/// Every (stream, group) pair of the topology.
pub const ALL_GROUPS: [(&str, &str); 3] = [
    (ORDER_EVENTS, PAYMENT_GROUP),
    (ORDER_EVENTS, NOTIFICATION_GROUP),
    (PAYMENT_EVENTS, NOTIFICATION_GROUP),
];

/// Spawns a service and waits until `/healthz` and `/readyz` answer 200.
pub fn start_ready(name: &str, redis: &RedisServer, env: &[(&str, &str)]) -> Service {
    let mut svc = Service::spawn(name, redis, env);
    svc.wait_ready();
    svc.wait_readyz();
    svc
}

/// The fields of the `i`-th test order with prefix `prefix`.
pub fn order_fields(prefix: &str, i: usize) -> [(&'static str, String); 3] {
    [
        ("userId", format!("{prefix}-u{i}")),
        ("productId", format!("p{}", i % 17)),
        ("price", format!("{}.{:02}", 1 + i % 500, i % 100)),
    ]
}

/// Writes orders `from..to` (see [`order_fields`]) straight into
/// `order-events` as one pipelined batch of `XADD`s; returns their IDs.
pub fn xadd_orders_range(
    conn: &mut Connection,
    prefix: &str,
    range: std::ops::Range<usize>,
) -> Vec<String> {
    let mut pipe = redis::pipe();
    for i in range {
        let cmd = pipe.cmd("XADD").arg(ORDER_EVENTS).arg("*");
        for (k, v) in order_fields(prefix, i) {
            cmd.arg(k).arg(v);
        }
    }
    pipe.query(conn)
        .unwrap_or_else(|e| panic!("pipelined XADD {ORDER_EVENTS}: {e}"))
}

/// Like [`xadd_orders_range`], in one `MULTI`/`EXEC`: Redis serves
/// consumers blocked in `XREADGROUP` only after the whole batch, so each
/// gets a full `COUNT` of it rather than the first entry.
pub fn xadd_orders_atomic(
    conn: &mut Connection,
    prefix: &str,
    range: std::ops::Range<usize>,
) -> Vec<String> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for i in range {
        let cmd = pipe.cmd("XADD").arg(ORDER_EVENTS).arg("*");
        for (k, v) in order_fields(prefix, i) {
            cmd.arg(k).arg(v);
        }
    }
    pipe.query(conn)
        .unwrap_or_else(|e| panic!("MULTI XADD {ORDER_EVENTS} ... EXEC: {e}"))
}

/// Writes `n` orders (in pipelined chunks of 500); returns their IDs.
pub fn xadd_orders(conn: &mut Connection, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    let mut from = 0;
    while from < n {
        let to = (from + 500).min(n);
        ids.extend(xadd_orders_range(conn, prefix, from..to));
        from = to;
    }
    ids
}

/// `XADD stream * field value ...` with raw bytes; returns the ID.
pub fn xadd_raw(conn: &mut Connection, stream: &str, fields: &[(&[u8], &[u8])]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query(conn)
        .unwrap_or_else(|e| panic!("XADD {stream} {fields:?}: {e}"))
}

/// `XLEN` (0 when the stream does not exist).
pub fn xlen(conn: &mut Connection, stream: &str) -> usize {
    redis::cmd("XLEN")
        .arg(stream)
        .query(conn)
        .unwrap_or_else(|e| panic!("XLEN {stream}: {e}"))
}

/// Writes orders from a thread at a steady pace, so that a consumer is
/// busy (and can be killed mid-run) for the whole run instead of being
/// handed everything at once.
pub struct Feeder {
    written: Arc<AtomicUsize>,
    thread: Option<JoinHandle<Vec<String>>>,
}

impl Feeder {
    /// Writes `total` orders in pipelined chunks of `chunk`, one chunk every
    /// `every`.
    pub fn start(
        redis: &RedisServer,
        prefix: &str,
        total: usize,
        chunk: usize,
        every: Duration,
    ) -> Feeder {
        let mut conn = redis.conn();
        let written = Arc::new(AtomicUsize::new(0));
        let prefix = prefix.to_string();
        let thread = {
            let written = Arc::clone(&written);
            std::thread::Builder::new()
                .name("feeder".into())
                .spawn(move || {
                    let mut ids = Vec::with_capacity(total);
                    while ids.len() < total {
                        let from = ids.len();
                        let to = (from + chunk).min(total);
                        ids.extend(xadd_orders_range(&mut conn, &prefix, from..to));
                        written.store(ids.len(), Ordering::SeqCst);
                        std::thread::sleep(every);
                    }
                    ids
                })
                .expect("spawn the feeder")
        };
        Feeder {
            written,
            thread: Some(thread),
        }
    }

    /// Orders written so far.
    pub fn written(&self) -> usize {
        self.written.load(Ordering::SeqCst)
    }

    /// Waits until every order is written; returns their IDs.
    pub fn join(mut self) -> Vec<String> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(ids)) => ids,
            _ => panic!("the feeder thread panicked"),
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Places `n` orders with `GET /order` from `threads` client threads;
/// panics on anything but a 200. Returns the `orderId`s.
pub fn http_orders(order: &Service, prefix: &str, n: usize, threads: usize) -> Vec<String> {
    let base = order.url("/order");
    let ids: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let base = &base;
                s.spawn(move || {
                    let agent = agent(Duration::from_secs(10));
                    (t..n)
                        .step_by(threads)
                        .map(|i| {
                            let url = order_url(base, prefix, i);
                            let resp = request_with(&agent, "GET", &url, &[], None)
                                .unwrap_or_else(|e| panic!("order {i}: {e}"));
                            assert_eq!(resp.status, 200, "order {i}: {resp}");
                            resp.json_str("orderId")
                                .unwrap_or_else(|| panic!("order {i}: no orderId in {resp}"))
                                .to_string()
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("an order client thread panicked"))
            .collect()
    });
    ids.into_iter().flatten().collect()
}

/// `<base>?userId=..&productId=..&price=..` for the `i`-th test order
/// (its values need no percent-encoding).
pub fn order_url(base: &str, prefix: &str, i: usize) -> String {
    let [(_, user), (_, product), (_, price)] = order_fields(prefix, i);
    format!("{base}?userId={user}&productId={product}&price={price}")
}

pub use testkit::stream::{xrange, RawEntry};

/// The pending entries of a group: the total and the count per consumer
/// (`XPENDING stream group`). A missing group counts as nothing pending.
pub fn pending(
    conn: &mut Connection,
    stream: &str,
    group: &str,
) -> (usize, BTreeMap<String, usize>) {
    let reply: redis::RedisResult<Value> =
        redis::cmd("XPENDING").arg(stream).arg(group).query(conn);
    let reply = match reply {
        Ok(v) => v,
        Err(e) if e.code() == Some("NOGROUP") => return (0, BTreeMap::new()),
        Err(e) => panic!("XPENDING {stream} {group}: {e}"),
    };
    let Value::Array(parts) = reply else {
        panic!("XPENDING {stream} {group}: unexpected reply {reply:?}")
    };
    let total = match parts.first() {
        Some(Value::Int(n)) => *n as usize,
        other => panic!("XPENDING {stream} {group}: unexpected count {other:?}"),
    };
    let mut per = BTreeMap::new();
    if let Some(Value::Array(consumers)) = parts.get(3) {
        for c in consumers {
            if let Value::Array(pair) = c {
                if let [Value::BulkString(name), Value::BulkString(n)] = pair.as_slice() {
                    let n = String::from_utf8_lossy(n).parse().unwrap_or(0);
                    per.insert(String::from_utf8_lossy(name).into_owned(), n);
                }
            }
        }
    }
    (total, per)
}

/// How many entries `consumer` holds pending in `group`.
pub fn pending_of(conn: &mut Connection, stream: &str, group: &str, consumer: &str) -> usize {
    pending(conn, stream, group)
        .1
        .get(consumer)
        .copied()
        .unwrap_or(0)
}

pub use testkit::stream::{group, groups};

/// Entries of `stream` after the group's last-delivered ID: never
/// delivered to it. Counted by reading them (unlike `XINFO`'s `lag`, this
/// stays exact after trimming). `None` when the group does not exist.
pub fn unread(conn: &mut Connection, stream: &str, group_name: &str) -> Option<usize> {
    let g = group(conn, stream, group_name)?;
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg(format!("({}", g.last_delivered_id))
        .arg("+")
        .query(conn)
        .unwrap_or_else(|e| panic!("XRANGE {stream}: {e}"));
    Some(testkit::stream::parse_entries(&reply).len())
}

/// Whether the group exists and has neither pending nor unread entries.
pub fn drained(conn: &mut Connection, stream: &str, group_name: &str) -> bool {
    unread(conn, stream, group_name) == Some(0) && pending(conn, stream, group_name).0 == 0
}

/// One line describing every group of the topology, for messages.
pub fn describe_groups(conn: &mut Connection) -> String {
    ALL_GROUPS
        .iter()
        .map(|(s, g)| {
            let info = group(conn, s, g);
            format!(
                "{s}/{g}: unread {:?} pending {:?} lag {:?}",
                unread(conn, s, g),
                pending(conn, s, g),
                info.and_then(|i| i.lag)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What the payments say about a set of orders.
#[derive(Debug, Clone)]
pub struct Ledger {
    /// Orders expected to be paid.
    pub orders: usize,
    /// `payment-events` entries.
    pub payments: usize,
    /// Orders paid more than once (extra payments counted).
    pub duplicates: usize,
    /// Orders not paid.
    pub lost: Vec<String>,
    /// Payments whose `orderId` is none of the orders (or absent).
    pub unknown: Vec<String>,
    /// Payments sharing a `paymentProcessId` with an earlier one.
    pub duplicate_process_ids: usize,
    /// Payments whose userId, productId or price differ from the order's.
    pub mismatched: Vec<String>,
}

impl Ledger {
    /// Compares `payments` with `orders` (entries of `order-events`, or
    /// just their IDs with empty fields when values are not checked).
    pub fn of(orders: &[RawEntry], payments: &[RawEntry]) -> Ledger {
        let by_id: HashMap<&str, &RawEntry> = orders.iter().map(|o| (o.id.as_str(), o)).collect();
        let mut paid: HashMap<String, usize> = HashMap::new();
        let mut process_ids = HashSet::new();
        let mut ledger = Ledger {
            orders: orders.len(),
            payments: payments.len(),
            duplicates: 0,
            lost: Vec::new(),
            unknown: Vec::new(),
            duplicate_process_ids: 0,
            mismatched: Vec::new(),
        };
        for p in payments {
            if !process_ids.insert(p.get("paymentProcessId").map(<[u8]>::to_vec)) {
                ledger.duplicate_process_ids += 1;
            }
            let Some(order_id) = p.text("orderId") else {
                ledger.unknown.push(p.id.clone());
                continue;
            };
            let Some(order) = by_id.get(order_id.as_str()) else {
                ledger.unknown.push(p.id.clone());
                continue;
            };
            let n = paid.entry(order_id).or_default();
            *n += 1;
            if *n > 1 {
                ledger.duplicates += 1;
            }
            if !order.fields.is_empty()
                && ["userId", "productId", "price"]
                    .iter()
                    .any(|f| order.get(f) != p.get(f))
            {
                ledger.mismatched.push(p.id.clone());
            }
        }
        ledger.lost = orders
            .iter()
            .filter(|o| !paid.contains_key(&o.id))
            .map(|o| o.id.clone())
            .collect();
        ledger
    }

    /// [`Ledger::of`] with bare order IDs.
    pub fn of_ids(order_ids: &[String], payments: &[RawEntry]) -> Ledger {
        let orders: Vec<RawEntry> = order_ids
            .iter()
            .map(|id| RawEntry {
                id: id.clone(),
                fields: Vec::new(),
            })
            .collect();
        Ledger::of(&orders, payments)
    }

    /// Whether every order was paid exactly once and nothing else was paid.
    pub fn exactly_once(&self) -> bool {
        self.payments == self.orders
            && self.duplicates == 0
            && self.lost.is_empty()
            && self.unknown.is_empty()
            && self.duplicate_process_ids == 0
            && self.mismatched.is_empty()
    }
}

impl fmt::Display for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "orders={} payments={} duplicates={} lost={} unknown={} duplicate_payment_process_ids={} mismatched={}",
            self.orders,
            self.payments,
            self.duplicates,
            self.lost.len(),
            self.unknown.len(),
            self.duplicate_process_ids,
            self.mismatched.len()
        )?;
        write_lists(
            f,
            &[
                ("lost", &self.lost),
                ("unknown", &self.unknown),
                ("mismatched", &self.mismatched),
            ],
        )
    }
}

/// A service's `/metrics`, parsed: one sample per series.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The text as served.
    pub text: String,
    samples: Vec<(String, String, f64)>,
}

impl Metrics {
    /// `GET /metrics`; panics (with the log) unless it answers 200.
    pub fn of(svc: &Service) -> Metrics {
        let resp = svc.get("/metrics");
        svc.expect_status(&resp, 200);
        Metrics::parse(&resp.body)
    }

    /// Parses Prometheus text format (`name{labels} value` lines).
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let value: f64 = value.trim().parse().ok()?;
                let (name, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                Some((name.to_string(), labels.to_string(), value))
            })
            .collect();
        Metrics {
            text: text.to_string(),
            samples,
        }
    }

    /// The sum of every series of `name` whose labels contain each of
    /// `labels` (`key="value"` strings); `None` when there is no such
    /// series at all: a family that is missing is not a zero.
    pub fn get(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let mut matching = self
            .samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|want| l.contains(want)))
            .map(|(_, _, v)| *v)
            .peekable();
        matching.peek()?;
        Some(matching.sum())
    }

    /// [`Metrics::get`], panicking (with the scrape) when no series of
    /// `name` with `labels` exists.
    #[track_caller]
    pub fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            panic!(
                "no series {name}{{{}}} in /metrics:\n{}",
                labels.join(","),
                self.text
            )
        })
    }

    /// Whether a series of `name` exists at all.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }
}

/// The `(id, consumer, delivery count)` of each entry `consumer` holds
/// pending (`XPENDING stream group - + 10000 consumer`).
pub fn pending_entries(
    conn: &mut Connection,
    stream: &str,
    group: &str,
    consumer: &str,
) -> Vec<(String, usize)> {
    let reply: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .arg(consumer)
        .query(conn)
        .unwrap_or_else(|e| panic!("XPENDING {stream} {group} - + 10000 {consumer}: {e}"));
    let Value::Array(rows) = reply else {
        return Vec::new();
    };
    rows.iter()
        .filter_map(|row| match row {
            Value::Array(cols) => match cols.as_slice() {
                [Value::BulkString(id), _, _, Value::Int(n), ..] => {
                    Some((String::from_utf8_lossy(id).into_owned(), *n as usize))
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// What a webhook sink's accepted requests say about the entries that
/// should have been notified.
#[derive(Debug, Clone, Default)]
pub struct Notified {
    /// Accepted order notifications (of the given orders).
    pub orders: usize,
    /// Accepted payment notifications (of the given payments).
    pub payments: usize,
    /// Accepted repeats of a notification already accepted.
    pub duplicates: usize,
    /// Entries with no accepted notification (`stream:id`).
    pub missing: Vec<String>,
    /// Accepted notifications of entries not given (`stream:id`).
    pub unexpected: Vec<String>,
    /// Notifications that do not match their entry or the contract.
    pub problems: Vec<String>,
}

impl Notified {
    /// Checks every accepted request of `received` against the contract's
    /// JSON and `Idempotency-Key`, and against `orders` and `payments`.
    pub fn check(
        received: &[super::Received],
        orders: &[RawEntry],
        payments: &[RawEntry],
    ) -> Notified {
        let mut expected: HashMap<String, (&str, &RawEntry)> = HashMap::new();
        for o in orders {
            expected.insert(format!("{ORDER_EVENTS}:{}", o.id), ("order", o));
        }
        for p in payments {
            expected.insert(format!("{PAYMENT_EVENTS}:{}", p.id), ("payment", p));
        }
        let mut out = Notified::default();
        let mut seen: HashSet<String> = HashSet::new();
        for r in received.iter().filter(|r| r.accepted()) {
            let b = &r.body;
            let text = |k: &str| b.get(k).and_then(|v| v.as_str()).map(str::to_string);
            let (Some(stream), Some(event)) = (text("stream"), text("eventId")) else {
                out.problems
                    .push(format!("no stream or eventId in {}", r.raw));
                continue;
            };
            let key = format!("{stream}:{event}");
            if r.method != "POST" {
                out.problems.push(format!("{key}: method {}", r.method));
            }
            if r.idempotency_key.as_deref() != Some(key.as_str()) {
                out.problems
                    .push(format!("{key}: Idempotency-Key {:?}", r.idempotency_key));
            }
            if !seen.insert(key.clone()) {
                out.duplicates += 1;
                continue;
            }
            let Some((kind, entry)) = expected.get(&key) else {
                out.unexpected.push(key);
                continue;
            };
            if text("kind").as_deref() != Some(*kind) {
                out.problems
                    .push(format!("{key}: kind {:?}", b.get("kind")));
            }
            let mut fields = vec!["userId", "productId", "price"];
            if *kind == "payment" {
                fields.extend(["paymentProcessId", "orderId"]);
                out.payments += 1;
            } else {
                out.orders += 1;
            }
            for f in fields {
                // A field absent from the entry (the seed's payments have no
                // orderId) must be absent or null in the JSON.
                if text(f) != entry.text(f) {
                    out.problems.push(format!(
                        "{key}: {f} is {:?}, entry has {:?}",
                        b.get(f),
                        entry.text(f)
                    ));
                }
            }
        }
        out.missing = expected.into_keys().filter(|k| !seen.contains(k)).collect();
        out.missing.sort();
        out
    }

    /// Whether each entry was notified, correctly, and nothing else was.
    pub fn complete(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.problems.is_empty()
    }
}

impl fmt::Display for Notified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "notified_orders={} notified_payments={} notification_duplicates={} missing={} unexpected={} problems={}",
            self.orders,
            self.payments,
            self.duplicates,
            self.missing.len(),
            self.unexpected.len(),
            self.problems.len()
        )?;
        write_lists(
            f,
            &[
                ("missing", &self.missing),
                ("unexpected", &self.unexpected),
                ("problems", &self.problems),
            ],
        )
    }
}

/// One order a [`Load`] client placed.
#[derive(Debug, Clone)]
pub struct Placed {
    /// When the request was sent.
    pub sent: std::time::Instant,
    /// The status, or `None` for a transport failure (refused, timed out).
    pub status: Option<u16>,
    /// The `orderId` of a 2xx answer.
    pub order_id: Option<String>,
    /// How long the answer took.
    pub elapsed: Duration,
}

impl Placed {
    /// Whether the order was accepted (2xx with an `orderId`).
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s)) && self.order_id.is_some()
    }
}

/// Client threads placing orders with `GET /order` back to back until
/// stopped, recording every answer: load on order-service while a test
/// breaks something underneath it.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    placed: Arc<std::sync::Mutex<Vec<Placed>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `threads` clients against `order`'s `/order`; user IDs are
    /// `<prefix>-u<n>`.
    pub fn start(order: &Service, prefix: &str, threads: usize) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let placed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let counter = Arc::new(AtomicUsize::new(0));
        let base = order.url("/order");
        let threads = (0..threads)
            .map(|t| {
                let (stop, placed, counter) =
                    (Arc::clone(&stop), Arc::clone(&placed), Arc::clone(&counter));
                let (base, prefix) = (base.clone(), prefix.to_string());
                std::thread::Builder::new()
                    .name(format!("load-{t}"))
                    .spawn(move || {
                        let agent = agent(Duration::from_secs(10));
                        while !stop.load(Ordering::SeqCst) {
                            let i = counter.fetch_add(1, Ordering::SeqCst);
                            let sent = std::time::Instant::now();
                            let resp = request_with(
                                &agent,
                                "GET",
                                &order_url(&base, &prefix, i),
                                &[],
                                None,
                            );
                            let p = Placed {
                                sent,
                                status: resp.as_ref().ok().map(|r| r.status),
                                order_id: resp
                                    .as_ref()
                                    .ok()
                                    .and_then(|r| r.json_str("orderId").map(str::to_string)),
                                elapsed: sent.elapsed(),
                            };
                            let failed = !p.ok();
                            placed.lock().unwrap_or_else(|e| e.into_inner()).push(p);
                            if failed {
                                // Do not spin on a service that answers 503 at once.
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    })
                    .expect("spawn a load thread")
            })
            .collect();
        Load {
            stop,
            placed,
            threads,
        }
    }

    /// Everything placed so far.
    pub fn placed(&self) -> Vec<Placed> {
        self.placed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Accepted orders sent at or after `since`.
    pub fn ok_since(&self, since: std::time::Instant) -> usize {
        self.placed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|p| p.ok() && p.sent >= since)
            .count()
    }

    /// Failed orders sent at or after `since`.
    pub fn failed_since(&self, since: std::time::Instant) -> usize {
        self.placed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|p| !p.ok() && p.sent >= since)
            .count()
    }

    /// Stops the clients (each finishes its request) and returns
    /// everything placed.
    pub fn stop(mut self) -> Vec<Placed> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.placed()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The status of `GET /readyz`, or 0 if the service did not answer.
pub fn readyz(svc: &Service) -> u16 {
    super::request("GET", &svc.url("/readyz"), &[], None).map_or(0, |r| r.status)
}

/// Room for a slow, shared CI machine; the figures tests print say how long
/// things really took.
pub const DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// The consumer settings the end-to-end tests use unless they say
/// otherwise: short blocking reads (a prompt shutdown), claims after 1 s,
/// no trimming.
pub const QUICK: [(&str, &str); 3] = [
    ("BLOCK_MS", "200"),
    ("CLAIM_IDLE_MS", "1000"),
    ("TRIM_INTERVAL_MS", "0"),
];

/// [`QUICK`], then `extra` (which wins).
pub fn env<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all: Vec<(&str, &str)> = QUICK.to_vec();
    all.extend_from_slice(extra);
    all
}

/// Milliseconds, for the figures tests print.
pub fn ms(d: std::time::Duration) -> u128 {
    d.as_millis()
}

/// Writes each non-empty list as "\n  name (first 10): [...]", for the
/// summaries tests print when an accounting does not add up.
fn write_lists(
    f: &mut std::fmt::Formatter<'_>,
    lists: &[(&str, &Vec<String>)],
) -> std::fmt::Result {
    for (what, list) in lists {
        if !list.is_empty() {
            write!(
                f,
                "\n  {what} (first 10): {:?}",
                &list[..list.len().min(10)]
            )?;
        }
    }
    Ok(())
}

/// The metadata of a dead letter, as the README's "Guarantees" names it.
pub const README_META_FIELDS: [&str; 6] = [
    "originalId",
    "originalStream",
    "group",
    "consumer",
    "error",
    "deliveries",
];

/// Kills (`CLIENT KILL ID`) every client connection whose `CLIENT LIST`
/// line `pick` chooses, except the one `conn` itself is; returns how many
/// were killed.
pub fn kill_clients(conn: &mut Connection, pick: impl Fn(&str) -> bool) -> usize {
    let own: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query(conn)
        .expect("CLIENT ID");
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(conn)
        .expect("CLIENT LIST");
    let ids: Vec<i64> = list
        .lines()
        .filter(|l| pick(l))
        .filter_map(|l| l.strip_prefix("id=")?.split(' ').next()?.parse().ok())
        .filter(|&id| id != own)
        .collect();
    ids.iter()
        .map(|id| {
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query::<usize>(conn)
                .unwrap_or(0)
        })
        .sum()
}

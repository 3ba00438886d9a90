//! `streamctl`, the operator's CLI, run as a binary against a real
//! `redis-server` that each test fills by hand (groups, entries, pending
//! entries, dead letters in the real format) or, for dead letters, by a real
//! payment-service. Every figure it prints is checked against what Redis
//! holds, mostly through `--json`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::TcpListener;
use std::time::Duration;

use redis::Connection;
use serde_json::Value;

use streamline::dlq::{self, DeadLetter};
use streamline::record::Fields;

use crate::support::{indent, wait_until, RedisServer, Service};

const ORDER_EVENTS: &str = "order-events";
const ORDER_DLQ: &str = "order-events:dlq";
const PAYMENT_EVENTS: &str = "payment-events";
const PAYMENT_GROUP: &str = "payment-service-group";
const NOTIFICATION_GROUP: &str = "notification-service-group";

/// A run that takes longer than this is a hang, not a slow machine.
const RUN_DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Running streamctl
// ---------------------------------------------------------------------------

/// One finished run of `streamctl`.
struct Run {
    command: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\nexit code {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- end ---",
            self.command,
            self.code,
            self.elapsed,
            indent(&self.stdout),
            indent(&self.stderr)
        )
    }
}

impl Run {
    /// Panics with the whole run unless it exited 0.
    #[track_caller]
    fn ok(self) -> Run {
        self.expect_code(0);
        self
    }

    #[track_caller]
    fn expect_code(&self, code: i32) {
        assert_eq!(self.code, Some(code), "expected exit code {code}:\n{self}");
    }

    /// Stdout as JSON; panics with the run if it is not.
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }
}

/// Runs `streamctl --redis-url URL ARGS...` with nothing of the developer's
/// environment but `PATH` (a `REDIS_URL` there must not leak in).
fn streamctl(url: &str, args: &[&str]) -> Run {
    let mut all = vec!["--redis-url", url];
    all.extend_from_slice(args);
    streamctl_env(&[], &all)
}

/// Runs `streamctl ARGS...` with exactly `env` (plus `PATH`); kills it and
/// panics with its output if it is still running after [`RUN_DEADLINE`].
fn streamctl_env(env: &[(&str, &str)], args: &[&str]) -> Run {
    let done = crate::support::run_to_exit("streamctl", env, args, RUN_DEADLINE);
    Run {
        command: done.command,
        code: done.status.code(),
        stdout: done.stdout,
        stderr: done.stderr,
        elapsed: done.elapsed,
    }
}

use crate::support::flow::README_META_FIELDS;

// ---------------------------------------------------------------------------
// Filling Redis by hand
// ---------------------------------------------------------------------------

/// Creates `group` on `stream` at ID 0 (and the stream), as the services do.
fn create_group(conn: &mut Connection, stream: &str, group: &str) {
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .exec(conn)
        .unwrap_or_else(|e| panic!("XGROUP CREATE {stream} {group}: {e}"));
}

/// Every group of the topology, on both streams.
fn create_topology(conn: &mut Connection) {
    create_group(conn, ORDER_EVENTS, PAYMENT_GROUP);
    create_group(conn, ORDER_EVENTS, NOTIFICATION_GROUP);
    create_group(conn, PAYMENT_EVENTS, NOTIFICATION_GROUP);
}

fn xadd(conn: &mut Connection, stream: &str, fields: &[(&str, &str)]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query(conn)
        .unwrap_or_else(|e| panic!("XADD {stream}: {e}"))
}

/// `n` orders `u<i>`/`p<i>`/`<100+i>`; returns their IDs.
fn orders(conn: &mut Connection, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let (user, product, price) = (format!("u{i}"), format!("p{i}"), format!("{}", 100 + i));
            xadd(
                conn,
                ORDER_EVENTS,
                &[
                    ("userId", user.as_str()),
                    ("productId", product.as_str()),
                    ("price", price.as_str()),
                ],
            )
        })
        .collect()
}

/// `XREADGROUP ... STREAMS stream <from>` without acknowledging: `>` reads
/// new entries, `0` re-reads the consumer's own pending ones (which counts
/// as another delivery). Returns the IDs read.
fn read_group(
    conn: &mut Connection,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
    from: &str,
) -> Vec<String> {
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(stream)
        .arg(from)
        .query(conn)
        .unwrap_or_else(|e| panic!("XREADGROUP {stream} {group}: {e}"));
    reply
        .keys
        .into_iter()
        .flat_map(|k| k.ids.into_iter().map(|e| e.id))
        .collect()
}

fn xack(conn: &mut Connection, stream: &str, group: &str, id: &str) {
    let acked: i64 = redis::cmd("XACK")
        .arg(stream)
        .arg(group)
        .arg(id)
        .query(conn)
        .unwrap_or_else(|e| panic!("XACK {stream} {group} {id}: {e}"));
    assert_eq!(acked, 1, "XACK {id}");
}

/// Dead-letters a pending `order-events` entry exactly as a consumer does,
/// through [`dlq::move_to_dlq`]. Returns the dead letter's ID.
fn dead_letter(server: &RedisServer, id: &str, consumer: &str, error: &str) -> String {
    let mut conn = server.conn();
    let entry = server
        .entries(ORDER_EVENTS)
        .into_iter()
        .find(|e| e.id == id)
        .unwrap_or_else(|| panic!("{id} is not in {ORDER_EVENTS}"));
    let fields = Fields(
        entry
            .fields
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect(),
    );
    let letter = DeadLetter {
        stream: ORDER_EVENTS,
        group: PAYMENT_GROUP,
        consumer,
        id,
        fields: &fields,
        error,
        deliveries: 3,
        retain: 10_000,
    };
    let moved = dlq::move_to_dlq(&mut conn, &letter).expect("move_to_dlq");
    assert!(
        matches!(moved, dlq::Moved::Written { evicted: 0 }),
        "{id} was not pending, nothing dead-lettered: {moved:?}"
    );
    let letters = server.entries(ORDER_DLQ);
    letters.last().expect("a dead letter").id.clone()
}

/// A port on 127.0.0.1 nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// The stream named `name` in a `status --json` report.
fn stream_of<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["streams"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["stream"] == name))
        .unwrap_or_else(|| panic!("no stream {name} in {status:#}"))
}

/// The group `name` of a stream of a `status --json` report.
fn group_of<'a>(stream: &'a Value, name: &str) -> &'a Value {
    stream["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["group"] == name))
        .unwrap_or_else(|| panic!("no group {name} in {stream:#}"))
}

// ---------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------

#[test]
fn status_shows_lengths_lag_pending_consumers_and_dead_letters() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    // payment-events and its group are left missing on purpose.
    create_group(&mut conn, ORDER_EVENTS, PAYMENT_GROUP);
    create_group(&mut conn, ORDER_EVENTS, NOTIFICATION_GROUP);
    let ids = orders(&mut conn, 4);
    let read = read_group(&mut conn, ORDER_EVENTS, PAYMENT_GROUP, "pay-1", 3, ">");
    assert_eq!(read, ids[..3]);
    dead_letter(&redis, &ids[0], "pay-1", "boom");

    let run = streamctl(&redis.url(), &["--json", "status"]).ok();
    let status = run.json();
    let orders = stream_of(&status, ORDER_EVENTS);
    assert_eq!(orders["exists"], true, "{run}");
    assert_eq!(orders["length"], 4, "{run}");
    assert_eq!(orders["firstId"], ids[0].as_str(), "{run}");
    assert_eq!(orders["lastId"], ids[3].as_str(), "{run}");
    assert_eq!(orders["dlq"]["stream"], ORDER_DLQ, "{run}");
    assert_eq!(orders["dlq"]["length"], 1, "{run}");

    let payment = group_of(orders, PAYMENT_GROUP);
    assert_eq!(payment["exists"], true, "{run}");
    assert_eq!(payment["lag"], 1, "one entry unread: {run}");
    assert_eq!(
        payment["pending"], 2,
        "three read, one dead-lettered: {run}"
    );
    assert_eq!(payment["entriesRead"], 3, "{run}");
    assert_eq!(payment["lastDeliveredId"], ids[2].as_str(), "{run}");
    let consumers = payment["consumers"].as_array().expect("consumers");
    assert_eq!(consumers.len(), 1, "{run}");
    assert_eq!(consumers[0]["name"], "pay-1", "{run}");
    assert_eq!(consumers[0]["pending"], 2, "{run}");
    assert!(consumers[0]["idleMs"].is_u64(), "{run}");

    let notification = group_of(orders, NOTIFICATION_GROUP);
    assert_eq!(notification["lag"], 4, "nothing read: {run}");
    assert_eq!(notification["pending"], 0, "{run}");
    assert_eq!(notification["consumers"], serde_json::json!([]), "{run}");

    let payments = stream_of(&status, PAYMENT_EVENTS);
    assert_eq!(payments["exists"], false, "{run}");
    assert_eq!(payments["length"], Value::Null, "{run}");
    assert_eq!(
        group_of(payments, NOTIFICATION_GROUP)["exists"],
        false,
        "{run}"
    );
    assert_eq!(payments["dlq"]["length"], 0, "{run}");

    // The table says the same, in aligned columns.
    let run = streamctl(&redis.url(), &["status"]).ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    let header = lines
        .iter()
        .find(|l| l.starts_with("STREAM ") && l.contains("LENGTH"))
        .unwrap_or_else(|| panic!("no stream table:\n{run}"));
    let col = header.find("LENGTH").expect("LENGTH column");
    let row = lines
        .iter()
        .find(|l| l.starts_with("order-events "))
        .unwrap_or_else(|| panic!("no order-events row:\n{run}"));
    assert!(
        row[col..].starts_with("4 "),
        "length not under LENGTH:\n{run}"
    );
    let missing = lines
        .iter()
        .find(|l| l.starts_with("payment-events "))
        .unwrap_or_else(|| panic!("no payment-events row:\n{run}"));
    assert!(missing[col..].starts_with("missing"), "{run}");
    assert!(run.stdout.contains("pay-1"), "consumer not shown:\n{run}");
}

// ---------------------------------------------------------------------------
// pending
// ---------------------------------------------------------------------------

#[test]
fn pending_lists_the_oldest_entries_with_consumer_and_delivery_count() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    create_topology(&mut conn);
    let ids = orders(&mut conn, 3);
    read_group(&mut conn, ORDER_EVENTS, PAYMENT_GROUP, "pay-1", 3, ">");
    // Re-reading its own pending entry from 0 delivers the oldest one again.
    let again = read_group(&mut conn, ORDER_EVENTS, PAYMENT_GROUP, "pay-1", 1, "0");
    assert_eq!(again, ids[..1]);

    let args = [
        "--json",
        "pending",
        ORDER_EVENTS,
        PAYMENT_GROUP,
        "--count",
        "2",
    ];
    let run = streamctl(&redis.url(), &args).ok();
    let report = run.json();
    assert_eq!(report["total"], 3, "{run}");
    let entries = report["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 2, "--count 2: {run}");
    assert_eq!(entries[0]["id"], ids[0].as_str(), "oldest first: {run}");
    assert_eq!(entries[0]["consumer"], "pay-1", "{run}");
    assert_eq!(entries[0]["deliveries"], 2, "{run}");
    assert_eq!(entries[1]["id"], ids[1].as_str(), "{run}");
    assert_eq!(entries[1]["deliveries"], 1, "{run}");
    assert!(entries[0]["idleMs"].is_u64(), "{run}");

    let run = streamctl(&redis.url(), &["pending", ORDER_EVENTS, PAYMENT_GROUP]).ok();
    assert!(run.stdout.contains("3 pending"), "{run}");
    for id in &ids {
        assert!(run.stdout.contains(id.as_str()), "{id} missing:\n{run}");
    }
    let first = run
        .stdout
        .lines()
        .find(|l| l.starts_with(ids[0].as_str()))
        .unwrap_or_else(|| panic!("no row for {}:\n{run}", ids[0]));
    let cells: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(cells[1], "pay-1", "{run}");
    assert!(
        cells[2].ends_with('s'),
        "idle time like 12ms or 1.2s: {run}"
    );
    assert_eq!(cells[3], "2", "{run}");

    // Nothing pending is an answer, a missing group an error.
    let run = streamctl(&redis.url(), &["pending", ORDER_EVENTS, NOTIFICATION_GROUP]).ok();
    assert!(run.stdout.contains("nothing pending"), "{run}");
    let run = streamctl(&redis.url(), &["pending", ORDER_EVENTS, "no-such-group"]);
    run.expect_code(1);
    assert!(run.stderr.contains("no-such-group"), "{run}");
}

// ---------------------------------------------------------------------------
// dlq list
// ---------------------------------------------------------------------------

#[test]
fn dlq_list_shows_what_a_real_payment_service_dead_lettered_and_why() {
    let redis = RedisServer::start();
    let env = [("BLOCK_MS", "200"), ("TRIM_INTERVAL_MS", "0")];
    let mut payment = Service::spawn("payment-service", &redis, &env);
    payment.wait_ready();
    payment.wait_readyz();
    let mut conn = redis.conn();
    // A poison order: productId is missing, it can never be paid.
    let poison = xadd(
        &mut conn,
        ORDER_EVENTS,
        &[("userId", "u1"), ("price", "100")],
    );
    wait_until(
        "the poison order is dead-lettered",
        Duration::from_secs(20),
        || redis.xlen(ORDER_DLQ) == 1,
    );

    let run = streamctl(&redis.url(), &["--json", "dlq", "list", ORDER_EVENTS]).ok();
    let report = run.json();
    assert_eq!(report["dlq"], ORDER_DLQ, "{run}");
    assert_eq!(report["length"], 1, "{run}");
    let letter = &report["entries"][0];
    assert_eq!(letter["originalId"], poison.as_str(), "{run}");
    assert_eq!(letter["originalStream"], ORDER_EVENTS, "{run}");
    assert_eq!(letter["group"], PAYMENT_GROUP, "{run}");
    let error = letter["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("productId"),
        "the error names the field: {run}"
    );
    assert_eq!(
        letter["fields"],
        serde_json::json!({"userId": "u1", "price": "100"}),
        "original fields only: {run}"
    );

    let run = streamctl(&redis.url(), &["dlq", "list", ORDER_EVENTS]).ok();
    assert!(run.stdout.contains(error), "error not shown:\n{run}");
    assert!(run.stdout.contains(poison.as_str()), "{run}");
    assert!(run.stdout.contains("userId=u1 price=100"), "{run}");
}

// ---------------------------------------------------------------------------
// dlq redrive
// ---------------------------------------------------------------------------

/// The fields of the last entry of `stream`.
fn last_fields(redis: &RedisServer, stream: &str) -> BTreeMap<String, String> {
    let entries = redis.entries(stream);
    entries.last().expect("an entry").fields.clone()
}

#[test]
fn dlq_redrive_puts_back_exactly_the_original_fields_once() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    create_topology(&mut conn);
    let ids = orders(&mut conn, 3);
    read_group(&mut conn, ORDER_EVENTS, PAYMENT_GROUP, "pay-1", 3, ">");
    let originals: Vec<BTreeMap<String, String>> = redis
        .entries(ORDER_EVENTS)
        .into_iter()
        .map(|e| e.fields)
        .collect();
    let letters: Vec<String> = ids
        .iter()
        .map(|id| dead_letter(&redis, id, "pay-1", "webhook down"))
        .collect();
    assert_eq!(redis.xlen(ORDER_DLQ), 3);
    // Each dead letter: its original fields plus the README's metadata.
    for (letter, original) in redis.entries(ORDER_DLQ).iter().zip(&originals) {
        let mut expected: Vec<&str> = original.keys().map(String::as_str).collect();
        expected.extend(README_META_FIELDS);
        expected.sort_unstable();
        let mut names: Vec<&str> = letter.fields.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, expected, "{letter:?}");
    }

    // One by ID: it leaves the DLQ and comes back as a new entry.
    let run = streamctl(
        &redis.url(),
        &["dlq", "redrive", ORDER_EVENTS, "--id", &letters[1]],
    )
    .ok();
    assert!(run.stdout.contains("re-added as "), "{run}");
    assert!(
        run.stdout.contains(ids[1].as_str()),
        "names the original ID: {run}"
    );
    assert_eq!(redis.xlen(ORDER_DLQ), 2, "{run}");
    let left: Vec<String> = redis.entries(ORDER_DLQ).into_iter().map(|e| e.id).collect();
    assert_eq!(left, [letters[0].clone(), letters[2].clone()], "{run}");
    assert_eq!(redis.xlen(ORDER_EVENTS), 4, "{run}");
    // The original fields, exactly, marked for the group that gave up on
    // it and with the ID first written.
    let mut back = last_fields(&redis, ORDER_EVENTS);
    assert_eq!(
        back.remove(dlq::REDRIVE_GROUP).as_deref(),
        Some(PAYMENT_GROUP),
        "{run}"
    );
    assert_eq!(
        back.remove(dlq::REDRIVEN_FROM).as_deref(),
        Some(ids[1].as_str()),
        "{run}"
    );
    assert_eq!(back, originals[1], "original fields, exactly: {run}");
    for meta in README_META_FIELDS {
        assert!(
            !back.contains_key(meta),
            "meta field {meta} redriven: {run}"
        );
    }

    // The same ID again: reported, not added a second time.
    let run = streamctl(
        &redis.url(),
        &["dlq", "redrive", ORDER_EVENTS, "--id", &letters[1]],
    )
    .ok();
    assert!(run.stdout.contains("not found"), "{run}");
    assert_eq!(redis.xlen(ORDER_EVENTS), 4, "{run}");

    // --all empties it, oldest first.
    let run = streamctl(
        &redis.url(),
        &["--json", "dlq", "redrive", ORDER_EVENTS, "--all"],
    )
    .ok();
    let report = run.json();
    let redriven = report["redriven"].as_array().expect("redriven");
    assert_eq!(redriven.len(), 2, "{run}");
    assert_eq!(redriven[0]["dlqId"], letters[0].as_str(), "{run}");
    assert_eq!(redriven[0]["originalId"], ids[0].as_str(), "{run}");
    assert_eq!(redis.xlen(ORDER_DLQ), 0, "{run}");
    let entries = redis.entries(ORDER_EVENTS);
    assert_eq!(entries.len(), 6, "{run}");
    assert_eq!(
        entries[4].id,
        redriven[0]["newId"].as_str().unwrap_or_default()
    );
    let unmarked = |i: usize| {
        let mut f = entries[i].fields.clone();
        f.remove(dlq::REDRIVE_GROUP);
        f.remove(dlq::REDRIVEN_FROM);
        f
    };
    assert_eq!(unmarked(4), originals[0], "{run}");
    assert_eq!(unmarked(5), originals[2], "{run}");

    // New entries: every group of the stream sees them as unread (the
    // consumers of other groups than the one named acknowledge them).
    let status = streamctl(&redis.url(), &["--json", "status"]).ok().json();
    let orders = stream_of(&status, ORDER_EVENTS);
    assert_eq!(group_of(orders, PAYMENT_GROUP)["lag"], 3, "{status:#}");
    assert_eq!(group_of(orders, NOTIFICATION_GROUP)["lag"], 6, "{status:#}");
}

// ---------------------------------------------------------------------------
// trim
// ---------------------------------------------------------------------------

#[test]
fn trim_dry_run_counts_only_acknowledged_entries_and_removes_nothing() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    create_topology(&mut conn);
    let ids = orders(&mut conn, 10);
    read_group(&mut conn, ORDER_EVENTS, PAYMENT_GROUP, "pay-1", 10, ">");
    read_group(
        &mut conn,
        ORDER_EVENTS,
        NOTIFICATION_GROUP,
        "note-1",
        10,
        ">",
    );
    for (i, id) in ids.iter().enumerate() {
        xack(&mut conn, ORDER_EVENTS, NOTIFICATION_GROUP, id);
        // The fourth order stays unacknowledged by payment-service.
        if i != 3 {
            xack(&mut conn, ORDER_EVENTS, PAYMENT_GROUP, id);
        }
    }

    let args = ["--json", "trim", "--dry-run", "--retain", "2"];
    let run = streamctl(&redis.url(), &args).ok();
    let report = run.json();
    assert_eq!(report["dryRun"], true, "{run}");
    let orders = stream_of(&report, ORDER_EVENTS);
    assert_eq!(orders["length"], 10, "{run}");
    assert_eq!(
        orders["removable"], 3,
        "only the entries before the unacked one: {run}"
    );
    assert_eq!(orders["bound"], ids[3].as_str(), "{run}");
    assert_eq!(stream_of(&report, PAYMENT_EVENTS)["removable"], 0, "{run}");
    assert_eq!(
        redis.xlen(ORDER_EVENTS),
        10,
        "a dry run removed entries: {run}"
    );

    let run = streamctl(&redis.url(), &["trim", "--dry-run", "--retain", "2"]).ok();
    assert!(run.stdout.contains("REMOVABLE"), "{run}");
    assert!(
        run.stdout.contains(ids[3].as_str()),
        "the bound is shown: {run}"
    );
    assert_eq!(redis.xlen(ORDER_EVENTS), 10, "{run}");

    // Without --dry-run it removes exactly what it said, and keeps the
    // unacknowledged entry.
    let run = streamctl(&redis.url(), &["--json", "trim", "--retain", "2"]).ok();
    let report = run.json();
    assert_eq!(stream_of(&report, ORDER_EVENTS)["removed"], 3, "{run}");
    let left = redis.entries(ORDER_EVENTS);
    assert_eq!(left.len(), 7, "{run}");
    assert_eq!(left[0].id, ids[3], "the unacknowledged entry stays: {run}");
}

// ---------------------------------------------------------------------------
// The command line itself
// ---------------------------------------------------------------------------

#[test]
fn bad_usage_exits_2_with_one_line_naming_the_problem() {
    // Never the default 127.0.0.1:6379, even if parsing let something by.
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let env = [("REDIS_URL", url.as_str())];
    let cases: &[(&[&str], &str)] = &[
        (&[], "no command"),
        (&["frobnicate"], "frobnicate"),
        (&["pending", ORDER_EVENTS], "pending needs"),
        (
            &["pending", ORDER_EVENTS, PAYMENT_GROUP, "--count", "abc"],
            "--count",
        ),
        (&["dlq", "redrive", ORDER_EVENTS], "--id"),
        (&["dlq", "redrive", ORDER_EVENTS, "--id", "17"], "17"),
        (&["status", "--bogus"], "--bogus"),
        (&["trim", "--count", "3"], "--count"),
        (&["--redis-url", "http://nope", "status"], "Redis URL"),
    ];
    for (args, names) in cases {
        let run = streamctl_env(&env, args);
        run.expect_code(2);
        assert_eq!(run.stderr.lines().count(), 1, "one line:\n{run}");
        assert!(run.stderr.contains(names), "should name {names:?}:\n{run}");
        assert!(run.stderr.contains("see --help"), "{run}");
        assert!(run.stdout.is_empty(), "{run}");
    }
}

#[test]
fn unreachable_redis_exits_1_quickly_naming_the_url() {
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let run = streamctl(&url, &["status"]);
    run.expect_code(1);
    assert!(
        run.elapsed < Duration::from_secs(5),
        "took too long:\n{run}"
    );
    assert_eq!(run.stderr.lines().count(), 1, "one line:\n{run}");
    assert!(run.stderr.contains(&url), "names the URL:\n{run}");

    // Through the environment too, and never showing the password.
    let secret = format!("redis://admin:s3cret@127.0.0.1:{}", closed_port());
    let run = streamctl_env(&[("REDIS_URL", &secret)], &["pending", "s", "g"]);
    run.expect_code(1);
    assert!(run.stderr.contains("admin:***@127.0.0.1"), "{run}");
    assert!(!run.stderr.contains("s3cret"), "password shown:\n{run}");
}

#[test]
fn help_and_version() {
    let run = streamctl_env(&[], &["--help"]).ok();
    for needle in [
        "status",
        "pending",
        "dlq list",
        "dlq redrive",
        "trim",
        "--json",
    ] {
        assert!(run.stdout.contains(needle), "{needle} not in help:\n{run}");
    }
    assert!(
        run.stdout.contains("re-added as a NEW entry"),
        "help warns that redrive adds a new entry:\n{run}"
    );
    let run = streamctl_env(&[], &["--version"]).ok();
    assert_eq!(
        run.stdout.trim(),
        format!("streamctl {}", env!("CARGO_PKG_VERSION")),
        "{run}"
    );
}

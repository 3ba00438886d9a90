//! Process metrics, rendered in the Prometheus text format on `/metrics`.
//!
//! One global registry: every thread of a service counts into it without
//! being handed a reference, and the HTTP layer renders it. Counters are
//! keyed by their label values; the maps stay tiny (a few streams, groups,
//! statuses, outcomes), and hot paths update them once per batch, not once
//! per entry.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Upper bounds of the handler latency histogram, in seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Default)]
struct Registry {
    http: Mutex<BTreeMap<u16, u64>>,
    events: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    redeliveries: Mutex<BTreeMap<(String, String), u64>>,
    dead_lettered: Mutex<BTreeMap<(String, String), u64>>,
    dlq_evicted: Mutex<BTreeMap<String, u64>>,
    trim_held_back: Mutex<BTreeMap<(String, String), u64>>,
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
    reconnects: AtomicU64,
    failovers: AtomicU64,
    wait_unconfirmed: AtomicU64,
    orders_batched: AtomicU64,
    order_batches: AtomicU64,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a metrics lock leaves plain counters behind;
    // they are still good to read.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts one HTTP answer with this status.
pub fn http_request(status: u16) {
    *lock(&registry().http).entry(status).or_default() += 1;
}

/// Counts `n` events of `stream`/`group` that ended with `outcome`
/// (`ok`, `failed`, `dead_lettered`, `duplicate`, `skipped`).
pub fn events(stream: &str, group: &str, outcome: &'static str, n: u64) {
    if n > 0 {
        *lock(&registry().events)
            .entry((stream.to_string(), group.to_string(), outcome))
            .or_default() += n;
    }
}

/// Counts `n` deliveries that were not the first for their entry.
pub fn redeliveries(stream: &str, group: &str, n: u64) {
    if n > 0 {
        *lock(&registry().redeliveries)
            .entry((stream.to_string(), group.to_string()))
            .or_default() += n;
    }
}

/// Counts one entry the group dead-lettered (the letter is written once,
/// by the first group to give up on the entry).
pub fn dead_lettered(stream: &str, group: &str) {
    *lock(&registry().dead_lettered)
        .entry((stream.to_string(), group.to_string()))
        .or_default() += 1;
}

/// Counts `n` dead letters of `<stream>:dlq` deleted to keep the newest
/// `DLQ_RETAIN_ENTRIES`.
pub fn dlq_evicted(stream: &str, n: u64) {
    if n > 0 {
        *lock(&registry().dlq_evicted)
            .entry(stream.to_string())
            .or_default() += n;
    }
}

/// Sets how many entries of `stream` beyond `RETAIN_ENTRIES` trimming had
/// to keep because `group` had not read or acknowledged them (`None`:
/// nothing held back; every group of the stream shown is set to 0).
pub fn trim_held_back(stream: &str, held: Option<(&str, u64)>) {
    let mut map = lock(&registry().trim_held_back);
    for ((s, _), n) in map.iter_mut() {
        if s == stream {
            *n = 0;
        }
    }
    if let Some((group, n)) = held {
        map.insert((stream.to_string(), group.to_string()), n);
    }
}

/// Records how long handling `n` entries took (each gets `elapsed / n`).
pub fn handler_latency(stream: &str, group: &str, elapsed: Duration, n: u64) {
    if n == 0 {
        return;
    }
    let each = elapsed.as_secs_f64() / n as f64;
    let mut map = lock(&registry().latency);
    let h = map
        .entry((stream.to_string(), group.to_string()))
        .or_default();
    if h.counts.is_empty() {
        h.counts = vec![0; BUCKETS.len()];
    }
    if let Some(i) = BUCKETS.iter().position(|b| each <= *b) {
        h.counts[i] += n;
    }
    h.sum += each * n as f64;
    h.count += n;
}

/// Counts one reconnection to Redis.
pub fn reconnect() {
    registry().reconnects.fetch_add(1, Ordering::Relaxed);
}

/// Counts one failover followed: the sentinels named a new master.
pub fn failover() {
    registry().failovers.fetch_add(1, Ordering::Relaxed);
}

/// Counts `n` writes that fewer replicas than `REDIS_WAIT_REPLICAS`
/// confirmed in time.
pub fn wait_unconfirmed(n: u64) {
    registry().wait_unconfirmed.fetch_add(n, Ordering::Relaxed);
}

/// Counts one group-committed batch of `n` orders.
pub fn order_batch(n: u64) {
    registry().order_batches.fetch_add(1, Ordering::Relaxed);
    registry().orders_batched.fetch_add(n, Ordering::Relaxed);
}

/// Lag and pending count of one group, read from `XINFO GROUPS` at scrape time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupGauge {
    /// The stream.
    pub stream: String,
    /// The group.
    pub group: String,
    /// Entries not yet delivered to the group (`lag`); `None` if Redis cannot tell.
    pub lag: Option<u64>,
    /// Entries delivered and not yet acknowledged; `None` if Redis cannot
    /// tell (the series is then left out rather than shown as 0).
    pub pending: Option<u64>,
}

/// Renders every metric, plus the given group gauges, as Prometheus text.
pub fn render(groups: &[GroupGauge]) -> String {
    let r = registry();
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        "http_requests_total",
        "counter",
        "HTTP answers by status code.",
    );
    for (status, n) in lock(&r.http).iter() {
        let _ = writeln!(out, "http_requests_total{{status=\"{status}\"}} {n}");
    }
    family(
        &mut out,
        "events_handled_total",
        "counter",
        "Stream entries handled, by stream, group and outcome.",
    );
    for ((stream, group, outcome), n) in lock(&r.events).iter() {
        let _ = writeln!(out, "events_handled_total{{stream=\"{stream}\",group=\"{group}\",outcome=\"{outcome}\"}} {n}");
    }
    family(
        &mut out,
        "handler_duration_seconds",
        "histogram",
        "Time to handle one entry.",
    );
    for ((stream, group), h) in lock(&r.latency).iter() {
        let labels = format!("stream=\"{stream}\",group=\"{group}\"");
        let mut cumulative = 0;
        for (bound, c) in BUCKETS.iter().zip(&h.counts) {
            cumulative += c;
            let _ = writeln!(
                out,
                "handler_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "handler_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "handler_duration_seconds_sum{{{labels}}} {}", h.sum);
        let _ = writeln!(
            out,
            "handler_duration_seconds_count{{{labels}}} {}",
            h.count
        );
    }
    pairs(
        &mut out,
        "redeliveries_total",
        "Deliveries of an entry after its first.",
        &lock(&r.redeliveries),
    );
    pairs(
        &mut out,
        "dead_lettered_total",
        "Entries moved to the dead-letter stream.",
        &lock(&r.dead_lettered),
    );
    family(
        &mut out,
        "dlq_evicted_total",
        "counter",
        "Oldest dead letters deleted to keep the newest DLQ_RETAIN_ENTRIES.",
    );
    for (stream, n) in lock(&r.dlq_evicted).iter() {
        let _ = writeln!(out, "dlq_evicted_total{{stream=\"{stream}\"}} {n}");
    }
    let held = lock(&r.trim_held_back);
    if !held.is_empty() {
        family(
            &mut out,
            "trim_held_back_entries",
            "gauge",
            "Entries beyond RETAIN_ENTRIES that trimming keeps because the group has not read or acknowledged them.",
        );
        for ((stream, group), n) in held.iter() {
            let _ = writeln!(
                out,
                "trim_held_back_entries{{stream=\"{stream}\",group=\"{group}\"}} {n}"
            );
        }
    }
    drop(held);
    family(
        &mut out,
        "group_lag",
        "gauge",
        "Entries of the stream not yet delivered to the group.",
    );
    for g in groups {
        if let Some(lag) = g.lag {
            let _ = writeln!(
                out,
                "group_lag{{stream=\"{}\",group=\"{}\"}} {lag}",
                g.stream, g.group
            );
        }
    }
    family(
        &mut out,
        "group_pending",
        "gauge",
        "Entries delivered to the group and not yet acknowledged.",
    );
    for g in groups {
        if let Some(pending) = g.pending {
            let _ = writeln!(
                out,
                "group_pending{{stream=\"{}\",group=\"{}\"}} {pending}",
                g.stream, g.group
            );
        }
    }
    counter(
        &mut out,
        "redis_reconnects_total",
        "Reconnections to Redis after a lost connection.",
        r.reconnects.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "redis_failovers_total",
        "Failovers followed: the sentinels named a new master and every connection moved to it.",
        r.failovers.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "redis_wait_unconfirmed_total",
        "Orders answered 503, or entries not yet acknowledged, because fewer replicas than REDIS_WAIT_REPLICAS confirmed them in time.",
        r.wait_unconfirmed.load(Ordering::Relaxed),
    );
    let batches = r.order_batches.load(Ordering::Relaxed);
    if batches > 0 {
        counter(
            &mut out,
            "order_batches_total",
            "Group-committed XADD batches.",
            batches,
        );
        counter(
            &mut out,
            "orders_batched_total",
            "Orders written in those batches.",
            r.orders_batched.load(Ordering::Relaxed),
        );
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A counter without labels: its family lines and its one sample.
fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

fn pairs(out: &mut String, name: &str, help: &str, map: &BTreeMap<(String, String), u64>) {
    family(out, name, "counter", help);
    for ((stream, group), n) in map {
        let _ = writeln!(out, "{name}{{stream=\"{stream}\",group=\"{group}\"}} {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_count_redis_did_not_give_is_left_out_not_shown_as_zero() {
        let text = render(&[GroupGauge {
            stream: "unknown-pending".into(),
            group: "g".into(),
            lag: None,
            pending: None,
        }]);
        assert!(
            !text.contains("group_pending{stream=\"unknown-pending\""),
            "{text}"
        );
        assert!(
            !text.contains("group_lag{stream=\"unknown-pending\""),
            "{text}"
        );
    }

    #[test]
    fn renders_counters_and_gauges() {
        http_request(200);
        events("s", "g", "ok", 3);
        handler_latency("s", "g", Duration::from_millis(3), 3);
        let text = render(&[GroupGauge {
            stream: "s".into(),
            group: "g".into(),
            lag: Some(7),
            pending: Some(2),
        }]);
        assert!(
            text.contains("http_requests_total{status=\"200\"}"),
            "{text}"
        );
        assert!(
            text.contains("events_handled_total{stream=\"s\",group=\"g\",outcome=\"ok\"}"),
            "{text}"
        );
        assert!(
            text.contains("group_lag{stream=\"s\",group=\"g\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("group_pending{stream=\"s\",group=\"g\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("handler_duration_seconds_bucket{stream=\"s\",group=\"g\",le=\"0.001\"}"),
            "{text}"
        );
    }
}

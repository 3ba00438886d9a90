//! Order -> payment-event latency at a fixed, low rate.
//!
//! Sender threads send order `i` at `start + i / rate` (deadlines computed
//! from the start, so pacing does not drift), each recording the instant
//! just before its request. A watcher thread follows `payment-events` with
//! `XREAD BLOCK` from the stream's last ID before the first order, and
//! reports `(orderId, instant seen)` over a channel. The payment may well be
//! seen before the HTTP answer (which carries the orderId) is back; that is
//! why both sides are only joined at the end, by orderId:
//! latency = payment seen - request sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, ScopedJoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use redis::{Connection, Value};
use streamline::topology::PAYMENT_EVENTS;
use testkit::stream::{read_reply_entries, try_stream_info};

use crate::args::Args;
use crate::client::Client;
use crate::progress::Progress;
use crate::stats::{self, Summary};
use crate::system::{order_path, redis_connect};

/// At most this many sender threads: enough that one slow answer does not
/// delay the next deadline.
const MAX_SENDERS: usize = 4;
/// How long to wait for the last payments once every order is sent.
const GRACE: Duration = Duration::from_secs(5);
/// The watcher's `XREAD BLOCK`, in ms: how quickly it notices a stop.
const BLOCK_MS: u64 = 50;
/// Time for the senders to connect before the first deadline.
const WARM_UP: Duration = Duration::from_millis(100);

/// What a latency run measured.
#[derive(Debug, Default)]
pub struct LatencyRun {
    /// Orders sent.
    pub sent: usize,
    /// Orders answered 200 with an orderId.
    pub accepted: usize,
    /// Accepted orders whose payment was seen.
    pub matched: usize,
    /// Requests sent more than a period after their deadline.
    pub late: usize,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Achieved send rate.
    pub rate: f64,
    /// HTTP answer latency.
    pub http: Summary,
    /// Request sent -> payment entry seen.
    pub payment: Summary,
}

/// An accepted order.
struct Sent {
    order_id: String,
    at: Instant,
    took: Duration,
}

/// One sender thread's orders.
#[derive(Default)]
struct SenderResult {
    sent: Vec<Sent>,
    attempts: usize,
    late: usize,
    first_error: Option<String>,
}

/// `--rate` orders/s for `--seconds`; see the module docs.
pub fn run(args: &Args, progress: &Progress) -> Result<LatencyRun, String> {
    let total = usize::try_from(args.rate * args.seconds).unwrap_or(usize::MAX);
    let mut conn = redis_connect(&args.redis)?;
    let from = last_payment_id(&mut conn)?;
    let stop = AtomicBool::new(false);
    let (seen_tx, seen_rx) = crossbeam_channel::unbounded();
    let hard_deadline = Instant::now() + Duration::from_secs(args.seconds) + args.time_limit;
    progress.phase(&format!("latency at {}/s", args.rate), total as u64);
    let result = thread::scope(|s| {
        let stopped = &stop;
        // The watcher owns the only sender: when it ends, `join` stops waiting.
        let watcher = thread::Builder::new()
            .name(format!("watcher:{PAYMENT_EVENTS}"))
            .spawn_scoped(s, move || {
                watch(conn, from, seen_tx, stopped, hard_deadline)
            })
            .map_err(|e| format!("cannot start the watcher: {e}"))?;
        let senders = send_paced(args, total, hard_deadline, progress);
        let run = senders.map(|r| join(r, &seen_rx, args.seconds));
        stop.store(true, Ordering::Relaxed);
        let watched = watcher
            .join()
            .unwrap_or_else(|_| Err("watcher panicked".into()));
        let mut run = run?;
        if let Err(e) = watched {
            run.first_error.get_or_insert(e);
        }
        Ok(run)
    });
    progress.idle();
    result
}

/// The ID after which payments of this run can appear.
fn last_payment_id(conn: &mut Connection) -> Result<String, String> {
    let info = try_stream_info(conn, PAYMENT_EVENTS)?;
    Ok(info
        .map(|i| i.last_generated_id)
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| "0-0".to_string()))
}

/// Follows `payment-events` until told to stop; sends `(orderId, seen)`.
fn watch(
    mut conn: Connection,
    mut last: String,
    seen: Sender<(String, Instant)>,
    stop: &AtomicBool,
    hard_deadline: Instant,
) -> Result<(), String> {
    while !stop.load(Ordering::Relaxed) && Instant::now() < hard_deadline {
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(512)
            .arg("BLOCK")
            .arg(BLOCK_MS)
            .arg("STREAMS")
            .arg(PAYMENT_EVENTS)
            .arg(&last)
            .query(&mut conn)
            .map_err(|e| format!("XREAD {PAYMENT_EVENTS}: {e}"))?;
        let at = Instant::now();
        for (id, order_id) in payment_entries(&reply) {
            last = id;
            if let Some(order_id) = order_id {
                if seen.send((order_id, at)).is_err() {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// `(entry ID, orderId)` of every entry in an `XREAD` reply (RESP2 or 3).
fn payment_entries(reply: &Value) -> Vec<(String, Option<String>)> {
    read_reply_entries(reply)
        .into_iter()
        .map(|e| {
            let order_id = e.text("orderId");
            (e.id, order_id)
        })
        .collect()
}

/// Runs the sender threads; order `i` goes to sender `i % senders`.
fn send_paced(
    args: &Args,
    total: usize,
    hard_deadline: Instant,
    progress: &Progress,
) -> Result<Vec<SenderResult>, String> {
    let senders = args.clients.clamp(1, MAX_SENDERS);
    let start = Instant::now() + WARM_UP;
    let pace = Pace {
        start,
        rate: args.rate,
        stride: senders,
        total,
        hard_deadline,
    };
    thread::scope(|s| {
        let handles: Result<Vec<ScopedJoinHandle<SenderResult>>, String> = (0..senders)
            .map(|k| {
                let pace = &pace;
                thread::Builder::new()
                    .name(format!("sender-{k}"))
                    .spawn_scoped(s, move || sender(k, pace, args, progress))
                    .map_err(|e| format!("cannot start a sender thread: {e}"))
            })
            .collect();
        Ok(handles?
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect())
    })
}

/// When each order is due.
struct Pace {
    start: Instant,
    rate: u64,
    stride: usize,
    total: usize,
    hard_deadline: Instant,
}

impl Pace {
    fn due(&self, i: usize) -> Instant {
        self.start + Duration::from_nanos(i as u64 * 1_000_000_000 / self.rate)
    }
}

fn sender(k: usize, pace: &Pace, args: &Args, progress: &Progress) -> SenderResult {
    let mut client = Client::new(args.client, &args.target);
    let mut result = SenderResult::default();
    if let Err(e) = client.warm_up() {
        result.first_error = Some(e);
        return result;
    }
    let period = Duration::from_nanos(1_000_000_000 / pace.rate);
    let mut path = String::with_capacity(256);
    for i in (k..pace.total).step_by(pace.stride) {
        let due = pace.due(i);
        let now = Instant::now();
        if now >= pace.hard_deadline {
            break;
        }
        if due > now {
            thread::sleep(due - now);
        }
        path.clear();
        order_path(&mut path, i, k);
        let at = Instant::now();
        result.late += usize::from(at > due + period);
        let answer = client.get(&path);
        result.record(answer, at, &client, progress);
    }
    result
}

impl SenderResult {
    fn record(
        &mut self,
        answer: Result<u16, String>,
        at: Instant,
        client: &Client,
        progress: &Progress,
    ) {
        let took = at.elapsed();
        self.attempts += 1;
        let error = match answer {
            Ok(200) => match order_id(client.body()) {
                Some(order_id) => {
                    self.sent.push(Sent { order_id, at, took });
                    progress.ok();
                    return;
                }
                None => format!("no orderId in {:?}", String::from_utf8_lossy(client.body())),
            },
            Ok(status) => format!("HTTP {status}: {}", String::from_utf8_lossy(client.body())),
            Err(e) => e,
        };
        progress.failed();
        self.first_error.get_or_insert(error);
    }
}

fn order_id(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("orderId")?.as_str().map(str::to_string)
}

/// Matches payments to orders; waits up to [`GRACE`] for the last ones.
fn join(
    senders: Vec<SenderResult>,
    seen: &Receiver<(String, Instant)>,
    seconds: u64,
) -> LatencyRun {
    let mut run = LatencyRun::default();
    let mut want: HashMap<String, Instant> = HashMap::new();
    let mut http = Vec::new();
    let mut first = None::<Instant>;
    let mut last = None::<Instant>;
    for s in senders {
        run.sent += s.attempts;
        run.late += s.late;
        run.first_error = run.first_error.or(s.first_error);
        for o in s.sent {
            http.push(stats::nanos(o.took));
            first = Some(first.map_or(o.at, |f| f.min(o.at)));
            last = Some(last.map_or(o.at, |l| l.max(o.at)));
            want.insert(o.order_id, o.at);
        }
    }
    run.accepted = want.len();
    run.rate = match (first, last) {
        (Some(f), Some(l)) if run.accepted > 1 => stats::rate(run.accepted as u64 - 1, l - f),
        _ => run.accepted as f64 / seconds as f64,
    };
    run.http = stats::summarize(&mut http);
    let mut latencies = Vec::with_capacity(want.len());
    let deadline = Instant::now() + GRACE;
    while !want.is_empty() {
        let Ok((order_id, at)) = seen.recv_deadline(deadline) else {
            break;
        };
        if let Some(sent) = want.remove(&order_id) {
            latencies.push(stats::nanos(at.saturating_duration_since(sent)));
        }
    }
    run.matched = latencies.len();
    run.payment = stats::summarize(&mut latencies);
    run
}

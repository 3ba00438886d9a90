//! Group commit of orders into `order-events`.
//!
//! An HTTP worker validates an order and queues it with its request. If no
//! write is in flight, that worker becomes a writer on the spot: it takes
//! whatever has queued up (up to [`MAX_BATCH`]), writes it as one pipelined
//! batch of `XADD`s (one round trip however many orders), answers every
//! request with its own entry ID, and goes on while orders keep queueing;
//! then it returns to HTTP. While a write is in flight, new orders just
//! queue and ride the next batch. At most as many writers as there are
//! Redis connections ([`Producer::new`]'s `writers`) run at once.
//!
//! A writer works in turns: at most [`TURN_BATCHES`] batches, none started
//! after [`TURN_TIME`]; between turns it reports progress to the watchdog
//! and yields the CPU. However long the queue keeps refilling, its
//! heartbeat waits at most one turn (the last batch of a turn is bounded by
//! the link's read timeout, half the request timeout), by construction.
//!
//! Writing on the worker, not on a writer thread of its own, saves a thread
//! hand-off per order, the largest cost on a small host (see
//! `BENCHMARKS.md`). A request waits only for the batch it is in; a failed
//! batch fails only its own requests, with `503`; an order not written
//! within the request timeout is answered `503`.
//!
//! Orders with an `Idempotency-Key` ride the same batches: a batch holding
//! one is written by one script call ([`crate::idempotency`]) that checks
//! and stores the keys and `XADD`s every order of the batch atomically; a
//! batch without keys is the pipelined `XADD`s, as before.
//!
//! With `REDIS_WAIT_REPLICAS=N` each batch ends with one `WAIT N`, in the
//! same pipeline: an order is answered `2xx` only once N replicas have it
//! (a failover can then not lose it), else `503`. One `WAIT` per batch, so
//! group commit keeps its throughput; its timeout is clamped so that the
//! answer still comes within the request timeout.
//!
//! `XADD ... NOMKSTREAM` never creates the stream: if it is gone (`FLUSHALL`,
//! Redis restarted empty) the writer recreates the topology's groups first
//! and writes again, so no order is ever written where a group cannot see it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::Value;
use serde_json::json;
use tiny_http::Request;

use crate::connection::{Link, Redis, WaitFor};
use crate::http;
use crate::idempotency::{self, Outcome};
use crate::notify::Heartbeat;
use crate::record::Order;
use crate::topology::{self, ORDER_EVENTS};

/// Most orders written in one round trip.
pub const MAX_BATCH: usize = 256;
/// Orders that may wait for a writer; past this, `503` at once.
const QUEUE: usize = 4096;
/// Most batches a writer writes before it reports progress and yields.
pub const TURN_BATCHES: usize = 8;
/// Longest a writer starts new batches before it reports progress and
/// yields.
pub const TURN_TIME: Duration = Duration::from_millis(50);

/// An accepted order waiting to be written, and the request to answer.
struct Job {
    order: Order,
    request: Request,
    /// `200` for `GET /order`, `201` for `POST /orders`.
    status: u16,
    /// The request's `Idempotency-Key`, if it had one.
    key: Option<String>,
    deadline: Instant,
}

/// The queue, and the Redis links no writer holds right now. A worker
/// becomes a writer by taking a link, and stops being one by putting it
/// back, both under this lock: so whenever orders are queued, a writer is
/// at work or about to see them.
struct State {
    jobs: VecDeque<Job>,
    idle_links: Vec<Link>,
}

/// The handle HTTP workers submit orders through.
#[derive(Clone)]
pub struct Producer {
    state: Arc<Mutex<State>>,
    timeout: Duration,
    read_timeout: Duration,
    wait: Option<WaitFor>,
    /// How long an `Idempotency-Key` is remembered, in seconds.
    idempotency_ttl_s: u64,
}

impl Producer {
    /// A producer with `writers` Redis connections (so at most that many
    /// batches in flight). An order not written within `timeout` is
    /// answered `503`.
    pub fn new(redis: &Redis, writers: usize, timeout: Duration) -> Producer {
        // Half the timeout per round trip: a batch stuck on a paused Redis
        // fails in time for the orders queued behind it to be answered
        // within the timeout too.
        let read_timeout = (timeout / 2).max(Duration::from_millis(50));
        let idle_links = (0..writers.max(1))
            .map(|_| Link::new(redis.clone(), read_timeout, topology::ensure_groups))
            .collect();
        let state = State {
            jobs: VecDeque::with_capacity(64),
            idle_links,
        };
        Producer {
            state: Arc::new(Mutex::new(state)),
            timeout,
            read_timeout,
            wait: None,
            idempotency_ttl_s: 86_400,
        }
    }

    /// Remembers each `Idempotency-Key` for `seconds` (`IDEMPOTENCY_TTL_S`).
    pub fn with_idempotency_ttl(mut self, seconds: u64) -> Producer {
        self.idempotency_ttl_s = seconds.max(1);
        self
    }

    /// Answers `2xx` only once `wait` replicas confirmed an order's batch.
    pub fn with_wait(mut self, wait: Option<WaitFor>) -> Producer {
        self.wait = wait;
        self
    }

    /// The `WAIT` for a batch whose oldest order must be answered by
    /// `deadline`: within the request timeout, and within the connection's
    /// read timeout (the reply must come before the read gives up).
    fn wait_for(&self, deadline: Instant) -> Option<Wait> {
        let w = self.wait?;
        // Redis ends a timed-out WAIT on its next event-loop tick (up to
        // 100 ms late at the default `hz 10`): leave room for that.
        let margin = Duration::from_millis(200);
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .min(self.read_timeout)
            .saturating_sub(margin);
        Some(Wait {
            replicas: w.replicas,
            millis: w.millis_within(budget),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `order`; its request is answered with `status` and the entry
    /// ID, or `503`. Returns once the order is queued, or after writing it
    /// (and whatever queued meanwhile) if no write was in flight; `beat`
    /// is the calling thread's heartbeat, beaten between writer turns.
    pub fn submit(&self, order: Order, request: Request, status: u16, beat: &Heartbeat) {
        self.submit_keyed(order, None, request, status, beat);
    }

    /// [`Producer::submit`] for a request that may carry an
    /// `Idempotency-Key` (see [`crate::idempotency`]): the order rides the
    /// same batches, and a batch holding a keyed order is written by one
    /// script call instead of pipelined `XADD`s.
    pub fn submit_keyed(
        &self,
        order: Order,
        key: Option<String>,
        request: Request,
        status: u16,
        beat: &Heartbeat,
    ) {
        let job = Job {
            order,
            request,
            status,
            key,
            deadline: Instant::now() + self.timeout,
        };
        let link = {
            let mut state = self.lock();
            if state.jobs.len() >= QUEUE {
                drop(state);
                return http::respond(
                    job.request,
                    http::error(503, "too many orders waiting for Redis; retry later"),
                );
            }
            state.jobs.push_back(job);
            state.idle_links.pop()
        };
        if let Some(link) = link {
            self.write_while_queued(link, beat);
        }
    }

    /// Writes batches until the queue is empty, then gives `link` back;
    /// in turns, with a beat and a yield between them.
    fn write_while_queued(&self, mut link: Link, beat: &Heartbeat) {
        loop {
            beat.beat();
            match self.write_turn(link) {
                Some(back) => link = back,
                None => return,
            }
            std::thread::yield_now();
        }
    }

    /// One writer turn: at most [`TURN_BATCHES`] batches, none started
    /// after [`TURN_TIME`]. Returns the link if orders are still queued,
    /// `None` once the queue was empty and the link given back.
    fn write_turn(&self, mut link: Link) -> Option<Link> {
        let turn_ends = Instant::now() + TURN_TIME;
        for _ in 0..TURN_BATCHES {
            if Instant::now() >= turn_ends {
                break;
            }
            let batch: Vec<Job> = {
                let mut state = self.lock();
                if state.jobs.is_empty() {
                    state.idle_links.push(link);
                    return None;
                }
                let n = state.jobs.len().min(MAX_BATCH);
                state.jobs.drain(..n).collect()
            };
            let now = Instant::now();
            let (live, expired): (Vec<Job>, Vec<Job>) =
                batch.into_iter().partition(|j| j.deadline > now);
            for job in expired {
                http::respond(
                    job.request,
                    http::error(503, "Redis did not answer within the request timeout"),
                );
            }
            if let Some(oldest) = live.iter().map(|j| j.deadline).min() {
                write_batch(
                    &mut link,
                    live,
                    self.wait_for(oldest),
                    self.idempotency_ttl_s,
                );
            }
        }
        Some(link)
    }
}

/// One `WAIT` at the end of a batch's pipeline.
#[derive(Debug, Clone, Copy)]
struct Wait {
    replicas: u64,
    millis: u64,
}

fn write_batch(link: &mut Link, batch: Vec<Job>, wait: Option<Wait>, idempotency_ttl_s: u64) {
    crate::metrics::order_batch(batch.len() as u64);
    // These orders wait for an answer: try Redis now rather than fail them
    // because an earlier batch failed.
    link.skip_backoff();
    let mut pending = batch;
    // Second pass only for orders whose stream had vanished.
    for attempt in 0..2 {
        let replies = link.run(|conn| write_all(conn, &pending, wait, idempotency_ttl_s));
        let mut replies = match replies {
            Ok(r) if r.len() == pending.len() + usize::from(wait.is_some()) => r,
            Ok(_) => {
                link.reset();
                return fail_all(pending, "unexpected reply from Redis");
            }
            Err(e) => return fail_all(pending, &format!("Redis unavailable: {e}")),
        };
        let confirmed = wait.map(|_| replies.pop().and_then(|v| crate::value::as_i64(&v)));
        let mut missing_stream = Vec::new();
        let mut written = Vec::new();
        for (job, reply) in pending.into_iter().zip(replies) {
            match Outcome::of(&reply) {
                Outcome::StreamMissing => missing_stream.push(job),
                // Written now or earlier: promised only once replicated.
                outcome @ (Outcome::Written(_) | Outcome::Replayed { .. }) => {
                    written.push((job, outcome))
                }
                outcome => answer(job, outcome),
            }
        }
        match (wait, confirmed) {
            (Some(w), Some(n)) if n.unwrap_or(0) < w.replicas as i64 => {
                not_confirmed(written, w, n.unwrap_or(0))
            }
            _ => {
                for (job, outcome) in written {
                    answer(job, outcome);
                }
            }
        }
        if missing_stream.is_empty() {
            return;
        }
        pending = missing_stream;
        if attempt == 0 {
            log::warn!(
                "{ORDER_EVENTS} is gone (FLUSHALL or an empty restart?): recreating the groups"
            );
            if let Err(e) = link.run(topology::ensure_groups) {
                return fail_all(
                    pending,
                    &format!("cannot recreate the consumer groups: {e}"),
                );
            }
        }
    }
    fail_all(pending, "order-events keeps disappearing");
}

/// Writes a batch in one round trip: pipelined `XADD`s when no order has a
/// key (the path and cost of orders without one), else one script call;
/// then its `WAIT` if any (pipelined with the `XADD`s; after the script, a
/// round trip of its own). The replies: one per job, then the `WAIT`'s.
fn write_all(
    conn: &mut redis::Connection,
    jobs: &[Job],
    wait: Option<Wait>,
    idempotency_ttl_s: u64,
) -> redis::RedisResult<Vec<Value>> {
    if jobs.iter().all(|j| j.key.is_none()) {
        return xadd_all(conn, jobs, wait);
    }
    let items: Vec<idempotency::Item<'_>> = jobs
        .iter()
        .map(|j| idempotency::Item {
            order: &j.order,
            key: j.key.as_deref(),
            status: j.status,
        })
        .collect();
    let mut replies = idempotency::write_batch(conn, ORDER_EVENTS, idempotency_ttl_s, &items)?;
    if let Some(w) = wait {
        replies.push(
            redis::cmd("WAIT")
                .arg(w.replicas)
                .arg(w.millis)
                .query(conn)?,
        );
    }
    Ok(replies)
}

/// The batch's `XADD`s, then its `WAIT` if any: one round trip.
fn xadd_all(
    conn: &mut redis::Connection,
    jobs: &[Job],
    wait: Option<Wait>,
) -> redis::RedisResult<Vec<Value>> {
    let mut pipe = redis::pipe();
    for job in jobs {
        let cmd = pipe
            .cmd("XADD")
            .arg(ORDER_EVENTS)
            .arg("NOMKSTREAM")
            .arg("*");
        for (k, v) in job.order.fields() {
            cmd.arg(k).arg(v);
        }
    }
    if let Some(w) = wait {
        pipe.cmd("WAIT").arg(w.replicas).arg(w.millis);
    }
    pipe.query(conn)
}

/// Written, but fewer than `REDIS_WAIT_REPLICAS` replicas have them: a
/// failover now could lose them, so they are not promised.
fn not_confirmed(written: Vec<(Job, Outcome)>, wait: Wait, got: i64) {
    if written.is_empty() {
        return;
    }
    crate::metrics::wait_unconfirmed(written.len() as u64);
    let why = format!(
        "written, but confirmed by {got} of {} replicas within {} ms (REDIS_WAIT_REPLICAS); \
         a retry with the same Idempotency-Key is safe",
        wait.replicas, wait.millis
    );
    log::warn!("{} order(s) not confirmed: {why}", written.len());
    for (job, _) in written {
        http::respond(job.request, http::error(503, &why));
    }
}

fn answer_ok(job: Job, id: String) {
    http::respond(
        job.request,
        http::json(job.status, &json!({ "status": "ok", "orderId": id })),
    );
}

/// Answers one order of a written batch.
fn answer(job: Job, outcome: Outcome) {
    match outcome {
        Outcome::Written(id) => answer_ok(job, id),
        Outcome::Replayed { status, order_id } => {
            let body = json!({ "status": "ok", "orderId": order_id });
            let response = http::json(status, &body).with_header(idempotency::replayed_header());
            http::respond(job.request, response);
        }
        Outcome::Conflict => http::respond(
            job.request,
            http::error(
                422,
                "Idempotency-Key was already used for an order with other userId, productId \
                 or price; nothing written (use a new key for a new order)",
            ),
        ),
        Outcome::StreamMissing | Outcome::Unexpected => {
            http::respond(job.request, http::error(503, "unexpected reply from Redis"))
        }
    }
}

fn fail_all(jobs: Vec<Job>, why: &str) {
    log::warn!("{} order(s) not written: {why}", jobs.len());
    for job in jobs {
        http::respond(job.request, http::error(503, why));
    }
}

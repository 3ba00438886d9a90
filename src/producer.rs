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
//! Writing on the worker, not on a writer thread of its own, saves a thread
//! hand-off per order, the largest cost on a small host (see
//! `BENCHMARKS.md`). A request waits only for the batch it is in; a failed
//! batch fails only its own requests, with `503`; an order not written
//! within the request timeout is answered `503`.
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

use crate::connection::{Link, Redis};
use crate::http;
use crate::idempotency::{self, Outcome};
use crate::record::Order;
use crate::topology::{self, ORDER_EVENTS};

/// Most orders written in one round trip.
pub const MAX_BATCH: usize = 256;
/// Orders that may wait for a writer; past this, `503` at once.
const QUEUE: usize = 4096;

/// An accepted order waiting to be written, and the request to answer.
struct Job {
    order: Order,
    request: Request,
    /// `200` for `GET /order`, `201` for `POST /orders`.
    status: u16,
    deadline: Instant,
    /// The request's `Idempotency-Key`, if it had one.
    key: Option<String>,
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
            idempotency_ttl_s: 86_400,
        }
    }

    /// Remembers each `Idempotency-Key` for `seconds` (`IDEMPOTENCY_TTL_S`).
    pub fn with_idempotency_ttl(mut self, seconds: u64) -> Producer {
        self.idempotency_ttl_s = seconds.max(1);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `order`; its request is answered with `status` and the entry
    /// ID, or `503`. Returns once the order is queued, or after writing it
    /// (and whatever queued meanwhile) if no write was in flight.
    pub fn submit(&self, order: Order, request: Request, status: u16) {
        self.submit_keyed(order, None, request, status);
    }

    /// [`Producer::submit`] for a request that may carry an
    /// `Idempotency-Key` (see [`crate::idempotency`]): the order rides the
    /// same batches, and a batch holding a keyed order is written by one
    /// script call instead of pipelined `XADD`s.
    pub fn submit_keyed(&self, order: Order, key: Option<String>, request: Request, status: u16) {
        let job = Job {
            order,
            request,
            status,
            deadline: Instant::now() + self.timeout,
            key,
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
            self.write_while_queued(link);
        }
    }

    /// Writes batches until the queue is empty, then gives `link` back.
    fn write_while_queued(&self, mut link: Link) {
        loop {
            let batch: Vec<Job> = {
                let mut state = self.lock();
                if state.jobs.is_empty() {
                    state.idle_links.push(link);
                    return;
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
            if !live.is_empty() {
                write_batch(&mut link, live, self.idempotency_ttl_s);
            }
        }
    }
}

fn write_batch(link: &mut Link, batch: Vec<Job>, idempotency_ttl_s: u64) {
    crate::metrics::order_batch(batch.len() as u64);
    // These orders wait for an answer: try Redis now rather than fail them
    // because an earlier batch failed.
    link.skip_backoff();
    let mut pending = batch;
    // Second pass only for orders whose stream had vanished.
    for attempt in 0..2 {
        let replies = link.run(|conn| write_all(conn, &pending, idempotency_ttl_s));
        let replies = match replies {
            Ok(r) if r.len() == pending.len() => r,
            Ok(_) => {
                link.reset();
                return fail_all(pending, "unexpected reply from Redis");
            }
            Err(e) => return fail_all(pending, &format!("Redis unavailable: {e}")),
        };
        let mut missing_stream = Vec::new();
        for (job, reply) in pending.into_iter().zip(replies) {
            match Outcome::of(&reply) {
                Outcome::StreamMissing => missing_stream.push(job),
                outcome => answer(job, outcome),
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
/// key (the path and cost of orders without one), else one script call.
fn write_all(
    conn: &mut redis::Connection,
    jobs: &[Job],
    idempotency_ttl_s: u64,
) -> redis::RedisResult<Vec<Value>> {
    if jobs.iter().all(|j| j.key.is_none()) {
        return xadd_all(conn, jobs);
    }
    let items: Vec<idempotency::Item<'_>> = jobs
        .iter()
        .map(|j| idempotency::Item {
            order: &j.order,
            key: j.key.as_deref(),
            status: j.status,
        })
        .collect();
    idempotency::write_batch(conn, ORDER_EVENTS, idempotency_ttl_s, &items)
}

fn xadd_all(conn: &mut redis::Connection, jobs: &[Job]) -> redis::RedisResult<Vec<Value>> {
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
    pipe.query(conn)
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

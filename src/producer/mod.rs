//! Group commit of orders into `order-events`.
//!
//! An HTTP worker validates an order and queues it with its request;
//! queued orders are written as batches, one pipeline of `XADD`s per batch
//! (however many orders it holds), and every request is answered with its
//! own entry ID once Redis answered its batch, never before. While batches
//! are in flight new orders queue and ride the next one. A failed batch
//! fails only its own requests, with `503`; an order not written within the
//! request timeout is answered `503`.
//!
//! Two ways to keep batches in flight, chosen by the connection:
//!
//! * `pipelined.rs` (plain TCP and Unix sockets): one connection split into
//!   halves ([`crate::wire`]). The worker that queues an order sends the
//!   batch itself, if fewer than [`WINDOW`] batches are in flight, and goes
//!   back to HTTP at once; a reply thread (`order-replies`) reads the
//!   replies in order and answers each batch's requests. A Redis a WAN
//!   link away then costs latency, not throughput: up to [`WINDOW`]
//!   batches ride one round trip.
//! * `links.rs` (TLS, whose session cannot be split): the worker that queues
//!   an order becomes a writer if a Redis connection is free (two of
//!   them), writes batches and waits for each reply, then returns to HTTP.
//!
//! Orders with an `Idempotency-Key` ride the same batches: a batch holding
//! one is written by one script call ([`crate::idempotency`]) that checks
//! and stores the keys and `XADD`s every order of the batch atomically; a
//! batch without keys is the pipelined `XADD`s.
//!
//! With `REDIS_WAIT_REPLICAS=N` each batch ends with one `WAIT N`, in the
//! same pipeline: an order is answered `2xx` only once N replicas have it
//! (a failover can then not lose it), else `503`. One `WAIT` per batch, so
//! group commit keeps its throughput; its timeout is clamped so that the
//! answer still comes within the request timeout.
//!
//! `XADD ... NOMKSTREAM` never creates the stream: if it is gone (`FLUSHALL`,
//! Redis restarted empty) the topology's groups are recreated first and the
//! orders written again, so no order is ever written where a group cannot
//! see it.

mod links;
mod pipelined;

use std::time::{Duration, Instant};

use redis::Value;
use serde_json::json;
use tiny_http::Request;

use crate::connection::{Redis, WaitFor};
use crate::http;
use crate::idempotency::{self, Outcome};
use crate::notify::{Heartbeat, Heartbeats};
use crate::record::Order;
use crate::topology::ORDER_EVENTS;

/// Most orders written in one round trip.
pub const MAX_BATCH: usize = 256;
/// Orders that may wait for a writer; past this, `503` at once.
const QUEUE: usize = 4096;
/// Most batches in flight on a pipelined connection: enough that with
/// Redis a WAN link away an order waits a small part of a round trip for
/// its batch to be sent (at 10 ms RTT and 64 clients, 8 reached 0.76 of
/// 64/RTT, 32 reached 0.86: `BENCHMARKS.md`), few enough that batches
/// still form (each is one write, one reply read and one `WAIT`).
pub const WINDOW: usize = 32;

/// An accepted order waiting to be written, and the request to answer.
struct Job {
    order: Order,
    request: Request,
    /// `200` for `GET /order`, `201` for `POST /orders`.
    status: u16,
    /// The request's `Idempotency-Key`, if it had one.
    key: Option<String>,
    deadline: Instant,
    /// Written once already into a stream that had vanished.
    rewritten: bool,
}

/// What both ways of writing share: timeouts, the `WAIT`, the key TTL.
#[derive(Debug, Clone, Copy)]
struct Settings {
    timeout: Duration,
    /// Longest wait for one round trip: half the request timeout, so a
    /// batch stuck on a paused Redis fails in time for the orders queued
    /// behind it to be answered within the timeout too.
    read_timeout: Duration,
    wait: Option<WaitFor>,
    /// How long an `Idempotency-Key` is remembered, in seconds.
    idempotency_ttl_s: u64,
}

impl Settings {
    /// The `WAIT` for a batch whose oldest order must be answered by
    /// `deadline`: within the request timeout, and within the read timeout
    /// (the reply must come before the read gives up).
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
}

/// One `WAIT` at the end of a batch's pipeline.
#[derive(Debug, Clone, Copy)]
struct Wait {
    replicas: u64,
    millis: u64,
}

enum Way {
    Links(links::Writers),
    Pipelined(pipelined::Pipeline),
}

/// The handle HTTP workers submit orders through.
#[derive(Clone)]
pub struct Producer {
    way: std::sync::Arc<Way>,
    settings: Settings,
}

impl Producer {
    /// A producer for `redis`: pipelined on one connection where it can be
    /// split (its reply thread beats `beats`), else with `writers` links
    /// (so at most that many batches in flight). An order not written
    /// within `timeout` is answered `503`.
    pub fn new(
        redis: &Redis,
        writers: usize,
        timeout: Duration,
        wait: Option<WaitFor>,
        idempotency_ttl_s: u64,
        beats: &Heartbeats,
    ) -> std::io::Result<Producer> {
        let settings = Settings {
            timeout,
            read_timeout: (timeout / 2).max(Duration::from_millis(50)),
            wait,
            idempotency_ttl_s: idempotency_ttl_s.max(1),
        };
        let way = if redis.is_tls() {
            Way::Links(links::Writers::new(redis, writers, settings))
        } else {
            Way::Pipelined(pipelined::Pipeline::start(redis, settings, beats)?)
        };
        Ok(Producer {
            way: std::sync::Arc::new(way),
            settings,
        })
    }

    /// Queues `order`; its request is answered with `status` and the entry
    /// ID, or `503`. `beat` is the calling thread's heartbeat (a worker
    /// that became a writer beats it between turns).
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
            deadline: Instant::now() + self.settings.timeout,
            rewritten: false,
        };
        match &*self.way {
            Way::Links(w) => w.submit(job, beat),
            Way::Pipelined(p) => p.submit(job),
        }
    }

    /// At shutdown, once no more orders come: waits until every order
    /// queued or in flight is answered, at most `within`.
    pub fn finish(&self, within: Duration) {
        if let Way::Pipelined(p) = &*self.way {
            p.finish(within);
        }
    }
}

/// Adds `job`'s `XADD` to `pipe`.
fn xadd(pipe: &mut redis::Pipeline, job: &Job) {
    let cmd = pipe
        .cmd("XADD")
        .arg(ORDER_EVENTS)
        .arg("NOMKSTREAM")
        .arg("*");
    for (k, v) in job.order.fields() {
        cmd.arg(k).arg(v);
    }
}

fn has_keys(jobs: &[Job]) -> bool {
    jobs.iter().any(|j| j.key.is_some())
}

fn items(jobs: &[Job]) -> Vec<idempotency::Item<'_>> {
    jobs.iter()
        .map(|j| idempotency::Item {
            order: &j.order,
            key: j.key.as_deref(),
            status: j.status,
        })
        .collect()
}

/// Answers a written batch from `replies` (one per job); returns the jobs
/// whose stream had vanished (nothing written), to write again once the
/// groups are back.
fn settle(
    batch: Vec<Job>,
    replies: Vec<Value>,
    wait: Option<Wait>,
    confirmed: Option<i64>,
) -> Vec<Job> {
    let mut missing_stream = Vec::new();
    let mut written = Vec::new();
    for (job, reply) in batch.into_iter().zip(replies) {
        match Outcome::of(&reply) {
            Outcome::StreamMissing => missing_stream.push(job),
            // Written now or earlier: promised only once replicated.
            outcome @ (Outcome::Written(_) | Outcome::Replayed { .. }) => {
                written.push((job, outcome))
            }
            outcome => answer(job, outcome),
        }
    }
    match wait {
        Some(w) if confirmed.unwrap_or(0) < w.replicas as i64 => {
            not_confirmed(written, w, confirmed.unwrap_or(0))
        }
        _ => {
            for (job, outcome) in written {
                answer(job, outcome);
            }
        }
    }
    missing_stream
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

/// Answers one order of a written batch.
fn answer(job: Job, outcome: Outcome) {
    match outcome {
        Outcome::Written(id) => http::respond(
            job.request,
            http::json(job.status, &json!({ "status": "ok", "orderId": id })),
        ),
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

/// The queue is full: `503` at once rather than a wait with no end.
fn refuse_queue_full(job: Job) {
    http::respond(
        job.request,
        http::error(503, "too many orders waiting for Redis; retry later"),
    );
}

fn expire(job: Job) {
    http::respond(
        job.request,
        http::error(503, "Redis did not answer within the request timeout"),
    );
}

fn fail_all(jobs: Vec<Job>, why: &str) {
    if jobs.is_empty() {
        return;
    }
    log::warn!("{} order(s) not written: {why}", jobs.len());
    for job in jobs {
        http::respond(job.request, http::error(503, why));
    }
}

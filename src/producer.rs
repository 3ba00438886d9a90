//! Group commit of orders into `order-events`.
//!
//! HTTP workers validate an order and hand it, with its request, to a queue.
//! A few writer threads, each with its own Redis connection, take whatever
//! has queued up (up to [`MAX_BATCH`]), write it as one pipelined batch of
//! `XADD`s — one round trip however many orders — and answer every request
//! with its own entry ID. A request waits only for the batch it is in; a
//! failed batch fails only its own requests, with `503`.
//!
//! `XADD ... NOMKSTREAM` never creates the stream: if it is gone (`FLUSHALL`,
//! Redis restarted empty) the writer recreates the topology's groups first
//! and writes again, so no order is ever written where a group cannot see it.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use redis::Value;
use serde_json::json;
use tiny_http::Request;

use crate::connection::{Link, Redis};
use crate::http;
use crate::notify::{Heartbeat, Heartbeats};
use crate::record::Order;
use crate::topology::{self, ORDER_EVENTS};

/// Most orders written in one round trip.
pub const MAX_BATCH: usize = 256;
/// Orders that may wait for a writer; past this, `503` at once. The queue
/// holds boxes: a bounded channel allocates (and touches) every slot up
/// front, and a `Job` with its request is some 400 bytes.
const QUEUE: usize = 4096;

/// An accepted order waiting to be written, and the request to answer.
struct Job {
    order: Order,
    request: Request,
    /// `200` for `GET /order`, `201` for `POST /orders`.
    status: u16,
    deadline: Instant,
}

/// The handle HTTP workers submit orders through. Dropping every clone
/// lets the writers finish the queue and exit.
#[derive(Clone)]
pub struct Producer {
    jobs: Sender<Box<Job>>,
    timeout: Duration,
}

impl Producer {
    /// Starts `writers` writer threads. An order not written within
    /// `timeout` is answered `503`.
    pub fn spawn(
        redis: &Redis,
        writers: usize,
        timeout: Duration,
        beats: &Heartbeats,
    ) -> std::io::Result<(Producer, Vec<JoinHandle<()>>)> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let mut threads = Vec::with_capacity(writers);
        for i in 1..=writers {
            let rx = rx.clone();
            // Half the timeout per round trip: a batch stuck on a paused
            // Redis fails in time for the orders queued behind it to be
            // answered within the timeout too.
            let link = Link::new(
                redis.clone(),
                (timeout / 2).max(Duration::from_millis(50)),
                topology::ensure_groups,
            );
            let beat = beats.register(&format!("writer-{i}"));
            threads.push(
                std::thread::Builder::new()
                    .name(format!("writer-{i}"))
                    .spawn(move || write_loop(link, &rx, &beat))?,
            );
        }
        Ok((Producer { jobs: tx, timeout }, threads))
    }

    /// Queues `order`; the writer answers `request` with `status` and the
    /// entry ID, or `503`.
    pub fn submit(&self, order: Order, request: Request, status: u16) {
        let job = Box::new(Job {
            order,
            request,
            status,
            deadline: Instant::now() + self.timeout,
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => http::respond(
                job.request,
                http::error(503, "too many orders waiting for Redis; retry later"),
            ),
            Err(TrySendError::Disconnected(job)) => {
                http::respond(job.request, http::error(503, "shutting down"))
            }
        }
    }
}

fn write_loop(mut link: Link, jobs: &Receiver<Box<Job>>, beat: &Heartbeat) {
    loop {
        beat.beat();
        let first = match jobs.recv_timeout(Duration::from_secs(1)) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => continue,
            // Every Producer is dropped and the queue is empty.
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut batch = Vec::with_capacity(16);
        batch.push(*first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(*job),
                Err(_) => break,
            }
        }
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
            write_batch(&mut link, live);
        }
    }
}

fn write_batch(link: &mut Link, batch: Vec<Job>) {
    crate::metrics::order_batch(batch.len() as u64);
    // These orders wait for an answer: try Redis now rather than fail them
    // because an earlier batch failed.
    link.skip_backoff();
    let mut pending = batch;
    // Second pass only for orders whose stream had vanished.
    for attempt in 0..2 {
        let replies = link.run(|conn| xadd_all(conn, &pending));
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
            match reply {
                Value::Nil => missing_stream.push(job),
                other => match crate::value::as_string(&other) {
                    Some(id) => answer_ok(job, id),
                    None => {
                        http::respond(job.request, http::error(503, "unexpected reply from Redis"))
                    }
                },
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

fn fail_all(jobs: Vec<Job>, why: &str) {
    log::warn!("{} order(s) not written: {why}", jobs.len());
    for job in jobs {
        http::respond(job.request, http::error(503, why));
    }
}

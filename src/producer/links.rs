//! Group commit over TLS: a TLS session cannot be split into a sending
//! and a reading half, so batches are written on whole connections, at most
//! one in flight per connection.
//!
//! If no write is in flight, the worker that queued an order becomes a
//! writer on the spot: it takes whatever has queued up (up to
//! [`MAX_BATCH`]), writes it as one batch, answers every request, and goes
//! on while orders keep queueing; then it returns to HTTP. At most as many
//! writers as there are connections ([`Writers::new`]'s `writers`) run at
//! once. Writing on the worker, not on a writer thread of its own, saves a
//! thread hand-off per order, the largest cost on a small host (see
//! `BENCHMARKS.md`).
//!
//! A writer works in turns: at most [`TURN_BATCHES`] batches, none started
//! after [`TURN_TIME`]; between turns it reports progress to the watchdog
//! and yields the CPU. However long the queue keeps refilling, its
//! heartbeat waits at most one turn (the last batch of a turn is bounded by
//! the link's read timeout, half the request timeout), by construction.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::Value;

use super::{
    expire, fail_all, has_keys, items, refuse_queue_full, settle, xadd, Job, Settings, Wait,
    MAX_BATCH, QUEUE,
};
use crate::connection::{Link, Redis};
use crate::notify::Heartbeat;
use crate::topology::{self, ORDER_EVENTS};

/// Most batches a writer writes before it reports progress and yields.
pub const TURN_BATCHES: usize = 8;
/// Longest a writer starts new batches before it reports progress and
/// yields.
pub const TURN_TIME: Duration = Duration::from_millis(50);

/// The queue, and the Redis links no writer holds right now. A worker
/// becomes a writer by taking a link, and stops being one by putting it
/// back, both under this lock: so whenever orders are queued, a writer is
/// at work or about to see them.
struct State {
    jobs: VecDeque<Job>,
    idle_links: Vec<Link>,
}

/// The queue and the links of [`super::Way::Links`].
pub(super) struct Writers {
    state: Arc<Mutex<State>>,
    settings: Settings,
}

impl Writers {
    /// `writers` Redis connections: at most that many batches in flight.
    pub(super) fn new(redis: &Redis, writers: usize, settings: Settings) -> Writers {
        let idle_links = (0..writers.max(1))
            .map(|_| {
                Link::new(
                    redis.clone(),
                    settings.read_timeout,
                    topology::ensure_groups,
                )
            })
            .collect();
        let state = State {
            jobs: VecDeque::with_capacity(64),
            idle_links,
        };
        Writers {
            state: Arc::new(Mutex::new(state)),
            settings,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`; returns once it is queued, or after writing it (and
    /// whatever queued meanwhile) if no write was in flight.
    pub(super) fn submit(&self, job: Job, beat: &Heartbeat) {
        let link = {
            let mut state = self.lock();
            if state.jobs.len() >= QUEUE {
                drop(state);
                return refuse_queue_full(job);
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
            expired.into_iter().for_each(expire);
            if let Some(oldest) = live.iter().map(|j| j.deadline).min() {
                let wait = self.settings.wait_for(oldest);
                write_batch(&mut link, live, wait, self.settings.idempotency_ttl_s);
            }
        }
        Some(link)
    }
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
        let confirmed = wait.and_then(|_| replies.pop().and_then(|v| crate::value::as_i64(&v)));
        pending = settle(pending, replies, wait, confirmed);
        if pending.is_empty() {
            return;
        }
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
    if !has_keys(jobs) {
        let mut pipe = redis::pipe();
        for job in jobs {
            xadd(&mut pipe, job);
        }
        if let Some(w) = wait {
            pipe.cmd("WAIT").arg(w.replicas).arg(w.millis);
        }
        return pipe.query(conn);
    }
    let mut replies =
        crate::idempotency::write_batch(conn, ORDER_EVENTS, idempotency_ttl_s, &items(jobs))?;
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

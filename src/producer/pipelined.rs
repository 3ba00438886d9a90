//! Group commit on one pipelined connection ([`crate::wire`]).
//!
//! The worker that queues an order sends a batch itself when fewer than
//! [`WINDOW`] batches are in flight (everything queued, up to
//! [`MAX_BATCH`]), under the queue's lock so that batches go out in the
//! order they are recorded, and returns to HTTP at once. The reply thread
//! (`order-replies`) reads the replies in that order, answers each batch's
//! requests once its last reply is in, and sends what queued meanwhile.
//! So a worker never waits for Redis, a far Redis keeps up to [`WINDOW`]
//! batches on the way, and a near one sees about as many batches as before
//! (they form while the window is full).
//!
//! One path fails things: the reply thread. A reply late by more than the
//! read timeout (half the request timeout), a lost connection, a send that
//! failed (the worker closes the socket): every batch in flight is answered
//! `503` and the connection dropped; the next queued order opens a new one.
//! A late reply can never be taken for another batch's: it would arrive on
//! a closed socket.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::Value;

use super::{
    expire, fail_all, has_keys, items, refuse_queue_full, settle, xadd, Job, Settings, Wait,
    MAX_BATCH, QUEUE, WINDOW,
};
use crate::connection::{self, Link, Redis, CONNECT_TIMEOUT};
use crate::metrics;
use crate::notify::{Heartbeat, Heartbeats};
use crate::topology::{self, ORDER_EVENTS};
use crate::wire::{self, Replies};

/// Longest the reply thread waits in one read: how soon it notices a
/// failover followed, or an overdue reply.
const READ_SLICE: Duration = Duration::from_millis(200);

/// A batch sent and not yet answered.
struct Sent {
    jobs: Vec<Job>,
    /// One script call (one reply for the batch) rather than one `XADD`
    /// per order.
    keyed: bool,
    wait: Option<Wait>,
    at: Instant,
}

impl Sent {
    /// Replies the batch gets: one per `XADD` or one for the script, and
    /// the `WAIT`'s.
    fn replies(&self) -> usize {
        let writes = if self.keyed { 1 } else { self.jobs.len() };
        writes + usize::from(self.wait.is_some())
    }
}

struct State {
    /// Queued, not yet sent.
    jobs: VecDeque<Job>,
    /// Sent, in the order they were sent: the order of their replies.
    sent: VecDeque<Sent>,
    /// The sending half of the connection, `None` while there is none.
    sender: Option<wire::Sender>,
    /// Shutdown: the reply thread exits once nothing is left.
    finishing: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Tells the reply thread that orders queued while there was no
    /// connection, or that shutdown began.
    wake: Condvar,
    settings: Settings,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits on `wake` for at most `timeout`, holding `state` again after.
    fn wait<'a>(&self, state: MutexGuard<'a, State>, timeout: Duration) -> MutexGuard<'a, State> {
        self.wake
            .wait_timeout(state, timeout)
            .map(|(s, _)| s)
            .unwrap_or_else(|e| e.into_inner().0)
    }
}

/// The queue and connection of [`super::Way::Pipelined`].
pub(super) struct Pipeline {
    shared: Arc<Shared>,
}

impl Pipeline {
    /// Starts the reply thread; the connection opens with the first order.
    pub(super) fn start(
        redis: &Redis,
        settings: Settings,
        beats: &Heartbeats,
    ) -> std::io::Result<Pipeline> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                jobs: VecDeque::with_capacity(64),
                sent: VecDeque::with_capacity(WINDOW),
                sender: None,
                finishing: false,
            }),
            wake: Condvar::new(),
            settings,
        });
        let thread = ReplyThread {
            shared: shared.clone(),
            redis: redis.clone(),
            groups: Link::new(redis.clone(), settings.read_timeout, connection::nothing),
            beat: beats.register("order-replies"),
            wire: None,
            got: Vec::new(),
            connected_before: false,
        };
        std::thread::Builder::new()
            .name("order-replies".into())
            .spawn(move || thread.run())?;
        Ok(Pipeline { shared })
    }

    /// Queues `job`, and sends a batch if the window has room.
    pub(super) fn submit(&self, job: Job) {
        let mut state = self.shared.lock();
        if state.jobs.len() >= QUEUE {
            drop(state);
            return refuse_queue_full(job);
        }
        state.jobs.push_back(job);
        if state.sender.is_none() {
            self.shared.wake.notify_one();
            return;
        }
        let expired = send_some(&mut state, &self.shared.settings);
        drop(state);
        expired.into_iter().for_each(expire);
    }

    /// Waits until every order queued or in flight is answered, at most
    /// `within`; then the reply thread exits.
    pub(super) fn finish(&self, within: Duration) {
        let until = Instant::now() + within;
        let mut state = self.shared.lock();
        state.finishing = true;
        self.shared.wake.notify_one();
        while (!state.jobs.is_empty() || !state.sent.is_empty()) && Instant::now() < until {
            state = self.shared.wait(state, Duration::from_millis(20));
        }
    }
}

/// Sends queued orders as batches while the window has room; returns the
/// orders whose time ran out before they could be sent.
fn send_some(state: &mut State, settings: &Settings) -> Vec<Job> {
    let mut expired = Vec::new();
    while state.sent.len() < WINDOW && !state.jobs.is_empty() {
        let Some(sender) = state.sender.as_mut() else {
            break;
        };
        let n = state.jobs.len().min(MAX_BATCH);
        let now = Instant::now();
        let (live, late): (Vec<Job>, Vec<Job>) =
            state.jobs.drain(..n).partition(|j| j.deadline > now);
        expired.extend(late);
        let Some(oldest) = live.iter().map(|j| j.deadline).min() else {
            continue;
        };
        let wait = settings.wait_for(oldest);
        let keyed = has_keys(&live);
        let mut pipe = redis::pipe();
        if keyed {
            crate::idempotency::add_batch_eval(
                &mut pipe,
                ORDER_EVENTS,
                settings.idempotency_ttl_s,
                &items(&live),
            );
        } else {
            for job in &live {
                xadd(&mut pipe, job);
            }
        }
        if let Some(w) = wait {
            pipe.cmd("WAIT").arg(w.replicas).arg(w.millis);
        }
        metrics::order_batch(live.len() as u64);
        let sent = sender.send(&pipe.get_packed_pipeline());
        if let Err(e) = &sent {
            // The reply thread's read fails now, and it fails what is in
            // flight, this batch too: one path for failures.
            log::warn!("sending orders to Redis failed: {e}");
            sender.close();
            state.sender = None;
        }
        state.sent.push_back(Sent {
            jobs: live,
            keyed,
            wait,
            at: Instant::now(),
        });
    }
    expired
}

/// The `order-replies` thread: connects when orders wait, reads replies,
/// answers batches, sends what queued meanwhile.
struct ReplyThread {
    shared: Arc<Shared>,
    redis: Redis,
    /// For recreating the groups (on every new connection, and when the
    /// stream vanished): an ordinary connection, used rarely.
    groups: Link,
    beat: Heartbeat,
    /// The reading half and the generation it was opened to.
    wire: Option<(Replies, u64)>,
    /// Replies of the oldest batch in flight, so far.
    got: Vec<Value>,
    connected_before: bool,
}

impl ReplyThread {
    fn run(mut self) {
        loop {
            self.beat.beat();
            if self.wire.is_some() {
                self.read_one();
            } else if !self.connect_when_needed() {
                break;
            }
        }
        log::debug!("order-replies stopped");
    }

    /// Waits for queued orders, then connects and sends them (or fails them
    /// if Redis cannot be reached). Returns `false` at shutdown, once
    /// nothing is left.
    fn connect_when_needed(&mut self) -> bool {
        {
            let mut state = self.shared.lock();
            while state.jobs.is_empty() {
                if state.finishing {
                    return false;
                }
                state = self.shared.wait(state, Duration::from_secs(1));
                self.beat.beat();
            }
        }
        match self.open() {
            Ok(w) => {
                let expired = {
                    let mut state = self.shared.lock();
                    state.sender = Some(w.sender);
                    send_some(&mut state, &self.shared.settings)
                };
                expired.into_iter().for_each(expire);
                self.wire = Some((w.replies, w.generation));
            }
            Err(e) => {
                let queued: Vec<Job> = self.shared.lock().jobs.drain(..).collect();
                fail_all(queued, &format!("Redis unavailable: {e}"));
            }
        }
        true
    }

    /// A new connection, with the topology's groups in place.
    fn open(&mut self) -> Result<wire::Wire, redis::RedisError> {
        let read_timeout = self.shared.settings.read_timeout;
        let connect_timeout = CONNECT_TIMEOUT
            .min(read_timeout / 2)
            .max(Duration::from_millis(10));
        let target = self.redis.wire_target()?.ok_or_else(|| {
            redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "a TLS connection cannot be pipelined",
            ))
        })?;
        let opened = wire::open(&target, connect_timeout, read_timeout);
        let wire = match opened {
            Ok(w) => w,
            Err(e) => {
                self.redis.lost(target.generation);
                return Err(e);
            }
        };
        self.groups.skip_backoff();
        self.groups.run(topology::ensure_groups)?;
        self.groups.run(crate::idempotency::load_script)?;
        if self.connected_before {
            metrics::reconnect();
            log::info!("reconnected to Redis");
        }
        self.connected_before = true;
        Ok(wire)
    }

    /// Reads for at most a slice; answers the oldest batch if its replies
    /// are all in; drops the connection if a reply is overdue or it failed.
    fn read_one(&mut self) {
        let Some((replies, generation)) = self.wire.as_mut() else {
            return;
        };
        let generation = *generation;
        let oldest = {
            let mut state = self.shared.lock();
            if self.redis.generation() != generation {
                // A failover was followed: send nothing more here, and
                // drop the connection once what is in flight is answered.
                if state.sender.take().is_some() {
                    log::info!("following the failover: new orders go to the new master");
                }
                if state.sent.is_empty() {
                    drop(state);
                    self.wire = None;
                    return;
                }
            }
            state.sent.front().map(|s| s.at)
        };
        let read_timeout = self.shared.settings.read_timeout;
        let slice = oldest.map_or(READ_SLICE, |at| {
            (at + read_timeout)
                .saturating_duration_since(Instant::now())
                .min(READ_SLICE)
        });
        match replies.next(slice) {
            Ok(Some(v)) => {
                // Looked up now: a worker may have sent a batch while this
                // thread was reading.
                let needed = self.shared.lock().sent.front().map(Sent::replies);
                match needed {
                    Some(n) => {
                        self.got.push(v);
                        if self.got.len() >= n {
                            self.answer_oldest(generation);
                        }
                    }
                    None => self.drop_wire("Redis sent a reply nothing asked for"),
                }
            }
            Ok(None) => {
                if oldest.is_some_and(|at| at.elapsed() >= read_timeout) {
                    self.drop_wire(&format!(
                        "Redis did not answer within {} ms",
                        read_timeout.as_millis()
                    ));
                }
            }
            Err(e) => self.drop_wire(&format!("Redis unavailable: {e}")),
        }
    }

    /// The oldest batch's replies are all in: answer its requests, write
    /// again what found no stream, send what queued meanwhile.
    fn answer_oldest(&mut self, generation: u64) {
        let Some(sent) = self.shared.lock().sent.pop_front() else {
            return;
        };
        let mut replies = std::mem::take(&mut self.got);
        if let Some(e) = replies.iter().find_map(|v| v.clone().extract_error().err()) {
            let why = format!("Redis unavailable: {e}");
            if e.code() == Some("NOSCRIPT") && !sent.jobs.iter().any(|j| j.rewritten) {
                // The script cache was flushed (SCRIPT FLUSH): nothing was
                // written; load it and write these orders again, once.
                match self.groups.run(crate::idempotency::load_script) {
                    Ok(()) => self.queue_first(sent.jobs),
                    Err(e) => fail_all(sent.jobs, &format!("cannot load the script: {e}")),
                }
            } else if connection::is_connection_error(&e) {
                // READONLY: a demoted master. What follows fails alike.
                fail_all(sent.jobs, &why);
                self.redis.lost(generation);
                return self.drop_wire(&why);
            } else {
                fail_all(sent.jobs, &why);
            }
        } else {
            let confirmed = match sent.wait {
                Some(_) => replies.pop().and_then(|v| crate::value::as_i64(&v)),
                None => None,
            };
            if sent.keyed {
                replies = replies
                    .first()
                    .and_then(crate::value::as_array)
                    .map(<[Value]>::to_vec)
                    .unwrap_or_default();
            }
            if replies.len() != sent.jobs.len() {
                fail_all(sent.jobs, "unexpected reply from Redis");
            } else {
                let missing = settle(sent.jobs, replies, sent.wait, confirmed);
                self.write_again(missing);
            }
        }
        let expired = {
            let mut state = self.shared.lock();
            send_some(&mut state, &self.shared.settings)
        };
        expired.into_iter().for_each(expire);
        // `finish` waits for the queue and the window to empty.
        self.shared.wake.notify_all();
    }

    /// Orders whose stream had vanished (`FLUSHALL`, Redis restarted
    /// empty): recreate the groups and queue them first, once.
    fn write_again(&mut self, missing: Vec<Job>) {
        if missing.is_empty() {
            return;
        }
        let (again, twice): (Vec<Job>, Vec<Job>) = missing.into_iter().partition(|j| !j.rewritten);
        fail_all(twice, "order-events keeps disappearing");
        if again.is_empty() {
            return;
        }
        log::warn!("{ORDER_EVENTS} is gone (FLUSHALL or an empty restart?): recreating the groups");
        self.groups.skip_backoff();
        if let Err(e) = self.groups.run(topology::ensure_groups) {
            return fail_all(again, &format!("cannot recreate the consumer groups: {e}"));
        }
        self.queue_first(again);
    }

    /// Queues `jobs` before everything else, marked as written once.
    fn queue_first(&self, jobs: Vec<Job>) {
        let mut state = self.shared.lock();
        for mut job in jobs.into_iter().rev() {
            job.rewritten = true;
            state.jobs.push_front(job);
        }
    }

    /// Drops the connection and answers `503` to every batch in flight.
    fn drop_wire(&mut self, why: &str) {
        let in_flight: Vec<Sent> = {
            let mut state = self.shared.lock();
            if let Some(sender) = state.sender.take() {
                sender.close();
            }
            state.sent.drain(..).collect()
        };
        if let Some((replies, generation)) = self.wire.take() {
            replies.close();
            self.redis.lost(generation);
        }
        self.got.clear();
        log::warn!("lost the Redis connection: {why}");
        for sent in in_flight {
            fail_all(sent.jobs, why);
        }
        self.shared.wake.notify_all();
    }
}

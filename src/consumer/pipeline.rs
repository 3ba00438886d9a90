//! Pipelined handling, for a [`Pipelined`] handler (payment-service's):
//! its whole work on a batch is one script that also acknowledges, so no
//! thread needs to wait for each reply.
//!
//! ```text
//!  lane ─> handler-1 ──EVALSHA, EVALSHA, ...──> Redis      (one connection,
//!             │                                   │          split: wire.rs)
//!             └── Sent, in order ──> handler-replies <─ replies, in order
//!                 (at most WINDOW)       settle: dead letters, metrics
//! ```
//!
//! `handler-1` takes batches from its lane and sends their commands on one
//! split connection ([`crate::wire`]), up to [`WINDOW`] batches ahead of
//! their replies; `handler-replies` reads the replies in the same order and
//! settles each batch as a handler thread would. With Redis a WAN link away
//! a new entry is sent as soon as it is read, instead of waiting for the
//! batch before it to come back (`BENCHMARKS.md`, issue 14). The two
//! threads take the place of `HANDLER_THREADS` handler threads.
//!
//! **Ordering.** One sender, one connection: Redis runs the commands in the
//! order the lane holds the entries, which is stream order.
//!
//! **Faults.** Anything but a good reply (a lost connection, a reply later
//! than [`COMMAND_TIMEOUT`], an error reply: `READONLY`, `NOSCRIPT`,
//! `NOGROUP`, `BUSY`, out of memory) closes the connection. That batch,
//! and every batch sent after it on that connection, is handled again by
//! `handler-replies` the way a handler thread does (its own connection,
//! its retries, [`crate::consumer::Handler::handle`]): the script skips
//! what it already did, and a fault never counts as a failure. The sender
//! opens a new connection only once every batch sent on the old one is
//! settled, so the order holds across a reconnect too.
//!
//! Used when the connection can be split and no replica must confirm
//! writes first: not for `rediss://`, nor with `REDIS_WAIT_REPLICAS` (the
//! handler threads do those).

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use redis::{RedisError, Value};

use super::handler::{by_subscription, HandlerThread};
use super::{Delivery, Outcome, Pipelined};
use crate::connection::{self, Redis, COMMAND_TIMEOUT, CONNECT_TIMEOUT};
use crate::metrics;
use crate::wire::{self, Replies};

/// Batches sent and not yet settled, at most: at 10 ms RTT and one entry
/// per batch, 1,600 entries/s before the sender waits.
const WINDOW: usize = 16;

/// Starts `sender` as `handler-1` and `replies` as `handler-replies`, with
/// the way between them.
pub(super) fn spawn(
    sender: HandlerThread,
    replies: HandlerThread,
    redis: &Redis,
) -> std::io::Result<[JoinHandle<()>; 2]> {
    let (to_replies, from_sender) = crossbeam_channel::bounded(WINDOW);
    let settled = Arc::new(Settled::default());
    let side = SendSide {
        redis: redis.clone(),
        to_replies,
        settled: settled.clone(),
        sent: 0,
        wire: None,
        opened_before: false,
    };
    Ok([
        std::thread::Builder::new()
            .name("handler-1".into())
            .spawn(move || sender.run_sender(side))?,
        std::thread::Builder::new()
            .name("handler-replies".into())
            .spawn(move || replies.run_replies(from_sender, settled))?,
    ])
}

/// A batch on its way from the sender to the reply thread.
enum Sent {
    /// Its command went out. `replies` is the new connection's reply half
    /// when it is the first batch sent on one.
    Command {
        batch: Vec<Delivery>,
        at: Instant,
        replies: Option<Replies>,
    },
    /// Nothing in it needs Redis.
    NoCommand { batch: Vec<Delivery> },
    /// It could not be sent: handled the way a handler thread does.
    Unsent { batch: Vec<Delivery> },
}

/// How many batches the reply thread has settled; the sender waits on it
/// before opening a new connection.
#[derive(Default)]
struct Settled {
    count: Mutex<u64>,
    changed: Condvar,
}

impl Settled {
    fn add_one(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.changed.notify_all();
    }

    /// Waits up to `wait` for the count to reach `n`; whether it has.
    fn wait_for(&self, n: u64, wait: Duration) -> bool {
        let count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let (count, _) = self
            .changed
            .wait_timeout_while(count, wait, |c| *c < n)
            .unwrap_or_else(|e| e.into_inner());
        *count >= n
    }
}

/// The sender's side: the connection's sending half and the way to the
/// reply thread.
struct SendSide {
    redis: Redis,
    to_replies: Sender<Sent>,
    settled: Arc<Settled>,
    /// Batches handed to the reply thread so far.
    sent: u64,
    /// The sending half, and the master generation it was opened to.
    wire: Option<(wire::Sender, u64)>,
    /// Whether a connection was opened before: the next is a reconnect.
    opened_before: bool,
}

impl HandlerThread {
    /// `handler-1` of a pipelined handler: takes batches, sends their
    /// commands, hands them to the reply thread.
    fn run_sender(mut self, mut side: SendSide) {
        while let Some(batch) = self.next_batch() {
            let batch = self.skip_redrives_for_others(batch);
            for mine in by_subscription(batch) {
                let sent = self.send(&mut side, mine);
                if !self.hand_over(&side, sent) {
                    return;
                }
                side.sent += 1;
            }
        }
        if let Some((s, _)) = side.wire.take() {
            // Only after the reply thread has read what is in flight.
            drop(side.to_replies);
            side.settled.wait_for(side.sent, COMMAND_TIMEOUT);
            s.close();
        }
        log::debug!("handler-1 stopped");
    }

    /// Sends the command of `batch`, on a new connection if need be.
    fn send(&mut self, side: &mut SendSide, batch: Vec<Delivery>) -> Sent {
        let Some(pipelined) = self.handler.pipelined() else {
            return Sent::Unsent { batch };
        };
        let Some(cmd) = pipelined.command(&batch) else {
            return Sent::NoCommand { batch };
        };
        if side
            .wire
            .as_ref()
            .is_some_and(|(_, g)| *g != side.redis.generation())
        {
            // A failover was followed: the next batch goes to the new master.
            side.wire = None;
        }
        let packed = cmd.get_packed_command();
        // A connection found dead by this send (the reply thread saw it
        // first, or Redis dropped it) is replaced at once, and the batch
        // sent on the new one: nothing of it was taken on the old.
        for _ in 0..2 {
            let mut fresh = None;
            if side.wire.is_none() {
                match self.open(side) {
                    Ok(w) => {
                        side.wire = Some((w.sender, w.generation));
                        fresh = Some(w.replies);
                    }
                    Err(e) => {
                        log::debug!("cannot open a pipelined connection: {e}");
                        return Sent::Unsent { batch };
                    }
                }
            }
            let Some((sender, _)) = side.wire.as_mut() else {
                return Sent::Unsent { batch };
            };
            match sender.send(&packed) {
                Ok(()) => {
                    return Sent::Command {
                        batch,
                        at: Instant::now(),
                        replies: fresh,
                    }
                }
                Err(e) => {
                    log::debug!("pipelined send failed: {e}");
                    sender.close();
                    side.wire = None;
                    if fresh.is_some() {
                        // A new connection failed at once: Redis is not there.
                        break;
                    }
                }
            }
        }
        Sent::Unsent { batch }
    }

    /// Opens a new connection once everything sent on the old one is
    /// settled, and loads the script.
    fn open(&mut self, side: &mut SendSide) -> Result<wire::Wire, RedisError> {
        while !side.settled.wait_for(side.sent, Duration::from_secs(1)) {
            self.beat.beat();
        }
        let target = side.redis.wire_target()?.ok_or_else(|| {
            RedisError::from(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "a TLS connection cannot be pipelined",
            ))
        })?;
        let w = wire::open(&target, CONNECT_TIMEOUT, COMMAND_TIMEOUT).inspect_err(|_| {
            side.redis.lost(target.generation);
        })?;
        let handler = self.handler.clone();
        if let Some(p) = handler.pipelined() {
            self.link.run(|c| p.script().load(c).map(drop))?;
        }
        if side.opened_before {
            metrics::reconnect();
            log::info!("pipelined connection to Redis open again");
        }
        side.opened_before = true;
        Ok(w)
    }

    /// Hands `sent` to the reply thread, waiting while [`WINDOW`] batches
    /// are ahead of it; `false` if the reply thread is gone.
    fn hand_over(&self, side: &SendSide, mut sent: Sent) -> bool {
        loop {
            match side.to_replies.send_timeout(sent, Duration::from_secs(1)) {
                Ok(()) => return true,
                Err(SendTimeoutError::Timeout(s)) => {
                    self.beat.beat();
                    sent = s;
                }
                Err(SendTimeoutError::Disconnected(_)) => return false,
            }
        }
    }

    /// `handler-replies`: settles each batch the sender handed over, in
    /// order, from its reply or by handling it again.
    fn run_replies(mut self, from_sender: Receiver<Sent>, settled: Arc<Settled>) {
        let mut replies: Option<Replies> = None;
        loop {
            self.beat.beat();
            let sent = match from_sender.recv_timeout(Duration::from_secs(1)) {
                Ok(s) => s,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            match sent {
                Sent::Command {
                    batch,
                    at,
                    replies: fresh,
                } => {
                    if fresh.is_some() {
                        replies = fresh;
                    }
                    let outcomes = self
                        .reply(&mut replies, at)
                        .and_then(|v| self.outcomes_of(&batch, Some(v)));
                    if outcomes.is_some() {
                        let (sub, n) = (batch[0].sub, batch.len() as u64);
                        metrics::handler_latency(sub.stream, sub.group, at.elapsed(), n);
                    }
                    self.settle_or_handle(batch, outcomes);
                }
                Sent::NoCommand { batch } => {
                    let outcomes = self.outcomes_of(&batch, None);
                    self.settle_or_handle(batch, outcomes);
                }
                Sent::Unsent { batch } => self.settle_or_handle(batch, None),
            }
            settled.add_one();
        }
        if let Some(r) = replies {
            r.close();
        }
        log::debug!("handler-replies stopped");
    }

    /// The reply to the command sent at `at`, or `None` (the connection
    /// closed) if there is none in time or it is an error.
    fn reply(&mut self, replies: &mut Option<Replies>, at: Instant) -> Option<Value> {
        let r = replies.as_mut()?;
        let deadline = at + COMMAND_TIMEOUT;
        let why = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break format!("no reply within {} ms", COMMAND_TIMEOUT.as_millis());
            }
            match r.next(left.min(Duration::from_secs(1))) {
                Ok(Some(v)) => match v.extract_error() {
                    Ok(v) => return Some(v),
                    Err(e) => {
                        if connection::is_connection_error(&e) {
                            // READONLY: a demoted master; ask the sentinels.
                            self.link.reset();
                        }
                        break e.to_string();
                    }
                },
                Ok(None) => self.beat.beat(),
                Err(e) => break e.to_string(),
            }
        };
        log::info!("pipelined handling interrupted ({why}); handling the batches in flight again");
        r.close();
        *replies = None;
        None
    }

    /// The handler's outcomes from `reply`, or `None` if it cannot make
    /// them out (the batch is then handled again).
    fn outcomes_of(&self, batch: &[Delivery], reply: Option<Value>) -> Option<Vec<Outcome>> {
        let p: &dyn Pipelined = self.handler.pipelined()?;
        match p.outcomes(batch, reply) {
            Ok(o) => Some(o),
            Err(e) => {
                log::warn!(
                    "{}: unexpected reply ({e}); handling again",
                    batch[0].sub.stream
                );
                None
            }
        }
    }

    /// Settles `batch` from its `outcomes`, or without them handles it the
    /// way a handler thread does (on this thread's own connection); then
    /// acknowledges and lets go, and handles at once what was not tried
    /// (carried over by [`HandlerThread::finish`]).
    fn settle_or_handle(&mut self, mut batch: Vec<Delivery>, mut outcomes: Option<Vec<Outcome>>) {
        loop {
            let not_tried = match outcomes.take() {
                Some(o) => self.settle(&batch, o),
                None => self.handle(&batch),
            };
            self.acknowledge();
            self.finish(batch, &not_tried);
            if self.carry.is_empty() {
                return;
            }
            batch = self.carry.drain(..).collect();
            if self.stop_grace_over() {
                self.let_go(&batch);
                return;
            }
        }
    }
}

//! The consumer runtime: payment-service, notification-service and any
//! consumer service of your own run on it (see [`run`] and the crate
//! documentation).
//!
//! Files: this one holds the types a [`Handler`] meets and [`start`];
//! `reader.rs` the readers, `lanes.rs` the channels between them and the
//! handler threads, `handler.rs` the handler threads, `pipeline.rs` the
//! two threads that take their place for a [`Pipelined`] handler, `reply.rs`
//! the decoding of Redis's replies, `service.rs` [`run`] and
//! [`run_until`], the whole service around the runtime.
//!
//! ```text
//!  reader:order-events ──┐   one bounded lane    ┌─ handler-1 ─┐
//!                         ├── per handler thread ─┤              ├─ handle, then XACK
//!  reader:payment-events ─┘   (by userId)         └─ handler-2 ─┘   (or dead-letter)
//! ```
//!
//! * One **reader** thread per subscription, with its own connection, does
//!   `XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS s id`. It starts at ID
//!   `0`, re-reading the entries it took before a crash or restart, until
//!   none are left; then it reads new entries (`>`). Every claim interval it
//!   runs `XAUTOCLAIM` for entries idle longer than `CLAIM_IDLE_MS`: those of
//!   a consumer that died, and its own that failed and wait for a retry.
//!   The claim cursor is kept from one round to the next (back to `0-0` only
//!   when Redis says the scan is complete), so the tail of a long pending
//!   list is reached too.
//! * Entries cross **bounded** channels, one lane per handler thread
//!   (`lanes.rs`). A full lane blocks the reader, so memory stays bounded
//!   whatever the backlog.
//! * **Ordering.** Every entry of one `userId` takes the same lane, so one
//!   thread handles a user's entries, in stream order: a user's orders are
//!   paid and notified in the order they were written. Only an entry
//!   retried after a failure (a claim) may come after later ones.
//! * **Handler** threads take a batch, run the [`Handler`], and only then
//!   acknowledge (one `XACK` for the batch), or leave a failed entry pending
//!   for a retry, or dead-letter it (see [`crate::dlq`]). A failing entry
//!   never holds up the others.
//! * **Counting failures.** Only a handler that tried and failed counts
//!   toward `MAX_DELIVERIES`: `HINCRBY` on [`topology::failures_key`], whose
//!   answer says when the limit is reached; the count is removed when the
//!   entry is acknowledged or dead-lettered. Redis's own delivery counter
//!   is not used: reconnects, re-reading one's own pending entries and
//!   claims raise it without anything having failed.
//! * **Time.** A handler reports progress (its watchdog heartbeat) per
//!   delivery, and a batch gets a wall-time budget ([`Settings::batch_budget`],
//!   well below the watchdog and `CLAIM_IDLE_MS`): entries not started
//!   within it are handed to the same thread's next turn, still pending and
//!   in flight, never counted as failed.
//! * **One path per entry.** An entry is in flight on one path at a time:
//!   a claim or a re-read of our own pending entries that returns an entry a
//!   handler holds, or finished while the read was on its way, skips it.
//! * Shutdown: readers stop reading and hand over what they already read;
//!   handlers keep handling for at most [`STOP_GRACE`] while deliveries are
//!   quick (checked between deliveries; one started after the signal and
//!   slower than [`SLOW_AT_STOP`] ends it), acknowledge what they finished
//!   (on a new connection if a dropped one fails), leave the rest pending for
//!   the next start, and exit when their lane is disconnected.

mod handler;
mod lanes;
mod pipeline;
mod reader;
pub(crate) mod reply;
mod service;

pub use crate::record::Fields;
pub use service::{run, run_until, Consumer};

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use redis::{Connection, RedisError};

use crate::config::Config;
use crate::connection::{Link, Redis, WaitFor, COMMAND_TIMEOUT};
use crate::notify::{Heartbeat, Heartbeats};
use crate::topology;

use handler::HandlerThread;
use lanes::Lanes;
use reader::Reader;

/// What a consumer reads: one stream through one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subscription {
    /// The stream.
    pub stream: &'static str,
    /// The group.
    pub group: &'static str,
}

impl Subscription {
    /// Creates the topology's groups and this subscription's own (which may
    /// be outside the topology: a shipping-service's group), at ID `0`.
    fn ensure_groups(self, conn: &mut Connection) -> Result<(), RedisError> {
        topology::ensure_groups(conn)?;
        topology::ensure_group(conn, self.stream, self.group)
    }
}

/// One entry delivered to this consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Where it came from.
    pub sub: Subscription,
    /// Its entry ID.
    pub id: String,
    /// Its fields, as bytes.
    pub fields: Fields,
    /// Whether it was delivered before (a re-read of our own pending
    /// entries, a claim): it may have a failure count to forget.
    pub redelivered: bool,
}

/// How handling one delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; the runtime acknowledges it.
    Done,
    /// Done, and already acknowledged by the handler in the same atomic
    /// step as its work.
    DoneAndAcked,
    /// Done before, by another route (a second payment for an order already
    /// paid): refused and acknowledged by the handler in one atomic step.
    /// Counted as outcome `duplicate`.
    Duplicate,
    /// Not done.
    Failed(Failure),
    /// Not tried: the batch's time ran out, or the service is stopping
    /// ([`Progress::may_start`] said no). Stays pending, is tried again by
    /// this process, and is not a failure.
    NotTried,
}

/// Why a delivery was not handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong, for logs and the dead-letter entry.
    pub reason: String,
    /// `true` if retrying can never help (a malformed entry): dead-letter now.
    pub permanent: bool,
}

impl Failure {
    /// A failure that retrying may fix (a webhook that was down).
    pub fn transient(reason: impl Into<String>) -> Outcome {
        Outcome::Failed(Failure {
            reason: reason.into(),
            permanent: false,
        })
    }

    /// A failure that retrying cannot fix.
    pub fn permanent(reason: impl Into<String>) -> Outcome {
        Outcome::Failed(Failure {
            reason: reason.into(),
            permanent: true,
        })
    }
}

/// What a service does with its entries.
pub trait Handler: Send + Sync + 'static {
    /// Handles `batch` (all from one subscription) and returns one outcome
    /// per delivery, in order. A handler that works delivery by delivery
    /// asks `progress` before each one and answers [`Outcome::NotTried`]
    /// for the rest once it says no. An `Err` means Redis failed part-way:
    /// nothing the handler did was acknowledged, and the batch is tried
    /// again.
    fn handle(
        &self,
        conn: &mut Connection,
        batch: &[Delivery],
        progress: &Progress<'_>,
    ) -> Result<Vec<Outcome>, RedisError>;

    /// This handler as a [`Pipelined`] one, if its whole work on a batch
    /// is one Redis command: the runtime then keeps several batches in
    /// flight on one connection instead of waiting for each reply.
    fn pipelined(&self) -> Option<&dyn Pipelined> {
        None
    }
}

/// A handler whose whole work on a batch is one Redis command (a script)
/// that also acknowledges what it did, in the same atomic step, and is safe
/// to run again for entries it already handled (it skips those no longer
/// pending). payment-service's is one. The runtime sends the command of the
/// next batch before the reply to this one is back (`pipeline.rs`), and
/// falls back to [`Handler::handle`] after a fault.
pub trait Pipelined: Send + Sync {
    /// The script the commands run, loaded (`SCRIPT LOAD`) on each new
    /// connection before they are sent as `EVALSHA`.
    fn script(&self) -> &redis::Script;

    /// The command for `batch` (all from one subscription), or `None` if no
    /// delivery in it needs Redis.
    fn command(&self, batch: &[Delivery]) -> Option<redis::Cmd>;

    /// The outcome of each delivery of `batch`, from the reply to its
    /// command (`None` when [`Pipelined::command`] gave none). An `Err`
    /// (a reply of the wrong shape) has the batch handled again.
    fn outcomes(
        &self,
        batch: &[Delivery],
        reply: Option<redis::Value>,
    ) -> Result<Vec<Outcome>, RedisError>;

    /// [`Pipelined::command`] and [`Pipelined::outcomes`] in one round
    /// trip on `conn`, loading the script if Redis does not have it: what
    /// [`Handler::handle`] of a pipelined handler does.
    fn handle_at_once(
        &self,
        conn: &mut Connection,
        batch: &[Delivery],
    ) -> Result<Vec<Outcome>, RedisError> {
        let Some(cmd) = self.command(batch) else {
            return self.outcomes(batch, None);
        };
        let reply = match cmd.query::<redis::Value>(conn) {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                self.script().load(conn)?;
                cmd.query(conn)?
            }
            other => other?,
        };
        self.outcomes(batch, Some(reply))
    }
}

/// A [`Handler`] that handles one delivery at a time, without Redis: it
/// calls something per entry (a webhook, a carrier). Implementing this
/// instead of [`Handler`] gets the batch's budget and the stop grace kept
/// for it: deliveries are started while [`Progress::may_start`] says so,
/// the rest are [`Outcome::NotTried`] (see [`Progress::one_by_one`]).
pub trait EachDelivery: Send + Sync + 'static {
    /// Handles one delivery; [`Outcome::Done`] has it acknowledged.
    fn handle_one(&self, delivery: &Delivery) -> Outcome;
}

impl<T: EachDelivery> Handler for T {
    fn handle(
        &self,
        _conn: &mut Connection,
        batch: &[Delivery],
        progress: &Progress<'_>,
    ) -> Result<Vec<Outcome>, RedisError> {
        Ok(progress.one_by_one(batch, |d| self.handle_one(d)))
    }
}

/// Longest a handler thread keeps starting deliveries once shutdown has
/// begun; what is left stays pending for the next start.
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// A delivery that took longer than this ends the [`STOP_GRACE`] at once:
/// work in hand is finished at a stop while it is quick, not when every
/// delivery waits on a slow receiver.
pub const SLOW_AT_STOP: Duration = Duration::from_millis(300);

/// A batch's progress: the handler thread's heartbeat, its time budget and
/// shutdown.
pub struct Progress<'a> {
    beat: &'a Heartbeat,
    deadline: Instant,
    shutdown: &'a Receiver<()>,
    stop_by: Cell<Option<Instant>>,
    last_start: Cell<Option<Instant>>,
}

impl Progress<'_> {
    /// Reports progress, and says whether delivery `i` of the batch may
    /// start: the first always may (unless the stop grace is over), the
    /// others only within the batch's budget and the stop grace.
    pub fn may_start(&self, i: usize) -> bool {
        self.beat.beat();
        let now = Instant::now();
        if crate::shutdown::is_started(self.shutdown) && self.stop_by.get().is_none() {
            self.stop_by.set(Some(now + STOP_GRACE));
        }
        if let Some(stop_by) = self.stop_by.get() {
            // Only a delivery started after the stop began tells how quick
            // the receiver is now: the one in progress at SIGTERM may have
            // waited on anything.
            let stop_began = stop_by - STOP_GRACE;
            let slow = self
                .last_start
                .get()
                .is_some_and(|t| t >= stop_began && now - t > SLOW_AT_STOP);
            if slow {
                self.stop_by.set(Some(now));
            }
            if slow || now >= stop_by {
                return false;
            }
        }
        self.last_start.set(Some(now));
        i == 0 || now < self.deadline
    }

    /// Handles `batch` one delivery at a time with `handle`, asking
    /// [`Progress::may_start`] before each: those not started once it says
    /// no are [`Outcome::NotTried`]. What a handler that calls something
    /// slow per delivery (a webhook, a carrier) returns.
    pub fn one_by_one(
        &self,
        batch: &[Delivery],
        mut handle: impl FnMut(&Delivery) -> Outcome,
    ) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for (i, d) in batch.iter().enumerate() {
            if !self.may_start(i) {
                break;
            }
            outcomes.push(handle(d));
        }
        outcomes.resize(batch.len(), Outcome::NotTried);
        outcomes
    }
}

/// How the runtime reads and retries.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Consumer name in every group.
    pub consumer: String,
    /// Handler threads.
    pub handler_threads: usize,
    /// Entries per read and per handled batch.
    pub batch_size: usize,
    /// Longest `BLOCK`.
    pub block: Duration,
    /// Idle time after which pending entries are claimed.
    pub claim_idle: Duration,
    /// Failed deliveries after which an entry is dead-lettered.
    pub max_deliveries: u64,
    /// Dead letters kept per `<stream>:dlq` (`DLQ_RETAIN_ENTRIES`).
    pub dlq_retain: u64,
    /// Longest a handler thread spends starting the deliveries of one batch
    /// before acknowledging what it finished and reporting progress; see
    /// [`batch_budget`].
    pub batch_budget: Duration,
    /// Replicas that must confirm a batch's writes before its entries are
    /// acknowledged (`REDIS_WAIT_REPLICAS`), and for how long one `WAIT`
    /// waits.
    pub wait: Option<WaitFor>,
}

/// The wall-time budget of a batch: 2 s, and at most a quarter of the
/// watchdog interval and of `CLAIM_IDLE_MS`, so a batch of slow deliveries
/// never holds its entries long enough for another instance to claim them,
/// nor keeps the watchdog or a stop waiting.
pub fn batch_budget(claim_idle: Duration, watchdog: Option<Duration>) -> Duration {
    let mut budget = Duration::from_secs(2).min(claim_idle / 4);
    if let Some(w) = watchdog {
        budget = budget.min(w / 4);
    }
    budget.max(Duration::from_millis(10))
}

impl Settings {
    /// The settings a service was configured with.
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            consumer: config.consumer_name.clone(),
            handler_threads: config.handler_threads,
            batch_size: config.batch_size,
            block: config.block,
            claim_idle: config.claim_idle,
            max_deliveries: config.max_deliveries,
            dlq_retain: config.dlq_retain_entries,
            batch_budget: batch_budget(config.claim_idle, crate::notify::watchdog_interval()),
            wait: WaitFor::from_config(config),
        }
    }

    /// How often readers renew the entries their instance holds: three
    /// times per `claim_idle`, so none looks idle long enough to be claimed.
    fn renew_interval(&self) -> Duration {
        (self.claim_idle / 3).max(Duration::from_millis(100))
    }

    /// How often readers look for entries to claim: often enough that a
    /// stranded entry waits little longer than `claim_idle`, rarely enough
    /// to cost nothing.
    fn claim_interval(&self) -> Duration {
        (self.claim_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(10))
    }
}

type Key = (Subscription, String);

/// Entries handed to handlers and not yet finished, so that a claim or a
/// re-read does not hand the same entry out twice inside this process.
#[derive(Default)]
struct Tracker {
    /// Held by a handler thread (on its lane, in a batch, or carried
    /// over to its next turn).
    held: HashSet<Key>,
    /// Finished (or let go) recently, with the [`Tracker::epoch`] at that
    /// moment: a read that started before can still return them.
    finished: HashMap<Key, u64>,
    /// Counts finishes.
    epoch: u64,
}

impl Tracker {
    /// Whether a read that started at `epoch` may dispatch `key`.
    fn may_dispatch(&self, key: &Key, epoch: u64) -> bool {
        !self.held.contains(key) && self.finished.get(key).is_none_or(|&e| e <= epoch)
    }

    fn finish(&mut self, key: Key) {
        if self.held.remove(&key) {
            self.epoch += 1;
            self.finished.insert(key, self.epoch);
        }
    }

    /// Forgets finishes of `sub` that a read started at `epoch` (or later)
    /// cannot have raced with.
    fn prune(&mut self, sub: Subscription, epoch: u64) {
        self.finished.retain(|k, e| k.0 != sub || *e > epoch);
    }
}

type InFlight = Arc<Mutex<Tracker>>;

fn lock(set: &InFlight) -> std::sync::MutexGuard<'_, Tracker> {
    set.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts a reader per subscription and the handler threads. They run until
/// `shutdown` fires, finish their work, and exit; join the returned handles.
pub fn start(
    redis: &Redis,
    subscriptions: &[Subscription],
    handler: Arc<dyn Handler>,
    settings: &Settings,
    shutdown: &Receiver<()>,
    beats: &Heartbeats,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    // A pipelined handler needs one sender, on one lane, for its order.
    let pipelined = handler.pipelined().is_some() && settings.wait.is_none() && !redis.is_tls();
    let lanes_n = if pipelined {
        1
    } else {
        settings.handler_threads
    };
    // Room for a backlog batch (see `handler.rs`) on each lane.
    let capacity = settings.batch_size * handler::BACKLOG_FACTOR;
    let (lanes, receivers) = Lanes::new(lanes_n, capacity);
    let in_flight: InFlight = Arc::default();
    let mut threads = Vec::new();
    for &sub in subscriptions {
        let reader = Reader {
            sub,
            link: Link::new(
                redis.clone(),
                settings.block + COMMAND_TIMEOUT,
                topology::ensure_groups,
            ),
            settings: settings.clone(),
            lanes: lanes.clone(),
            in_flight: in_flight.clone(),
            shutdown: shutdown.clone(),
            beat: beats.register(&format!("reader:{}", sub.stream)),
            claim_cursor: "0-0".into(),
            next_renew: Instant::now(),
            ahead: std::collections::VecDeque::new(),
            side: Link::new(redis.clone(), COMMAND_TIMEOUT, topology::ensure_groups),
            count: settings.batch_size,
        };
        threads.push(
            std::thread::Builder::new()
                .name(format!("reader:{}", sub.stream))
                .spawn(move || reader.run())?,
        );
    }
    drop(lanes);
    let thread = |name: &str, rx: Receiver<Delivery>| HandlerThread {
        link: Link::new(redis.clone(), COMMAND_TIMEOUT, topology::ensure_groups),
        handler: handler.clone(),
        settings: settings.clone(),
        rx,
        in_flight: in_flight.clone(),
        shutdown: shutdown.clone(),
        beat: beats.register(name),
        carry: VecDeque::new(),
        stop_by: None,
        acks: Vec::new(),
    };
    if pipelined {
        let sender = receivers
            .into_iter()
            .next()
            .map(|rx| thread("handler-1", rx));
        let replies = thread("handler-replies", crossbeam_channel::never());
        if let Some(sender) = sender {
            threads.extend(pipeline::spawn(sender, replies, redis)?);
        }
    } else {
        for (i, rx) in (1..).zip(receivers) {
            let name = format!("handler-{i}");
            let t = thread(&name, rx);
            threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || t.run())?,
            );
        }
    }
    Ok(threads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_budget_stays_well_below_the_watchdog_and_the_claim_idle_time() {
        let s = Duration::from_secs;
        // Shipped: WatchdogSec=30s, CLAIM_IDLE_MS=30000.
        assert_eq!(batch_budget(s(30), Some(s(30))), s(2));
        // As the tests run it: WATCHDOG_USEC=5000000.
        assert_eq!(batch_budget(s(30), Some(s(5))), Duration::from_millis(1250));
        assert_eq!(batch_budget(s(1), None), Duration::from_millis(250));
        assert_eq!(
            batch_budget(Duration::from_millis(1), None),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn an_entry_is_dispatched_on_one_path_at_a_time() {
        let sub = Subscription {
            stream: "order-events",
            group: "g",
        };
        let key = |id: &str| (sub, id.to_string());
        let mut t = Tracker::default();
        let before = t.epoch;
        assert!(t.may_dispatch(&key("1-0"), before));
        t.held.insert(key("1-0"));
        assert!(!t.may_dispatch(&key("1-0"), before), "held by a handler");
        t.finish(key("1-0"));
        assert!(
            !t.may_dispatch(&key("1-0"), before),
            "finished while a read sent before was on its way"
        );
        assert!(
            t.may_dispatch(&key("1-0"), t.epoch),
            "a read sent after it finished may see it again (a retry)"
        );
        t.prune(sub, t.epoch);
        assert!(t.finished.is_empty());
        t.finish(key("2-0"));
        assert_eq!(t.epoch, 1, "letting go of what is not held is no finish");
    }
}

//! The consumer runtime shared by payment-service and notification-service.
//!
//! ```text
//!  reader:order-events ──┐                       ┌─ handler-1 ─┐
//!                         ├─ bounded channel ───┤              ├─ handle, then XACK
//!  reader:payment-events ─┘   (backpressure)     └─ handler-2 ─┘   (or dead-letter)
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
//! * Entries cross a **bounded** channel. A full channel blocks the reader,
//!   so memory stays bounded whatever the backlog.
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
//!   the next start, and exit when the channel is disconnected.

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use redis::{Connection, RedisError, Value};

use crate::config::Config;
use crate::connection::{self, Link, Redis, WaitFor, COMMAND_TIMEOUT};
use crate::dlq::{self, DeadLetter};
use crate::notify::{Heartbeat, Heartbeats};
use crate::record::Fields;
use crate::{metrics, topology, value};

/// What a consumer reads: one stream through one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subscription {
    /// The stream.
    pub stream: &'static str,
    /// The group.
    pub group: &'static str,
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
}

/// Longest a handler thread keeps starting deliveries once shutdown has
/// begun; what is left stays pending for the next start.
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// Attempts at acknowledging finished work (or dead-lettering) when
/// connections keep being dropped; each on a new connection.
const IDEMPOTENT_ATTEMPTS: u32 = 3;
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
    /// Held by a handler thread (in the channel, in a batch, or carried
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
    let capacity = settings.batch_size * settings.handler_threads * 2;
    let (tx, rx) = crossbeam_channel::bounded::<Delivery>(capacity);
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
            tx: tx.clone(),
            in_flight: in_flight.clone(),
            shutdown: shutdown.clone(),
            beat: beats.register(&format!("reader:{}", sub.stream)),
            claim_cursor: "0-0".into(),
            next_renew: Instant::now(),
        };
        threads.push(
            std::thread::Builder::new()
                .name(format!("reader:{}", sub.stream))
                .spawn(move || reader.run())?,
        );
    }
    drop(tx);
    for i in 1..=settings.handler_threads {
        let worker = Worker {
            link: Link::new(redis.clone(), COMMAND_TIMEOUT, topology::ensure_groups),
            handler: handler.clone(),
            settings: settings.clone(),
            rx: rx.clone(),
            in_flight: in_flight.clone(),
            shutdown: shutdown.clone(),
            beat: beats.register(&format!("handler-{i}")),
            carry: VecDeque::new(),
            stop_by: None,
        };
        threads.push(
            std::thread::Builder::new()
                .name(format!("handler-{i}"))
                .spawn(move || worker.run())?,
        );
    }
    Ok(threads)
}

struct Reader {
    sub: Subscription,
    link: Link,
    settings: Settings,
    tx: Sender<Delivery>,
    in_flight: InFlight,
    shutdown: Receiver<()>,
    beat: Heartbeat,
    /// Where the next `XAUTOCLAIM` continues (`0-0`: from the start).
    claim_cursor: String,
    /// When the entries this instance holds are next renewed (see
    /// [`crate::lease`]).
    next_renew: Instant,
}

impl Reader {
    fn run(mut self) {
        let Subscription { stream, group } = self.sub;
        // `Some(id)`: still re-reading our own pending entries after `id`.
        let mut backlog: Option<String> = Some("0".into());
        let mut next_claim = Instant::now();
        log::info!("reading {stream} as {group}/{}", self.settings.consumer);
        loop {
            self.beat.beat();
            if !self.link.is_connected() {
                // (Re)connecting: entries we took before may not have been
                // acknowledged (the ack failed with the connection), so
                // re-read our own pending entries first, as at start.
                backlog = Some("0".into());
            }
            if crate::shutdown::is_started(&self.shutdown)
                || !self
                    .link
                    .wait_connected(&self.shutdown, &|| self.beat.beat())
            {
                break;
            }
            if Instant::now() >= next_claim {
                self.claim();
                next_claim = Instant::now() + self.settings.claim_interval();
            }
            self.renew_if_due();
            let from = backlog.clone().unwrap_or_else(|| ">".into());
            let epoch = self.epoch();
            match self.read(&from) {
                Ok(entries) => {
                    if backlog.is_some() {
                        match entries.last() {
                            Some(last) => backlog = Some(last.0.clone()),
                            None => {
                                log::info!(
                                    "{stream}/{group}: own pending entries done, reading new ones"
                                );
                                backlog = None;
                            }
                        }
                    }
                    let redelivered = backlog.is_some();
                    if !self.dispatch(entries, redelivered, epoch) {
                        break;
                    }
                }
                Err(e) => self.on_error(&e),
            }
        }
        log::debug!("reader for {stream}/{group} stopped");
    }

    fn on_error(&mut self, e: &RedisError) {
        if topology::is_nogroup(e) {
            log::warn!(
                "{}: group {} is gone, recreating the topology",
                self.sub.stream,
                self.sub.group
            );
            if let Err(e) = self.link.run(topology::ensure_groups) {
                log::warn!("cannot recreate the groups: {e}");
            }
        } else if crate::connection::is_transient(e) {
            crate::shutdown::wait(&self.shutdown, Duration::from_millis(100));
        } else if !crate::connection::is_connection_error(e) {
            // A server error we do not expect: do not spin on it.
            log::error!("{}: read failed: {e}", self.sub.stream);
            crate::shutdown::wait(&self.shutdown, Duration::from_secs(1));
        }
    }

    /// `XREADGROUP` from `from` (`>` blocks; an ID re-reads our pending).
    fn read(&mut self, from: &str) -> Result<Vec<(String, Option<Fields>)>, RedisError> {
        let (sub, settings) = (self.sub, &self.settings);
        let reply: Value = self.link.run(|c| {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(sub.group)
                .arg(&settings.consumer)
                .arg("COUNT")
                .arg(settings.batch_size);
            if from == ">" {
                cmd.arg("BLOCK").arg(settings.block.as_millis() as u64);
            }
            cmd.arg("STREAMS").arg(sub.stream).arg(from).query(c)
        })?;
        Ok(parse_read_reply(&reply))
    }

    /// Renews the entries of this subscription that handlers hold (in the
    /// channel, in a batch, carried over), every third of `CLAIM_IDLE_MS`,
    /// so that no other instance claims what this one is working through.
    fn renew_if_due(&mut self) {
        if Instant::now() < self.next_renew {
            return;
        }
        self.next_renew = Instant::now() + self.settings.renew_interval();
        let sub = self.sub;
        let held: Vec<String> = lock(&self.in_flight)
            .held
            .iter()
            .filter(|k| k.0 == sub)
            .map(|k| k.1.clone())
            .collect();
        if held.is_empty() {
            return;
        }
        let consumer = self.settings.consumer.clone();
        let renewed = self
            .link
            .run(|c| crate::lease::renew(c, sub.stream, sub.group, &consumer, &held));
        match renewed {
            Ok(n) if (n as usize) < held.len() => log::info!(
                "{}/{}: {} held entries are no longer ours (claimed by another instance?)",
                sub.stream,
                sub.group,
                held.len() - n as usize
            ),
            Ok(_) => {}
            // Not fatal: the next round tries again, and a claim by another
            // instance only repeats work (at least once).
            Err(e) => log::warn!("{}: renewing held entries failed: {e}", sub.stream),
        }
    }

    /// How many entries handlers have finished so far (see [`Tracker`]).
    fn epoch(&self) -> u64 {
        lock(&self.in_flight).epoch
    }

    /// Claims entries idle longer than `CLAIM_IDLE_MS` and dispatches them,
    /// continuing where the last round stopped.
    fn claim(&mut self) {
        let (sub, settings) = (self.sub, self.settings.clone());
        // Bounded per round, so reading new entries is never starved; the
        // cursor carries over to the next round.
        for _ in 0..16 {
            let cursor = self.claim_cursor.clone();
            let epoch = self.epoch();
            let reply: Result<Value, RedisError> = self.link.run(|c| {
                redis::cmd("XAUTOCLAIM")
                    .arg(sub.stream)
                    .arg(sub.group)
                    .arg(&settings.consumer)
                    .arg(settings.claim_idle.as_millis() as u64)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(settings.batch_size)
                    .query(c)
            });
            let reply = match reply {
                Ok(r) => r,
                Err(e) => return self.on_error(&e),
            };
            let Some([next, entries, ..]) = value::as_array(&reply) else {
                return;
            };
            let entries = parse_entries(value::as_array(entries).unwrap_or_default());
            let entries: Vec<_> = {
                let in_flight = lock(&self.in_flight);
                entries
                    .into_iter()
                    .filter(|(id, _)| in_flight.may_dispatch(&(sub, id.clone()), epoch))
                    .collect()
            };
            self.claim_cursor = match value::as_string(next) {
                Some(n) if n != "0-0" => n,
                _ => "0-0".into(),
            };
            if !entries.is_empty() {
                log::info!(
                    "{}/{}: claimed {} idle entries",
                    sub.stream,
                    sub.group,
                    entries.len()
                );
            }
            if !self.dispatch(entries, true, epoch) || self.claim_cursor == "0-0" {
                return;
            }
        }
    }

    /// Hands entries to the handlers. `redelivered`: they were delivered
    /// before. `epoch`: [`Reader::epoch`] when the read that returned them
    /// was sent; entries held or finished since are skipped. Returns `false`
    /// if the handlers are gone.
    fn dispatch(
        &mut self,
        entries: Vec<(String, Option<Fields>)>,
        redelivered: bool,
        epoch: u64,
    ) -> bool {
        lock(&self.in_flight).prune(self.sub, epoch);
        // All of them are held from now on, so that renewing (while the
        // channel is full) covers those still waiting here too.
        let mut deliveries = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            let Some(fields) = fields else {
                // Deleted from the stream (XDEL) while pending: nothing is
                // left to handle. Acknowledge so it does not haunt the PEL.
                log::warn!(
                    "{}: pending entry {id} no longer exists in the stream; acknowledging it",
                    self.sub.stream
                );
                let (s, g) = (self.sub.stream, self.sub.group);
                let _ = self
                    .link
                    .run(|c| ack_and_forget(c, s, g, &[id.as_str()], &[id.as_str()]));
                continue;
            };
            let mut in_flight = lock(&self.in_flight);
            let key = (self.sub, id.clone());
            if !in_flight.may_dispatch(&key, epoch) {
                // Held by a handler, or finished while this read was on
                // its way: in flight on one path only.
                continue;
            }
            in_flight.held.insert(key);
            deliveries.push(Delivery {
                sub: self.sub,
                id,
                fields,
                redelivered,
            });
        }
        let redeliveries = if redelivered {
            deliveries.len() as u64
        } else {
            0
        };
        for mut delivery in deliveries {
            loop {
                match self.tx.send_timeout(delivery, Duration::from_secs(1)) {
                    Ok(()) => break,
                    // Handlers are busy: that is backpressure, not a wedge.
                    Err(SendTimeoutError::Timeout(d)) => {
                        self.beat.beat();
                        self.renew_if_due();
                        delivery = d;
                    }
                    Err(SendTimeoutError::Disconnected(_)) => return false,
                }
            }
        }
        metrics::redeliveries(self.sub.stream, self.sub.group, redeliveries);
        true
    }
}

/// `XACK`s `acked` and removes the failure counts of `forget`, in one round
/// trip.
fn ack_and_forget(
    conn: &mut Connection,
    stream: &str,
    group: &str,
    acked: &[&str],
    forget: &[&str],
) -> Result<(), RedisError> {
    let mut pipe = redis::pipe();
    if !acked.is_empty() {
        pipe.cmd("XACK").arg(stream).arg(group).arg(acked).ignore();
    }
    if !forget.is_empty() {
        pipe.cmd("HDEL")
            .arg(topology::failures_key(stream, group))
            .arg(forget)
            .ignore();
    }
    pipe.query(conn)
}

/// Adds one failure to each of `ids`; returns the counts now.
fn count_failures(
    conn: &mut Connection,
    stream: &str,
    group: &str,
    ids: &[&str],
) -> Result<Vec<u64>, RedisError> {
    let key = topology::failures_key(stream, group);
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("HINCRBY").arg(&key).arg(*id).arg(1);
    }
    let counts: Vec<i64> = pipe.query(conn)?;
    Ok(counts.into_iter().map(|n| n.max(1) as u64).collect())
}

/// Entries of an `XREADGROUP` reply (RESP2 array or RESP3 map); `None`
/// fields mark an entry deleted from the stream while pending.
fn parse_read_reply(reply: &Value) -> Vec<(String, Option<Fields>)> {
    let streams: Vec<Value> = match reply {
        Value::Nil => return Vec::new(),
        Value::Map(pairs) => pairs.iter().map(|(_, v)| v.clone()).collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(|s| value::as_array(s).and_then(|kv| kv.get(1)).cloned())
            .collect(),
        _ => return Vec::new(),
    };
    streams
        .iter()
        .flat_map(|entries| parse_entries(value::as_array(entries).unwrap_or_default()))
        .collect()
}

fn parse_entries(entries: &[Value]) -> Vec<(String, Option<Fields>)> {
    entries
        .iter()
        .filter_map(|e| {
            let [id, fields, ..] = value::as_array(e)? else {
                return None;
            };
            let id = value::as_string(id)?;
            let fields = value::as_array(fields).map(|kv| {
                Fields(
                    kv.chunks(2)
                        .filter_map(|p| match p {
                            [k, v] => {
                                Some((value::as_bytes(k)?.to_vec(), value::as_bytes(v)?.to_vec()))
                            }
                            _ => None,
                        })
                        .collect(),
                )
            });
            Some((id, fields))
        })
        .collect()
}

/// Whether a handled batch's writes reached `REDIS_WAIT_REPLICAS` replicas.
enum Replicated {
    /// Yes (or no wait is configured).
    Yes,
    /// The connection was lost first: handle the batch again.
    Lost,
    /// Shutdown came first.
    ShuttingDown,
}

struct Worker {
    link: Link,
    handler: Arc<dyn Handler>,
    settings: Settings,
    rx: Receiver<Delivery>,
    in_flight: InFlight,
    shutdown: Receiver<()>,
    beat: Heartbeat,
    /// Deliveries of a batch whose budget ran out before they were started:
    /// still held, first in this thread's next turn.
    carry: VecDeque<Delivery>,
    /// Once shutdown has begun: when to stop starting deliveries.
    stop_by: Option<Instant>,
}

impl Worker {
    fn run(mut self) {
        loop {
            self.beat.beat();
            let first = match self.carry.pop_front() {
                Some(d) => d,
                None => match self.rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(d) => d,
                    Err(RecvTimeoutError::Timeout) => continue,
                    // Every reader has stopped and the channel is drained.
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut batch = vec![first];
            while batch.len() < self.settings.batch_size {
                match self
                    .carry
                    .pop_front()
                    .map_or_else(|| self.rx.try_recv(), Ok)
                {
                    Ok(d) => batch.push(d),
                    Err(_) => break,
                }
            }
            if self.stop_grace_over() {
                self.let_go(&batch);
                continue;
            }
            // Group by subscription, keeping arrival order within each.
            while !batch.is_empty() {
                let sub = batch[0].sub;
                let (mine, rest): (Vec<_>, Vec<_>) = batch.into_iter().partition(|d| d.sub == sub);
                batch = rest;
                self.process(mine);
            }
        }
        log::debug!(
            "{} stopped",
            std::thread::current().name().unwrap_or("handler")
        );
    }

    /// Whether shutdown began more than [`STOP_GRACE`] ago.
    fn stop_grace_over(&mut self) -> bool {
        if self.stop_by.is_none() && crate::shutdown::is_started(&self.shutdown) {
            self.stop_by = Some(Instant::now() + STOP_GRACE);
        }
        self.stop_by.is_some_and(|t| Instant::now() >= t)
    }

    /// Lets go of deliveries not started at shutdown: they stay pending
    /// for the next start (or a claim).
    fn let_go(&mut self, batch: &[Delivery]) {
        if let Some(d) = batch.first() {
            log::info!(
                "{}: stopping; {} entries not started stay pending for the next start",
                d.sub.stream,
                batch.len()
            );
        }
        let mut in_flight = lock(&self.in_flight);
        for d in batch {
            in_flight.finish((d.sub, d.id.clone()));
        }
    }

    fn process(&mut self, batch: Vec<Delivery>) {
        let batch = self.skip_redrives_for_others(batch);
        if batch.is_empty() {
            return;
        }
        let not_tried = self.handle(&batch);
        let mut in_flight = lock(&self.in_flight);
        for (i, d) in batch.into_iter().enumerate() {
            if not_tried.contains(&i) {
                // Still held: the next turn of this thread starts with it.
                self.carry.push_back(d);
            } else {
                in_flight.finish((d.sub, d.id));
            }
        }
    }

    /// Acknowledges, without handling, the redriven entries meant for other
    /// groups (see [`crate::dlq`]): this group handled the original already.
    /// Returns the rest. Left pending if the acknowledgement fails: they
    /// come back and are skipped then.
    fn skip_redrives_for_others(&mut self, batch: Vec<Delivery>) -> Vec<Delivery> {
        let (skip, rest): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|d| dlq::is_for_other_group(&d.fields, d.sub.group));
        if let Some(first) = skip.first() {
            let sub = first.sub;
            let ids: Vec<&str> = skip.iter().map(|d| d.id.as_str()).collect();
            let acked = self.link.run(|c| {
                redis::cmd("XACK")
                    .arg(sub.stream)
                    .arg(sub.group)
                    .arg(&ids)
                    .query::<i64>(c)
            });
            match acked {
                Ok(_) => {
                    log::info!(
                        "{}/{}: skipped {} redriven entries meant for other groups",
                        sub.stream,
                        sub.group,
                        ids.len()
                    );
                    metrics::events(sub.stream, sub.group, "skipped", ids.len() as u64);
                }
                Err(e) => log::warn!(
                    "{}: could not acknowledge {} redriven entries of other groups: {e}",
                    sub.stream,
                    ids.len()
                ),
            }
            let mut in_flight = lock(&self.in_flight);
            for d in &skip {
                in_flight.finish((d.sub, d.id.clone()));
            }
        }
        rest
    }

    /// Handles `batch`; returns the positions of the deliveries the handler
    /// did not start (its budget ran out).
    fn handle(&mut self, batch: &[Delivery]) -> Vec<usize> {
        let sub = batch[0].sub;
        loop {
            if !self
                .link
                .wait_connected(&self.shutdown, &|| self.beat.beat())
            {
                log::warn!(
                    "{}: Redis unavailable at shutdown; {} entries stay pending for the next start",
                    sub.stream,
                    batch.len()
                );
                return Vec::new();
            }
            let started = Instant::now();
            let handler = self.handler.clone();
            let progress = Progress {
                beat: &self.beat,
                deadline: started + self.settings.batch_budget,
                shutdown: &self.shutdown,
                stop_by: Cell::new(self.stop_by),
                last_start: Cell::new(None),
            };
            let opened = self.link.connections_opened();
            let result = self.link.run(|c| handler.handle(c, batch, &progress));
            self.stop_by = progress.stop_by.get();
            match result {
                Ok(outcomes) => {
                    metrics::handler_latency(
                        sub.stream,
                        sub.group,
                        started.elapsed(),
                        batch.len() as u64,
                    );
                    match self.replicated(opened, batch.len()) {
                        Replicated::Yes => return self.settle(batch, outcomes),
                        // The connection (and maybe the writes) went with a
                        // failover: handle again, on the new master.
                        Replicated::Lost => continue,
                        Replicated::ShuttingDown => {
                            log::warn!(
                                "{}: stopping before replicas confirmed {} handled entries; \
                                 they stay pending for the next start",
                                sub.stream,
                                batch.len()
                            );
                            return Vec::new();
                        }
                    }
                }
                Err(e) if crate::connection::is_connection_error(&e) => {
                    log::warn!(
                        "{}: Redis failed while handling {} entries, retrying: {e}",
                        sub.stream,
                        batch.len()
                    );
                    if self.stop_grace_over() {
                        return Vec::new();
                    }
                }
                Err(e) if crate::connection::is_transient(&e) => {
                    log::info!("{}: Redis is busy ({e}); retrying", sub.stream);
                    if crate::shutdown::wait(&self.shutdown, Duration::from_millis(100)) {
                        return Vec::new();
                    }
                }
                Err(e) if topology::is_nogroup(&e) => {
                    log::warn!(
                        "{}: group {} vanished while handling; its entries went with it",
                        sub.stream,
                        sub.group
                    );
                    let _ = self.link.run(topology::ensure_groups);
                    return Vec::new();
                }
                Err(e) => {
                    // Redis refused (out of memory, a read-only replica
                    // after a failover, a missing permission): a fault of
                    // Redis, not of these entries, so not counted.
                    log::error!(
                        "{}: handling {} entries failed, they stay pending for a retry: {e}",
                        sub.stream,
                        batch.len()
                    );
                    metrics::events(sub.stream, sub.group, "failed", batch.len() as u64);
                    return Vec::new();
                }
            }
        }
    }

    /// With `REDIS_WAIT_REPLICAS`: waits until that many replicas confirmed
    /// what the handler wrote on the connection it used (opened as the
    /// `opened`-th), before anything is acknowledged. A `WAIT` that times
    /// out is asked again: the entries are done, and giving up would only
    /// deliver them again.
    fn replicated(&mut self, opened: u64, entries: usize) -> Replicated {
        let Some(w) = self.settings.wait else {
            return Replicated::Yes;
        };
        // The reply must come within the link's read timeout.
        let millis = w.millis_within(COMMAND_TIMEOUT - Duration::from_millis(500));
        let mut warned = false;
        loop {
            self.beat.beat();
            if !self.link.is_connected() || self.link.connections_opened() != opened {
                return Replicated::Lost;
            }
            match self.link.run(|c| connection::wait(c, w.replicas, millis)) {
                Ok(n) if n >= w.replicas => return Replicated::Yes,
                Ok(n) => {
                    if !warned {
                        log::warn!(
                            "{entries} handled entries confirmed by {n} of {} replicas \
                             within {millis} ms (REDIS_WAIT_REPLICAS): waiting before \
                             acknowledging them",
                            w.replicas
                        );
                        metrics::wait_unconfirmed(entries as u64);
                        warned = true;
                    }
                }
                Err(e) if connection::is_connection_error(&e) => return Replicated::Lost,
                Err(e) => {
                    log::warn!("WAIT failed: {e}; retrying");
                    if crate::shutdown::wait(&self.shutdown, Duration::from_millis(100)) {
                        return Replicated::ShuttingDown;
                    }
                }
            }
            if crate::shutdown::is_started(&self.shutdown) {
                return Replicated::ShuttingDown;
            }
        }
    }

    /// Acknowledges what is done, counts failures and dead-letters what
    /// failed `MAX_DELIVERIES` times or never can succeed, leaves the rest
    /// pending for a retry after `CLAIM_IDLE_MS`. Returns the positions of
    /// deliveries not tried.
    fn settle(&mut self, batch: &[Delivery], outcomes: Vec<Outcome>) -> Vec<usize> {
        let sub = batch[0].sub;
        let (mut to_ack, mut forget, mut failed_now, mut not_tried) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut ok, mut duplicate) = (0, 0);
        let answered = outcomes.len();
        for (i, (d, outcome)) in batch.iter().zip(outcomes).enumerate() {
            match outcome {
                Outcome::Done => {
                    to_ack.push(d.id.as_str());
                    if d.redelivered {
                        forget.push(d.id.as_str());
                    }
                }
                Outcome::DoneAndAcked => {
                    ok += 1;
                    if d.redelivered {
                        forget.push(d.id.as_str());
                    }
                }
                Outcome::Duplicate => {
                    duplicate += 1;
                    if d.redelivered {
                        forget.push(d.id.as_str());
                    }
                }
                Outcome::Failed(f) => failed_now.push((d, f)),
                Outcome::NotTried => not_tried.push(i),
            }
        }
        // A handler that answered fewer outcomes than deliveries did not
        // try the rest.
        not_tried.extend(answered..batch.len());
        let failed = self.count_and_settle_failures(sub, &failed_now);
        if !to_ack.is_empty() || !forget.is_empty() {
            let (s, g) = (sub.stream, sub.group);
            match self.run_idempotent(|c| ack_and_forget(c, s, g, &to_ack, &forget)) {
                Ok(()) => ok += to_ack.len() as u64,
                Err(e) => {
                    // Done but not acknowledged: it will be delivered again,
                    // which handlers must (and do) tolerate.
                    log::warn!(
                        "{}: could not acknowledge {} handled entries: {e}",
                        sub.stream,
                        to_ack.len()
                    );
                    metrics::events(sub.stream, sub.group, "failed", to_ack.len() as u64);
                }
            }
        }
        metrics::events(sub.stream, sub.group, "ok", ok);
        metrics::events(sub.stream, sub.group, "failed", failed);
        metrics::events(sub.stream, sub.group, "duplicate", duplicate);
        not_tried
    }

    /// Counts one failure for each of `failed` (`HINCRBY`) and dead-letters
    /// those that reached `MAX_DELIVERIES` or can never succeed. Returns
    /// how many stay pending for a retry.
    fn count_and_settle_failures(
        &mut self,
        sub: Subscription,
        failed: &[(&Delivery, Failure)],
    ) -> u64 {
        if failed.is_empty() {
            return 0;
        }
        let ids: Vec<&str> = failed.iter().map(|(d, _)| d.id.as_str()).collect();
        let (s, g) = (sub.stream, sub.group);
        let counts = match self.link.run(|c| count_failures(c, s, g, &ids)) {
            Ok(counts) if counts.len() == ids.len() => counts,
            other => {
                // Not counted: the entries stay pending and are retried; a
                // failure that could not be counted does not count.
                let why = other
                    .err()
                    .map_or_else(|| "unexpected reply".into(), |e| e.to_string());
                log::warn!(
                    "{}: could not count {} failed deliveries ({why}); they are retried",
                    sub.stream,
                    ids.len()
                );
                return ids.len() as u64;
            }
        };
        let max = self.settings.max_deliveries;
        let mut retried = 0;
        for ((d, f), n) in failed.iter().zip(counts) {
            if f.permanent {
                self.dead_letter(d, &f.reason, n);
            } else if n >= max {
                let reason = format!("failed {n} times (MAX_DELIVERIES is {max}): {}", f.reason);
                self.dead_letter(d, &reason, n);
            } else {
                retried += 1;
                log::warn!(
                    "{} {}: failure {n} of at most {max}, retrying after CLAIM_IDLE_MS: {}",
                    sub.stream,
                    d.id,
                    f.reason
                );
            }
        }
        retried
    }

    /// Runs `f`, which is safe to repeat, again on a new connection (up to
    /// [`IDEMPOTENT_ATTEMPTS`] in all) while attempts lose the connection:
    /// a dropped link must not turn finished work into a redelivery (a
    /// repeated webhook call).
    fn run_idempotent<T>(
        &mut self,
        f: impl Fn(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, RedisError> {
        let mut attempt = 1;
        loop {
            match self.link.run(&f) {
                Err(e)
                    if crate::connection::is_connection_error(&e)
                        && attempt < IDEMPOTENT_ATTEMPTS =>
                {
                    attempt += 1;
                    self.link.skip_backoff();
                }
                other => return other,
            }
        }
    }

    fn dead_letter(&mut self, d: &Delivery, reason: &str, failures: u64) {
        let consumer = self.settings.consumer.clone();
        let letter = DeadLetter {
            stream: d.sub.stream,
            group: d.sub.group,
            consumer: &consumer,
            id: &d.id,
            fields: &d.fields,
            error: reason,
            deliveries: failures,
            retain: self.settings.dlq_retain,
        };
        match self.run_idempotent(|c| dlq::move_to_dlq(c, &letter)) {
            Ok(dlq::Moved::Written { evicted }) => {
                log::warn!(
                    "{} {}: dead-lettered to {}: {reason}",
                    d.sub.stream,
                    d.id,
                    topology::dlq_stream(d.sub.stream)
                );
                metrics::dead_lettered(d.sub.stream, d.sub.group);
                metrics::events(d.sub.stream, d.sub.group, "dead_lettered", 1);
                if evicted > 0 {
                    // Once the DLQ is full this happens with every letter:
                    // the metric is the place to watch, not the log.
                    log::debug!(
                        "{}: {evicted} oldest dead letters deleted to keep the newest {} (DLQ_RETAIN_ENTRIES)",
                        topology::dlq_stream(d.sub.stream),
                        self.settings.dlq_retain
                    );
                    metrics::dlq_evicted(d.sub.stream, evicted);
                }
            }
            Ok(dlq::Moved::Joined) => {
                log::warn!(
                    "{} {}: given up by {} too; already in {}: {reason}",
                    d.sub.stream,
                    d.id,
                    d.sub.group,
                    topology::dlq_stream(d.sub.stream)
                );
                // Dead-lettered for this group: counted as such, though
                // the letter was written by the first group to give up.
                metrics::dead_lettered(d.sub.stream, d.sub.group);
                metrics::events(d.sub.stream, d.sub.group, "dead_lettered", 1);
            }
            Ok(dlq::Moved::NotPending) => log::info!(
                "{} {}: already handled elsewhere; not dead-lettered",
                d.sub.stream,
                d.id
            ),
            Err(e) => log::warn!(
                "{} {}: could not dead-letter, stays pending: {e}",
                d.sub.stream,
                d.id
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

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

    #[test]
    fn parses_xreadgroup_replies() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("order-events"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("userId"), bulk("u1")]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = parse_read_reply(&reply);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0, "1-0");
        assert_eq!(
            entries[0].1.as_ref().and_then(|f| f.get("userId")),
            Some(&b"u1"[..])
        );
        assert!(entries[1].1.is_none());
        assert!(parse_read_reply(&Value::Nil).is_empty());
    }

    mod properties {
        //! Whatever Redis (or something posing as it) replies, reading it
        //! never panics, and well-formed replies read back exactly. A long
        //! run: `PROPTEST_CASES=100000 cargo test --lib consumer`.

        use super::*;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            let mut config = ProptestConfig::default();
            if std::env::var_os("PROPTEST_CASES").is_none() {
                config.cases = 256;
            }
            config
        }

        fn any_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Nil),
                Just(Value::Okay),
                any::<i64>().prop_map(Value::Int),
                proptest::collection::vec(any::<u8>(), 0..12).prop_map(Value::BulkString),
                "[ -~]{0,8}".prop_map(Value::SimpleString),
                any::<f64>().prop_map(Value::Double),
                any::<bool>().prop_map(Value::Boolean),
            ];
            leaf.prop_recursive(4, 64, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Set),
                    proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Value::Map),
                ]
            })
        }

        type Entry = (String, Option<Vec<(Vec<u8>, Vec<u8>)>>);

        fn entry() -> impl Strategy<Value = Entry> {
            (
                "[0-9]{1,13}-[0-9]{1,3}",
                proptest::option::of(proptest::collection::vec(
                    (
                        proptest::collection::vec(any::<u8>(), 0..10),
                        proptest::collection::vec(any::<u8>(), 0..10),
                    ),
                    0..5,
                )),
            )
        }

        fn reply(stream: &str, entries: &[Entry], resp3: bool) -> Value {
            let items = entries
                .iter()
                .map(|(id, fields)| {
                    let fields = match fields {
                        None => Value::Nil,
                        Some(kv) => Value::Array(
                            kv.iter()
                                .flat_map(|(k, v)| {
                                    [Value::BulkString(k.clone()), Value::BulkString(v.clone())]
                                })
                                .collect(),
                        ),
                    };
                    Value::Array(vec![Value::BulkString(id.clone().into_bytes()), fields])
                })
                .collect();
            let name = Value::BulkString(stream.as_bytes().to_vec());
            if resp3 {
                Value::Map(vec![(name, Value::Array(items))])
            } else {
                Value::Array(vec![Value::Array(vec![name, Value::Array(items)])])
            }
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn arbitrary_replies_never_panic(reply in any_value()) {
                let entries = parse_read_reply(&reply);
                if let Some(items) = value::as_array(&reply) {
                    let _ = parse_entries(items);
                }
                for fields in entries.iter().filter_map(|(_, f)| f.as_ref()) {
                    let _ = crate::record::Order::from_fields(fields);
                    let _ = crate::record::Payment::from_fields(fields);
                }
            }

            #[test]
            fn well_formed_replies_read_back_exactly(
                entries in proptest::collection::vec(entry(), 0..6),
                resp3 in any::<bool>(),
            ) {
                let got = parse_read_reply(&reply("order-events", &entries, resp3));
                prop_assert_eq!(got.len(), entries.len());
                for ((id, fields), (want_id, want)) in got.iter().zip(&entries) {
                    prop_assert_eq!(id, want_id);
                    prop_assert_eq!(fields.as_ref().map(|f| f.0.clone()), want.clone());
                }
            }
        }
    }
}

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
//! * Entries cross a **bounded** channel. A full channel blocks the reader,
//!   so memory stays bounded whatever the backlog.
//! * **Handler** threads take a batch, run the [`Handler`], and only then
//!   acknowledge (one `XACK` for the batch), or leave a failed entry pending
//!   for a retry, or dead-letter it (see [`crate::dlq`]). A failing entry
//!   never holds up the others.
//! * Shutdown: readers stop reading and hand over what they already read;
//!   handlers finish and acknowledge everything in the channel, then exit
//!   when the channel is disconnected.

use std::collections::HashSet;
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
    /// How often Redis has delivered it (1 the first time).
    pub deliveries: u64,
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
    /// per delivery, in order. An `Err` means Redis failed part-way: nothing
    /// the handler did was acknowledged, and the batch is tried again.
    fn handle(&self, conn: &mut Connection, batch: &[Delivery])
        -> Result<Vec<Outcome>, RedisError>;
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
    /// Deliveries after which a failing entry is dead-lettered.
    pub max_deliveries: u64,
    /// Dead letters kept per `<stream>:dlq` (`DLQ_RETAIN_ENTRIES`).
    pub dlq_retain: u64,
    /// Replicas that must confirm a batch's writes before its entries are
    /// acknowledged (`REDIS_WAIT_REPLICAS`), and for how long one `WAIT`
    /// waits.
    pub wait: Option<WaitFor>,
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
            wait: WaitFor::from_config(config),
        }
    }

    /// How often readers look for entries to claim: often enough that a
    /// stranded entry waits little longer than `claim_idle`, rarely enough
    /// to cost nothing.
    fn claim_interval(&self) -> Duration {
        (self.claim_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(10))
    }
}

/// Entries handed to handlers and not yet finished, so that a claim does not
/// hand the same entry out twice inside this process.
type InFlight = Arc<Mutex<HashSet<(Subscription, String)>>>;

fn lock(set: &InFlight) -> std::sync::MutexGuard<'_, HashSet<(Subscription, String)>> {
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
            let from = backlog.clone().unwrap_or_else(|| ">".into());
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
                    let counted = backlog.is_some();
                    if !self.dispatch(entries, counted) {
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

    /// Claims entries idle longer than `CLAIM_IDLE_MS` and dispatches them.
    fn claim(&mut self) {
        let (sub, settings) = (self.sub, self.settings.clone());
        let mut cursor = "0-0".to_string();
        // Bounded per round, so reading new entries is never starved.
        for _ in 0..16 {
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
                    .filter(|(id, _)| !in_flight.contains(&(sub, id.clone())))
                    .collect()
            };
            if !entries.is_empty() {
                log::info!(
                    "{}/{}: claimed {} idle entries",
                    sub.stream,
                    sub.group,
                    entries.len()
                );
            }
            if !self.dispatch(entries, true) {
                return;
            }
            match value::as_string(next) {
                Some(n) if n != "0-0" => cursor = n,
                _ => return,
            }
        }
    }

    /// Hands entries to the handlers. `redelivered`: they were delivered
    /// before, so their delivery counts are looked up. Returns `false` if the
    /// handlers are gone.
    fn dispatch(&mut self, entries: Vec<(String, Option<Fields>)>, redelivered: bool) -> bool {
        if entries.is_empty() {
            return true;
        }
        let counts = if redelivered {
            self.delivery_counts(&entries)
        } else {
            Vec::new()
        };
        let mut redeliveries = 0;
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
                    .run(|c| redis::cmd("XACK").arg(s).arg(g).arg(&id).query::<i64>(c));
                continue;
            };
            let deliveries = counts
                .iter()
                .find(|(i, _)| *i == id)
                .map_or(1, |(_, n)| *n)
                .max(1);
            if !lock(&self.in_flight).insert((self.sub, id.clone())) {
                // Re-read after a reconnect while a handler still holds it.
                continue;
            }
            if deliveries > 1 {
                redeliveries += 1;
            }
            let mut delivery = Delivery {
                sub: self.sub,
                id,
                fields,
                deliveries,
            };
            loop {
                match self.tx.send_timeout(delivery, Duration::from_secs(1)) {
                    Ok(()) => break,
                    // Handlers are busy: that is backpressure, not a wedge.
                    Err(SendTimeoutError::Timeout(d)) => {
                        self.beat.beat();
                        delivery = d;
                    }
                    Err(SendTimeoutError::Disconnected(_)) => return false,
                }
            }
        }
        metrics::redeliveries(self.sub.stream, self.sub.group, redeliveries);
        true
    }

    /// Delivery counts of `entries` from `XPENDING` (missing ones count 1).
    fn delivery_counts(&mut self, entries: &[(String, Option<Fields>)]) -> Vec<(String, u64)> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Vec::new();
        };
        let (sub, consumer) = (self.sub, self.settings.consumer.clone());
        let reply: Result<Value, RedisError> = self.link.run(|c| {
            redis::cmd("XPENDING")
                .arg(sub.stream)
                .arg(sub.group)
                .arg(&first.0)
                .arg(&last.0)
                .arg(entries.len())
                .arg(&consumer)
                .query(c)
        });
        let Ok(reply) = reply else { return Vec::new() };
        value::as_array(&reply)
            .unwrap_or_default()
            .iter()
            .filter_map(|row| match value::as_array(row)? {
                [id, _consumer, _idle, count, ..] => {
                    Some((value::as_string(id)?, value::as_i64(count)?.max(0) as u64))
                }
                _ => None,
            })
            .collect()
    }
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
}

impl Worker {
    fn run(mut self) {
        loop {
            self.beat.beat();
            let first = match self.rx.recv_timeout(Duration::from_secs(1)) {
                Ok(d) => d,
                Err(RecvTimeoutError::Timeout) => continue,
                // Every reader has stopped and the channel is drained.
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![first];
            while batch.len() < self.settings.batch_size {
                match self.rx.try_recv() {
                    Ok(d) => batch.push(d),
                    Err(_) => break,
                }
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

    fn process(&mut self, batch: Vec<Delivery>) {
        let batch = self.skip_redrives_for_others(batch);
        let (over, batch): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|d| d.deliveries > self.settings.max_deliveries);
        for d in &over {
            let reason = format!(
                "delivered {} times without success (MAX_DELIVERIES is {})",
                d.deliveries, self.settings.max_deliveries
            );
            self.dead_letter(d, &reason);
        }
        if !batch.is_empty() {
            self.handle(&batch);
        }
        let mut in_flight = lock(&self.in_flight);
        for d in over.iter().chain(&batch) {
            in_flight.remove(&(d.sub, d.id.clone()));
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
                in_flight.remove(&(d.sub, d.id.clone()));
            }
        }
        rest
    }

    fn handle(&mut self, batch: &[Delivery]) {
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
                return;
            }
            let started = Instant::now();
            let handler = self.handler.clone();
            let opened = self.link.connections_opened();
            match self.link.run(|c| handler.handle(c, batch)) {
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
                            return;
                        }
                    }
                }
                Err(e) if crate::connection::is_connection_error(&e) => {
                    log::warn!(
                        "{}: Redis failed while handling {} entries, retrying: {e}",
                        sub.stream,
                        batch.len()
                    );
                }
                Err(e) if crate::connection::is_transient(&e) => {
                    log::info!("{}: Redis is busy ({e}); retrying", sub.stream);
                    if crate::shutdown::wait(&self.shutdown, Duration::from_millis(100)) {
                        return;
                    }
                }
                Err(e) if topology::is_nogroup(&e) => {
                    log::warn!(
                        "{}: group {} vanished while handling; its entries went with it",
                        sub.stream,
                        sub.group
                    );
                    let _ = self.link.run(topology::ensure_groups);
                    return;
                }
                Err(e) => {
                    log::error!(
                        "{}: handling {} entries failed, they stay pending for a retry: {e}",
                        sub.stream,
                        batch.len()
                    );
                    metrics::events(sub.stream, sub.group, "failed", batch.len() as u64);
                    return;
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

    /// Acknowledges what is done, dead-letters what will never be, leaves
    /// the rest pending for a retry after `CLAIM_IDLE_MS`.
    fn settle(&mut self, batch: &[Delivery], outcomes: Vec<Outcome>) {
        let sub = batch[0].sub;
        let mut to_ack = Vec::new();
        let (mut ok, mut failed, mut duplicate) = (0, 0, 0);
        for (d, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Outcome::Done => to_ack.push(d.id.as_str()),
                Outcome::DoneAndAcked => ok += 1,
                Outcome::Duplicate => duplicate += 1,
                Outcome::Failed(f)
                    if f.permanent || d.deliveries >= self.settings.max_deliveries =>
                {
                    self.dead_letter(d, &f.reason)
                }
                Outcome::Failed(f) => {
                    failed += 1;
                    log::warn!(
                        "{} {}: delivery {} of {} failed, retrying after CLAIM_IDLE_MS: {}",
                        sub.stream,
                        d.id,
                        d.deliveries,
                        self.settings.max_deliveries,
                        f.reason
                    );
                }
            }
        }
        if !to_ack.is_empty() {
            let acked = self.link.run(|c| {
                redis::cmd("XACK")
                    .arg(sub.stream)
                    .arg(sub.group)
                    .arg(&to_ack)
                    .query::<i64>(c)
            });
            match acked {
                Ok(_) => ok += to_ack.len() as u64,
                Err(e) => {
                    // Done but not acknowledged: it will be delivered again,
                    // which handlers must (and do) tolerate.
                    log::warn!(
                        "{}: could not acknowledge {} handled entries: {e}",
                        sub.stream,
                        to_ack.len()
                    );
                    failed += to_ack.len() as u64;
                }
            }
        }
        metrics::events(sub.stream, sub.group, "ok", ok);
        metrics::events(sub.stream, sub.group, "failed", failed);
        metrics::events(sub.stream, sub.group, "duplicate", duplicate);
    }

    fn dead_letter(&mut self, d: &Delivery, reason: &str) {
        let letter = DeadLetter {
            stream: d.sub.stream,
            group: d.sub.group,
            consumer: &self.settings.consumer,
            id: &d.id,
            fields: &d.fields,
            error: reason,
            deliveries: d.deliveries,
            retain: self.settings.dlq_retain,
        };
        match self.link.run(|c| dlq::move_to_dlq(c, &letter)) {
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

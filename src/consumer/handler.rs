//! Handler threads (`handler-<n>`): take a batch from their lane, run the
//! [`Handler`], wait for replicas (`REDIS_WAIT_REPLICAS`), then acknowledge,
//! count failures, and dead-letter what can never succeed.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use redis::{Connection, RedisError};

use super::{
    lock, Delivery, Failure, Handler, InFlight, Outcome, Progress, Settings, Subscription,
    STOP_GRACE,
};
use crate::connection::{self, Link, COMMAND_TIMEOUT};
use crate::dlq::{self, DeadLetter};
use crate::notify::Heartbeat;
use crate::{metrics, topology};

/// Attempts at acknowledging finished work (or dead-lettering) when
/// connections keep being dropped; each on a new connection.
const IDEMPOTENT_ATTEMPTS: u32 = 3;

/// How many times `BATCH_SIZE` a handler thread takes in one turn when more
/// than a batch waits on its lane.
pub(super) const BACKLOG_FACTOR: usize = 4;

/// `XACK`s `acked` and removes the failure counts of `forget`, in one round
/// trip.
pub(super) fn ack_and_forget(
    conn: &mut Connection,
    stream: &str,
    group: &str,
    acked: &[&str],
    forget: &[&str],
) -> Result<(), RedisError> {
    let mut pipe = redis::pipe();
    add_ack_and_forget(&mut pipe, stream, group, acked, forget);
    pipe.query(conn)
}

/// Adds the `XACK` of `acked` and the `HDEL` of the failure counts of
/// `forget` to `pipe`, replies ignored.
fn add_ack_and_forget<S: redis::ToRedisArgs>(
    pipe: &mut redis::Pipeline,
    stream: &str,
    group: &str,
    acked: &[S],
    forget: &[S],
) {
    if !acked.is_empty() {
        pipe.cmd("XACK").arg(stream).arg(group).arg(acked).ignore();
    }
    if !forget.is_empty() {
        pipe.cmd("HDEL")
            .arg(topology::failures_key(stream, group))
            .arg(forget)
            .ignore();
    }
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

/// Whether a handled batch's writes reached `REDIS_WAIT_REPLICAS` replicas.
enum Replicated {
    /// Yes (or no wait is configured).
    Yes,
    /// The connection was lost first: handle the batch again.
    Lost,
    /// Shutdown came first.
    ShuttingDown,
}

pub(super) struct HandlerThread {
    pub(super) link: Link,
    pub(super) handler: Arc<dyn Handler>,
    pub(super) settings: Settings,
    pub(super) rx: Receiver<Delivery>,
    pub(super) in_flight: InFlight,
    pub(super) shutdown: Receiver<()>,
    pub(super) beat: Heartbeat,
    /// Deliveries of a batch whose budget ran out before they were started:
    /// still held, first in this thread's next turn.
    pub(super) carry: VecDeque<Delivery>,
    /// Once shutdown has begun: when to stop starting deliveries.
    pub(super) stop_by: Option<Instant>,
    /// Acknowledgements of the turn's batches, sent together (one round
    /// trip for a turn holding entries of several streams).
    pub(super) acks: Vec<Acks>,
}

/// What [`HandlerThread::take`] found.
enum Take {
    /// A batch, in lane order.
    Batch(Vec<Delivery>),
    /// Nothing within a second.
    Idle,
    /// Nothing, and nothing will come: the readers have stopped.
    Closed,
}

/// `batch` split by subscription, keeping arrival order within each.
pub(super) fn by_subscription(mut batch: Vec<Delivery>) -> Vec<Vec<Delivery>> {
    let mut parts = Vec::new();
    while !batch.is_empty() {
        let sub = batch[0].sub;
        let (mine, rest): (Vec<_>, Vec<_>) = batch.into_iter().partition(|d| d.sub == sub);
        parts.push(mine);
        batch = rest;
    }
    parts
}

/// What one subscription's batch leaves to acknowledge.
pub(super) struct Acks {
    sub: Subscription,
    /// Entries done: `XACK`.
    done: Vec<String>,
    /// Entries whose failure count goes (`HDEL`).
    forget: Vec<String>,
}

impl HandlerThread {
    pub(super) fn run(mut self) {
        while let Some(batch) = self.next_batch() {
            // Group by subscription, keeping arrival order within each;
            // acknowledge all of them in one round trip, then let go.
            let mut handled = Vec::new();
            for mine in by_subscription(batch) {
                handled.push(self.process(mine));
            }
            self.acknowledge();
            for (batch, not_tried) in handled {
                self.finish(batch, &not_tried);
            }
        }
        log::debug!(
            "{} stopped",
            std::thread::current().name().unwrap_or("handler")
        );
    }

    /// The next batch to start, reporting progress while there is none;
    /// `None` once the readers have stopped and the lane is drained. Once
    /// the stop grace is over, batches are let go instead of returned.
    pub(super) fn next_batch(&mut self) -> Option<Vec<Delivery>> {
        loop {
            self.beat.beat();
            match self.take() {
                Take::Batch(batch) if self.stop_grace_over() => self.let_go(&batch),
                Take::Batch(batch) => return Some(batch),
                Take::Idle => {}
                Take::Closed => return None,
            }
        }
    }

    /// The next batch: what was carried over, then what waits on the lane,
    /// up to `BATCH_SIZE` (four times that from a backlog).
    fn take(&mut self) -> Take {
        let first = match self.carry.pop_front() {
            Some(d) => d,
            None => match self.rx.recv_timeout(Duration::from_secs(1)) {
                Ok(d) => d,
                Err(RecvTimeoutError::Timeout) => return Take::Idle,
                // Every reader has stopped and the lane is drained.
                Err(RecvTimeoutError::Disconnected) => return Take::Closed,
            },
        };
        // A backlog on the lane (Redis far away, each batch a round
        // trip): take up to four batches' worth in one turn.
        let most = if self.rx.len() > self.settings.batch_size {
            self.settings.batch_size * BACKLOG_FACTOR
        } else {
            self.settings.batch_size
        };
        let mut batch = vec![first];
        while batch.len() < most {
            match self
                .carry
                .pop_front()
                .map_or_else(|| self.rx.try_recv(), Ok)
            {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        Take::Batch(batch)
    }

    /// Whether shutdown began more than [`STOP_GRACE`] ago.
    pub(super) fn stop_grace_over(&mut self) -> bool {
        if self.stop_by.is_none() && crate::shutdown::is_started(&self.shutdown) {
            self.stop_by = Some(Instant::now() + STOP_GRACE);
        }
        self.stop_by.is_some_and(|t| Instant::now() >= t)
    }

    /// Lets go of deliveries not started at shutdown: they stay pending
    /// for the next start (or a claim).
    pub(super) fn let_go(&mut self, batch: &[Delivery]) {
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

    /// Handles one subscription's batch; its acknowledgements wait in
    /// `acks`. Returns the batch and the positions of deliveries not tried.
    fn process(&mut self, batch: Vec<Delivery>) -> (Vec<Delivery>, Vec<usize>) {
        let batch = self.skip_redrives_for_others(batch);
        if batch.is_empty() {
            return (batch, Vec::new());
        }
        let not_tried = self.handle(&batch);
        (batch, not_tried)
    }

    /// Sends the turn's acknowledgements, in one round trip.
    pub(super) fn acknowledge(&mut self) {
        let acks = std::mem::take(&mut self.acks);
        if acks.is_empty() {
            return;
        }
        let result = self.run_idempotent(|c| {
            let mut pipe = redis::pipe();
            for a in &acks {
                add_ack_and_forget(&mut pipe, a.sub.stream, a.sub.group, &a.done, &a.forget);
            }
            pipe.query::<()>(c)
        });
        for a in acks {
            let (stream, group, n) = (a.sub.stream, a.sub.group, a.done.len() as u64);
            match &result {
                Ok(()) => metrics::events(stream, group, "ok", n),
                Err(e) => {
                    // Done but not acknowledged: it will be delivered again,
                    // which handlers must (and do) tolerate.
                    log::warn!("{stream}: could not acknowledge {n} handled entries: {e}");
                    metrics::events(stream, group, "failed", n);
                }
            }
        }
    }

    /// Lets go of a handled batch: finished entries, and those not tried
    /// carried over to this thread's next turn.
    pub(super) fn finish(&mut self, batch: Vec<Delivery>, not_tried: &[usize]) {
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
    pub(super) fn skip_redrives_for_others(&mut self, batch: Vec<Delivery>) -> Vec<Delivery> {
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
    pub(super) fn handle(&mut self, batch: &[Delivery]) -> Vec<usize> {
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
                    let _ = self.link.run(|c| sub.ensure_groups(c));
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
    pub(super) fn settle(&mut self, batch: &[Delivery], outcomes: Vec<Outcome>) -> Vec<usize> {
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
            // Sent with the turn's other acknowledgements (`acknowledge`),
            // which counts them as `ok`.
            self.acks.push(Acks {
                sub,
                done: to_ack.iter().map(|s| s.to_string()).collect(),
                forget: forget.iter().map(|s| s.to_string()).collect(),
            });
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

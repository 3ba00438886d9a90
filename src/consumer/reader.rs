//! One reader thread per subscription (`reader:<stream>`): re-reads its own
//! pending entries, claims idle ones, reads new ones, and hands them to the
//! handler threads over the bounded lanes (the lane of each entry's
//! `userId`, see `lanes.rs`).
//!
//! **Reading ahead.** While new entries keep coming and the handlers keep
//! up, a reader keeps [`READ_AHEAD`] reads of new entries outstanding on its
//! connection: Redis runs the second as soon as the first returns, so a read
//! is always waiting at Redis and a new entry leaves at once, instead of
//! waiting for the next read to cross the link (half a round trip on
//! average, which with Redis a WAN link away is most of the latency). Each
//! read is sent before the previous one's entries are dispatched. An empty
//! read (the stream went quiet), a lane more than half full, or a claim or renewal due
//! stops reading ahead; the outstanding reads are received (and their
//! entries dispatched) before any other command uses the connection.
//!
//! **Reading more from a backlog.** A read of new entries that comes back
//! full (`BATCH_SIZE` entries) means more wait at Redis: the next reads ask
//! for four times as many, until one comes back short. With Redis far away
//! a backlog then crosses the link in a quarter of the round trips
//! (`tests/it/far_redis.rs`: 3,000 entries at 400 ms RTT in 0.84 s, 4.1 s
//! before).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, SendTimeoutError};
use redis::{RedisError, Value};

use super::handler::{ack_and_forget, BACKLOG_FACTOR};
use super::lanes::Lanes;
use super::reply::{parse_entries, parse_read_reply};
use super::{lock, Delivery, InFlight, Settings, Subscription};
use crate::connection::Link;
use crate::notify::Heartbeat;
use crate::record::Fields;
use crate::{metrics, topology, value};

pub(super) struct Reader {
    pub(super) sub: Subscription,
    pub(super) link: Link,
    pub(super) settings: Settings,
    /// Where entries go: the lane of each entry's user (see `lanes.rs`).
    pub(super) lanes: Lanes,
    pub(super) in_flight: InFlight,
    pub(super) shutdown: Receiver<()>,
    pub(super) beat: Heartbeat,
    /// Where the next `XAUTOCLAIM` continues (`0-0`: from the start).
    pub(super) claim_cursor: String,
    /// When the entries this instance holds are next renewed (see
    /// [`crate::lease`]).
    pub(super) next_renew: Instant,
    /// Reads of new entries sent whose replies are still to come, oldest
    /// first: the [`Reader::epoch`] at which each was sent.
    pub(super) ahead: VecDeque<u64>,
    /// A second connection for what must not wait for the outstanding
    /// reads: renewing held entries while a lane is full.
    pub(super) side: Link,
    /// `COUNT` of the next read of new entries: `BATCH_SIZE`, or four times
    /// that while reads come back full (a backlog at Redis, which a far
    /// Redis would otherwise hand over one batch per round trip).
    pub(super) count: usize,
}

/// Reads of new entries kept outstanding while entries keep coming: one
/// per entry that arrives within a round trip, plus one (at 200 orders/s
/// and 10 ms RTT, 2 left entries waiting for a read: `BENCHMARKS.md`).
pub const READ_AHEAD: usize = 4;
/// The `BLOCK` of the reads sent ahead: short, so that once the stream goes
/// quiet they come back empty one after the other within a fraction of a
/// second, and the reader is back to one read with the full `BLOCK_MS`
/// (claims, renewals and a stop wait for the outstanding reads).
const AHEAD_BLOCK: Duration = Duration::from_millis(100);

impl Reader {
    pub(super) fn run(mut self) {
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
                self.ahead.clear();
            }
            if crate::shutdown::is_started(&self.shutdown)
                || !self
                    .link
                    .wait_connected(&self.shutdown, &|| self.beat.beat())
            {
                // What the reads still on their way deliver is ours: hand it
                // to the handlers, which finish it within the stop grace,
                // rather than leave it pending until the next start.
                while !self.ahead.is_empty() && self.link.is_connected() {
                    if !self.read_new(false) {
                        break;
                    }
                }
                break;
            }
            let claim_due = Instant::now() >= next_claim;
            if self.ahead.is_empty() {
                if claim_due {
                    self.claim();
                    next_claim = Instant::now() + self.settings.claim_interval();
                }
                self.renew_if_due();
            }
            if backlog.is_none() {
                let may_read_ahead = !claim_due && Instant::now() < self.next_renew;
                if !self.read_new(may_read_ahead) {
                    break;
                }
                continue;
            }
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

    /// Receives the oldest outstanding read of new entries (sending one
    /// first if none is), keeps [`READ_AHEAD`] outstanding while entries
    /// keep coming and `may_read_ahead`, and dispatches. Returns `false` if
    /// the handlers are gone.
    fn read_new(&mut self, may_read_ahead: bool) -> bool {
        if self.ahead.is_empty() {
            if let Err(e) = self.send_read(self.settings.block) {
                self.on_error(&e);
                return true;
            }
        }
        let Some(epoch) = self.ahead.pop_front() else {
            return true;
        };
        let reply = self
            .link
            .run(|c| c.recv_response().and_then(|v| v.extract_error()));
        let entries = match reply {
            Ok(v) => parse_read_reply(&v),
            Err(e) => {
                if !self.ahead.is_empty() {
                    // Replies still outstanding would answer whatever the
                    // error handling sends: start over on a new connection.
                    self.link.reset();
                    self.ahead.clear();
                }
                self.on_error(&e);
                return true;
            }
        };
        self.count = if entries.len() >= self.settings.batch_size {
            self.settings.batch_size * BACKLOG_FACTOR
        } else {
            self.settings.batch_size
        };
        let handlers_keep_up = self.lanes.keep_up();
        if !entries.is_empty() && may_read_ahead && handlers_keep_up {
            while self.ahead.len() < READ_AHEAD {
                if self
                    .send_read(AHEAD_BLOCK.min(self.settings.block))
                    .is_err()
                {
                    // The connection is gone; the next turn reconnects and
                    // re-reads what was delivered.
                    break;
                }
            }
        }
        self.dispatch(entries, false, epoch)
    }

    /// Sends `XREADGROUP ... BLOCK block ... >` without waiting for its
    /// reply.
    fn send_read(&mut self, block: Duration) -> Result<(), RedisError> {
        let packed = self.read_command(">", block).get_packed_command();
        let epoch = self.epoch();
        self.link.run(|c| c.send_packed_command(&packed))?;
        self.ahead.push_back(epoch);
        Ok(())
    }

    fn on_error(&mut self, e: &RedisError) {
        if topology::is_nogroup(e) {
            log::warn!(
                "{}: group {} is gone, recreating the topology",
                self.sub.stream,
                self.sub.group
            );
            let sub = self.sub;
            if let Err(e) = self.link.run(|c| sub.ensure_groups(c)) {
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
        let cmd = self.read_command(from, self.settings.block);
        let reply: Value = self.link.run(|c| cmd.query(c))?;
        Ok(parse_read_reply(&reply))
    }

    fn read_command(&self, from: &str, block: Duration) -> redis::Cmd {
        let (sub, settings) = (self.sub, &self.settings);
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(sub.group)
            .arg(&settings.consumer)
            .arg("COUNT")
            .arg(if from == ">" {
                self.count
            } else {
                settings.batch_size
            });
        if from == ">" {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(sub.stream).arg(from);
        cmd
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
        // On the side connection when reads are outstanding on this one.
        let link = if self.ahead.is_empty() {
            &mut self.link
        } else {
            &mut self.side
        };
        let renewed = link.run(|c| crate::lease::renew(c, sub.stream, sub.group, &consumer, &held));
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
        // lane is full) covers those still waiting here too.
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
                let link = if self.ahead.is_empty() {
                    &mut self.link
                } else {
                    &mut self.side
                };
                let _ = link.run(|c| ack_and_forget(c, s, g, &[id.as_str()], &[id.as_str()]));
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
                match self.lanes.send_timeout(delivery, Duration::from_secs(1)) {
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

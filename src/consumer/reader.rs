//! One reader thread per subscription (`reader:<stream>`): re-reads its own
//! pending entries, claims idle ones, reads new ones, and hands them to the
//! handler threads over the bounded channel.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender};
use redis::{RedisError, Value};

use super::handler::ack_and_forget;
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
    pub(super) tx: Sender<Delivery>,
    pub(super) in_flight: InFlight,
    pub(super) shutdown: Receiver<()>,
    pub(super) beat: Heartbeat,
    /// Where the next `XAUTOCLAIM` continues (`0-0`: from the start).
    pub(super) claim_cursor: String,
    /// When the entries this instance holds are next renewed (see
    /// [`crate::lease`]).
    pub(super) next_renew: Instant,
}

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

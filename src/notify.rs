//! The systemd notification protocol: `READY=1`, `STATUS=…`, `STOPPING=1`
//! and a watchdog that pings only while the service makes progress.
//!
//! The units in `systemd/` are `Type=notify`: systemd considers a service
//! started when it says `READY=1`, not when the process exists, so units
//! ordered after it (and `systemctl start`, which waits) see a service that
//! listens, reached Redis and found its consumer groups. Every function here
//! is a no-op when `NOTIFY_SOCKET` is unset (a terminal, a test), so services
//! call them unconditionally, and a failure to notify is logged at debug and
//! otherwise ignored: losing a status line must never stop a service.
//!
//! # Why the watchdog is tied to heartbeats
//!
//! `WatchdogSec=` makes systemd kill and restart a service that has not sent
//! `WATCHDOG=1` for that long. A timer thread that pings unconditionally
//! would prove only that the timer thread runs: a reader loop stuck forever
//! on a Redis socket with no timeout, or a handler deadlocked on a lock,
//! would keep its pending entries hostage while systemd thinks all is well.
//! So each long-running loop [`Heartbeats::register`]s a [`Heartbeat`] and
//! calls [`Heartbeat::beat`] every time round, idle or not (reader loops wake
//! at least every `BLOCK_MS`); the watchdog thread pings only when **every**
//! heartbeat is younger than the watchdog interval, and otherwise logs which
//! one is stale and stays silent, letting systemd restart the wedged process.
//! A restart is the right cure here: a consumer that restarts re-reads its
//! own pending entries first, so nothing is lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use sd_notify::NotifyState;

/// Tells systemd the service is up: listening, Redis reached, groups present.
pub fn ready() {
    send("READY", &[NotifyState::Ready]);
}

/// Sets the one-line status `systemctl status` shows. Newlines would end the
/// protocol's line early, so they become spaces.
pub fn status(msg: &str) {
    let msg = msg.replace(['\n', '\r'], " ");
    send("STATUS", &[NotifyState::Status(&msg)]);
}

/// Tells systemd the service is shutting down on purpose, so the stop is not
/// mistaken for a crash while in-flight work is finished.
pub fn stopping() {
    send("STOPPING", &[NotifyState::Stopping]);
}

fn send(what: &str, state: &[NotifyState<'_>]) {
    // `false`: keep NOTIFY_SOCKET in the environment. Removing it would mean
    // mutating the environment of a multi-threaded process, and our services
    // start no children that could misuse it.
    if let Err(e) = sd_notify::notify(false, state) {
        log::debug!("systemd notification {what} not sent: {e}");
    }
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any.
///
/// Read from `WATCHDOG_USEC` and `WATCHDOG_PID` as `sd_watchdog_enabled(3)`
/// does: the request applies to this process when `WATCHDOG_PID` is this
/// process's ID **or is unset**. `sd_notify::watchdog_enabled` (0.4) insists
/// on `WATCHDOG_PID` being set; systemd always sets both, so the two agree
/// for a real unit, but following libsystemd lets a test (which cannot know a
/// child's pid before starting it) ask for a watchdog with `WATCHDOG_USEC`
/// alone.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// The pure part of [`watchdog_interval`].
fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != own_pid {
            // Inherited from a parent that was the watchdogged process.
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// The set of loops whose progress the watchdog checks. Cheap to clone: all
/// clones share the same set.
#[derive(Clone)]
pub struct Heartbeats {
    inner: Arc<Inner>,
}

struct Inner {
    /// Beats are stored as milliseconds since this instant, so a beat is one
    /// atomic store of a `u64`.
    epoch: Instant,
    /// Locked only to register and to check, never to beat.
    slots: Mutex<Vec<Arc<Slot>>>,
}

struct Slot {
    name: String,
    last_ms: AtomicU64,
}

/// One loop's heartbeat. Call [`beat`](Heartbeat::beat) every time round.
///
/// A heartbeat stays registered for the life of the process: a loop that
/// ends (or a thread that panics) without the process shutting down stops
/// beating, goes stale, and the watchdog lets systemd restart the service,
/// which is what should happen to a service missing one of its loops.
#[derive(Clone)]
pub struct Heartbeat {
    epoch: Instant,
    slot: Arc<Slot>,
}

impl Heartbeat {
    /// Records that the loop made progress now. Lock-free: one atomic store.
    pub fn beat(&self) {
        self.slot
            .last_ms
            .store(millis_since(self.epoch), Ordering::Relaxed);
    }

    /// The name given at registration.
    pub fn name(&self) -> &str {
        &self.slot.name
    }
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("name", &self.slot.name)
            .finish_non_exhaustive()
    }
}

/// A heartbeat found too old by a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// The name it was registered with.
    pub name: String,
    /// How long ago it last beat.
    pub age: Duration,
}

impl Heartbeats {
    /// An empty set. With nothing registered, every check passes.
    pub fn new() -> Self {
        Heartbeats {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                slots: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Adds a loop to the set; it counts as having beaten just now, so a loop
    /// that is still starting up is not stale. Names should read like thread
    /// names (`reader:order-events`), since a stale one is logged by name.
    pub fn register(&self, name: &str) -> Heartbeat {
        let slot = Arc::new(Slot {
            name: name.to_owned(),
            last_ms: AtomicU64::new(millis_since(self.inner.epoch)),
        });
        self.lock().push(Arc::clone(&slot));
        Heartbeat {
            epoch: self.inner.epoch,
            slot,
        }
    }

    /// The heartbeats that have not beaten for longer than `limit`, now.
    pub fn stale(&self, limit: Duration) -> Vec<Stale> {
        self.stale_at(millis_since(self.inner.epoch), limit)
    }

    /// [`stale`](Heartbeats::stale) at a given clock reading (milliseconds
    /// since the set's epoch), so the rule can be tested without sleeping.
    fn stale_at(&self, now_ms: u64, limit: Duration) -> Vec<Stale> {
        let snapshot: Vec<(String, u64)> = self
            .lock()
            .iter()
            .map(|s| (s.name.clone(), s.last_ms.load(Ordering::Relaxed)))
            .collect();
        stale_among(&snapshot, now_ms, limit)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Slot>>> {
        // A panic while holding this lock cannot leave the vector half
        // updated (push is the only mutation), so poison is ignored.
        self.inner
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for Heartbeats {
    fn default() -> Self {
        Heartbeats::new()
    }
}

impl std::fmt::Debug for Heartbeats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.lock().iter().map(|s| s.name.clone()).collect();
        f.debug_struct("Heartbeats").field("names", &names).finish()
    }
}

/// The staleness rule: a heartbeat last seen at `last_ms` is stale at
/// `now_ms` when more than `limit` has passed. A beat stored after `now_ms`
/// was read (a race, not a clock problem) counts as fresh.
fn stale_among(beats: &[(String, u64)], now_ms: u64, limit: Duration) -> Vec<Stale> {
    let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
    beats
        .iter()
        .filter_map(|(name, last_ms)| {
            let age_ms = now_ms.saturating_sub(*last_ms);
            (age_ms > limit_ms).then(|| Stale {
                name: name.clone(),
                age: Duration::from_millis(age_ms),
            })
        })
        .collect()
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Starts the watchdog thread if systemd asked for one ([`watchdog_interval`]);
/// returns `None` otherwise.
///
/// The thread, named `watchdog`, wakes every half interval (systemd's advice
/// in `sd_watchdog_enabled(3)`, so one late wake-up does not cost a restart)
/// and sends `WATCHDOG=1` only if every heartbeat in `beats` beat within the
/// interval. It ends when `shutdown` receives a message or is disconnected
/// (all senders dropped), which is how the service says it is stopping.
pub fn spawn_watchdog(beats: Heartbeats, shutdown: Receiver<()>) -> Option<JoinHandle<()>> {
    let interval = watchdog_interval()?;
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || watchdog_loop(&beats, &shutdown, interval));
    match spawned {
        Ok(handle) => {
            log::debug!("watchdog every {:?}, interval {interval:?}", interval / 2);
            Some(handle)
        }
        Err(e) => {
            // Without the thread systemd will restart us after one interval;
            // say why before that happens.
            log::error!("cannot start the watchdog thread: {e}");
            None
        }
    }
}

fn watchdog_loop(beats: &Heartbeats, shutdown: &Receiver<()>, interval: Duration) {
    let period = (interval / 2).max(Duration::from_millis(1));
    loop {
        match shutdown.recv_timeout(period) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let stale = beats.stale(interval);
        if stale.is_empty() {
            send("WATCHDOG", &[NotifyState::Watchdog]);
        } else {
            let list: Vec<String> = stale
                .iter()
                .map(|s| format!("{} (last beat {} ms ago)", s.name, s.age.as_millis()))
                .collect();
            log::warn!(
                "watchdog not fed: no progress within {} ms from {}; systemd will restart the service",
                interval.as_millis(),
                list.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_needs_a_positive_usec() {
        assert_eq!(parse_watchdog(None, None, 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 7), None);
        assert_eq!(
            parse_watchdog(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn watchdog_pid_when_set_must_be_ours() {
        let half = Some(Duration::from_millis(500));
        assert_eq!(parse_watchdog(Some("500000"), Some("7"), 7), half);
        assert_eq!(parse_watchdog(Some("500000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(Some("500000"), Some("x"), 7), None);
    }

    fn beats(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(n, t)| (n.to_string(), *t)).collect()
    }

    #[test]
    fn a_heartbeat_is_stale_only_past_the_limit() {
        let limit = Duration::from_millis(1000);
        let list = beats(&[("reader", 9_000), ("handler-1", 9_500), ("trim", 10_000)]);
        assert!(
            stale_among(&list, 10_000, limit).is_empty(),
            "exactly 1000 ms old"
        );
        let stale = stale_among(&list, 10_001, limit);
        assert_eq!(
            stale,
            vec![Stale {
                name: "reader".into(),
                age: Duration::from_millis(1001)
            }]
        );
        let names: Vec<String> = stale_among(&list, 20_000, limit)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["reader", "handler-1", "trim"]);
    }

    #[test]
    fn a_beat_newer_than_the_clock_reading_is_fresh() {
        let list = beats(&[("reader", 5_000)]);
        assert!(stale_among(&list, 4_000, Duration::ZERO).is_empty());
    }

    #[test]
    fn nothing_registered_means_nothing_stale() {
        assert!(Heartbeats::new()
            .stale_at(u64::MAX, Duration::ZERO)
            .is_empty());
    }

    #[test]
    fn registering_counts_as_a_beat_and_beats_reset_the_age() {
        let set = Heartbeats::new();
        let clone = set.clone();
        let reader = clone.register("reader:order-events");
        let handler = set.register("handler-1");
        assert_eq!(reader.name(), "reader:order-events");
        let now = millis_since(set.inner.epoch);
        assert!(set.stale_at(now, Duration::from_secs(1)).is_empty());

        // Pretend the reader last beat long ago; the handler keeps beating.
        reader.slot.last_ms.store(0, Ordering::Relaxed);
        handler.beat();
        let later = millis_since(set.inner.epoch) + 5_000;
        handler.slot.last_ms.store(later, Ordering::Relaxed);
        let stale = set.stale_at(later, Duration::from_secs(1));
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].name, "reader:order-events");
        assert_eq!(stale[0].age, Duration::from_millis(later));

        reader.beat();
        assert!(set.stale(Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn the_watchdog_loop_ends_when_shutdown_disconnects() {
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let set = Heartbeats::new();
        let thread = std::thread::spawn(move || {
            watchdog_loop(&set, &rx, Duration::from_millis(20));
            let _ = done_tx.send(());
        });
        // Several periods go by and it keeps running while shutdown is open.
        assert_eq!(
            done_rx.recv_timeout(Duration::from_millis(100)),
            Err(crossbeam_channel::RecvTimeoutError::Timeout),
            "the watchdog loop ended before shutdown"
        );
        drop(tx);
        // Ends promptly once shutdown disconnects; never a hung suite.
        assert_eq!(
            done_rx.recv_timeout(Duration::from_secs(10)),
            Ok(()),
            "the watchdog loop did not end within 10 s of shutdown"
        );
        thread.join().expect("watchdog loop panicked");
    }
}

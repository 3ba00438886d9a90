//! The systemd notification protocol, spoken by the real binaries to a
//! socket that stands in for systemd.
//!
//! systemd gives a `Type=notify` service the path of a Unix datagram socket
//! in `NOTIFY_SOCKET` and reads `READY=1`, `STATUS=…`, `STOPPING=1` and
//! `WATCHDOG=1` lines from it. Each test here binds such a socket in its own
//! directory, starts a service with `NOTIFY_SOCKET` pointing at it, and
//! checks what the units in `systemd/` rely on:
//!
//! * `READY=1` means ready: by the time it arrives the service answers
//!   `/readyz` with 200 and every consumer group of the topology exists, so
//!   `systemctl start` (which waits for it) returns a working service;
//! * `STATUS=` lines arrive, for `systemctl status`;
//! * on SIGTERM, `STOPPING=1` arrives and the process exits 0;
//! * with `WATCHDOG_USEC` set (`WatchdogSec=`), `WATCHDOG=1` keeps coming
//!   while the service is healthy, and does not come when `WATCHDOG_PID`
//!   names another process (the variable was inherited, not meant for it).

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::{RedisServer, Service, TempDir};

const SERVICES: [&str; 3] = ["order-service", "payment-service", "notification-service"];

/// How long a service may take from spawn to `READY=1` on a busy machine.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// The watchdog interval the tests ask for. Loops beat about once a second
/// (`BLOCK_MS` and the handlers' idle wake-up are 1 s), so the interval
/// must be comfortably longer or a healthy service would look wedged; 3 s
/// leaves room for a loaded CI machine.
const WATCHDOG_USEC: &str = "3000000";

/// Stands in for systemd's notification socket.
struct NotifySocket {
    path: PathBuf,
    sock: UnixDatagram,
    /// Every line received so far, in order (a datagram may hold several).
    seen: Vec<String>,
    _dir: TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = TempDir::new("notify");
        // sun_path holds at most 107 bytes: keep the name short.
        let path = dir.join("n.sock");
        let sock =
            UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set_read_timeout on the notify socket");
        NotifySocket {
            path,
            sock,
            seen: Vec::new(),
            _dir: dir,
        }
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("temp path is UTF-8")
    }

    /// Receives what arrives within about 50 ms into [`NotifySocket::seen`].
    fn receive(&mut self) {
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                self.seen
                    .extend(text.lines().filter(|l| !l.is_empty()).map(String::from));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv on {}: {e}", self.path.display()),
        }
    }

    /// Receives until `done(&seen)` holds; fails the test with everything
    /// received and the service log after `deadline`.
    fn wait_for(
        &mut self,
        service: &Service,
        what: &str,
        deadline: Duration,
        mut done: impl FnMut(&[String]) -> bool,
    ) {
        let start = Instant::now();
        while !done(&self.seen) {
            if start.elapsed() > deadline {
                service.fail(format!(
                    "no {what} within {deadline:?}; notifications received: {:?}",
                    self.seen
                ));
            }
            self.receive();
        }
    }

    /// Receives for `duration`, whatever arrives.
    fn listen_for(&mut self, duration: Duration) {
        let start = Instant::now();
        while start.elapsed() < duration {
            self.receive();
        }
    }

    fn count(&self, line: &str) -> usize {
        self.seen.iter().filter(|l| *l == line).count()
    }
}

/// Waits for the service to exit after a SIGTERM, and checks it exited 0.
fn expect_clean_exit(svc: &mut Service) {
    let status = svc.wait_exit(Duration::from_secs(30));
    svc.check(status.success(), || {
        format!("SIGTERM: exited with {status}")
    });
}

/// SIGTERM: the service says `STOPPING=1`, then exits 0.
fn stop_saying_stopping(svc: &mut Service, notify: &mut NotifySocket) {
    svc.sigterm();
    notify.wait_for(
        svc,
        "STOPPING=1",
        Duration::from_secs(30),
        has("STOPPING=1"),
    );
    expect_clean_exit(svc);
}

fn has(line: &'static str) -> impl FnMut(&[String]) -> bool {
    move |seen| seen.iter().any(|l| l == line)
}

/// The groups of `stream`, by name, sorted.
fn group_names(redis: &RedisServer, stream: &str) -> Vec<String> {
    let mut names: Vec<String> = redis.groups(stream).into_iter().map(|g| g.name).collect();
    names.sort();
    names
}

/// READY, STATUS and STOPPING from one service, in a fresh Redis where no
/// group exists before the service starts.
fn ready_status_stopping(name: &str) {
    let redis = RedisServer::start();
    let mut notify = NotifySocket::bind();
    let mut svc = Service::spawn(name, &redis, &[("NOTIFY_SOCKET", notify.path())]);
    svc.wait_ready(); // also moves it to another port if its port was taken
    notify.wait_for(&svc, "READY=1", READY_WITHIN, has("READY=1"));

    // Ready means: listening, Redis reached, every group there. Checked
    // right after READY=1, with no retry: a service that said it too early
    // fails here.
    let readyz = svc.get("/readyz");
    svc.expect_status(&readyz, 200);
    let order_groups = group_names(&redis, "order-events");
    svc.check(
        order_groups == ["notification-service-group", "payment-service-group"],
        || format!("after READY=1, XINFO GROUPS order-events: {order_groups:?}"),
    );
    let payment_groups = group_names(&redis, "payment-events");
    svc.check(payment_groups == ["notification-service-group"], || {
        format!("after READY=1, XINFO GROUPS payment-events: {payment_groups:?}")
    });

    notify.wait_for(&svc, "a STATUS= line", READY_WITHIN, |seen| {
        seen.iter()
            .any(|l| l.starts_with("STATUS=") && l.len() > "STATUS=".len())
    });

    stop_saying_stopping(&mut svc, &mut notify);
    svc.check(notify.count("READY=1") == 1, || {
        format!("READY=1 sent more than once: {:?}", notify.seen)
    });
}

#[test]
fn order_service_notifies_ready_status_and_stopping() {
    ready_status_stopping("order-service");
}

#[test]
fn payment_service_notifies_ready_status_and_stopping() {
    ready_status_stopping("payment-service");
}

#[test]
fn notification_service_notifies_ready_status_and_stopping() {
    ready_status_stopping("notification-service");
}

/// With `WATCHDOG_USEC` and no `WATCHDOG_PID` (a test cannot know the pid
/// before the spawn; `sd_watchdog_enabled(3)` treats an unset pid as "this
/// process"), every service keeps sending `WATCHDOG=1` while idle and
/// healthy, and stops cleanly with the watchdog running.
#[test]
fn every_service_feeds_the_watchdog_while_healthy() {
    let redis = RedisServer::start();
    let mut running = Vec::new();
    for name in SERVICES {
        let notify = NotifySocket::bind();
        let mut svc = Service::spawn(
            name,
            &redis,
            &[
                ("NOTIFY_SOCKET", notify.path()),
                ("WATCHDOG_USEC", WATCHDOG_USEC),
            ],
        );
        svc.wait_ready();
        running.push((svc, notify));
    }
    for (svc, notify) in &mut running {
        notify.wait_for(svc, "READY=1", READY_WITHIN, has("READY=1"));
    }
    // Pings come every half interval (1.5 s): three of them take about 5 s
    // of a healthy service's life, idle loops included.
    for (svc, notify) in &mut running {
        notify.wait_for(svc, "three WATCHDOG=1", Duration::from_secs(20), |seen| {
            seen.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3
        });
        let log = svc.log();
        svc.check(!log.contains("watchdog not fed"), || {
            "a healthy service reported a stale loop".to_string()
        });
    }
    for (svc, notify) in &mut running {
        stop_saying_stopping(svc, notify);
    }
}

/// `WATCHDOG_PID` naming another process means the variables were inherited
/// from a watchdogged parent: the service must not answer for it.
#[test]
fn a_watchdog_meant_for_another_process_is_ignored() {
    let redis = RedisServer::start();
    let mut notify = NotifySocket::bind();
    let mut svc = Service::spawn(
        "payment-service",
        &redis,
        &[
            ("NOTIFY_SOCKET", notify.path()),
            ("WATCHDOG_USEC", "500000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    svc.wait_ready();
    notify.wait_for(&svc, "READY=1", READY_WITHIN, has("READY=1"));
    // Six intervals' worth: a watchdog thread would have pinged 12 times.
    notify.listen_for(Duration::from_secs(3));
    svc.check(notify.count("WATCHDOG=1") == 0, || {
        format!("WATCHDOG=1 sent although WATCHDOG_PID=1: {:?}", notify.seen)
    });
    svc.sigterm();
    expect_clean_exit(&mut svc);
}

/// A wedged loop trips the watchdog: with Redis frozen (SIGSTOP), the
/// reader of payment-service sits in `XREADGROUP` past the watchdog
/// interval (its read timeout is `BLOCK_MS` + 5 s), so `WATCHDOG=1` stops
/// (under systemd, a restart after `WatchdogSec`) and the log names the
/// stale reader; once Redis runs again, the pings come back.
#[test]
fn a_wedged_reader_stops_the_watchdog_pings() {
    let redis = RedisServer::start();
    let mut notify = NotifySocket::bind();
    let mut svc = Service::spawn(
        "payment-service",
        &redis,
        &[
            ("NOTIFY_SOCKET", notify.path()),
            ("WATCHDOG_USEC", "1000000"),
            ("BLOCK_MS", "500"),
        ],
    );
    svc.wait_ready();
    notify.wait_for(&svc, "READY=1", READY_WITHIN, has("READY=1"));
    notify.wait_for(&svc, "two WATCHDOG=1", Duration::from_secs(10), |seen| {
        seen.iter().filter(|l| *l == "WATCHDOG=1").count() >= 2
    });

    redis.pause();
    // The reader's current read returns within BLOCK_MS; the next one
    // hangs. Give the watchdog an interval to see the stale beat, then
    // expect silence for two more intervals.
    notify.listen_for(Duration::from_secs(2));
    let before = notify.count("WATCHDOG=1");
    notify.listen_for(Duration::from_secs(2));
    let during = notify.count("WATCHDOG=1") - before;
    redis.resume();
    svc.check(during == 0, || {
        format!("{during} WATCHDOG=1 sent while the reader was stuck on a frozen Redis")
    });
    let log = svc.log();
    svc.check(
        log.contains("watchdog not fed") && log.contains("reader:order-events"),
        || "the log does not name the stale reader".to_string(),
    );

    let resumed = notify.count("WATCHDOG=1");
    notify.wait_for(&svc, "WATCHDOG=1 again", Duration::from_secs(15), |seen| {
        seen.iter().filter(|l| *l == "WATCHDOG=1").count() > resumed
    });
}

//! A slow but working webhook receiver (issue 10, item 1).
//!
//! A receiver that answers each call after 0.6 s is not broken, only slow.
//! notification-service must keep telling systemd it makes progress
//! (`WATCHDOG=1` well within `WatchdogSec=`, here `WATCHDOG_USEC=5000000`
//! as systemd sets it), stop promptly on SIGTERM however long its queue of
//! webhook calls is, and in the end notify every order without
//! dead-lettering any of them.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::support::flow::{
    ms, xadd_orders_range, xlen, xrange, Notified, DEADLINE, ORDER_DLQ, ORDER_EVENTS, PAYMENT_DLQ,
};
use crate::support::{RedisServer, Service, TempDir, WebhookSink};

/// The watchdog interval systemd would ask for in the test (5 s).
const WATCHDOG: Duration = Duration::from_secs(5);
/// How long the receiver takes to answer each call.
const SLOW: Duration = Duration::from_millis(600);

/// Stands in for systemd's notification socket, remembering when each
/// `WATCHDOG=1` arrived.
struct Systemd {
    sock: UnixDatagram,
    path: String,
    pings: Vec<Instant>,
    ready: Option<Instant>,
    _dir: TempDir,
}

impl Systemd {
    fn bind() -> Systemd {
        let dir = TempDir::new("slowhook");
        let path = dir.join("n.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("set_read_timeout");
        Systemd {
            sock,
            path: path.to_str().expect("UTF-8 temp path").to_string(),
            pings: Vec::new(),
            ready: None,
            _dir: dir,
        }
    }

    /// Receives whatever arrives within about 20 ms.
    fn receive(&mut self) {
        let mut buf = [0u8; 4096];
        if let Ok(n) = self.sock.recv(&mut buf) {
            let now = Instant::now();
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                match line {
                    "WATCHDOG=1" => self.pings.push(now),
                    "READY=1" => self.ready = Some(now),
                    _ => {}
                }
            }
        }
    }

    /// Receives until `done()` holds, failing with the service log after
    /// `deadline`.
    fn listen_until(&mut self, svc: &Service, what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            svc.check(start.elapsed() < DEADLINE, || {
                format!("{what}: not within {DEADLINE:?}")
            });
            self.receive();
        }
    }

    /// Receives until `READY=1` has arrived.
    fn wait_ready(&mut self, svc: &Service) {
        let start = Instant::now();
        while self.ready.is_none() {
            svc.check(start.elapsed() < DEADLINE, || {
                format!("no READY=1 within {DEADLINE:?}")
            });
            self.receive();
        }
    }

    /// The longest time systemd went without `WATCHDOG=1` since `READY=1`,
    /// up to `until`.
    fn longest_silence(&self, until: Instant) -> Duration {
        let mut last = self.ready.expect("READY=1 arrived");
        let mut longest = Duration::ZERO;
        for &t in self.pings.iter().chain(std::iter::once(&until)) {
            if t > last {
                longest = longest.max(t - last);
                last = t;
            }
        }
        longest
    }
}

/// 40 orders to a receiver taking 0.6 s per call: the watchdog is fed
/// throughout, a SIGTERM in the middle of the next 20 stops the service
/// within a couple of seconds, and after a restart every order has been
/// notified and nothing was dead-lettered.
#[test]
fn a_slow_webhook_receiver_neither_starves_the_watchdog_nor_delays_a_stop() {
    const FIRST: usize = 40;
    const SECOND: usize = 20;
    let redis = RedisServer::start();
    let sink = WebhookSink::options().delay(SLOW).start();
    let url = sink.url();
    let mut systemd = Systemd::bind();
    let usec = WATCHDOG.as_micros().to_string();
    // CLAIM_IDLE_MS and the webhook timeout keep their defaults: nobody
    // tuned them for a slow receiver.
    let mut notification = Service::spawn(
        "notification-service",
        &redis,
        &[
            ("NOTIFY_WEBHOOK_URL", url.as_str()),
            ("NOTIFY_SOCKET", systemd.path.as_str()),
            ("WATCHDOG_USEC", usec.as_str()),
            ("BLOCK_MS", "200"),
            ("TRIM_INTERVAL_MS", "0"),
        ],
    );
    systemd.wait_ready(&notification);
    let mut conn = redis.conn();
    let started = Instant::now();
    let mut ids = xadd_orders_range(&mut conn, "slow", 0..FIRST);
    systemd.listen_until(&notification, "every order notified", || {
        sink.accepted().len() >= FIRST
    });
    let drained_in = started.elapsed();
    let silence = systemd.longest_silence(Instant::now());
    // Every figure is measured before anything is judged.
    let mut problems = Vec::new();
    if silence >= WATCHDOG {
        problems.push(format!(
            "systemd went {} ms without WATCHDOG=1 (WatchdogSec {} ms) while notifying {FIRST} orders",
            ms(silence),
            ms(WATCHDOG)
        ));
    }

    // A stop in the middle of a long queue of slow calls.
    ids.extend(xadd_orders_range(&mut conn, "slow", FIRST..FIRST + SECOND));
    systemd.listen_until(&notification, "the second lot started", || {
        sink.accepted().len() >= FIRST + 2
    });
    let asked = Instant::now();
    notification.sigterm();
    let status = notification.wait_exit(DEADLINE);
    let stopped_in = asked.elapsed();
    notification.check(status.success(), || format!("exit status {status}"));
    if stopped_in >= WATCHDOG {
        problems.push(format!(
            "SIGTERM took {} ms with a slow receiver",
            ms(stopped_in)
        ));
    }

    // What was not notified before the stop is after the restart.
    notification.restart();
    let orders = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    assert_eq!(orders.len(), ids.len());
    wait_all_notified(&notification, &sink, &orders, || systemd.receive());
    let notified = Notified::check(&sink.accepted(), &orders, &[]);
    if !notified.complete() {
        problems.push(format!("{notified}"));
    }
    let dead = xlen(&mut conn, ORDER_DLQ) + xlen(&mut conn, PAYMENT_DLQ);
    if dead > 0 {
        problems.push(format!("{dead} dead letters"));
    }
    let failed = sink.received().iter().filter(|r| !r.accepted()).count();
    let summary = format!(
        "orders={} receiver_delay={}ms watchdog={}ms longest_watchdog_silence={}ms first_{FIRST}_notified_in={}ms sigterm_stop={}ms dead_letters={dead} failed_calls={failed} {notified}",
        ids.len(),
        ms(SLOW),
        ms(WATCHDOG),
        ms(silence),
        ms(drained_in),
        ms(stopped_in),
    );
    println!("{summary}");
    notification.check(problems.is_empty(), || {
        format!("{}\n{summary}", problems.join("\n"))
    });
}

/// Two instances behind a slow receiver: the entries one instance has read
/// and is working through must not look idle to the other, however long
/// its queue (`CLAIM_IDLE_MS` short here, so the queue outlasts it many
/// times over). Each order is notified once: no claim of an entry its
/// owner still holds, so no repeated webhook call.
#[test]
fn entries_queued_behind_a_slow_receiver_are_not_claimed_by_another_instance() {
    const ORDERS: usize = 40;
    const CLAIM_IDLE: &str = "1500";
    let redis = RedisServer::start();
    let sink = WebhookSink::options()
        .delay(Duration::from_millis(300))
        .start();
    let url = sink.url();
    let env = [
        ("NOTIFY_WEBHOOK_URL", url.as_str()),
        ("CLAIM_IDLE_MS", CLAIM_IDLE),
        ("BLOCK_MS", "200"),
        ("TRIM_INTERVAL_MS", "0"),
    ];
    let mut first = Service::spawn("notification-service", &redis, &env);
    first.wait_ready();
    let mut conn = redis.conn();
    // The first instance reads all of them (one read: fewer than a batch).
    let ids = xadd_orders_range(&mut conn, "queued", 0..ORDERS);
    crate::support::wait_until("the first instance read every order", DEADLINE, || {
        pending_of(&mut conn) == ORDERS
    });
    let mut second = Service::spawn("notification-service", &redis, &env);
    second.wait_ready();
    let orders = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    assert_eq!(orders.len(), ids.len());
    wait_all_notified(&first, &sink, &orders, || {
        std::thread::sleep(Duration::from_millis(50))
    });
    let notified = Notified::check(&sink.accepted(), &orders, &[]);
    println!(
        "orders={ORDERS} claim_idle={CLAIM_IDLE}ms receiver_delay=300ms calls={} {notified}",
        sink.received().len()
    );
    second.check(notified.complete() && notified.duplicates == 0, || {
        format!("each order notified once, none claimed from a busy instance: {notified}")
    });
}

/// Entries pending in `notification-service-group` on `order-events`.
fn pending_of(conn: &mut redis::Connection) -> usize {
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg(ORDER_EVENTS)
        .arg("notification-service-group")
        .query(conn)
        .expect("XPENDING");
    match reply {
        redis::Value::Array(v) => match v.first() {
            Some(redis::Value::Int(n)) => *n as usize,
            _ => 0,
        },
        _ => 0,
    }
}

/// Waits until `sink` accepted a notification of every one of `orders`,
/// doing `between` between looks; fails with `svc`'s log after the
/// deadline.
fn wait_all_notified(
    svc: &Service,
    sink: &WebhookSink,
    orders: &[crate::support::flow::RawEntry],
    mut between: impl FnMut(),
) {
    let start = Instant::now();
    loop {
        let notified = Notified::check(&sink.accepted(), orders, &[]);
        if notified.missing.is_empty() {
            return;
        }
        svc.check(start.elapsed() < DEADLINE, || {
            format!("not every order notified: {notified}")
        });
        between();
    }
}

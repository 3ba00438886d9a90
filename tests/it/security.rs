//! Issue 7: an edge host on a network we do not trust.
//!
//! * TLS to Redis: `rediss://` with a private CA works end to end; a wrong
//!   CA is refused with a certificate error; nothing falls back to plain
//!   text.
//! * Least-privilege Redis users (`systemd/redis-acl.conf`): the shipped
//!   file does not load until passwords are set, the `default` user is off,
//!   every service does all its work under its own user without a single
//!   refusal, and each user is refused what is not its job.
//! * HTTP that survives abuse: hundreds of half-open connections and a
//!   trickling client leave fresh requests served within a second, with
//!   bounded threads and memory, and are closed after `IO_TIMEOUT`;
//!   oversized heads and bodies are refused before they are read.
//! * Values are checked at both doors: over HTTP (`400` naming the field,
//!   nothing written) and in the consumers (an entry written straight into
//!   Redis is given up by both groups and dead-lettered once, naming the field).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use redis::{Connection, Value};

use crate::support::flow::{
    drained, start_ready, xlen, xrange, NOTIFICATION_GROUP, ORDER_DLQ, ORDER_EVENTS,
    PAYMENT_EVENTS, PAYMENT_GROUP,
};
use crate::support::secure::{self, eventually, AclRedis, Certs};
use crate::support::{order_path, RedisServer, Service, TempDir};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `VmRSS` (KiB) and `Threads` of a process.
fn proc_status(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let get = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
    };
    (get("VmRSS:"), get("Threads:"))
}

/// Sends `bytes` and reads the answer until the server closes the
/// connection or `within` passes. Returns the answer (possibly empty).
fn exchange(addr: SocketAddr, bytes: &[u8], within: Duration) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let _ = stream.write_all(bytes);
    read_until_closed(&mut stream, within)
}

fn read_until_closed(stream: &mut TcpStream, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left)).expect("set timeout");
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_of(answer: &str) -> Option<u16> {
    answer.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

/// With `rediss://` and `REDIS_CA_CERT` naming the private CA, all three
/// services work: an order is written, paid and notified over TLS.
#[test]
fn tls_with_the_private_ca_serves_orders_end_to_end() {
    let certs = Certs::generate();
    let redis = RedisServer::options()
        .tls(&certs.cert(), &certs.key(), &certs.ca())
        .start();
    assert!(redis.url().starts_with("rediss://"), "{}", redis.url());
    let ca = certs.ca().display().to_string();
    let env = [("REDIS_CA_CERT", ca.as_str())];
    let order = start_ready("order-service", &redis, &env);
    let _payment = start_ready("payment-service", &redis, &env);
    let _notification = start_ready("notification-service", &redis, &env);

    let resp = order.get(&order_path("tls-user", "tls-product", "10"));
    order.expect_status(&resp, 200);

    let mut conn = redis.conn();
    eventually("the order is paid and notified over TLS", || {
        (xlen(&mut conn, PAYMENT_EVENTS) == 1
            && drained(&mut conn, ORDER_EVENTS, PAYMENT_GROUP)
            && drained(&mut conn, ORDER_EVENTS, NOTIFICATION_GROUP)
            && drained(&mut conn, PAYMENT_EVENTS, NOTIFICATION_GROUP))
        .then_some(())
    });
    assert_eq!(xlen(&mut conn, ORDER_EVENTS), 1);
}

/// A CA that did not sign the server's certificate: no connection. Ready
/// says no, orders get 503 with an error, the log says why (a certificate
/// problem), and nothing reached Redis.
#[test]
fn tls_with_a_wrong_ca_is_refused_with_a_certificate_error() {
    let certs = Certs::generate();
    let other = Certs::generate();
    let redis = RedisServer::options()
        .tls(&certs.cert(), &certs.key(), &certs.ca())
        .start();
    let wrong_ca = other.ca().display().to_string();
    let mut svc = Service::spawn("order-service", &redis, &[("REDIS_CA_CERT", &wrong_ca)]);
    svc.wait_ready();

    let ready = svc.get("/readyz");
    svc.expect_status(&ready, 503);
    let resp = svc.get(&order_path("u", "p", "1"));
    svc.expect_status(&resp, 503);
    svc.check(resp.json_str("error").is_some(), || {
        format!("a 503 must say why: {resp}")
    });
    // The README: "/readyz says why" -- the answer itself, not only the log.
    svc.check(ready.body.to_lowercase().contains("certificate"), || {
        format!("/readyz does not name a certificate problem: {ready}")
    });
    let mut conn = redis.conn();
    assert_eq!(xlen(&mut conn, ORDER_EVENTS), 0);
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(keys.is_empty(), "nothing may reach Redis: {keys:?}");
}

/// `rediss://` to a server that speaks plain text: the handshake fails and
/// the service does not quietly talk plain text instead. Had it fallen
/// back, it would have created the consumer groups within a second.
#[test]
fn rediss_to_a_plain_text_port_fails_instead_of_falling_back() {
    let certs = Certs::generate();
    let plain = RedisServer::start();
    let url = format!("rediss://127.0.0.1:{}", plain.port());
    let ca = certs.ca().display().to_string();
    let mut svc = Service::spawn_env(
        "order-service",
        &[("REDIS_URL", &url), ("REDIS_CA_CERT", &ca)],
        &[],
    );
    svc.wait_ready();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let ready = svc.get("/readyz");
        svc.expect_status(&ready, 503);
        std::thread::sleep(Duration::from_millis(200));
    }
    let resp = svc.get(&order_path("u", "p", "1"));
    svc.expect_status(&resp, 503);
    let mut conn = plain.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    svc.check(keys.is_empty(), || {
        format!("the service reached the plain-text server: {keys:?}")
    });
}

// ---------------------------------------------------------------------------
// ACL users
// ---------------------------------------------------------------------------

/// The shipped file is not usable as is: its password placeholders are not
/// hashes, so Redis refuses to start rather than run users with known
/// passwords. With hashes filled in, it loads, and `default` is off.
#[test]
fn shipped_acl_file_needs_passwords_and_turns_the_default_user_off() {
    let dir = TempDir::new("acl-shipped");
    std::fs::write(dir.join("users.acl"), secure::shipped_acl()).unwrap();
    // On a port of its own: with no listener at all Redis exits before it
    // reads the ACL file. If it loads the file, it runs: killed after 10 s.
    let port = crate::support::free_port().to_string();
    let mut child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--aclfile",
        ])
        .arg(dir.join("users.acl"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run redis-server");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = String::new();
    let _ = child.stdout.take().map(|mut o| o.read_to_string(&mut log));
    assert!(
        status.is_some_and(|s| !s.success()) && log.contains("password hash must be exactly 64"),
        "redis-server must refuse the placeholders ({status:?}): {log}"
    );

    let redis = AclRedis::start(&secure::acl_with_passwords());
    for user in [
        "admin",
        "order-service",
        "payment-service",
        "notification-service",
        "streamctl",
    ] {
        if let Err(e) = redis.conn_as(user) {
            redis.fail(&format!("{user} cannot log in: {e}"));
        }
    }
    let anonymous = redis.anonymous();
    assert!(
        anonymous.is_err(),
        "a client without credentials must be refused"
    );
    let wrong = redis::Client::open(format!(
        "redis://order-service:guess@127.0.0.1:{}",
        redis.port()
    ))
    .unwrap()
    .get_connection_with_timeout(Duration::from_secs(2));
    assert!(wrong.is_err(), "a wrong password must be refused");
}

/// The three services and streamctl, each under its own user, do all of
/// their work: orders are written, paid, notified, a poison entry is
/// given up by both groups (one dead letter), both producers trim, streamctl reads,
/// redrives and trims. `ACL LOG` stays empty: not one command was refused.
#[test]
fn every_service_does_its_work_under_its_own_acl_user() {
    let redis = AclRedis::start(&secure::acl_with_passwords());
    let port = redis.port();
    let url = |user: &str| secure::user_url(user, port);
    let spawn = |name: &str, extra: &[(&str, &str)]| {
        let u = url(name);
        let mut env = vec![("REDIS_URL", u.as_str())];
        env.extend_from_slice(extra);
        let mut svc = Service::spawn_env(name, &env, &[]);
        svc.wait_ready();
        svc.wait_readyz();
        svc
    };
    // Trimming every 200 ms down to nothing: XTRIM runs as soon as two
    // entries are acknowledged.
    let trim = [("TRIM_INTERVAL_MS", "200"), ("RETAIN_ENTRIES", "0")];
    let order = spawn("order-service", &trim);
    let payment = spawn("payment-service", &trim);
    let notification = spawn("notification-service", &[]);

    for i in 0..3 {
        let resp = order.get(&order_path(&format!("acl-{i}"), "p", "5"));
        order.expect_status(&resp, 200);
    }
    let mut admin = redis.conn_as("admin").unwrap();
    redis::cmd("XADD")
        .arg(ORDER_EVENTS)
        .arg("*")
        .arg("userId")
        .arg("poison")
        .arg("productId")
        .arg("p")
        .query::<String>(&mut admin)
        .unwrap();
    for i in 3..6 {
        let resp = order.get(&order_path(&format!("acl-{i}"), "p", "5"));
        order.expect_status(&resp, 200);
    }
    let count = |svc: &Service, needle: &str| svc.log().matches(needle).count();
    eventually(
        "six orders paid and notified, the poison dead-lettered once (by both groups)",
        || {
            (count(&payment, "Created payment") == 6
                && count(&notification, "[Order consumed]") == 6
                && count(&notification, "[Payment consumed]") == 6
                && xlen(&mut admin, ORDER_DLQ) == 1)
                .then_some(())
        },
    );
    eventually("both producers trimmed under their users", || {
        (order.log().contains("entries from order-events")
            && payment.log().contains("entries from payment-events"))
        .then_some(())
    });

    // streamctl as its own user: read, redrive the dead letters, trim.
    {
        let streamctl = crate::support::bin("streamctl");
        let u = url("streamctl");
        for args in [
            &["status"][..],
            &["dlq", "list", ORDER_EVENTS],
            &["pending", ORDER_EVENTS, PAYMENT_GROUP],
            &["dlq", "redrive", ORDER_EVENTS, "--all"],
            &["trim", "--retain", "0"],
        ] {
            let out = std::process::Command::new(&streamctl)
                .args(args)
                .env_clear()
                .env("REDIS_URL", &u)
                .output()
                .expect("run streamctl");
            assert!(
                out.status.success(),
                "streamctl {args:?} as streamctl failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The dead letter went back as a new entry for both groups, which
        // both give up on again: one new letter.
        eventually("the redriven poison entry is dead-lettered again", || {
            (xlen(&mut admin, ORDER_DLQ) == 1
                && drained(&mut admin, ORDER_EVENTS, PAYMENT_GROUP)
                && drained(&mut admin, ORDER_EVENTS, NOTIFICATION_GROUP))
            .then_some(())
        });
    }

    let refusals = crate::support::secure::acl_refusals(&mut admin);
    assert!(
        refusals.is_empty(),
        "commands refused to the services:\n{}",
        refusals.join("\n")
    );
}

/// Each user is refused what is not its job (`NOPERM`), including writing
/// another service's stream; `admin` is refused flushing, `CONFIG`,
/// scripting and changing users, and keeps what an operator reads with.
#[test]
fn each_acl_user_is_refused_what_is_not_its_job() {
    let redis = AclRedis::start(&secure::acl_with_passwords());
    let everyone: &[&[&str]] = &[
        &["FLUSHALL"],
        &["GET", "foo"],
        &["SET", "foo", "1"],
        &["KEYS", "*"],
        &["CONFIG", "GET", "*"],
        &["ACL", "LIST"],
        &["DEL", ORDER_EVENTS],
        &["XADD", "some-other-stream", "*", "a", "b"],
        &["EVAL", "return 1", "0"],
        &["SUBSCRIBE", "news"],
    ];
    let own: &[(&str, &[&[&str]])] = &[
        (
            "order-service",
            &[
                &["XADD", PAYMENT_EVENTS, "*", "a", "b"],
                &["XADD", ORDER_DLQ, "*", "a", "b"],
                &[
                    "XREADGROUP",
                    "GROUP",
                    PAYMENT_GROUP,
                    "c",
                    "STREAMS",
                    ORDER_EVENTS,
                    ">",
                ],
                &["INCR", "payment-service:payment-process-id"],
            ],
        ),
        (
            "payment-service",
            &[
                &["XADD", ORDER_EVENTS, "*", "a", "b"],
                &["XADD", "payment-events:dlq", "*", "a", "b"],
                &["SET", "payment-service:payment-process-id", "0"],
                &["XTRIM", ORDER_EVENTS, "MAXLEN", "0"],
            ],
        ),
        (
            "notification-service",
            &[
                &["XADD", ORDER_EVENTS, "*", "a", "b"],
                &["XADD", PAYMENT_EVENTS, "*", "a", "b"],
                &["INCR", "payment-service:payment-process-id"],
                &["XTRIM", PAYMENT_EVENTS, "MAXLEN", "0"],
            ],
        ),
        (
            "streamctl",
            &[
                &["XADD", ORDER_DLQ, "*", "a", "b"],
                &["XDEL", ORDER_EVENTS, "1-0"],
                &["XGROUP", "DESTROY", ORDER_EVENTS, PAYMENT_GROUP],
            ],
        ),
    ];
    // The README: "no user can FLUSHALL, CONFIG or EVAL" -- the operator's
    // `admin` neither, nor can it give itself back those rights.
    let admin: &[&[&str]] = &[
        &["FLUSHALL"],
        &["FLUSHDB"],
        &["CONFIG", "GET", "*"],
        &["CONFIG", "SET", "appendonly", "no"],
        &["EVAL", "return 1", "0"],
        &["EVAL_RO", "return 1", "0"],
        &["FUNCTION", "LIST"],
        &["ACL", "SETUSER", "admin", "+@all"],
        &["SHUTDOWN"],
    ];
    let mut own = own.to_vec();
    own.push(("admin", admin));
    let everyone_but_admin = |user: &str| if user == "admin" { &[][..] } else { everyone };
    for (user, extra) in own {
        let mut conn = redis
            .conn_as(user)
            .unwrap_or_else(|e| redis.fail(&format!("{user} cannot log in: {e}")));
        for cmd in everyone_but_admin(user).iter().chain(extra.iter()) {
            let mut c = redis::cmd(cmd[0]);
            for arg in &cmd[1..] {
                c.arg(*arg);
            }
            match c.query::<Value>(&mut conn) {
                Err(e) if e.code() == Some("NOPERM") => {}
                other => redis.fail(&format!(
                    "{user} must be refused {cmd:?} with NOPERM, got {other:?}"
                )),
            }
        }
    }
    let mut admin = redis.conn_as("admin").expect("admin logs in");
    for cmd in [
        &["INFO", "server"][..],
        &["ACL", "LIST"],
        &["ACL", "WHOAMI"],
        &["XLEN", ORDER_EVENTS],
        &["XADD", ORDER_EVENTS, "*", "a", "b"],
        &["XINFO", "STREAM", ORDER_EVENTS],
    ] {
        let mut c = redis::cmd(cmd[0]);
        for arg in &cmd[1..] {
            c.arg(*arg);
        }
        if let Err(e) = c.query::<Value>(&mut admin) {
            redis.fail(&format!("admin must be allowed {cmd:?}: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP abuse
// ---------------------------------------------------------------------------

/// The README's "at most 256 connections".
pub const MAX_CONNECTIONS: usize = 256;
/// The README's "a 10 s deadline for a request head and for its body".
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a fresh order may take next to an attack: well under
/// [`IO_TIMEOUT`], which is how long it would wait if the attack held the
/// worker it needs, and room enough for a loaded 2-core machine running
/// other tests beside it.
const FRESH_ORDER_WITHIN: Duration = Duration::from_secs(5);

/// How many connections the attack holds open: more than the server's
/// connection limit, so a server that spends a thread per connection
/// without limit (unpatched tiny_http did: 275 threads for 300) fails the
/// bound, and one that refuses new connections when full fails the fresh
/// orders.
const HALF_OPEN: usize = 2 * MAX_CONNECTIONS + 88;
/// The bound on order-service's threads under attack: a thread per
/// connection up to MAX_CONNECTIONS, at most 16 more of evicted
/// connections still exiting (the acceptor refuses past that), and about a
/// dozen of its own (main, signals, acceptor, four HTTP workers, two order
/// writers, trimming, watchdog...), with room to spare.
const MAX_THREADS: u64 = MAX_CONNECTIONS as u64 + 16 + 24;
/// The bound on how much RSS the attack may add: at most ~80 KiB of buffers
/// per connection, and these send only a partial head.
const MAX_RSS_GROWTH_KIB: u64 = 48 * 1024;

/// 600 connections that send half a request and wait, and one that
/// trickles a byte every 300 ms: fresh orders are still answered well
/// within IO_TIMEOUT, threads and memory stay bounded, and every one of the attacking
/// connections is closed by the server within IO_TIMEOUT (the trickler
/// too: the timeout is a deadline for the whole head, not per read).
#[test]
fn half_open_and_trickling_clients_cannot_tie_up_order_service() {
    let redis = RedisServer::start();
    let svc = start_ready("order-service", &redis, &[]);
    let pid = svc.pid().expect("running");
    let (rss_idle, threads_idle) = proc_status(pid);

    let opened = Instant::now();
    let mut half_open = Vec::with_capacity(HALF_OPEN);
    for _ in 0..HALF_OPEN {
        let mut s = TcpStream::connect(svc.addr()).expect("connect");
        s.write_all(b"GET /order?userId=u&productId=p&price=1 HTTP/1.1\r\nHost: x\r\n")
            .expect("send half a request");
        half_open.push(s);
    }
    let addr = svc.addr();
    let trickler = std::thread::spawn(move || {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let head = b"GET /order?userId=slow&productId=p&price=1 HTTP/1.1\r\nX-Slow: ";
        let mut sent = 0;
        loop {
            let byte = head.get(sent).copied().unwrap_or(b'a');
            if s.write_all(&[byte]).is_err() {
                return (started.elapsed(), sent);
            }
            sent += 1;
            let mut buf = [0u8; 256];
            match s.read(&mut buf) {
                Ok(_) => return (started.elapsed(), sent),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return (started.elapsed(), sent),
            }
            if started.elapsed() > IO_TIMEOUT * 3 {
                return (started.elapsed(), sent);
            }
        }
    });

    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let resp = svc.get(&order_path(&format!("fresh-{i}"), "p", "1"));
        svc.expect_status(&resp, 200);
        slowest = slowest.max(resp.elapsed);
        svc.check(resp.elapsed < FRESH_ORDER_WITHIN, || {
            format!("a fresh order took {:?} under attack: {resp}", resp.elapsed)
        });
    }
    // A connection evicted at the cap takes a moment to end (it may be
    // lingering after an answer, at most 2 s) while its successor's thread
    // starts: the count may pass the bound for an instant, but must settle
    // under it within those 2 s, long before the half-open connections'
    // 10 s deadline. A thread per connection (600 and more) never would.
    let settle = Instant::now() + Duration::from_secs(2);
    let (rss, threads) = loop {
        let (rss, threads) = proc_status(pid);
        if threads <= MAX_THREADS || Instant::now() > settle {
            break (rss, threads);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "under attack ({HALF_OPEN} half-open): {threads} threads (idle {threads_idle}), \
         RSS {rss} KiB (idle {rss_idle} KiB), slowest fresh order {slowest:?}"
    );
    svc.check(threads <= MAX_THREADS, || {
        format!("{threads} threads with {HALF_OPEN} half-open connections (bound {MAX_THREADS})")
    });
    svc.check(rss <= rss_idle + MAX_RSS_GROWTH_KIB, || {
        format!("RSS grew from {rss_idle} KiB to {rss} KiB")
    });
    let mut conn = redis.conn();
    assert_eq!(xlen(&mut conn, ORDER_EVENTS), 20, "only the fresh orders");

    // Every attacking connection is closed by the server (an answer or end
    // of stream, not our read timing out) by IO_TIMEOUT after it opened.
    let deadline = opened + IO_TIMEOUT + Duration::from_secs(5);
    for (i, s) in half_open.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 512];
        if let Err(e) = s.read(&mut buf) {
            let timed_out = matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            );
            svc.check(!timed_out, || {
                format!(
                    "half-open connection {i} still open {:?} after it opened",
                    opened.elapsed()
                )
            });
        }
    }
    let (took, sent) = trickler.join().expect("trickler");
    svc.check(took < IO_TIMEOUT + Duration::from_secs(3), || {
        format!("the trickling client kept its connection {took:?} ({sent} bytes)")
    });
    let ok = svc.get(&order_path("after", "p", "1"));
    svc.expect_status(&ok, 200);
    let (_, threads_after) = proc_status(pid);
    eprintln!("after the attack: {threads_after} threads");
}

/// Eight clients pipeline 20,000 requests each and never read the
/// answers: their connections' threads soon wait to write, the workers do
/// not, so fresh orders are still answered well within IO_TIMEOUT. (With
/// unpatched tiny_http the workers wrote the answers, and four such clients could
/// hold all four of them for IO_TIMEOUT at a time.)
#[test]
fn clients_that_never_read_their_answers_do_not_stall_the_workers() {
    let redis = RedisServer::start();
    let svc = start_ready("order-service", &redis, &[]);
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    // 20,000 pipelined requests per client, about 0.7 MB: the server
    // takes them in while its answers pile up unread.
    let batch: Vec<u8> = request.repeat(20_000);
    let mut greedy = Vec::new();
    for _ in 0..8 {
        // A small receive buffer: the unread answers fill it soon.
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        socket.connect(&svc.addr().into()).expect("connect");
        let mut s: TcpStream = socket.into();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        // Sent until the server stops taking more (its answers fill our
        // small buffer): at least a few hundred requests must have gone out,
        // or there was no attack to withstand.
        let mut sent = 0;
        while sent < batch.len() {
            match s.write(&batch[sent..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => sent += n,
            }
        }
        assert!(
            sent >= 500 * request.len(),
            "a greedy client sent only {sent} bytes: the attack did not happen"
        );
        greedy.push(s);
    }
    for i in 0..10 {
        let resp = svc.get(&order_path(&format!("fresh-{i}"), "p", "1"));
        svc.expect_status(&resp, 200);
        svc.check(resp.elapsed < FRESH_ORDER_WITHIN, || {
            format!(
                "a fresh order took {:?} next to greedy clients: {resp}",
                resp.elapsed
            )
        });
    }
    drop(greedy);
}

/// Every service listens on loopback unless told otherwise.
#[test]
fn every_service_listens_on_loopback_by_default() {
    use streamline::config::{parse, Command, Service as Which};
    for which in [Which::Order, Which::Payment, Which::Notification] {
        let Ok(Command::Run(config)) = parse(which, Vec::<String>::new(), |_| None) else {
            panic!("{which:?}: the defaults must make a configuration");
        };
        assert!(
            config.http_addr.ip().is_loopback(),
            "{which:?} listens on {} by default",
            config.http_addr
        );
    }
}

/// Heads and bodies over the limits are refused before they are read:
/// a 10 MiB `Content-Length` with only the head sent, a chunk that
/// announces 1 MiB, a chunked body that passes 64 KiB in small chunks, a
/// 20 KiB head, and a 32 MiB header line that never ends (memory stays
/// flat). Nothing is written.
#[test]
fn oversized_heads_and_bodies_are_refused_before_being_read() {
    let redis = RedisServer::start();
    let svc = start_ready("order-service", &redis, &[]);
    let addr = svc.addr();
    let quick = Duration::from_secs(5);

    let head_only = "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                     Content-Length: 10485760\r\n\r\n";
    let answer = exchange(addr, head_only.as_bytes(), quick);
    assert_eq!(status_of(&answer), Some(413), "10 MiB declared: {answer:?}");

    // A chunk announced at 1 MiB: refused once 64 KiB + 1 of it arrived,
    // without reading (or holding) the rest.
    let mut huge_chunk =
        b"POST /orders HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n"
            .to_vec();
    huge_chunk.resize(huge_chunk.len() + 64 * 1024 + 1, b' ');
    let answer = exchange(addr, &huge_chunk, quick);
    assert_eq!(
        status_of(&answer),
        Some(413),
        "1 MiB chunk announced: {answer:?}"
    );

    let mut small_chunks =
        b"POST /orders HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..64 {
        small_chunks.extend_from_slice(b"400\r\n");
        small_chunks.extend_from_slice(&[b' '; 1024]);
        small_chunks.extend_from_slice(b"\r\n");
    }
    small_chunks.extend_from_slice(b"1\r\n");
    let answer = exchange(addr, &small_chunks, quick);
    assert_eq!(
        status_of(&answer),
        Some(413),
        "64 KiB + 1 chunked: {answer:?}"
    );

    let mut big_head = b"GET /healthz HTTP/1.1\r\nX-Big: ".to_vec();
    big_head.resize(20 * 1024, b'a');
    big_head.extend_from_slice(b"\r\n\r\n");
    let answer = exchange(addr, &big_head, quick);
    assert_eq!(status_of(&answer), Some(431), "20 KiB head: {answer:?}");

    let pid = svc.pid().expect("running");
    let (rss_before, _) = proc_status(pid);
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = s.try_clone().unwrap();
    let answer =
        std::thread::spawn(move || read_until_closed(&mut reader, Duration::from_secs(10)));
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nX-Endless: ");
    let line = vec![b'a'; 1024 * 1024];
    let mut sent = 0;
    for _ in 0..32 {
        if s.write_all(&line).is_err() {
            break;
        }
        sent += line.len();
    }
    let answer = answer.join().unwrap();
    let (rss_after, _) = proc_status(pid);
    assert_eq!(
        status_of(&answer),
        Some(431),
        "endless header ({sent} bytes sent): {answer:?}"
    );
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB reading an endless header"
    );

    let mut conn = redis.conn();
    assert_eq!(xlen(&mut conn, ORDER_EVENTS), 0, "nothing may be written");
    svc.expect_status(&svc.get("/healthz"), 200);
}

// ---------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------

/// Lengths, control characters and price bounds over HTTP: `400` naming
/// the field, nothing written; the values at the limits are accepted.
#[test]
fn values_past_the_limits_are_refused_over_http() {
    let redis = RedisServer::start();
    let svc = start_ready("order-service", &redis, &[]);
    let long = "u".repeat(129);
    let at_limit = "u".repeat(128);
    let refused: &[(&str, &str, &str, &str)] = &[
        ("userId", &long, "p", "1"),
        ("productId", "u", &long, "1"),
        ("userId", "a\nb", "p", "1"),
        ("userId", "a\0b", "p", "1"),
        ("productId", "u", "p\r", "1"),
        ("productId", "u", "p\u{7f}", "1"),
        ("userId", "u\u{85}", "p", "1"),
        ("price", "u", "p", "1000000000000"),
        ("price", "u", "p", "1.123456789"),
        ("price", "u", "p", "1e400"),
        ("price", "u", "p", "99999999999999999999999999999999"),
    ];
    for (field, user, product, price) in refused {
        let resp = svc.get(&order_path(user, product, price));
        svc.expect_status(&resp, 400);
        let error = resp.json_str("error").unwrap_or_default().to_string();
        svc.check(error.contains(field), || {
            format!("the error should name {field}: {resp}")
        });
        let body = serde_json::json!({"userId": user, "productId": product, "price": price});
        let resp = svc.post_json("/orders", &body.to_string());
        svc.expect_status(&resp, 400);
        svc.check(
            resp.json_str("error").is_some_and(|e| e.contains(field)),
            || format!("the error should name {field}: {resp}"),
        );
    }
    // A JSON number too large for any price, and a userId near the body
    // limit.
    let resp = svc.post_json("/orders", r#"{"userId":"u","productId":"p","price":1e400}"#);
    svc.expect_status(&resp, 400);
    let big = serde_json::json!({"userId": "u".repeat(60_000), "productId": "p", "price": "1"});
    let resp = svc.post_json("/orders", &big.to_string());
    svc.expect_status(&resp, 400);

    let mut conn = redis.conn();
    assert_eq!(xlen(&mut conn, ORDER_EVENTS), 0, "nothing may be written");

    let resp = svc.get(&order_path(&at_limit, &at_limit, "999999999999.12345678"));
    svc.expect_status(&resp, 200);
    let written = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].get("userId"), Some(at_limit.as_bytes()));
}

/// The same poison written straight into Redis (as any client of the
/// contract may) is given up at once by both groups and dead-lettered once,
/// with the field named; the good entries around it are paid.
#[test]
fn values_past_the_limits_are_dead_lettered_by_the_consumers() {
    let redis = RedisServer::start();
    let _payment = start_ready("payment-service", &redis, &[]);
    let _notification = start_ready("notification-service", &redis, &[]);
    let mut conn = redis.conn();
    let long = vec![b'u'; 129];
    type Fields = Vec<(&'static str, Vec<u8>)>;
    let poison: Vec<(&str, Fields)> = vec![
        (
            "userId",
            vec![
                ("userId", long.clone()),
                ("productId", b"p".to_vec()),
                ("price", b"1".to_vec()),
            ],
        ),
        (
            "productId",
            vec![
                ("userId", b"u".to_vec()),
                ("productId", long.clone()),
                ("price", b"1".to_vec()),
            ],
        ),
        (
            "userId",
            vec![
                ("userId", b"u\n1".to_vec()),
                ("productId", b"p".to_vec()),
                ("price", b"1".to_vec()),
            ],
        ),
        (
            "productId",
            vec![
                ("userId", b"u".to_vec()),
                ("productId", b"p\0".to_vec()),
                ("price", b"1".to_vec()),
            ],
        ),
        (
            "price",
            vec![
                ("userId", b"u".to_vec()),
                ("productId", b"p".to_vec()),
                ("price", b"1e5".to_vec()),
            ],
        ),
        (
            "price",
            vec![
                ("userId", b"u".to_vec()),
                ("productId", b"p".to_vec()),
                ("price", b"1000000000000".to_vec()),
            ],
        ),
    ];
    let xadd = |conn: &mut Connection, fields: &[(&str, Vec<u8>)]| -> String {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(ORDER_EVENTS).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(v.as_slice());
        }
        cmd.query(conn).expect("XADD")
    };
    let good = |i: usize| {
        vec![
            ("userId", format!("good-{i}").into_bytes()),
            ("productId", b"p".to_vec()),
            ("price", b"1".to_vec()),
        ]
    };
    let mut poison_ids = Vec::new();
    for (i, (field, fields)) in poison.iter().enumerate() {
        xadd(&mut conn, &good(i));
        poison_ids.push((xadd(&mut conn, fields), *field));
    }
    eventually(
        "good orders paid, poison dead-lettered once for both groups",
        || {
            (xlen(&mut conn, PAYMENT_EVENTS) == poison.len()
                && xlen(&mut conn, ORDER_DLQ) == poison.len()
                && drained(&mut conn, ORDER_EVENTS, PAYMENT_GROUP)
                && drained(&mut conn, ORDER_EVENTS, NOTIFICATION_GROUP))
            .then_some(())
        },
    );
    let letters = xrange(&mut conn, ORDER_DLQ, "-", "+");
    for (id, field_name) in &poison_ids {
        let letter = letters
            .iter()
            .find(|l| l.get("originalId") == Some(id.as_bytes()));
        let Some(letter) = letter else {
            panic!("{id} not dead-lettered: {letters:?}");
        };
        let error = letter.text("error").unwrap_or_default();
        assert!(
            error.contains(field_name),
            "{id}: error {error:?} should name {field_name}"
        );
        let given_up: String = redis::cmd("HGET")
            .arg("order-events:dlq:index")
            .arg(id)
            .query(&mut conn)
            .unwrap_or_else(|e| panic!("HGET order-events:dlq:index {id}: {e}"));
        for group in [PAYMENT_GROUP, NOTIFICATION_GROUP] {
            assert!(
                given_up.split(',').any(|g| g == group),
                "{id} not given up by {group}: {given_up:?}"
            );
        }
    }
    for payment in xrange(&mut conn, PAYMENT_EVENTS, "-", "+") {
        let user = payment.get("userId").unwrap_or_default();
        assert!(
            user.starts_with(b"good-"),
            "only good orders are paid: {payment:?}"
        );
    }
}

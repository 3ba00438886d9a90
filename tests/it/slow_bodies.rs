//! Issue 10.2: bodies announced with `Expect: 100-continue`, and bodies of
//! `Connection: Upgrade` requests, obey the same deadline and limit as any
//! other body (README "Security": a 10 s deadline for a request head and
//! for its body, bodies of 64 KiB, `413` before reading them), so a few
//! connections that trickle such a body cannot hold the threads that answer
//! everybody else.
//!
//! Before the fix, these bodies were read lazily by whoever handled the
//! request (an HTTP worker reading the body of `POST /orders`, an order
//! writer draining the unread body of a `GET /order` when it dropped the
//! request), one byte every half second for as long as the client liked:
//! eight such connections and every ordinary order waited.
//!
//! The hostile clients speak raw HTTP over `std::net::TcpStream` (no client
//! library trickles a body); the ordinary orders go through ureq.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::flow::{start_ready, xlen, ORDER_EVENTS};
use crate::support::{agent, order_path, request_with, RedisServer, Service};

/// README "Security": the deadline for a request's body.
const BODY_DEADLINE: Duration = Duration::from_secs(10);
/// The contract's limit on a request body.
const MAX_BODY: usize = 64 * 1024;

/// Tricklers of each kind (`Expect: 100-continue`, `Connection: Upgrade`):
/// twice the four HTTP workers and two order writers of the defaults, so
/// each kind alone could hold every one of them.
const TRICKLERS: usize = 8;
/// How long a trickler waits between two bytes of its body.
const TRICKLE_EVERY: Duration = Duration::from_millis(500);
/// Ordinary orders placed while the tricklers trickle, and the clients
/// placing them.
const ORDINARY: usize = 40;
const CLIENTS: usize = 8;
/// How long an ordinary order may take next to the tricklers. They take a
/// few milliseconds; 2 s leaves a loaded 2-core machine plenty of room and
/// still fails when a trickler holds a thread an order needs (it holds it
/// for the whole body deadline, or for ever).
const ORDER_BOUND: Duration = Duration::from_secs(2);
/// A client of an ordinary order gives up after this long.
const ORDER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long past the deadline a trickler's `408` may come on a loaded
/// machine (one more byte interval, scheduling).
const DEADLINE_SLACK: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------

/// What came back on a raw connection: the informational answers (`100
/// Continue`) and the final one, if it is complete.
#[derive(Debug, Default)]
struct Answers {
    informational: Vec<u16>,
    status: Option<u16>,
    body: String,
    /// Everything received, for failure messages.
    raw: String,
}

/// Parses what arrived so far: every `1xx` answer, then the first final
/// answer once its head and its `Content-Length` body are complete.
fn parse_answers(bytes: &[u8]) -> Answers {
    let mut out = Answers {
        raw: String::from_utf8_lossy(bytes).into_owned(),
        ..Answers::default()
    };
    let mut rest = bytes;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let after = &rest[end + 4..];
        let Some(status) = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
        else {
            break;
        };
        if (100..200).contains(&status) {
            out.informational.push(status);
            rest = after;
            continue;
        }
        let length = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if after.len() >= length {
            out.status = Some(status);
            out.body = String::from_utf8_lossy(&after[..length]).into_owned();
        }
        break;
    }
    out
}

/// A raw connection to the service.
struct Raw {
    stream: TcpStream,
    received: Vec<u8>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect to the service");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .expect("write timeout");
        Raw {
            stream,
            received: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads for at most `within`, until `done` says what arrived is
    /// enough, the server closes, or the connection fails. Returns whether
    /// the server closed the connection.
    fn read_until(&mut self, within: Duration, done: impl Fn(&Answers) -> bool) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        while !done(&parse_answers(&self.received)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream.set_read_timeout(Some(left)).expect("timeout");
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => self.received.extend_from_slice(&buf[..n]),
                Err(e) if is_timeout(&e) => {}
                Err(_) => return true,
            }
        }
        false
    }

    fn answers(&self) -> Answers {
        parse_answers(&self.received)
    }

    /// Forgets what was received (before the next request on the
    /// connection).
    fn clear(&mut self) {
        self.received.clear();
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// The head of a `POST /orders` with a JSON body of `length` bytes and
/// `extra` headers.
fn post_head(length: usize, extra: &str) -> String {
    format!(
        "POST /orders HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\n\
         Content-Length: {length}\r\n{extra}\r\n"
    )
}

/// A valid order as JSON, padded with spaces to `length` bytes.
fn order_json(user: &str, length: usize) -> Vec<u8> {
    let mut body = format!(r#"{{"userId":"{user}","productId":"p","price":"1"}}"#).into_bytes();
    assert!(body.len() <= length, "{length} bytes is too short an order");
    body.resize(length, b' ');
    body
}

// ---------------------------------------------------------------------------
// Tricklers
// ---------------------------------------------------------------------------

/// What one trickling connection saw.
#[derive(Debug)]
struct Trickled {
    what: String,
    answers: Answers,
    /// From the end of its head to its final answer, if one came.
    answered_after: Option<Duration>,
    /// When the final answer came.
    answered_at: Option<Instant>,
    bytes_sent: usize,
}

/// A trickler: what it is, its head, and what it sends of its body every
/// [`TRICKLE_EVERY`] (nothing, for one that goes silent after its head).
struct Trickler {
    what: String,
    head: String,
    step: &'static [u8],
}

/// Sends `head`, tells `started`, then sends `step` of its body every
/// [`TRICKLE_EVERY`] until a final answer arrives, the server closes, or
/// three deadlines have passed.
fn trickle(addr: SocketAddr, trickler: Trickler, started: mpsc::Sender<()>) -> Trickled {
    let Trickler { what, head, step } = trickler;
    let mut raw = Raw::connect(addr);
    raw.send(head.as_bytes()).expect("send the head");
    let head_sent = Instant::now();
    let _ = started.send(());
    let mut bytes_sent = 0;
    let mut answered_at = None;
    while head_sent.elapsed() < 3 * BODY_DEADLINE {
        if raw.send(step).is_err() {
            break;
        }
        bytes_sent += step.len();
        let closed = raw.read_until(TRICKLE_EVERY, |a| a.status.is_some());
        if raw.answers().status.is_some() {
            answered_at = Some(Instant::now());
            break;
        }
        if closed {
            break;
        }
    }
    Trickled {
        what,
        answers: raw.answers(),
        answered_after: answered_at.map(|at| at - head_sent),
        answered_at,
        bytes_sent,
    }
}

/// Starts the tricklers: half of the `Expect: 100-continue` ones on
/// `GET /order` (a valid order in the query, so the old code wrote it and
/// left the body to the order writer), the other half and all the
/// `Connection: Upgrade` ones on `POST /orders` (read by a worker); and one
/// more `Expect: 100-continue` on `POST /orders` that sends nothing after
/// its head. Each announces a body of exactly the limit.
fn start_tricklers(addr: SocketAddr) -> Vec<std::thread::JoinHandle<Trickled>> {
    let (started_tx, started) = mpsc::channel();
    let mut threads = Vec::new();
    for i in 0..=2 * TRICKLERS {
        let (what, head) = if i < TRICKLERS {
            let expect = "Expect: 100-continue\r\n";
            if i % 2 == 0 {
                let path = order_path(&format!("trickler-{i}"), "p", "1");
                let head = format!(
                    "GET {path} HTTP/1.1\r\nHost: shop\r\nContent-Length: {MAX_BODY}\r\n{expect}\r\n"
                );
                (
                    format!("trickler {i}: GET /order, Expect: 100-continue"),
                    head,
                )
            } else {
                (
                    format!("trickler {i}: POST /orders, Expect: 100-continue"),
                    post_head(MAX_BODY, expect),
                )
            }
        } else if i < 2 * TRICKLERS {
            (
                format!("trickler {i}: POST /orders, Connection: Upgrade"),
                post_head(MAX_BODY, "Connection: Upgrade\r\nUpgrade: websocket\r\n"),
            )
        } else {
            (
                format!("silent {i}: POST /orders, Expect: 100-continue, no byte of the body"),
                post_head(MAX_BODY, "Expect: 100-continue\r\n"),
            )
        };
        let step: &'static [u8] = if i < 2 * TRICKLERS { b" " } else { b"" };
        let trickler = Trickler { what, head, step };
        let started = started_tx.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("trickler-{i}"))
                .spawn(move || trickle(addr, trickler, started))
                .expect("spawn a trickler"),
        );
    }
    for _ in 0..threads.len() {
        started
            .recv_timeout(Duration::from_secs(10))
            .expect("every trickler connects and sends its head");
    }
    threads
}

/// One ordinary order's fate.
struct Ordinary {
    result: Result<(u16, Option<String>), String>,
    took: Duration,
}

/// Places [`ORDINARY`] orders over ureq from [`CLIENTS`] clients at once.
fn ordinary_orders(svc: &Service) -> Vec<Ordinary> {
    let per_client = ORDINARY / CLIENTS;
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let base = svc.url("");
            std::thread::spawn(move || {
                let agent = agent(ORDER_TIMEOUT);
                (0..per_client)
                    .map(|i| {
                        let url = format!(
                            "{base}{}",
                            order_path(&format!("ordinary-{c}-{i}"), "p", "1")
                        );
                        let start = Instant::now();
                        let result = request_with(&agent, "GET", &url, &[], None)
                            .map(|r| (r.status, r.json_str("orderId").map(str::to_string)));
                        Ordinary {
                            result,
                            took: start.elapsed(),
                        }
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("an ordinary client panicked"))
        .collect()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Eight connections announce a 64 KiB body with `Expect: 100-continue`
/// and eight with `Connection: Upgrade`, then trickle it a byte every half
/// second; one more sends its `Expect` head and then nothing. Meanwhile 40 ordinary orders from eight clients are each
/// answered within 2 s. Each trickler gets `408` once the body deadline
/// has passed (the `Expect` ones after a `100 Continue`), nothing of
/// theirs is written, and the service goes on answering.
#[test]
fn trickled_expect_and_upgrade_bodies_do_not_hold_up_ordinary_orders() {
    let redis = RedisServer::start();
    let svc = start_ready("order-service", &redis, &[]);

    let tricklers = start_tricklers(svc.addr());
    let orders = ordinary_orders(&svc);
    let orders_done = Instant::now();
    let trickled: Vec<Trickled> = tricklers
        .into_iter()
        .map(|t| t.join().expect("a trickler panicked"))
        .collect();

    let mut times: Vec<Duration> = orders.iter().map(|o| o.took).collect();
    times.sort();
    let quick = orders
        .iter()
        .filter(|o| matches!(o.result, Ok((200, Some(_)))) && o.took < ORDER_BOUND)
        .count();
    eprintln!(
        "ordinary orders next to {} tricklers: {quick}/{ORDINARY} answered 200 within \
         {ORDER_BOUND:?}, median {:?}, max {:?}",
        trickled.len(),
        times[times.len() / 2],
        times[times.len() - 1]
    );
    for t in &trickled {
        eprintln!(
            "{}: {:?} (then {:?}) after {:?}, {} bytes sent",
            t.what, t.answers.informational, t.answers.status, t.answered_after, t.bytes_sent
        );
    }
    for (i, o) in orders.iter().enumerate() {
        svc.check(
            matches!(o.result, Ok((200, Some(_)))) && o.took < ORDER_BOUND,
            || {
                format!(
                    "ordinary order {i} next to the tricklers: {:?} after {:?} \
                     ({quick}/{ORDINARY} answered 200 within {ORDER_BOUND:?})",
                    o.result, o.took
                )
            },
        );
    }

    let first_answer = trickled.iter().filter_map(|t| t.answered_at).min();
    for t in &trickled {
        svc.check(t.answers.status == Some(408), || {
            format!(
                "{} expected 408 once the body deadline passed, got {:?} after {:?}: {:?}",
                t.what, t.answers.status, t.answered_after, t.answers.raw
            )
        });
        let after = t.answered_after.unwrap_or_default();
        svc.check(
            after >= BODY_DEADLINE - TRICKLE_EVERY && after <= BODY_DEADLINE + DEADLINE_SLACK,
            || {
                format!(
                    "{} got 408 {after:?} after its head; the deadline is {BODY_DEADLINE:?}",
                    t.what
                )
            },
        );
        let expected_informational: &[u16] = if t.what.contains("Expect") {
            &[100]
        } else {
            &[]
        };
        svc.check(t.answers.informational == expected_informational, || {
            format!(
                "{}: informational answers {:?}, expected {expected_informational:?} \
                 (never 101: an Upgrade request is answered, not upgraded): {:?}",
                t.what, t.answers.informational, t.answers.raw
            )
        });
    }
    svc.check(first_answer.is_some_and(|t| orders_done < t), || {
        "the ordinary orders must have been placed while every trickler was still trickling"
            .to_string()
    });

    let mut conn = redis.conn();
    assert_eq!(
        xlen(&mut conn, ORDER_EVENTS),
        ORDINARY,
        "the ordinary orders, and nothing of the tricklers"
    );
    let after = svc.get(&order_path("after", "p", "1"));
    svc.expect_status(&after, 200);
}

/// `Expect: 100-continue` as a well-behaved client uses it: a body over
/// the limit is refused with `413` without a `100 Continue` (the client
/// need not send it); one of exactly the limit, and a small one, get
/// `100 Continue`, then their normal answer, and the connection serves
/// the next request. A `Connection: Upgrade` request gets its normal answer
/// (no `101`), then the connection is closed.
#[test]
fn expect_and_upgrade_requests_get_their_normal_answers() {
    let redis = RedisServer::start();
    let svc = start_ready("order-service", &redis, &[]);
    let addr = svc.addr();
    let quick = Duration::from_secs(5);

    // Over the limit: 413 at once, no 100 Continue.
    let mut raw = Raw::connect(addr);
    raw.send(post_head(MAX_BODY + 1, "Expect: 100-continue\r\n").as_bytes())
        .expect("send the head");
    let started = Instant::now();
    raw.read_until(quick, |a| a.status.is_some());
    let answers = raw.answers();
    svc.check(
        answers.status == Some(413) && answers.informational.is_empty(),
        || {
            format!(
                "a body of {} bytes with Expect: 100-continue: expected 413 and no 100 Continue, \
                 got {:?} after {:?}: {:?}",
                MAX_BODY + 1,
                answers.status,
                started.elapsed(),
                answers.raw
            )
        },
    );

    // Exactly the limit, then a small body, on one connection: each gets
    // 100 Continue before its body is sent, then 201.
    let mut raw = Raw::connect(addr);
    let mut order_ids = Vec::new();
    for (user, length) in [("at-the-limit", MAX_BODY), ("small", 60)] {
        raw.clear();
        raw.send(post_head(length, "Expect: 100-continue\r\n").as_bytes())
            .expect("send the head");
        raw.read_until(quick, |a| !a.informational.is_empty() || a.status.is_some());
        let answers = raw.answers();
        svc.check(
            answers.informational == [100] && answers.status.is_none(),
            || {
                format!(
                    "{user} ({length} bytes): expected 100 Continue before the body, \
                     got {:?}",
                    answers.raw
                )
            },
        );
        raw.send(&order_json(user, length)).expect("send the body");
        raw.read_until(quick, |a| a.status.is_some());
        let answers = raw.answers();
        svc.check(answers.status == Some(201), || {
            format!(
                "{user} ({length} bytes): expected 201, got {:?}",
                answers.raw
            )
        });
        let id = serde_json::from_str::<serde_json::Value>(&answers.body)
            .ok()
            .and_then(|v| v.get("orderId")?.as_str().map(str::to_string));
        svc.check(id.is_some(), || {
            format!("{user}: no orderId in {:?}", answers.body)
        });
        order_ids.extend(id);
    }
    assert_eq!(order_ids.len(), 2, "two orders on one connection");
    raw.clear();
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: shop\r\n\r\n")
        .expect("send the next request");
    raw.read_until(quick, |a| a.status.is_some());
    svc.check(raw.answers().status == Some(200), || {
        format!(
            "the connection serves the next request after an Expect one: {:?}",
            raw.answers().raw
        )
    });

    // Expect without a body: the normal answer.
    let mut raw = Raw::connect(addr);
    let path = order_path("no-body", "p", "1");
    raw.send(
        format!("GET {path} HTTP/1.1\r\nHost: shop\r\nExpect: 100-continue\r\n\r\n").as_bytes(),
    )
    .expect("send the request");
    raw.read_until(quick, |a| a.status.is_some());
    svc.check(raw.answers().status == Some(200), || {
        format!(
            "GET /order with Expect and no body: {:?}",
            raw.answers().raw
        )
    });

    // Connection: Upgrade with its body: answered, not upgraded, closed.
    let mut raw = Raw::connect(addr);
    let body = order_json("upgrade", 80);
    raw.send(post_head(body.len(), "Connection: Upgrade\r\nUpgrade: websocket\r\n").as_bytes())
        .expect("send the head");
    raw.send(&body).expect("send the body");
    let closed = raw.read_until(quick, |_| false);
    let answers = raw.answers();
    svc.check(
        answers.status == Some(201) && answers.informational.is_empty() && closed,
        || {
            format!(
                "POST /orders with Connection: Upgrade: expected 201 (no 101), then the \
                 connection closed (closed: {closed}): {:?}",
                answers.raw
            )
        },
    );

    let mut conn = redis.conn();
    assert_eq!(
        xlen(&mut conn, ORDER_EVENTS),
        4,
        "the orders at the limit, small, without a body and on Upgrade; not the refused one"
    );
}

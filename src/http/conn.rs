//! Connections: the `http-accept` thread, one `http-conn` thread per open
//! connection (at most [`MAX_CONNECTIONS`]), and the table that lets the
//! acceptor close the connection that has waited longest for its client.
//!
//! A connection is in one of two states. *Waiting for the client*: reading
//! a request head or body, writing an answer (which waits for the client
//! to read it), or lingering after a refusal. *Busy*: its request is with
//! a worker. Only waiting connections can be evicted, the one that started
//! waiting longest ago first, so a request being handled is never dropped
//! by the limit.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::wire::{self, Framing, Incoming, WireError};
use super::{Request, Response, IO_TIMEOUT, MAX_BODY, MAX_CONNECTIONS};

/// How long a closing connection keeps reading (and dropping) what the
/// client still sends after a refusal, so the client reads the answer
/// rather than a reset.
const LINGER: Duration = Duration::from_secs(2);
/// Connection threads that may still be running beyond [`MAX_CONNECTIONS`]:
/// those of evicted connections, which exit as soon as they are scheduled.
/// Past this the acceptor waits for them (at most [`EXIT_WAIT`]).
const EXITING_SLACK: usize = 16;
/// How long the acceptor waits for evicted connections' threads to exit
/// before refusing a new connection instead.
const EXIT_WAIT: Duration = Duration::from_millis(200);
/// Stack of a connection thread: it parses, it does not recurse or run
/// handlers. Small, so that [`MAX_CONNECTIONS`] threads cost little.
const CONN_STACK: usize = 128 * 1024;

/// What the acceptor, the connection threads and the workers share.
pub(super) struct Shared {
    conns: Mutex<HashMap<u64, Slot>>,
    next_id: AtomicU64,
    /// Requests handed to workers whose answer is not written yet.
    in_flight: AtomicUsize,
    /// Connection threads running, evicted ones included.
    threads: Arc<AtomicUsize>,
    /// Set at shutdown: answers say `Connection: close`.
    stopping: AtomicBool,
    requests: Sender<Request>,
}

struct Slot {
    stream: Arc<TcpStream>,
    /// `Some(since)` while waiting for the client.
    waiting_since: Option<Instant>,
}

impl Shared {
    pub(super) fn new(requests: Sender<Request>) -> Shared {
        Shared {
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            threads: Arc::default(),
            stopping: AtomicBool::new(false),
            requests,
        }
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Slot>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks connection `id` waiting (or not). `false` if it was evicted.
    fn set_waiting(&self, id: u64, waiting: bool) -> bool {
        match self.conns().get_mut(&id) {
            Some(slot) => {
                slot.waiting_since = waiting.then(Instant::now);
                true
            }
            None => false,
        }
    }

    fn forget(&self, id: u64) {
        self.conns().remove(&id);
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Stops keeping connections alive and closes those that wait for
    /// their client; busy ones finish their answer first.
    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for slot in self.conns().values() {
            if slot.waiting_since.is_some() {
                let _ = slot.stream.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Accepts connections until `shutdown` fires. The listener has a short
/// read timeout, so `accept` returns often enough to notice it.
pub(super) fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, shutdown: &Receiver<()>) {
    let mut last_complaint: Option<Instant> = None;
    while !crate::shutdown::is_started(shutdown) {
        match listener.accept() {
            Ok((stream, _)) => admit(shared, stream),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                // Out of file descriptors, most likely: say so now and
                // then, and give the process a moment instead of spinning.
                if last_complaint.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    log::warn!("cannot accept HTTP connections: {e}");
                    last_complaint = Some(Instant::now());
                }
                crate::shutdown::wait(shutdown, Duration::from_millis(100));
            }
        }
    }
    shared.stop();
}

/// Takes a new connection in: evicts the connection that has waited
/// longest for its client if the table is full, or refuses the new one if
/// every connection is busy; then gives it a thread.
fn admit(shared: &Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let stream = Arc::new(stream);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut conns = shared.conns();
        if conns.len() >= MAX_CONNECTIONS {
            let oldest = conns
                .iter()
                .filter_map(|(id, s)| s.waiting_since.map(|t| (t, *id)))
                .min();
            match oldest {
                Some((_, victim)) => {
                    if let Some(slot) = conns.remove(&victim) {
                        // Its thread's read returns at once and it exits.
                        let _ = slot.stream.shutdown(Shutdown::Both);
                        log::debug!(
                            "{MAX_CONNECTIONS} connections open: closed the one idle longest"
                        );
                    }
                }
                None => {
                    drop(conns);
                    return refuse_busy(&stream);
                }
            }
        }
        conns.insert(
            id,
            Slot {
                stream: stream.clone(),
                waiting_since: Some(Instant::now()),
            },
        );
    }
    // Threads of evicted connections exit at once, but "at once" is when
    // the scheduler gets to them: on a busy machine, wait for them rather
    // than let the thread count run ahead of the connection limit.
    let waited = Instant::now();
    while shared.threads.load(Ordering::SeqCst) >= MAX_CONNECTIONS + EXITING_SLACK {
        if waited.elapsed() > EXIT_WAIT {
            shared.forget(id);
            return refuse_busy(&stream);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let thread_shared = shared.clone();
    let running = ThreadCount::new(&shared.threads);
    let spawned = std::thread::Builder::new()
        .name("http-conn".into())
        .stack_size(CONN_STACK)
        .spawn(move || {
            let _running = running;
            serve(&thread_shared, id, &stream);
            thread_shared.forget(id);
        });
    if let Err(e) = spawned {
        shared.forget(id);
        log::warn!("cannot start a thread for an HTTP connection: {e}");
    }
}

/// Counts a connection thread as running until dropped (when the thread
/// ends, or at once if it could not be started).
struct ThreadCount(Arc<AtomicUsize>);

impl ThreadCount {
    fn new(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        ThreadCount(n.clone())
    }
}

impl Drop for ThreadCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Every connection is busy with a request: answer `503` without a thread
/// and without waiting (the socket's send buffer is empty, so one small
/// write cannot block), and close.
fn refuse_busy(stream: &TcpStream) {
    crate::metrics::http_request(503);
    let _ = stream.set_nonblocking(true);
    let body = br#"{"error":"too many connections; retry later"}"#;
    let headers = [("Content-Type".into(), "application/json".into())];
    let _ = wire::write_response(&mut &*stream, 503, &headers, body, false, true);
    let _ = stream.shutdown(Shutdown::Both);
}

/// A reader that gives up at a deadline: each read waits at most for the
/// time left, so a client that trickles bytes cannot stretch a request.
struct Deadlined<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&mut &*self.stream).read(buf)
    }
}

/// Counts a request as in flight until dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves the requests of one connection, one after the other, until the
/// client or an error closes it.
fn serve(shared: &Shared, id: u64, stream: &TcpStream) {
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut incoming = Incoming::new(Deadlined {
        stream,
        deadline: Instant::now() + IO_TIMEOUT,
    });
    loop {
        // Idle time and the head together get IO_TIMEOUT.
        incoming.get_mut().deadline = Instant::now() + IO_TIMEOUT;
        if !shared.set_waiting(id, true) {
            return;
        }
        let head = match incoming.read_head() {
            Ok(head) => head,
            Err(e) => return refuse(&mut incoming, stream, &e),
        };
        let framing = match head.framing() {
            Ok(f) => f,
            Err(e) => return refuse(&mut incoming, stream, &e),
        };
        let expects_continue = match head.expects_continue() {
            Ok(yes) => yes,
            Err(e) => return refuse(&mut incoming, stream, &e),
        };
        if let Framing::Length(n) = framing {
            if n > MAX_BODY as u64 {
                return refuse(&mut incoming, stream, &WireError::BodyTooLarge);
            }
        }
        if expects_continue && framing != Framing::None && !incoming.has_buffered() {
            send_continue(stream);
        }
        incoming.get_mut().deadline = Instant::now() + IO_TIMEOUT;
        let body = match incoming.read_body(framing, MAX_BODY) {
            Ok(body) => body,
            Err(e) => return refuse(&mut incoming, stream, &e),
        };
        if !shared.set_waiting(id, false) {
            return;
        }
        let head_only = head.method == wire::Method::Head;
        let keep_alive = head.keep_alive();
        let _in_flight = InFlight::new(&shared.in_flight);
        let (reply, answer) = crossbeam_channel::bounded(1);
        let request = Request {
            method: head.method,
            url: head.target,
            headers: head.headers,
            body,
            reply: Some(reply),
        };
        // At most one request per connection is out, and there are at
        // most MAX_CONNECTIONS connections: the queue never fills.
        let response = match shared.requests.try_send(request) {
            Ok(()) => answer.recv().unwrap_or_else(|_| stopping()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => stopping(),
        };
        let close = !keep_alive || response.close || shared.stopping.load(Ordering::SeqCst);
        // Writing waits for the client to read: a client that pipelines
        // requests and never reads its answers must not hold the slot.
        if !shared.set_waiting(id, true) {
            return;
        }
        let written = wire::write_response(
            &mut &*stream,
            response.status,
            &response.header_pairs(),
            &response.body,
            head_only,
            close,
        );
        if written.is_err() || close {
            let _ = stream.shutdown(Shutdown::Write);
            return;
        }
    }
}

fn stopping() -> Response {
    let mut r = super::error(503, "the server is stopping; retry later");
    r.close = true;
    r
}

/// Answers a request that could not be read (if anyone waits for an
/// answer), then closes the connection, lingering so that the answer is
/// read rather than lost to a reset.
fn refuse(incoming: &mut Incoming<Deadlined<'_>>, stream: &TcpStream, e: &WireError) {
    let Some(status) = e.status() else {
        log::debug!("HTTP connection ended: {e}");
        return;
    };
    crate::metrics::http_request(status);
    let body = serde_json::json!({ "error": e.to_string() }).to_string();
    let headers = [("Content-Type".into(), "application/json".into())];
    let written = wire::write_response(
        &mut &*stream,
        status,
        &headers,
        body.as_bytes(),
        false,
        true,
    );
    let _ = stream.shutdown(Shutdown::Write);
    // A client that timed out sends nothing worth waiting for.
    if written.is_ok() && status != 408 {
        incoming.get_mut().deadline = Instant::now() + LINGER;
        incoming.discard();
    }
}

/// `100 Continue`, for a client that waits for it before sending a body.
fn send_continue(stream: &TcpStream) {
    use std::io::Write;
    let _ = (&mut &*stream).write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
}

//! The closed-loop driver: C client threads share N tickets; each takes the
//! next ticket, sends one request, waits for the whole answer, and goes on
//! until the tickets or the time limit run out.
//!
//! Every client first sends one `GET /healthz` (not timed, not counted) so
//! that connection setup is not in the latency figures, then all start
//! together when the driver says go.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::client::{Client, ClientKind, Target};
use crate::progress::Progress;
use crate::stats::{self, Summary};

/// How long the clients may take to connect before the run is abandoned.
const WARM_UP_LIMIT: Duration = Duration::from_secs(10);

/// What to send and to whom.
pub struct Plan<'a> {
    /// Total requests over all clients.
    pub requests: usize,
    /// Client threads.
    pub clients: usize,
    /// HTTP client implementation.
    pub kind: ClientKind,
    /// The server.
    pub target: &'a Target,
    /// The run stops at this age even if tickets remain.
    pub limit: Duration,
    /// When set, request *i* carries `Idempotency-Key: <prefix>-<i>`: a
    /// fresh key for every request (the keyed mode).
    pub key_prefix: Option<&'a str>,
}

/// What a run did.
#[derive(Debug)]
pub struct Outcome {
    /// Answers with status 200.
    pub ok: usize,
    /// Other statuses and transport errors.
    pub failed: usize,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// When the first request could be sent.
    pub started: Instant,
    /// From `started` to the last answer.
    pub elapsed: Duration,
    /// Latency of the 200 answers.
    pub latency: Summary,
}

impl Outcome {
    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        stats::rate(self.ok as u64, self.elapsed)
    }
}

/// Writes the path of ticket `ticket` sent by client `client` into `buf`.
pub type PathFn<'a> = &'a (dyn Fn(&mut String, usize, usize) + Sync);

/// Runs `plan`; an error only when no client could reach the server.
pub fn run(plan: &Plan, path: PathFn, progress: &Progress) -> Result<Outcome, String> {
    let next = AtomicUsize::new(0);
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(plan.clients);
    let (go_tx, go_rx) = crossbeam_channel::bounded(plan.clients);
    let shared = Shared {
        plan,
        path,
        next: &next,
        progress,
    };
    thread::scope(|s| {
        // Owned by the closure: on an early return it is dropped before the
        // scope joins the clients, which then see the channel closed.
        let go_tx = go_tx;
        let mut handles = Vec::with_capacity(plan.clients);
        for id in 0..plan.clients {
            handles.push(spawn_client(s, id, &shared, &ready_tx, &go_rx)?);
        }
        wait_ready(&ready_rx, plan.clients)?;
        let started = Instant::now();
        for _ in 0..plan.clients {
            let _ = go_tx.send(started);
        }
        let results = handles.into_iter().map(|h| h.join().unwrap_or_default());
        Ok(merge(started, results))
    })
}

/// What every client thread reads.
struct Shared<'a> {
    plan: &'a Plan<'a>,
    path: PathFn<'a>,
    next: &'a AtomicUsize,
    progress: &'a Progress,
}

fn spawn_client<'s, 'e>(
    s: &'s Scope<'s, 'e>,
    id: usize,
    shared: &'s Shared<'e>,
    ready: &Sender<Result<(), String>>,
    go: &Receiver<Instant>,
) -> Result<ScopedJoinHandle<'s, ClientResult>, String> {
    let (ready, go) = (ready.clone(), go.clone());
    thread::Builder::new()
        .name(format!("client-{id}"))
        .spawn_scoped(s, move || client_loop(id, shared, &ready, &go))
        .map_err(|e| format!("cannot start client thread: {e}"))
}

/// Waits until every client is connected; the first connection error ends
/// the run (dropping the go channel releases the clients).
fn wait_ready(ready: &Receiver<Result<(), String>>, clients: usize) -> Result<(), String> {
    let deadline = Instant::now() + WARM_UP_LIMIT;
    for _ in 0..clients {
        match ready.recv_deadline(deadline) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("clients did not connect within 10 s".to_string()),
        }
    }
    Ok(())
}

/// One client's share of the run.
#[derive(Default)]
struct ClientResult {
    ok: usize,
    failed: usize,
    first_error: Option<String>,
    finished: Option<Instant>,
    latencies: Vec<u64>,
}

fn client_loop(
    id: usize,
    shared: &Shared,
    ready: &Sender<Result<(), String>>,
    go: &Receiver<Instant>,
) -> ClientResult {
    let plan = shared.plan;
    let mut client = Client::new(plan.kind, plan.target);
    let warm = client
        .warm_up()
        .map_err(|e| format!("cannot reach {}: {e}", plan.target.base));
    let _ = ready.send(warm);
    let mut result = ClientResult::default();
    let Ok(started) = go.recv() else {
        return result;
    };
    let deadline = started + plan.limit;
    result.latencies.reserve(plan.requests / plan.clients + 1);
    let mut path = String::with_capacity(256);
    let mut key = String::with_capacity(64);
    loop {
        let ticket = shared.next.fetch_add(1, Ordering::Relaxed);
        if ticket >= plan.requests || Instant::now() >= deadline {
            break;
        }
        path.clear();
        (shared.path)(&mut path, ticket, id);
        let key = plan.key_prefix.map(|prefix| {
            key.clear();
            // Writing to a String cannot fail.
            let _ = write!(key, "{prefix}-{ticket}");
            key.as_str()
        });
        let sent = Instant::now();
        let answer = client.get_keyed(&path, key);
        result.record(answer, sent.elapsed(), &client, shared.progress);
    }
    result.finished = Some(Instant::now());
    result
}

impl ClientResult {
    fn record(
        &mut self,
        answer: Result<u16, String>,
        took: Duration,
        client: &Client,
        progress: &Progress,
    ) {
        let error = match answer {
            Ok(200) => {
                self.ok += 1;
                self.latencies.push(stats::nanos(took));
                progress.ok();
                return;
            }
            Ok(status) => format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&client.body()[..client.body().len().min(200)])
            ),
            Err(e) => e,
        };
        self.failed += 1;
        progress.failed();
        self.first_error.get_or_insert(error);
    }
}

fn merge(started: Instant, results: impl Iterator<Item = ClientResult>) -> Outcome {
    let mut out = Outcome {
        ok: 0,
        failed: 0,
        first_error: None,
        started,
        elapsed: Duration::ZERO,
        latency: Summary::default(),
    };
    let mut latencies = Vec::new();
    let mut finished = started;
    for r in results {
        out.ok += r.ok;
        out.failed += r.failed;
        out.first_error = out.first_error.or(r.first_error);
        finished = finished.max(r.finished.unwrap_or(started));
        latencies.extend(r.latencies);
    }
    out.elapsed = finished - started;
    out.latency = stats::summarize(&mut latencies);
    out
}

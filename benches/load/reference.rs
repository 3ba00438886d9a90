//! The machine's limits, measured in the same run as the system so that
//! results can be given as ratios: a bare tiny_http server loaded exactly
//! like `/order`, and raw `XADD` round trips against the same Redis.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use redis::{Connection, Value};

use crate::args::Args;
use crate::client::Target;
use crate::drive::{self, Outcome, Plan};
use crate::progress::Progress;
use crate::stats;
use crate::system::{order_path, redis_connect};

/// A tiny_http server on a free port of 127.0.0.1 whose worker threads
/// answer every request with `ok`; stopped and joined on drop.
pub struct BareServer {
    server: Arc<tiny_http::Server>,
    stopping: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    target: Target,
}

impl BareServer {
    /// Binds a free port and starts `workers` threads calling `recv()`.
    pub fn start(workers: usize) -> Result<BareServer, String> {
        let server = tiny_http::Server::http("127.0.0.1:0")
            .map_err(|e| format!("cannot start the bare tiny_http server: {e}"))?;
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .ok_or("the bare tiny_http server has no IP address")?;
        let mut bare = BareServer {
            server: Arc::new(server),
            stopping: Arc::new(AtomicBool::new(false)),
            workers: Vec::with_capacity(workers),
            target: Target::local(port),
        };
        for i in 0..workers {
            let worker = bare.spawn_worker(i)?;
            bare.workers.push(worker);
        }
        Ok(bare)
    }

    /// Where it listens.
    pub fn target(&self) -> &Target {
        &self.target
    }

    fn spawn_worker(&self, i: usize) -> Result<JoinHandle<()>, String> {
        let (server, stopping) = (Arc::clone(&self.server), Arc::clone(&self.stopping));
        thread::Builder::new()
            .name(format!("bare-http-{i}"))
            .spawn(move || serve(&server, &stopping))
            .map_err(|e| format!("cannot start a bare tiny_http worker: {e}"))
    }
}

fn serve(server: &tiny_http::Server, stopping: &AtomicBool) {
    // `recv` fails when `unblock` wakes us, and also on an accept error,
    // which must not end the worker.
    while !stopping.load(Ordering::Relaxed) {
        if let Ok(request) = server.recv() {
            let _ = request.respond(tiny_http::Response::from_string("ok"));
        }
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        for _ in &self.workers {
            self.server.unblock();
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Loads a fresh bare server with the same client code, paths and
/// concurrency as the `/order` run.
pub fn bare_http(args: &Args, progress: &Progress) -> Result<Outcome, String> {
    let server = BareServer::start(args.workers)?;
    let plan = Plan {
        requests: args.requests,
        clients: args.clients,
        kind: args.client,
        target: server.target(),
        limit: args.time_limit,
        key_prefix: None,
    };
    progress.phase("bare tiny_http", args.requests as u64);
    let outcome = drive::run(&plan, &order_path, progress);
    progress.idle();
    outcome
}

/// Raw `XADD` throughput on one connection.
#[derive(Clone, Copy, Debug)]
pub struct XaddRates {
    /// One command, wait for the reply, next command.
    pub sequential: f64,
    /// Batches of `--pipeline` commands per round trip.
    pub pipelined: f64,
}

/// `-n` XADDs of an order-sized entry to a scratch stream, sequential then
/// pipelined; the stream is deleted afterwards.
pub fn xadd(args: &Args, progress: &Progress) -> Result<XaddRates, String> {
    let mut conn = redis_connect(&args.redis)?;
    let key = format!("bench:xadd:{}", std::process::id());
    let deadline = Instant::now() + args.time_limit;
    progress.phase("XADD sequential", args.requests as u64);
    let rates = xadd_sequential(&mut conn, &key, args.requests, deadline, progress).and_then(
        |sequential| {
            progress.phase("XADD pipelined", args.requests as u64);
            let pipelined = xadd_pipelined(&mut conn, &key, args, deadline, progress)?;
            Ok(XaddRates {
                sequential,
                pipelined,
            })
        },
    );
    progress.idle();
    let _: Result<(), _> = redis::cmd("DEL").arg(&key).query(&mut conn);
    rates
}

fn xadd_cmd(key: &str, i: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key)
        .arg("*")
        .arg("userId")
        .arg(format!("u{}", i % 16))
        .arg("productId")
        .arg(format!("p{}", i % 100))
        .arg("price")
        .arg(100 + i % 900);
    cmd
}

fn xadd_sequential(
    conn: &mut Connection,
    key: &str,
    n: usize,
    deadline: Instant,
    progress: &Progress,
) -> Result<f64, String> {
    let start = Instant::now();
    let mut done = 0;
    while done < n && Instant::now() < deadline {
        let _: Value = xadd_cmd(key, done)
            .query(conn)
            .map_err(|e| format!("XADD: {e}"))?;
        done += 1;
        progress.ok();
    }
    Ok(stats::rate(done as u64, start.elapsed()))
}

fn xadd_pipelined(
    conn: &mut Connection,
    key: &str,
    args: &Args,
    deadline: Instant,
    progress: &Progress,
) -> Result<f64, String> {
    let start = Instant::now();
    let mut done = 0;
    while done < args.requests && Instant::now() < deadline {
        let batch = args.pipeline.min(args.requests - done);
        let mut pipe = redis::pipe();
        for i in done..done + batch {
            pipe.add_command(xadd_cmd(key, i));
        }
        pipe.exec(conn)
            .map_err(|e| format!("pipelined XADD: {e}"))?;
        done += batch;
        progress.set_done(done as u64);
    }
    Ok(stats::rate(done as u64, start.elapsed()))
}

/// Waits a moment so the previous phase's sockets and threads are gone.
pub fn settle() {
    thread::sleep(Duration::from_millis(200));
}

//! Start-to-ready: spawn a service binary, poll `GET /readyz` in a tight
//! loop, and time spawn -> first 200. Then its idle RSS, and SIGTERM ->
//! exit.
//!
//! Each binary gets a free port (`HTTP_ADDR`), the `--redis` URL
//! (`REDIS_URL`), `RUST_LOG=warn`, and `CONSUMER_NAME=bench-ready` so it
//! never shares a consumer name with an instance already running against
//! the same Redis (it leaves an idle, empty consumer of that name in the
//! groups).

use std::path::Path;
use std::thread;
use std::time::Duration;

use testkit::{tail, Service, ServiceSpec};

use crate::args::Args;
use crate::procs::{self, SERVICES};
use crate::progress::Progress;
use crate::system::redis_connect;

/// A service not ready within this long has failed.
const READY_LIMIT: Duration = Duration::from_secs(10);
/// Between two `/readyz` probes while the port is not answering yet.
const PROBE_PAUSE: Duration = Duration::from_micros(200);
/// How long a service runs idle before its RSS is read.
const IDLE: Duration = Duration::from_millis(500);
/// How long a service may take to stop after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// What one start of one binary measured.
#[derive(Clone, Copy, Debug)]
pub struct Start {
    /// Spawn -> first 200 on `/readyz`.
    pub ready: Duration,
    /// VmRSS after [`IDLE`], KiB.
    pub idle_rss_kib: Option<u64>,
    /// SIGTERM -> exit.
    pub stop: Duration,
}

/// Every start of one binary.
#[derive(Debug)]
pub struct ReadyRun {
    /// The binary.
    pub name: &'static str,
    /// One per round.
    pub starts: Vec<Start>,
}

/// Starts each binary of `--bin-dir` `--rounds` times.
pub fn run(args: &Args, progress: &Progress) -> Result<Vec<ReadyRun>, String> {
    let dir = args
        .bin_dir
        .as_deref()
        .ok_or("ready needs --bin-dir (for example target/release)")?;
    redis_connect(&args.redis)?;
    let mut runs = Vec::new();
    for name in SERVICES {
        let bin = dir.join(name);
        if !bin.is_file() {
            return Err(format!(
                "{} not found (build with cargo build --release)",
                bin.display()
            ));
        }
        progress.phase(&format!("start-to-ready {name}"), args.rounds as u64);
        let mut starts = Vec::with_capacity(args.rounds);
        for _ in 0..args.rounds {
            starts.push(start_once(&bin, &args.redis)?);
            progress.ok();
        }
        runs.push(ReadyRun { name, starts });
    }
    progress.idle();
    Ok(runs)
}

fn start_once(bin: &Path, redis: &str) -> Result<Start, String> {
    let mut service = spawn(bin, redis, "bench-ready")?;
    let ready = wait_ready(&mut service)?;
    thread::sleep(IDLE);
    let idle_rss_kib = service.pid().and_then(procs::mem).map(|m| m.rss_kib);
    let stop = stop(&mut service)?;
    Ok(Start {
        ready,
        idle_rss_kib,
        stop,
    })
}

/// Starts the binary `bin` on a free port against `redis`, as consumer
/// `consumer`, with `RUST_LOG=warn` and this process's environment; its
/// output goes to a log in a temporary directory of its own.
pub fn spawn(bin: &Path, redis: &str, consumer: &str) -> Result<Service, String> {
    ServiceSpec::new(bin)
        .inherit_env()
        .env("REDIS_URL", redis)
        .env("RUST_LOG", "warn")
        .env("CONSUMER_NAME", consumer)
        .start()
        .map_err(|e| {
            format!(
                "cannot start {} (build with cargo build --release): {e}",
                bin.display()
            )
        })
}

/// Waits until `service` answers `/readyz` with 200 (probing every
/// [`PROBE_PAUSE`], up to [`READY_LIMIT`]); returns spawn -> first 200.
/// The error ends with the last lines of its log.
pub fn wait_ready(service: &mut Service) -> Result<Duration, String> {
    service
        .try_wait_readyz(READY_LIMIT, PROBE_PAUSE)
        .map_err(|e| {
            format!(
                "{}: {e}; its log:\n{}",
                service.name(),
                tail(&service.log(), 20)
            )
        })
}

/// SIGTERM, then waits for the exit; SIGKILL after [`STOP_LIMIT`].
pub fn stop(service: &mut Service) -> Result<Duration, String> {
    service.terminate(STOP_LIMIT)
}

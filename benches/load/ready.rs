//! Start-to-ready: spawn a service binary, poll `GET /readyz` in a tight
//! loop, and time spawn -> first 200. Then its idle RSS, and SIGTERM ->
//! exit.
//!
//! Each binary gets a free port (`HTTP_ADDR`), the `--redis` URL
//! (`REDIS_URL`), `RUST_LOG=warn`, and `CONSUMER_NAME=bench-ready` so it
//! never shares a consumer name with an instance already running against
//! the same Redis (it leaves an idle, empty consumer of that name in the
//! groups).

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::args::Args;
use crate::client::{Client, ClientKind, Target};
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
    /// SIGTERM -> exit (includes running `kill(1)`).
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
            starts.push(start_once(&bin, name, &args.redis)?);
            progress.ok();
        }
        runs.push(ReadyRun { name, starts });
    }
    progress.idle();
    Ok(runs)
}

fn start_once(bin: &Path, name: &str, redis: &str) -> Result<Start, String> {
    let spawned = Instant::now();
    let (mut child, port, log) = spawn(bin, name, redis, "bench-ready")?;
    let ready = wait_ready(&mut child, &Target::local(port), spawned);
    let ready = match ready {
        Ok(d) => d,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{name}: {e}; its log:\n{}", tail(&log)));
        }
    };
    thread::sleep(IDLE);
    let idle_rss_kib = procs::mem(child.id()).map(|m| m.rss_kib);
    let stop = terminate(&mut child)?;
    let _ = std::fs::remove_file(&log);
    Ok(Start {
        ready,
        idle_rss_kib,
        stop,
    })
}

/// Starts the binary `bin` (service `name`) on a free port against
/// `redis`, as consumer `consumer`, its stderr in a temp log file.
pub fn spawn(
    bin: &Path,
    name: &str,
    redis: &str,
    consumer: &str,
) -> Result<(Child, u16, PathBuf), String> {
    let port = free_port()?;
    let log =
        std::env::temp_dir().join(format!("load-{consumer}-{}-{name}.log", std::process::id()));
    let stderr = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(bin)
        .env("REDIS_URL", redis)
        .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .env("CONSUMER_NAME", consumer)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {} (build with cargo build --release): {e}",
                bin.display()
            )
        })?;
    Ok((child, port, log))
}

pub fn wait_ready(
    child: &mut Child,
    target: &Target,
    spawned: Instant,
) -> Result<Duration, String> {
    let mut last = String::from("no answer");
    while spawned.elapsed() < READY_LIMIT {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status} before it was ready"));
        }
        // A fresh connection per probe: the first one is refused until the
        // service listens.
        match Client::new(ClientKind::Raw, target).get("/readyz") {
            Ok(200) => return Ok(spawned.elapsed()),
            Ok(status) => last = format!("/readyz answered {status}"),
            Err(e) => last = e,
        }
        thread::sleep(PROBE_PAUSE);
    }
    Err(format!("not ready after {READY_LIMIT:?} ({last})"))
}

/// SIGTERM, then waits for the exit; SIGKILL after [`STOP_LIMIT`].
pub fn terminate(child: &mut Child) -> Result<Duration, String> {
    let asked = Instant::now();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    while asked.elapsed() < STOP_LIMIT {
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(asked.elapsed());
        }
        thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!(
        "did not stop within {STOP_LIMIT:?} of SIGTERM (killed)"
    ))
}

pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

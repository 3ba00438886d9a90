//! Command-line flags. No parser crate: the flags are few, and `cargo bench`
//! appends `--bench` to every benchmark's arguments, which we must ignore.

use std::path::PathBuf;
use std::time::Duration;

use crate::client::{ClientKind, Target};

/// What `--help` prints.
pub const USAGE: &str = "\
usage: cargo bench --bench load -- <mode> [flags]

modes:
  all        R rounds of: reference, /order load + end-to-end drain, latency;
             prints every round, the medians, ratios and the targets
  reference  the machine's limits: a bare in-process tiny_http server loaded
             like /order, and raw XADD round trips (sequential, pipelined)
  load       N orders from C clients to /order, then waits until every group
             has consumed everything: requests/s, latency, end-to-end orders/s
  keyed      R rounds of two /order loads, without and with a fresh
             Idempotency-Key per request (order alternating by round):
             requests/s, p50/p99 of each and keyed / unkeyed
  latency    orders at a fixed rate; order -> payment-event latency
  ready      spawns each service binary from --bin-dir and times spawn ->
             first 200 on /readyz, idle RSS and SIGTERM -> exit
  rss        VmRSS and VmHWM of the running services
  wan        starts the services from --bin-dir itself, with a delay proxy of
             --redis-rtt-ms between them and --redis; then a load run and a
             latency run, CPU per order per process, and one table row

flags:
  --url URL          order-service base URL      [http://127.0.0.1:8080]
  --redis URL        Redis the services use      [redis://127.0.0.1:6379]
  -n N               requests per load run       [20000]
  -c C               concurrent clients          [16]
  --rate R           orders/s in latency mode    [200]
  --seconds S        latency mode duration       [10]
  --rounds R         rounds (all, reference, ready, keyed) [3]
  --client raw|ureq  HTTP client                 [raw]
  --workers W        bare tiny_http worker threads [number of CPUs]
  --pipeline B       XADDs per pipelined batch   [64]
  --keys none|fresh  load mode: no Idempotency-Key, or a fresh one per
                     request                     [none]
  --pids P,P,...     service pids for RSS        [found by /proc/*/comm]
  --bin-dir DIR      where the service binaries are (ready mode)
  --time-limit S     cap on any one phase        [120]
  --redis-rtt-ms MS  round trip the delay proxy adds (wan mode) [0: none]
  --redis-pid P      redis-server's pid, for its CPU (wan mode)

Traffic goes only to 127.0.0.1: other hosts are refused.
";

/// The mode, the first word that is not a flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Reference, system and latency runs, interleaved for R rounds.
    All,
    /// Bare tiny_http and raw XADD only.
    Reference,
    /// `/order` load and end-to-end drain.
    Load,
    /// `/order` without and with an `Idempotency-Key`, side by side.
    Keyed,
    /// Fixed-rate order -> payment latency.
    Latency,
    /// Spawn -> ready of each binary.
    Ready,
    /// Memory of the running services.
    Rss,
    /// Services started by the tool behind a delay proxy.
    Wan,
}

/// Every setting of a run. Built once by [`parse`], then read-only.
#[derive(Clone, Debug)]
pub struct Args {
    /// What to run.
    pub mode: Mode,
    /// order-service, always on 127.0.0.1.
    pub target: Target,
    /// Redis URL, checked to point at this host.
    pub redis: String,
    /// Requests per load run (`-n`).
    pub requests: usize,
    /// Concurrent clients (`-c`).
    pub clients: usize,
    /// Orders per second in latency mode.
    pub rate: u64,
    /// Latency mode duration.
    pub seconds: u64,
    /// Rounds for `all`, `reference` and `ready`.
    pub rounds: usize,
    /// Which HTTP client the load threads use.
    pub client: ClientKind,
    /// Worker threads of the bare tiny_http server.
    pub workers: usize,
    /// XADDs per pipelined batch.
    pub pipeline: usize,
    /// Whether `load` sends a fresh `Idempotency-Key` with every request.
    pub fresh_keys: bool,
    /// Service pids given with `--pids`; empty means "look them up".
    pub pids: Vec<u32>,
    /// Directory of the service binaries (ready mode).
    pub bin_dir: Option<PathBuf>,
    /// Upper bound on the duration of any one phase.
    pub time_limit: Duration,
    /// Round trip added between the services and Redis (wan mode).
    pub redis_rtt: Duration,
    /// redis-server's pid, for its CPU time (wan mode).
    pub redis_pid: Option<u32>,
}

impl Default for Args {
    fn default() -> Args {
        Args {
            mode: Mode::All,
            target: Target::local(8080),
            redis: "redis://127.0.0.1:6379".to_string(),
            requests: 20_000,
            clients: 16,
            rate: 200,
            seconds: 10,
            rounds: 3,
            client: ClientKind::Raw,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            pipeline: 64,
            fresh_keys: false,
            pids: Vec::new(),
            bin_dir: None,
            time_limit: Duration::from_secs(120),
            redis_rtt: Duration::ZERO,
            redis_pid: None,
        }
    }
}

/// Parses the arguments (without the program name). `Ok(None)` means: print
/// the usage and exit successfully (`--help`, or no mode, as with a plain
/// `cargo bench` that runs every benchmark).
pub fn parse(argv: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
    let mut args = Args::default();
    let mut mode = None;
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bench" => {}
            "-h" | "--help" => return Ok(None),
            flag if flag.starts_with('-') => {
                let value = it
                    .next()
                    .ok_or_else(|| format!("{flag} needs a value (see --help)"))?;
                set_flag(&mut args, flag, &value)?;
            }
            word if mode.is_none() => mode = Some(parse_mode(word)?),
            word => return Err(format!("unexpected argument {word:?} (see --help)")),
        }
    }
    let Some(mode) = mode else { return Ok(None) };
    args.mode = mode;
    validate(&args)?;
    Ok(Some(args))
}

fn parse_mode(word: &str) -> Result<Mode, String> {
    Ok(match word {
        "all" => Mode::All,
        "reference" => Mode::Reference,
        "load" => Mode::Load,
        "keyed" => Mode::Keyed,
        "latency" => Mode::Latency,
        "ready" => Mode::Ready,
        "rss" => Mode::Rss,
        "wan" => Mode::Wan,
        _ => return Err(format!("unknown mode {word:?} (see --help)")),
    })
}

fn set_flag(args: &mut Args, flag: &str, value: &str) -> Result<(), String> {
    match flag {
        "--url" => args.target = Target::parse(value)?,
        "--redis" => args.redis = local_redis(value)?,
        "-n" | "--requests" => args.requests = number(flag, value)?,
        "-c" | "--clients" => args.clients = number(flag, value)?,
        "--rate" => args.rate = number(flag, value)?,
        "--seconds" => args.seconds = number(flag, value)?,
        "--rounds" => args.rounds = number(flag, value)?,
        "--client" => args.client = ClientKind::parse(value)?,
        "--workers" => args.workers = number(flag, value)?,
        "--pipeline" => args.pipeline = number(flag, value)?,
        "--keys" => {
            args.fresh_keys = match value {
                "none" => false,
                "fresh" => true,
                _ => return Err(format!("--keys wants none or fresh, not {value:?}")),
            }
        }
        "--pids" => args.pids = pids(value)?,
        "--bin-dir" => args.bin_dir = Some(PathBuf::from(value)),
        "--time-limit" => args.time_limit = Duration::from_secs(number(flag, value)?),
        "--redis-rtt-ms" => args.redis_rtt = Duration::from_millis(number(flag, value)?),
        "--redis-pid" => args.redis_pid = Some(number(flag, value)?),
        _ => return Err(format!("unknown flag {flag} (see --help)")),
    }
    Ok(())
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag} wants a whole number, not {value:?}"))
}

fn pids(value: &str) -> Result<Vec<u32>, String> {
    value
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| number("--pids", p.trim()))
        .collect()
}

fn validate(args: &Args) -> Result<(), String> {
    let checks = [
        (args.requests >= 1, "-n must be at least 1"),
        ((1..=1024).contains(&args.clients), "-c must be 1..=1024"),
        (
            (1..=100_000).contains(&args.rate),
            "--rate must be 1..=100000",
        ),
        (
            (1..=3600).contains(&args.seconds),
            "--seconds must be 1..=3600",
        ),
        ((1..=100).contains(&args.rounds), "--rounds must be 1..=100"),
        (
            (1..=256).contains(&args.workers),
            "--workers must be 1..=256",
        ),
        (
            (1..=10_000).contains(&args.pipeline),
            "--pipeline must be 1..=10000",
        ),
        (
            !args.time_limit.is_zero(),
            "--time-limit must be at least 1",
        ),
        (
            args.redis_rtt <= Duration::from_secs(1),
            "--redis-rtt-ms must be 0..=1000",
        ),
    ];
    match checks.iter().find(|(ok, _)| !ok) {
        Some((_, msg)) => Err((*msg).to_string()),
        None => Ok(()),
    }
}

/// Accepts `redis://` or `rediss://` URLs whose host is this machine.
fn local_redis(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .ok_or_else(|| format!("--redis wants redis://HOST:PORT, not {url:?}"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    if is_local_host(host) {
        Ok(url.to_string())
    } else {
        Err(format!(
            "--redis {url:?}: this tool only talks to 127.0.0.1 (got host {host:?})"
        ))
    }
}

/// The address of a (local, see [`parse`]) Redis URL, for the delay proxy.
pub fn redis_addr(url: &str) -> Result<std::net::SocketAddr, String> {
    let (_, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host_port = host_port.replacen("localhost", "127.0.0.1", 1);
    let with_port = if host_port.contains(':') {
        host_port
    } else {
        format!("{host_port}:6379")
    };
    with_port
        .parse()
        .map_err(|_| format!("--redis {url:?}: cannot tell its address"))
}

/// `url` with its host and port replaced by `addr` (user, password and
/// database kept).
pub fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let user = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    let path = if path.is_empty() {
        String::new()
    } else {
        format!("/{path}")
    };
    format!("{scheme}://{}{addr}{path}", user.unwrap_or_default())
}

/// Hosts that name this machine's IPv4 loopback.
pub fn is_local_host(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost")
}

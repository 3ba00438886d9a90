//! The load tool: `cargo bench --bench load -- <mode> [flags]`.
//!
//! It measures the three services from the outside, through the wire
//! contract only (`GET /order`, the streams and groups in Redis), and
//! measures the machine's own limits in the same run (a bare tiny_http
//! server, raw `XADD`s), so results read as ratios that mean something on
//! any machine. See `--help` and BENCHMARKS.md.
//!
//! One file per idea under `benches/load/` (a crate root's modules live
//! beside it, hence the `#[path]`s): [`args`], the HTTP [`client`],
//! the closed-loop [`drive`]r, the [`reference`] runs, the [`system`] run
//! and its drain, the [`latency`] run, [`ready`] (start-to-ready),
//! [`procs`] (memory and CPU), [`progress`], [`stats`] and [`report`]
//! (its Markdown tables are streamctl's [`table`], the same file);
//! for mode `wan`, the [`delay`] proxy and the services it [`spawn`]s.

#[path = "load/args.rs"]
mod args;
#[path = "load/client.rs"]
mod client;
#[path = "load/delay.rs"]
mod delay;
#[path = "load/drive.rs"]
mod drive;
#[path = "load/latency.rs"]
mod latency;
#[path = "load/procs.rs"]
mod procs;
#[path = "load/progress.rs"]
mod progress;
#[path = "load/ready.rs"]
mod ready;
#[path = "load/reference.rs"]
mod reference;
#[path = "load/report.rs"]
mod report;
#[path = "load/spawn.rs"]
mod spawn;
#[path = "load/stats.rs"]
mod stats;
#[path = "load/system.rs"]
mod system;
// The table renderer is streamctl's own file (std only), so the two
// tools cannot drift apart.
#[path = "../src/bin/streamctl/table.rs"]
mod table;

use std::process::ExitCode;

use args::{Args, Mode};
use procs::{Mem, Proc};
use progress::Progress;
use report::Round;

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<(), String> {
    let Some(args) = args::parse(std::env::args().skip(1))? else {
        print!("{}", args::USAGE);
        return Ok(());
    };
    let progress = Progress::start();
    match args.mode {
        Mode::All => all(&args, &progress),
        Mode::Reference => reference(&args, &progress),
        Mode::Load => load(&args, &progress),
        Mode::Keyed => keyed(&args, &progress),
        Mode::Latency => latency(&args, &progress),
        Mode::Ready => ready(&args, &progress),
        Mode::Wan => wan(&args, &progress),
        Mode::Rss => {
            let procs = procs::services(&args.pids);
            report::memory(&procs, &memory(&procs), &memory(&procs));
            Ok(())
        }
    }
}

/// Reference, system and latency runs, interleaved for `--rounds` rounds.
/// On a failure, the rounds done so far are printed before the error.
fn all(args: &Args, progress: &Progress) -> Result<(), String> {
    system::preflight(args)?;
    report::settings(args);
    let procs = procs::services(&args.pids);
    let before = memory(&procs);
    let mut rounds = Vec::with_capacity(args.rounds);
    let mut failure = None;
    for r in 1..=args.rounds {
        progress.round(format!("round {r}/{}", args.rounds));
        match one_round(args, progress) {
            Ok(round) => rounds.push(round),
            Err(e) => {
                failure = Some(format!("round {r}: {e}"));
                break;
            }
        }
    }
    progress.idle();
    let after = memory(&procs);
    report::throughput(&rounds);
    let latencies: Vec<_> = rounds.iter().filter_map(|r| r.latency.as_ref()).collect();
    report::latency(args, &latencies);
    report::memory(&procs, &before, &after);
    report::targets(&rounds, &before, &after);
    failure.map_or(Ok(()), Err)
}

fn one_round(args: &Args, progress: &Progress) -> Result<Round, String> {
    let bare = reference::bare_http(args, progress)?;
    reference::settle();
    let xadd = reference::xadd(args, progress)?;
    let system = system::run(args, progress)?;
    reference::settle();
    let latency = latency::run(args, progress)?;
    Ok(Round {
        bare: Some(bare),
        xadd: Some(xadd),
        system: Some(system),
        latency: Some(latency),
    })
}

fn reference(args: &Args, progress: &Progress) -> Result<(), String> {
    report::settings(args);
    let mut rounds = Vec::with_capacity(args.rounds);
    for r in 1..=args.rounds {
        progress.round(format!("round {r}/{}", args.rounds));
        let bare = reference::bare_http(args, progress)?;
        reference::settle();
        let xadd = reference::xadd(args, progress)?;
        rounds.push(Round {
            bare: Some(bare),
            xadd: Some(xadd),
            ..Round::default()
        });
    }
    progress.idle();
    report::reference(&rounds);
    Ok(())
}

fn load(args: &Args, progress: &Progress) -> Result<(), String> {
    system::preflight(args)?;
    report::settings(args);
    let procs = procs::services(&args.pids);
    let before = memory(&procs);
    let prefix = format!("load-{}", run_id());
    let keys = args.fresh_keys.then_some(prefix.as_str());
    let run = system::run_with_keys(args, progress, keys)?;
    report::system(&run);
    report::memory(&procs, &before, &memory(&procs));
    Ok(())
}

/// `/order` without and with a fresh `Idempotency-Key` per request, for
/// `--rounds` rounds; which goes first alternates, so a drift of the
/// machine's state within a round favours neither.
fn keyed(args: &Args, progress: &Progress) -> Result<(), String> {
    system::preflight(args)?;
    report::settings(args);
    let run_id = run_id();
    let mut pairs = Vec::with_capacity(args.rounds);
    for r in 1..=args.rounds {
        progress.round(format!("round {r}/{}", args.rounds));
        let prefix = format!("load-{run_id}-{r}");
        let mut plain = None;
        let mut keyed = None;
        for keyed_turn in [r % 2 == 0, r % 2 == 1] {
            let run = if keyed_turn {
                system::run_with_keys(args, progress, Some(&prefix))
            } else {
                system::run(args, progress)
            };
            let run = run.map_err(|e| format!("round {r}: {e}"))?;
            if keyed_turn {
                keyed = Some(run);
            } else {
                plain = Some(run);
            }
            reference::settle();
        }
        if let (Some(plain), Some(keyed)) = (plain, keyed) {
            pairs.push((plain, keyed));
        }
    }
    progress.idle();
    report::keyed(&pairs);
    Ok(())
}

/// Milliseconds since the epoch: makes the keys of one invocation unique,
/// so a rerun within IDEMPOTENCY_TTL_S never replays an earlier run's.
fn run_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn latency(args: &Args, progress: &Progress) -> Result<(), String> {
    system::preflight(args)?;
    report::settings(args);
    let run = latency::run(args, progress)?;
    report::latency(args, &[&run]);
    Ok(())
}

fn ready(args: &Args, progress: &Progress) -> Result<(), String> {
    let runs = ready::run(args, progress)?;
    report::ready(&runs);
    Ok(())
}

/// Starts the services behind a delay proxy of `--redis-rtt-ms`, then a
/// load run and a latency run against them, with the CPU time each process
/// (services and, given `--redis-pid`, Redis) spent per order of the load.
fn wan(args: &Args, progress: &Progress) -> Result<(), String> {
    let bin_dir = args
        .bin_dir
        .as_deref()
        .ok_or("wan needs --bin-dir (for example target/release)")?;
    let proxy;
    let service_url = if args.redis_rtt.is_zero() {
        args.redis.clone()
    } else {
        proxy = delay::DelayProxy::start(args::redis_addr(&args.redis)?, args.redis_rtt)?;
        args::via(&args.redis, proxy.addr)
    };
    let rtt = if args.redis_rtt.is_zero() {
        None
    } else {
        Some(ping_rtt(&service_url)?)
    };
    progress.phase("starting the services", 0);
    let services = spawn::Services::start(bin_dir, &service_url)?;
    let mut run_args = args.clone();
    run_args.target = services.target.clone();
    run_args.pids = services.pids();
    report::settings(&run_args);
    let mut pids: Vec<(String, u32)> = procs::SERVICES
        .iter()
        .map(|s| s.to_string())
        .zip(run_args.pids.iter().copied())
        .collect();
    pids.extend(args.redis_pid.map(|p| ("redis-server".to_string(), p)));
    let cpu = |pids: &[(String, u32)]| -> Vec<Option<std::time::Duration>> {
        pids.iter().map(|(_, p)| procs::cpu(*p)).collect()
    };
    let before = cpu(&pids);
    let system = system::run(&run_args, progress)?;
    let after = cpu(&pids);
    let latency = latency::run(&run_args, progress)?;
    progress.idle();
    report::system(&system);
    report::latency(&run_args, &[&latency]);
    let per_order: Vec<(String, Option<f64>)> = pids
        .iter()
        .zip(before.iter().zip(&after))
        .map(|((name, _), (b, a))| {
            let us = match (b, a) {
                (Some(b), Some(a)) => {
                    Some((*a - *b).as_secs_f64() * 1e6 / system.http.ok.max(1) as f64)
                }
                _ => None,
            };
            (name.clone(), us)
        })
        .collect();
    report::wan(&run_args, rtt, &system, &latency, &per_order);
    drop(services);
    Ok(())
}

/// The round trip the services see through the delay proxy: the median of
/// 21 `PING`s on one connection (the proxy's forwarding adds to its delay).
fn ping_rtt(url: &str) -> Result<std::time::Duration, String> {
    let mut conn = system::redis_connect(url)?;
    let mut took = Vec::new();
    for _ in 0..22 {
        let sent = std::time::Instant::now();
        redis::cmd("PING")
            .query::<String>(&mut conn)
            .map_err(|e| format!("PING through the delay proxy: {e}"))?;
        took.push(sent.elapsed());
    }
    // The first opened the way; the median of the rest.
    let mut rest = took.split_off(1);
    rest.sort();
    Ok(rest[rest.len() / 2])
}

fn memory(procs: &[Proc]) -> Vec<Option<Mem>> {
    procs.iter().map(|p| procs::mem(p.pid)).collect()
}

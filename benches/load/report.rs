//! Printing results: Markdown tables (readable in a terminal, pasteable
//! into BENCHMARKS.md), medians over rounds, and the targets of the issue.

use std::time::Duration;

use crate::args::Args;
use crate::drive::Outcome;
use crate::latency::LatencyRun;
use crate::procs::{Mem, Proc};
use crate::ready::ReadyRun;
use crate::reference::XaddRates;
use crate::stats::{self, median, mib, ms, per_sec, ratio};
use crate::system::SystemRun;
use crate::table::Table;

/// What one round of `all` (or `reference`) measured.
#[derive(Default)]
pub struct Round {
    /// The bare tiny_http server under the same load.
    pub bare: Option<Outcome>,
    /// Raw XADD round trips.
    pub xadd: Option<XaddRates>,
    /// `/order` and the drain.
    pub system: Option<SystemRun>,
    /// Order -> payment latency.
    pub latency: Option<LatencyRun>,
}

impl Round {
    fn bare_rps(&self) -> f64 {
        self.bare.as_ref().map_or(f64::NAN, Outcome::rps)
    }
    fn order_rps(&self) -> f64 {
        self.system.as_ref().map_or(f64::NAN, |s| s.http.rps())
    }
    fn e2e(&self) -> f64 {
        self.system.as_ref().map_or(f64::NAN, SystemRun::e2e_rate)
    }
    fn pay_p99_ms(&self) -> f64 {
        self.latency
            .as_ref()
            .map_or(f64::NAN, |l| l.payment.p99.as_secs_f64() * 1e3)
    }
}

/// The settings line printed before any result.
pub fn settings(args: &Args) {
    println!(
        "load: -n {} -c {} --client {} --workers {} --pipeline {} --rate {} --seconds {} \
         --url {} --redis {}\n",
        args.requests,
        args.clients,
        args.client.name(),
        args.workers,
        args.pipeline,
        args.rate,
        args.seconds,
        args.target.base,
        args.redis
    );
}

/// The throughput table: reference, system, ratios; one row per round and
/// the medians.
pub fn throughput(rounds: &[Round]) {
    println!("Throughput (requests/s of 200 answers; e2e = accepted orders / (first request -> all groups done))\n");
    let mut t = Table::new(&[
        "round",
        "bare rps",
        "XADD seq/s",
        "XADD pipe/s",
        "/order rps",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "failed",
        "e2e/s",
        "/order÷bare",
        "e2e÷bare",
    ]);
    for (i, r) in rounds.iter().enumerate() {
        t.row(throughput_row((i + 1).to_string(), r));
    }
    if rounds.len() > 1 {
        t.row(median_row(rounds));
    }
    println!("{}", t.markdown());
}

fn throughput_row(label: String, r: &Round) -> Vec<String> {
    let xadd = |f: fn(&XaddRates) -> f64| r.xadd.as_ref().map_or(f64::NAN, f);
    let http = r.system.as_ref().map(|s| &s.http);
    let lat = |f: fn(&Outcome) -> std::time::Duration| http.map_or("-".into(), |o| ms(f(o)));
    vec![
        label,
        per_sec(r.bare_rps()),
        per_sec(xadd(|x| x.sequential)),
        per_sec(xadd(|x| x.pipelined)),
        per_sec(r.order_rps()),
        lat(|o| o.latency.p50),
        lat(|o| o.latency.p99),
        lat(|o| o.latency.p999),
        http.map_or("-".into(), |o| o.failed.to_string()),
        per_sec(r.e2e()),
        ratio(r.order_rps() / r.bare_rps()),
        ratio(r.e2e() / r.bare_rps()),
    ]
}

fn median_row(rounds: &[Round]) -> Vec<String> {
    let m = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f));
    let lat = |f: &dyn Fn(&Outcome) -> std::time::Duration| {
        let v = m(&|r| {
            r.system
                .as_ref()
                .map_or(f64::NAN, |s| f(&s.http).as_secs_f64() * 1e3)
        });
        if v.is_finite() {
            format!("{v:.3}")
        } else {
            "-".into()
        }
    };
    vec![
        "median".into(),
        per_sec(m(&Round::bare_rps)),
        per_sec(m(&|r| r.xadd.map_or(f64::NAN, |x| x.sequential))),
        per_sec(m(&|r| r.xadd.map_or(f64::NAN, |x| x.pipelined))),
        per_sec(m(&Round::order_rps)),
        lat(&|o| o.latency.p50),
        lat(&|o| o.latency.p99),
        lat(&|o| o.latency.p999),
        per_sec(m(&|r| {
            r.system.as_ref().map_or(f64::NAN, |s| s.http.failed as f64)
        })),
        per_sec(m(&Round::e2e)),
        ratio(m(&|r| r.order_rps() / r.bare_rps())),
        ratio(m(&|r| r.e2e() / r.bare_rps())),
    ]
}

/// The reference table alone (mode `reference`).
pub fn reference(rounds: &[Round]) {
    println!("Reference (bare tiny_http loaded like /order; raw XADD on one connection)\n");
    let mut t = Table::new(&[
        "round",
        "bare rps",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "XADD seq/s",
        "XADD pipe/s",
    ]);
    for (i, r) in rounds.iter().enumerate() {
        let b = r.bare.as_ref();
        let lat = |f: fn(&Outcome) -> std::time::Duration| b.map_or("-".into(), |o| ms(f(o)));
        t.row(vec![
            (i + 1).to_string(),
            per_sec(r.bare_rps()),
            lat(|o| o.latency.p50),
            lat(|o| o.latency.p99),
            lat(|o| o.latency.p999),
            per_sec(r.xadd.map_or(f64::NAN, |x| x.sequential)),
            per_sec(r.xadd.map_or(f64::NAN, |x| x.pipelined)),
        ]);
    }
    if rounds.len() > 1 {
        let m = |f: &dyn Fn(&Round) -> f64| per_sec(median(rounds.iter().map(f)));
        t.row(vec![
            "median".into(),
            m(&Round::bare_rps),
            "".into(),
            "".into(),
            "".into(),
            m(&|r| r.xadd.map_or(f64::NAN, |x| x.sequential)),
            m(&|r| r.xadd.map_or(f64::NAN, |x| x.pipelined)),
        ]);
    }
    println!("{}", t.markdown());
}

/// One system run (mode `load`).
pub fn system(run: &SystemRun) {
    let h = &run.http;
    println!(
        "/order: {} ok, {} failed in {:.3} s: {} requests/s",
        h.ok,
        h.failed,
        h.elapsed.as_secs_f64(),
        per_sec(h.rps())
    );
    println!(
        "        latency p50 {} ms, p99 {} ms, p999 {} ms, max {} ms",
        ms(h.latency.p50),
        ms(h.latency.p99),
        ms(h.latency.p999),
        ms(h.latency.max)
    );
    if let Some(e) = &h.first_error {
        println!("        first failure: {e}");
    }
    println!(
        "end-to-end: {} orders/s (first request -> all groups done in {:.3} s); \
         order-events +{}, payment-events +{}",
        per_sec(run.e2e_rate()),
        run.e2e.as_secs_f64(),
        run.orders,
        run.payments
    );
    if run.payments != h.ok as u64 || run.orders != h.ok as u64 {
        println!(
            "        note: entries added differ from the {} accepted orders",
            h.ok
        );
    }
    println!();
}

/// The keyed table (mode `keyed`): each round's `/order` without and with
/// an `Idempotency-Key`, the ratio, the medians, and the target.
pub fn keyed(pairs: &[(SystemRun, SystemRun)]) {
    println!(
        "/order without and with a fresh Idempotency-Key per request (requests/s of 200 answers)\n"
    );
    let mut t = Table::new(&[
        "round",
        "unkeyed rps",
        "p50 ms",
        "p99 ms",
        "keyed rps",
        "p50 ms",
        "p99 ms",
        "failed",
        "keyed÷unkeyed",
    ]);
    for (i, (plain, keyed)) in pairs.iter().enumerate() {
        let (p, k) = (&plain.http, &keyed.http);
        t.row(vec![
            (i + 1).to_string(),
            per_sec(p.rps()),
            ms(p.latency.p50),
            ms(p.latency.p99),
            per_sec(k.rps()),
            ms(k.latency.p50),
            ms(k.latency.p99),
            (p.failed + k.failed).to_string(),
            ratio(k.rps() / p.rps()),
        ]);
    }
    let m = |f: &dyn Fn(&(SystemRun, SystemRun)) -> f64| median(pairs.iter().map(f));
    let msf = |v: f64| format!("{:.3}", v * 1e3);
    let share = m(&|(p, k)| k.http.rps() / p.http.rps());
    if pairs.len() > 1 {
        t.row(vec![
            "median".into(),
            per_sec(m(&|(p, _)| p.http.rps())),
            msf(m(&|(p, _)| p.http.latency.p50.as_secs_f64())),
            msf(m(&|(p, _)| p.http.latency.p99.as_secs_f64())),
            per_sec(m(&|(_, k)| k.http.rps())),
            msf(m(&|(_, k)| k.http.latency.p50.as_secs_f64())),
            msf(m(&|(_, k)| k.http.latency.p99.as_secs_f64())),
            "".into(),
            ratio(share),
        ]);
    }
    println!("{}", t.markdown());
    for (i, (p, k)) in pairs.iter().enumerate() {
        for (what, run) in [("unkeyed", p), ("keyed", k)] {
            if let Some(e) = &run.http.first_error {
                println!("round {}, {what}: first failure: {e}", i + 1);
            }
        }
    }
    let verdict = if share >= 0.85 { "met" } else { "missed" };
    println!(
        "target: keyed /order rps >= 0.85 x unkeyed: {} x, {verdict}\n",
        ratio(share)
    );
}

/// The latency table, one row per run and the medians.
pub fn latency(args: &Args, runs: &[&LatencyRun]) {
    println!(
        "Order -> payment-event latency at {}/s for {} s (request sent -> entry seen by XREAD BLOCK)\n",
        args.rate, args.seconds
    );
    let mut t = Table::new(&[
        "round",
        "sent",
        "accepted",
        "matched",
        "late",
        "rate/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "http p99 ms",
    ]);
    for (i, l) in runs.iter().enumerate() {
        t.row(vec![
            (i + 1).to_string(),
            l.sent.to_string(),
            l.accepted.to_string(),
            l.matched.to_string(),
            l.late.to_string(),
            format!("{:.1}", l.rate),
            ms(l.payment.p50),
            ms(l.payment.p99),
            ms(l.payment.max),
            ms(l.http.p99),
        ]);
    }
    if runs.len() > 1 {
        let m = |f: &dyn Fn(&LatencyRun) -> std::time::Duration| {
            format!(
                "{:.3}",
                median(runs.iter().map(|l| f(l).as_secs_f64() * 1e3))
            )
        };
        let mut row = vec!["median".to_string()];
        row.extend(["", "", "", "", ""].map(String::from));
        row.extend([
            m(&|l| l.payment.p50),
            m(&|l| l.payment.p99),
            m(&|l| l.payment.max),
            m(&|l| l.http.p99),
        ]);
        t.row(row);
    }
    println!("{}", t.markdown());
    for (i, l) in runs.iter().enumerate() {
        if let Some(e) = &l.first_error {
            println!("round {}: first failure: {e}", i + 1);
        }
    }
}

/// Memory of the services before and after.
pub fn memory(procs: &[Proc], before: &[Option<Mem>], after: &[Option<Mem>]) {
    if procs.is_empty() {
        println!("Memory: no service process found (give --pids, or run the binaries by name)\n");
        return;
    }
    println!("Memory (MiB, from /proc/<pid>/status)\n");
    let mut t = Table::new(&[
        "service",
        "pid",
        "VmRSS before",
        "VmHWM before",
        "VmRSS after",
        "VmHWM after",
    ]);
    let cell = |m: &Option<Mem>, f: fn(&Mem) -> u64| m.as_ref().map_or("-".into(), |m| mib(f(m)));
    for (i, p) in procs.iter().enumerate() {
        let (b, a) = (&before[i], &after[i]);
        t.row(vec![
            p.name.clone(),
            p.pid.to_string(),
            cell(b, |m| m.rss_kib),
            cell(b, |m| m.hwm_kib),
            cell(a, |m| m.rss_kib),
            cell(a, |m| m.hwm_kib),
        ]);
    }
    println!("{}", t.markdown());
}

/// Start-to-ready of every binary.
pub fn ready(runs: &[ReadyRun]) {
    println!("Start-to-ready (spawn -> first 200 on /readyz), idle RSS, SIGTERM -> exit\n");
    let mut t = Table::new(&[
        "service",
        "starts",
        "ready median ms",
        "ready max ms",
        "idle RSS MiB",
        "stop median ms",
    ]);
    for r in runs {
        let med = |f: fn(&crate::ready::Start) -> f64| median(r.starts.iter().map(f));
        let max_ready = r.starts.iter().map(|s| s.ready).max().unwrap_or_default();
        let rss = r.starts.iter().filter_map(|s| s.idle_rss_kib).max();
        t.row(vec![
            r.name.to_string(),
            r.starts.len().to_string(),
            format!("{:.2}", med(|s| s.ready.as_secs_f64() * 1e3)),
            format!("{:.2}", max_ready.as_secs_f64() * 1e3),
            rss.map_or("-".into(), mib),
            format!("{:.1}", med(|s| s.stop.as_secs_f64() * 1e3)),
        ]);
    }
    println!("{}", t.markdown());
    let worst = runs
        .iter()
        .flat_map(|r| r.starts.iter().map(|s| s.ready.as_secs_f64() * 1e3))
        .fold(0.0, f64::max);
    check(
        "start-to-ready ≤ 20 ms (worst start)",
        worst,
        20.0,
        false,
        "ms",
    );
}

/// The targets against the medians of `rounds` and the memory.
pub fn targets(rounds: &[Round], before: &[Option<Mem>], after: &[Option<Mem>]) {
    println!("Targets (medians over rounds)\n");
    check(
        "/order rps ≥ 0.6 × bare tiny_http",
        median(rounds.iter().map(|r| r.order_rps() / r.bare_rps())),
        0.6,
        true,
        "×",
    );
    check(
        "end-to-end ≥ 0.5 × bare tiny_http",
        median(rounds.iter().map(|r| r.e2e() / r.bare_rps())),
        0.5,
        true,
        "×",
    );
    check(
        "order→payment p99 ≤ 1.0 ms",
        median(rounds.iter().map(Round::pay_p99_ms)),
        1.0,
        false,
        "ms",
    );
    let worst = |m: &[Option<Mem>], f: fn(&Mem) -> u64| {
        m.iter()
            .flatten()
            .map(|m| f(m) as f64 / 1024.0)
            .fold(f64::NAN, f64::max)
    };
    check(
        "RSS per service ≤ 4 MiB idle (before load)",
        worst(before, |m| m.rss_kib),
        4.0,
        false,
        "MiB",
    );
    check(
        "RSS per service ≤ 32 MiB at load (VmHWM after)",
        worst(after, |m| m.hwm_kib),
        32.0,
        false,
        "MiB",
    );
    println!();
}

fn check(what: &str, value: f64, bound: f64, at_least: bool, unit: &str) {
    let verdict = match (value.is_finite(), at_least) {
        (false, _) => "not measured",
        (true, true) if value >= bound => "met",
        (true, false) if value <= bound => "met",
        _ => "MISSED",
    };
    println!("- {what}: {} {unit}: {verdict}", stats::ratio(value));
}

/// The header of [`wan`]'s row, for `scripts/bench.sh` to print once.
const WAN_HEADER: &str = "| RTT ms | PING ms | -c | /order req/s | c / PING | ratio | end-to-end orders/s | e2e / order | order -> payment p50 ms | 1.6 RTT + 1 ms | CPU us/order (order, payment, notification, redis) |";

/// One mode `wan` run as a Markdown row (prefixed `wan-row: ` so the bench
/// script can collect rows into one table) after a readable summary.
pub fn wan(
    args: &Args,
    ping: Option<Duration>,
    system: &SystemRun,
    latency: &LatencyRun,
    cpu_per_order: &[(String, Option<f64>)],
) {
    let rtt_ms = args.redis_rtt.as_secs_f64() * 1e3;
    let order = system.http.rps();
    // The closed-loop bound: each client has one order in flight, and an
    // order takes at least one round trip to Redis, as measured through
    // the proxy (its forwarding adds a little to the delay it is set to).
    let bound = match ping {
        Some(p) if !p.is_zero() => args.clients as f64 / p.as_secs_f64(),
        _ => f64::NAN,
    };
    let ping_ms = ping.map_or("-".to_string(), |p| format!("{:.1}", p.as_secs_f64() * 1e3));
    let cpu = cpu_per_order
        .iter()
        .map(|(_, us)| us.map_or("-".to_string(), |us| format!("{us:.0}")))
        .collect::<Vec<_>>()
        .join(" / ");
    let goal = if rtt_ms > 0.0 {
        format!("{:.1}", 1.6 * rtt_ms + 1.0)
    } else {
        "-".to_string()
    };
    println!("wan-header: {WAN_HEADER}");
    println!(
        "wan-row: | {rtt_ms:.0} | {ping_ms} | {} | {} | {} | {} | {} | {} | {} | {goal} | {cpu} |",
        args.clients,
        per_sec(order),
        per_sec(bound),
        ratio(order / bound),
        per_sec(system.e2e_rate()),
        ratio(system.e2e_rate() / order),
        ms(latency.payment.p50),
    );
    println!();
}

//! The system under load: `/order` requests, then the wait until every group
//! of the topology has consumed everything, read from `XINFO`.
//!
//! "Consumed everything" is: for every group of [`TOPOLOGY`], `pending` is 0
//! and the group has caught up with its stream (`lag` 0, or, where Redis
//! cannot tell the lag, `last-delivered-id` equal to the stream's
//! `last-generated-id`), and `payment-events` has received one entry per
//! accepted order. Entries are counted with `entries-added`, which trimming
//! does not lower (Redis 7; older servers fall back to the length).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use redis::streams::StreamInfoGroup;
use redis::{Connection, Value};
use streamline::topology::{ORDER_EVENTS, PAYMENT_EVENTS, TOPOLOGY};
use testkit::poll_for;
use testkit::stream::{is_no_such_key, parse_groups, parse_stream_info};

use crate::args::Args;
use crate::client::{Client, ClientKind, Target};
use crate::drive::{self, Outcome, Plan};
use crate::progress::Progress;
use crate::stats;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the drain is polled: the end-to-end time is known to this.
const POLL: Duration = Duration::from_millis(2);
/// A drain in which nothing moves for this long has failed.
const STALL: Duration = Duration::from_secs(15);

/// A connection to the (local) Redis with bounded reads and writes.
pub fn redis_connect(url: &str) -> Result<Connection, String> {
    let client = redis::Client::open(url).map_err(|e| format!("bad --redis {url:?}: {e}"))?;
    let conn = client
        .get_connection_with_timeout(CONNECT_TIMEOUT)
        .map_err(|e| {
            format!("cannot reach Redis at {url}: {e} (is redis-server running? see --redis)")
        })?;
    conn.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("Redis at {url}: {e}"))?;
    Ok(conn)
}

/// The path of one order: a few users, a hundred products, varied prices.
pub fn order_path(buf: &mut String, ticket: usize, client: usize) {
    let _ = write!(
        buf,
        "/order?userId=u{client}&productId=p{}&price={}",
        ticket % 100,
        100 + ticket % 900
    );
}

/// Checks that Redis, the groups and order-service are there, with a
/// message that says what to start when they are not.
pub fn preflight(args: &Args) -> Result<(), String> {
    let mut conn = redis_connect(&args.redis)?;
    let snap = Snapshot::take(&mut conn).map_err(|e| format!("{e} at {}", args.redis))?;
    let missing = snap.missing();
    if !missing.is_empty() {
        return Err(format!(
            "consumer groups missing at {}: {}; start the three services against \
             this Redis (they create the groups), or check --redis",
            args.redis,
            missing.join(", ")
        ));
    }
    check_order_service(&args.target)
}

fn check_order_service(target: &Target) -> Result<(), String> {
    let mut client = Client::new(ClientKind::Raw, target);
    match client.get("/readyz") {
        Ok(200) => Ok(()),
        Ok(404) => {
            eprintln!("note: {}/readyz answered 404; carrying on", target.base);
            Ok(())
        }
        Ok(status) => Err(format!(
            "order-service at {} is not ready: /readyz answered {status} {}",
            target.base,
            String::from_utf8_lossy(client.body()).trim()
        )),
        Err(e) => Err(format!(
            "order-service is not reachable at {}: {e}; start it, or see --url",
            target.base
        )),
    }
}

/// One group of the topology as `XINFO GROUPS` shows it.
#[derive(Clone, Debug)]
pub struct GroupState {
    /// The stream it reads.
    pub stream: &'static str,
    /// The group.
    pub group: &'static str,
    /// Delivered, not acknowledged; `None` when the group does not exist.
    pub pending: Option<u64>,
    /// Entries not yet delivered, when Redis knows.
    pub lag: Option<u64>,
    /// Nothing left to deliver.
    pub caught_up: bool,
}

/// The topology's streams and groups at one instant (one round trip).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Entries ever added to `order-events`.
    pub orders_added: u64,
    /// Entries ever added to `payment-events`.
    pub payments_added: u64,
    /// Every group of the topology.
    pub groups: Vec<GroupState>,
}

impl Snapshot {
    /// `XINFO STREAM` and `XINFO GROUPS` of every stream, pipelined.
    pub fn take(conn: &mut Connection) -> Result<Snapshot, String> {
        let mut pipe = redis::pipe();
        for spec in TOPOLOGY {
            pipe.cmd("XINFO").arg("STREAM").arg(spec.stream);
            pipe.cmd("XINFO").arg("GROUPS").arg(spec.stream);
        }
        let replies: Vec<Value> = pipe.query(conn).map_err(|e| {
            if is_no_such_key(&e) {
                format!(
                    "stream {ORDER_EVENTS} or {PAYMENT_EVENTS} does not exist (start the services)"
                )
            } else {
                format!("XINFO: {e}")
            }
        })?;
        let mut snap = Snapshot::default();
        for (spec, pair) in TOPOLOGY.iter().zip(replies.chunks(2)) {
            let [stream, groups] = pair else {
                return Err("XINFO: short reply".to_string());
            };
            let info = parse_stream_info(stream);
            match spec.stream {
                ORDER_EVENTS => snap.orders_added = info.added(),
                PAYMENT_EVENTS => snap.payments_added = info.added(),
                _ => {}
            }
            let groups = parse_groups(groups)?;
            for group in spec.groups {
                snap.groups.push(group_state(
                    spec.stream,
                    group,
                    &groups,
                    &info.last_generated_id,
                ));
            }
        }
        Ok(snap)
    }

    /// Every group exists, has caught up and has nothing pending.
    pub fn consumed(&self) -> bool {
        self.groups
            .iter()
            .all(|g| g.caught_up && g.pending == Some(0))
    }

    /// `stream/group` of the groups that do not exist.
    pub fn missing(&self) -> Vec<String> {
        self.groups
            .iter()
            .filter(|g| g.pending.is_none())
            .map(|g| format!("{}/{}", g.stream, g.group))
            .collect()
    }

    /// Lag plus pending over all groups: what is left to do.
    fn backlog(&self) -> u64 {
        self.groups
            .iter()
            .map(|g| g.lag.unwrap_or(0) + g.pending.unwrap_or(0))
            .sum()
    }

    /// Every group's lag and pending, for messages.
    pub fn describe(&self) -> String {
        let groups: Vec<String> = self
            .groups
            .iter()
            .map(|g| match (g.pending, g.lag) {
                (None, _) => format!("{}/{} missing", g.stream, g.group),
                (Some(p), Some(l)) => format!("{}/{} lag {l} pending {p}", g.stream, g.group),
                (Some(p), None) => format!(
                    "{}/{} lag ? (caught up: {}) pending {p}",
                    g.stream, g.group, g.caught_up
                ),
            })
            .collect();
        groups.join("; ")
    }
}

fn group_state(
    stream: &'static str,
    group: &'static str,
    groups: &[StreamInfoGroup],
    last_id: &str,
) -> GroupState {
    let found = groups.iter().find(|g| g.name == group);
    let lag = found.and_then(|g| g.lag).map(|n| n as u64);
    GroupState {
        stream,
        group,
        pending: found.map(|g| g.pending as u64),
        lag,
        caught_up: found.is_some_and(|g| lag == Some(0) || g.last_delivered_id == last_id),
    }
}

/// Polls [`Snapshot`]s every [`POLL`] until `done` holds; returns the
/// instant the reply that showed it arrived. Fails after `limit`, or when
/// nothing moved for [`STALL`].
pub fn poll_snapshots(
    conn: &mut Connection,
    what: &str,
    limit: Duration,
    progress: &Progress,
    done: impl Fn(&Snapshot) -> bool,
) -> Result<(Instant, Snapshot), String> {
    let start = Instant::now();
    let (mut moved, mut seen, mut last) = (start, None, None);
    let stalled = |moved: Instant, now: Instant, last: Option<&Snapshot>| {
        format!(
            "{what}: no progress for {:.0?} ({:.0?} in all): {}; \
             are payment-service and notification-service running?",
            now - moved,
            now - start,
            last.map(Snapshot::describe).unwrap_or_default()
        )
    };
    let polled = poll_for(limit, POLL, || {
        let snap = match Snapshot::take(conn) {
            Ok(snap) => snap,
            Err(e) => return Some(Err(e)),
        };
        let now = Instant::now();
        if done(&snap) {
            return Some(Ok((now, snap)));
        }
        let state = (snap.backlog(), snap.orders_added, snap.payments_added);
        if seen != Some(state) {
            (moved, seen) = (now, Some(state));
        }
        progress.relabel(format!("{what} (backlog {})", state.0));
        let stall = now - moved > STALL;
        last = Some(snap);
        stall.then(|| Err(stalled(moved, now, last.as_ref())))
    });
    polled.unwrap_or_else(|_| Err(stalled(moved, Instant::now(), last.as_ref())))
}

/// One `/order` load and its drain.
#[derive(Debug)]
pub struct SystemRun {
    /// The HTTP side.
    pub http: Outcome,
    /// First request sent -> every group done.
    pub e2e: Duration,
    /// Entries added to `order-events` during the run.
    pub orders: u64,
    /// Entries added to `payment-events` during the run.
    pub payments: u64,
}

impl SystemRun {
    /// Accepted orders per second, end to end.
    pub fn e2e_rate(&self) -> f64 {
        stats::rate(self.http.ok as u64, self.e2e)
    }
}

/// Waits for an idle system, sends `-n` orders from `-c` clients, and waits
/// until every group has consumed everything.
pub fn run(args: &Args, progress: &Progress) -> Result<SystemRun, String> {
    run_with_keys(args, progress, None)
}

/// [`run`], each request with a fresh `Idempotency-Key` (`<prefix>-<i>`)
/// when `key_prefix` is given.
pub fn run_with_keys(
    args: &Args,
    progress: &Progress,
    key_prefix: Option<&str>,
) -> Result<SystemRun, String> {
    let mut conn = redis_connect(&args.redis)?;
    progress.phase("waiting for an idle system", 0);
    let (_, base) = poll_snapshots(
        &mut conn,
        "waiting for an idle system",
        args.time_limit,
        progress,
        Snapshot::consumed,
    )?;
    let plan = Plan {
        requests: args.requests,
        clients: args.clients,
        kind: args.client,
        target: &args.target,
        limit: args.time_limit,
        key_prefix,
    };
    let what = if key_prefix.is_some() {
        "/order with keys"
    } else {
        "/order"
    };
    progress.phase(what, args.requests as u64);
    let http = drive::run(&plan, &order_path, progress)?;
    if http.ok == 0 {
        progress.idle();
        let why = http.first_error.unwrap_or_default();
        return Err(format!("order-service accepted no order: {why}"));
    }
    let want = base.payments_added + http.ok as u64;
    progress.phase("draining", 0);
    let drained = poll_snapshots(&mut conn, "draining", args.time_limit, progress, |s| {
        s.consumed() && s.payments_added >= want
    });
    progress.idle();
    let (at, end) = drained?;
    Ok(SystemRun {
        e2e: at - http.started,
        orders: end.orders_added - base.orders_added,
        payments: end.payments_added - base.payments_added,
        http,
    })
}

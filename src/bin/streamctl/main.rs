//! `streamctl`, the operator's tool: what the streams, groups and dead
//! letters look like, and the few repairs that are safe to make by hand.
//! See `streamctl --help`.
//!
//! A run parses the command line ([`args`]), connects to Redis, runs one
//! subcommand — [`status`], [`pending`], [`dlq`] (list and redrive) or
//! [`trim`] — which gathers a report, and prints it ([`report`]: tables from
//! [`table`], or `--json`). It goes through the library the services use —
//! `streamline::topology` for what should exist, `streamline::dlq` for the
//! dead-letter format, `streamline::trim` for what may be removed — so the
//! tool and the services can never disagree about what a dead letter is or
//! what is safe to trim.
//!
//! Exit statuses ([`error`]): `0` on success, `1` when Redis fails (one line
//! saying what failed), `2` for a bad command line (one line naming the
//! problem).
#![forbid(unsafe_code)]

mod args;
mod dlq;
mod error;
mod help;
mod pending;
mod report;
mod status;
mod table;
mod trim;

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use redis::Connection;
use streamline::config::redact;
use streamline::connection::{Redis, COMMAND_TIMEOUT};

use crate::args::{Command, Invocation, Request};
use crate::error::Error;
use crate::report::emit;

/// The program's name, in messages.
const NAME: &str = "streamctl";
/// Read timeout for `trim`: a dry run reads every removable entry in one
/// script, which on a long stream takes longer than an ordinary command.
const TRIM_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs, and turns a failure into one line on stderr and its exit status.
fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        // `streamctl status | head`: the reader has what it wanted.
        Err(Error::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            let line = e.to_string().replace(['\r', '\n'], " ");
            eprintln!("{NAME}: {line}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Parses the real command line and environment, then prints the help, the
/// version, or the report of one subcommand.
fn try_main() -> Result<(), Error> {
    let request = match args::parse(std::env::args_os().skip(1), |k| std::env::var(k).ok())? {
        Invocation::Run(r) => r,
        Invocation::Help => return print(&help::help()),
        Invocation::Version => return print(&format!("{NAME} {}\n", env!("CARGO_PKG_VERSION"))),
    };
    run(&request, &mut io::stdout().lock())
}

fn print(text: &str) -> Result<(), Error> {
    // Nowhere to report a failed write of the help text; never panic on it.
    let _ = io::stdout().lock().write_all(text.as_bytes());
    Ok(())
}

/// Runs one request against Redis and writes its report to `out`.
fn run(req: &Request, out: &mut dyn Write) -> Result<(), Error> {
    let timeout = match req.command {
        Command::Trim { .. } => TRIM_TIMEOUT,
        _ => COMMAND_TIMEOUT,
    };
    let redis = Redis::open(&req.redis_url, req.ca_cert.as_deref()).map_err(Error::Client)?;
    let conn = &mut connect(&redis, req, timeout)?;
    let json = req.json;
    match &req.command {
        Command::Status { retain } => emit(
            &status::status(conn, &req.redis_url, *retain, redis.master())?,
            json,
            out,
        ),
        Command::Pending {
            stream,
            group,
            count,
        } => emit(&pending::pending(conn, stream, group, *count)?, json, out),
        Command::DlqList { stream, count } => {
            emit(&dlq::dlq_list(conn, stream, *count)?, json, out)
        }
        Command::DlqRedrive { stream, which } => {
            emit(&dlq::redrive(conn, stream, which)?, json, out)
        }
        Command::Trim { dry_run, retain } => emit(&trim::trim(conn, *dry_run, *retain)?, json, out),
    }
}

/// A connection that answered `PING`: the client connects lazily enough
/// that a refused password or a TLS problem would otherwise surface as the
/// failure of some later, unrelated command.
/// With a `redis+sentinel://` URL, the master the sentinels name (checked
/// with `ROLE`).
fn connect(redis: &Redis, req: &Request, read_timeout: Duration) -> Result<Connection, Error> {
    let unreachable = |source| Error::Unreachable {
        url: redact(&req.redis_url),
        source,
    };
    let mut conn = redis.connect(read_timeout).map_err(unreachable)?;
    redis::cmd("PING")
        .query::<String>(&mut conn)
        .map_err(unreachable)?;
    Ok(conn)
}

//! `streamctl`, the operator's tool: what the streams, groups and dead
//! letters look like, and the few repairs that are safe to make by hand.
//!
//! It goes through the modules the services use — [`topology`] for what
//! should exist, [`dlq`] for the dead-letter format, [`trim`] for what may be
//! removed — so the tool and the services can never disagree about what a
//! dead letter is or what is safe to trim.
//!
//! Every subcommand first gathers a report (a plain struct) and then prints
//! it, as aligned tables for a human or, with `--json`, as JSON for a script.
//! Because both come from the same struct, they always say the same thing.
//!
//! Exit statuses: `0` on success, `1` when Redis fails (one line saying what
//! failed), `2` for a bad command line (one line naming the problem).

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use redis::{Connection, IntoConnectionInfo, RedisError, Script, Value};
use serde::{Serialize, Serializer};

use crate::connection::{ConnectError, Redis, COMMAND_TIMEOUT};
use crate::record::Fields;
use crate::topology::{self, StreamSpec, TOPOLOGY};
use crate::{config, dlq, trim, value};

/// The program's name, in messages.
const NAME: &str = "streamctl";
/// Entries shown by `pending` and `dlq list` unless `--count` says otherwise.
const DEFAULT_COUNT: u64 = 20;
/// Read timeout for `trim`: a dry run reads every removable entry in one
/// script, which on a long stream takes longer than an ordinary command.
const TRIM_TIMEOUT: Duration = Duration::from_secs(60);
/// Dead letters read per round trip by `dlq redrive --all`.
const REDRIVE_BATCH: u64 = 100;

// ---------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// Print the help text and exit 0.
    Help,
    /// Print the version line and exit 0.
    Version,
    /// Run a subcommand against Redis.
    Run(Request),
}

/// A subcommand and everything it needs to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Where Redis is: `--redis-url`, else `REDIS_URL`, else the default.
    pub redis_url: String,
    /// CA certificate for `rediss://`: `--redis-ca-cert` or `REDIS_CA_CERT`.
    pub ca_cert: Option<PathBuf>,
    /// Print JSON instead of tables.
    pub json: bool,
    /// What to do.
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Every stream of the topology, its groups, consumers and dead letters.
    Status {
        /// Entries trimming keeps per stream (to tell what a group holds back).
        retain: u64,
    },
    /// The oldest pending entries of one group.
    Pending {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
        /// How many entries to show.
        count: u64,
    },
    /// The oldest dead letters of `<stream>:dlq`.
    DlqList {
        /// The stream whose dead letters are shown.
        stream: String,
        /// How many to show.
        count: u64,
    },
    /// Dead letters put back on their stream.
    DlqRedrive {
        /// The stream they go back to.
        stream: String,
        /// Which ones.
        which: Redrive,
    },
    /// Safe trimming of every stream of the topology.
    Trim {
        /// Only say what would be removed.
        dry_run: bool,
        /// Entries always kept per stream.
        retain: u64,
    },
}

/// Which dead letters `dlq redrive` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    /// These dead-letter IDs, in this order.
    Ids(Vec<String>),
    /// Every dead letter present when the command starts.
    All,
}

/// A command line that cannot be run. `Display` is one line naming the
/// problem; [`Error`] adds "see --help".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageError {
    /// An argument that is not UTF-8.
    NotUtf8(String),
    /// An option nobody knows.
    UnknownOption(String),
    /// An option given without its value.
    MissingValue(&'static str),
    /// A flag given a value (`--json=yes`).
    UnexpectedValue(&'static str),
    /// No subcommand.
    MissingCommand,
    /// A subcommand nobody knows.
    UnknownCommand(String),
    /// A subcommand without its arguments.
    MissingArgument {
        /// The subcommand.
        command: &'static str,
        /// What it needs.
        what: &'static str,
    },
    /// One argument too many.
    UnexpectedArgument(String),
    /// An option that the subcommand does not take.
    NotFor {
        /// The option.
        option: &'static str,
        /// The subcommand.
        command: &'static str,
    },
    /// A number that does not parse or is too small.
    BadNumber {
        /// The option or variable.
        option: &'static str,
        /// What was given.
        value: String,
        /// The smallest allowed value.
        min: u64,
    },
    /// A dead-letter ID that is not a full `ms-seq` stream ID.
    BadId(String),
    /// `dlq redrive` without `--id` or `--all`.
    IdsOrAll,
    /// `dlq redrive` with both `--id` and `--all`.
    IdsAndAll,
    /// A Redis URL the client refuses.
    BadUrl {
        /// The URL, password hidden.
        url: String,
        /// Why.
        reason: String,
    },
    /// A CA certificate file that does not exist.
    NoCaCert(PathBuf),
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use UsageError::*;
        match self {
            NotUtf8(arg) => write!(f, "argument {arg:?} is not valid UTF-8"),
            UnknownOption(opt) => write!(f, "unknown option {opt}"),
            MissingValue(opt) => write!(f, "option {opt} needs a value"),
            UnexpectedValue(opt) => write!(f, "option {opt} takes no value"),
            MissingCommand => write!(
                f,
                "no command given (status, pending, dlq list, dlq redrive, trim)"
            ),
            UnknownCommand(c) => write!(f, "unknown command {c:?}"),
            MissingArgument { command, what } => write!(f, "{command} needs {what}"),
            UnexpectedArgument(arg) => write!(f, "unexpected argument {arg:?}"),
            NotFor { option, command } => write!(f, "option {option} does not apply to {command}"),
            BadNumber { option, value, min } => write!(
                f,
                "{option} {value:?} is not a whole number of at least {min}"
            ),
            BadId(id) => write!(
                f,
                "{id:?} is not a full stream entry ID like 1700000000000-0"
            ),
            IdsOrAll => write!(f, "dlq redrive needs --id DLQ_ID (repeatable) or --all"),
            IdsAndAll => write!(f, "dlq redrive takes --id or --all, not both"),
            BadUrl { url, reason } => write!(f, "invalid Redis URL {url:?}: {reason}"),
            NoCaCert(path) => write!(f, "Redis CA certificate {}: no such file", path.display()),
        }
    }
}

impl std::error::Error for UsageError {}

/// An option: its name, whether it takes a value, and the subcommands it
/// applies to (`None`: all of them).
struct OptSpec {
    name: &'static str,
    takes_value: bool,
    commands: Option<&'static [&'static str]>,
}

/// Every option. Subcommand options are accepted anywhere on the line, then
/// checked against the subcommand, so `streamctl --count 5 pending s g` and
/// `streamctl pending s g --count 5` mean the same.
const OPTIONS: &[OptSpec] = &[
    OptSpec {
        name: "--redis-url",
        takes_value: true,
        commands: None,
    },
    OptSpec {
        name: "--redis-ca-cert",
        takes_value: true,
        commands: None,
    },
    OptSpec {
        name: "--json",
        takes_value: false,
        commands: None,
    },
    OptSpec {
        name: "--count",
        takes_value: true,
        commands: Some(&["pending", "dlq list"]),
    },
    OptSpec {
        name: "--id",
        takes_value: true,
        commands: Some(&["dlq redrive"]),
    },
    OptSpec {
        name: "--all",
        takes_value: false,
        commands: Some(&["dlq redrive"]),
    },
    OptSpec {
        name: "--dry-run",
        takes_value: false,
        commands: Some(&["trim"]),
    },
    OptSpec {
        name: "--retain",
        takes_value: true,
        commands: Some(&["trim", "status"]),
    },
];

/// The command line split into options and words, not yet interpreted.
#[derive(Debug, Default)]
struct Scanned {
    help: bool,
    version: bool,
    options: Vec<(&'static str, Option<String>)>,
    words: Vec<String>,
}

impl Scanned {
    /// The value of the last occurrence of `name` (later ones win).
    fn last(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Every value given to `name`, in order.
    fn all(&self, name: &str) -> Vec<&str> {
        self.options
            .iter()
            .filter(|(n, _)| *n == name)
            .filter_map(|(_, v)| v.as_deref())
            .collect()
    }

    fn has(&self, name: &str) -> bool {
        self.options.iter().any(|(n, _)| *n == name)
    }
}

/// Parses the command line (without the program name), reading the
/// environment through `env` so tests pass a map instead of touching the
/// process-global environment.
pub fn parse(
    args: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Invocation, UsageError> {
    let args = args
        .into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|a| UsageError::NotUtf8(a.to_string_lossy().into_owned()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let scanned = scan(args)?;
    if scanned.help {
        return Ok(Invocation::Help);
    }
    if scanned.version {
        return Ok(Invocation::Version);
    }
    // An empty variable counts as unset, as for the services.
    let env = |k: &str| env(k).filter(|v| !v.is_empty());
    let command = command(&scanned, &env)?;
    let redis_url = scanned
        .last("--redis-url")
        .map(str::to_string)
        .or_else(|| env("REDIS_URL"))
        .unwrap_or_else(|| setting_default("REDIS_URL").to_string());
    check_url(&redis_url)?;
    let ca_cert = scanned
        .last("--redis-ca-cert")
        .map(str::to_string)
        .or_else(|| env("REDIS_CA_CERT"))
        .map(PathBuf::from);
    if let Some(path) = ca_cert.as_ref().filter(|p| !p.is_file()) {
        return Err(UsageError::NoCaCert(path.clone()));
    }
    Ok(Invocation::Run(Request {
        redis_url,
        ca_cert,
        json: scanned.has("--json"),
        command,
    }))
}

/// Splits the arguments into options (with their values) and words.
fn scan(args: Vec<String>) -> Result<Scanned, UsageError> {
    let mut scanned = Scanned::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => scanned.help = true,
            "-V" | "--version" => scanned.version = true,
            "--" => scanned.words.extend(args.by_ref()),
            a if a.starts_with('-') && a.len() > 1 => {
                let option = option(a, &mut args)?;
                scanned.options.push(option);
            }
            _ => scanned.words.push(arg),
        }
    }
    Ok(scanned)
}

/// One option, `--name VALUE` or `--name=VALUE` (or a bare flag).
fn option(
    arg: &str,
    rest: &mut impl Iterator<Item = String>,
) -> Result<(&'static str, Option<String>), UsageError> {
    let (name, inline) = match arg.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (arg, None),
    };
    let spec = OPTIONS
        .iter()
        .find(|o| o.name == name)
        .ok_or_else(|| UsageError::UnknownOption(name.to_string()))?;
    match (spec.takes_value, inline) {
        (true, Some(v)) => Ok((spec.name, Some(v))),
        (true, None) => rest
            .next()
            .map(|v| (spec.name, Some(v)))
            .ok_or(UsageError::MissingValue(spec.name)),
        (false, None) => Ok((spec.name, None)),
        (false, Some(_)) => Err(UsageError::UnexpectedValue(spec.name)),
    }
}

/// The subcommand named by the words, with its arguments and options.
fn command(s: &Scanned, env: &dyn Fn(&str) -> Option<String>) -> Result<Command, UsageError> {
    let words: Vec<&str> = s.words.iter().map(String::as_str).collect();
    let (name, args): (&'static str, &[&str]) = match words.as_slice() {
        [] => return Err(UsageError::MissingCommand),
        ["status", rest @ ..] => ("status", rest),
        ["pending", rest @ ..] => ("pending", rest),
        ["trim", rest @ ..] => ("trim", rest),
        ["dlq"] => {
            return Err(UsageError::MissingArgument {
                command: "dlq",
                what: "list or redrive",
            })
        }
        ["dlq", "list", rest @ ..] => ("dlq list", rest),
        ["dlq", "redrive", rest @ ..] => ("dlq redrive", rest),
        ["dlq", other, ..] => return Err(UsageError::UnknownCommand(format!("dlq {other}"))),
        [other, ..] => return Err(UsageError::UnknownCommand(other.to_string())),
    };
    check_options(s, name)?;
    match name {
        "status" => positional::<0>(name, args, "").and_then(|[]| {
            Ok(Command::Status {
                retain: retain(s, env)?,
            })
        }),
        "pending" => {
            let [stream, group] = positional(name, args, "<stream> <group>")?;
            Ok(Command::Pending {
                stream: base_stream(stream),
                group: group.to_string(),
                count: count(s)?,
            })
        }
        "dlq list" => {
            let [stream] = positional(name, args, "<stream>")?;
            Ok(Command::DlqList {
                stream: base_stream(stream),
                count: count(s)?,
            })
        }
        "dlq redrive" => {
            let [stream] = positional(name, args, "<stream>")?;
            Ok(Command::DlqRedrive {
                stream: base_stream(stream),
                which: redrive_which(s)?,
            })
        }
        _ => {
            positional::<0>(name, args, "")?;
            Ok(Command::Trim {
                dry_run: s.has("--dry-run"),
                retain: retain(s, env)?,
            })
        }
    }
}

/// Refuses options that do not apply to `command`: a `--count` given to
/// `trim` is a mistake the user should hear about, not a silent no-op.
fn check_options(s: &Scanned, command: &'static str) -> Result<(), UsageError> {
    for (option, _) in &s.options {
        let spec = OPTIONS.iter().find(|o| o.name == *option);
        if let Some(commands) = spec.and_then(|o| o.commands) {
            if !commands.contains(&command) {
                return Err(UsageError::NotFor { option, command });
            }
        }
    }
    Ok(())
}

/// Exactly `N` positional arguments.
fn positional<'a, const N: usize>(
    command: &'static str,
    args: &[&'a str],
    what: &'static str,
) -> Result<[&'a str; N], UsageError> {
    match <[&str; N]>::try_from(args) {
        Ok(a) => Ok(a),
        Err(_) if args.len() < N => Err(UsageError::MissingArgument { command, what }),
        Err(_) => Err(UsageError::UnexpectedArgument(args[N].to_string())),
    }
}

/// The stream a dead-letter stream belongs to: `order-events:dlq` and
/// `order-events` both name `order-events`, so pasting the DLQ's key works.
fn base_stream(arg: &str) -> String {
    arg.strip_suffix(":dlq").unwrap_or(arg).to_string()
}

fn count(s: &Scanned) -> Result<u64, UsageError> {
    s.last("--count")
        .map_or(Ok(DEFAULT_COUNT), |v| number("--count", v, 1))
}

/// `--retain`, else `RETAIN_ENTRIES` (as the services read it), else the
/// services' default: the dry run then describes what they would do.
fn retain(s: &Scanned, env: &dyn Fn(&str) -> Option<String>) -> Result<u64, UsageError> {
    if let Some(v) = s.last("--retain") {
        return number("--retain", v, 0);
    }
    match env("RETAIN_ENTRIES") {
        Some(v) => number("RETAIN_ENTRIES", &v, 0),
        None => number("RETAIN_ENTRIES", setting_default("RETAIN_ENTRIES"), 0),
    }
}

fn number(option: &'static str, value: &str, min: u64) -> Result<u64, UsageError> {
    match value.trim().parse::<u64>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(UsageError::BadNumber {
            option,
            value: value.to_string(),
            min,
        }),
    }
}

fn redrive_which(s: &Scanned) -> Result<Redrive, UsageError> {
    let ids = s.all("--id");
    match (ids.is_empty(), s.has("--all")) {
        (true, false) => Err(UsageError::IdsOrAll),
        (false, true) => Err(UsageError::IdsAndAll),
        (true, true) => Ok(Redrive::All),
        (false, false) => ids
            .into_iter()
            .map(|id| {
                is_full_id(id)
                    .then(|| id.to_string())
                    .ok_or_else(|| UsageError::BadId(id.to_string()))
            })
            .collect::<Result<_, _>>()
            .map(Redrive::Ids),
    }
}

/// Whether `id` is a full `ms-seq` ID. A bare `ms` would be read by
/// `XRANGE id id` as every entry of that millisecond: redriving one dead
/// letter must never take several.
fn is_full_id(id: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    id.split_once('-')
        .is_some_and(|(ms, seq)| digits(ms) && digits(seq))
}

/// The default of a service setting: [`config::SETTINGS`] is the one place
/// defaults live, so the tool and the services cannot drift apart.
fn setting_default(var: &str) -> &'static str {
    config::SETTINGS
        .iter()
        .find(|s| s.var == var)
        .and_then(|s| s.default)
        .unwrap_or_default()
}

fn check_url(url: &str) -> Result<(), UsageError> {
    if crate::sentinel::is_sentinel_url(url) {
        return crate::sentinel::parse(url)
            .map(|_| ())
            .map_err(|reason| UsageError::BadUrl {
                url: redact(url),
                reason,
            });
    }
    url.into_connection_info()
        .map(|_| ())
        .map_err(|e| UsageError::BadUrl {
            url: redact(url),
            reason: e.to_string(),
        })
}

/// The `--help` text.
pub fn help() -> String {
    format!(
        "{NAME} {version}: inspect and repair the streamline streams

Usage: {NAME} [OPTIONS] <COMMAND>

Commands:
  status [--retain N]
      Every stream of the topology: length, first and last ID; per group its
      lag, pending count, entries read, last delivered ID and consumers
      (pending count, idle time); the length of each <stream>:dlq; and a
      group that holds trimming back (entries beyond the newest N it has not
      read or acknowledged; N as for trim).
  pending <stream> <group> [--count N]
      The oldest pending entries of a group: ID, consumer, idle time and
      delivery count (default: 20 entries).
  dlq list <stream> [--count N]
      The oldest dead letters of <stream>:dlq: dead-letter ID, original ID,
      group, error, deliveries and the original fields (default: 20).
  dlq redrive <stream> (--id DLQ_ID ... | --all)
      Puts dead letters back on <stream> with their original fields,
      removing each from <stream>:dlq in the same atomic step. A redriven
      entry is re-added as a NEW entry with a new ID, marked redriveGroup
      (the groups that gave up on it) and redrivenFrom (the ID first
      written): the other groups of <stream> acknowledge it without acting,
      and payment-service never pays an order twice.
      --all takes the dead letters present when it starts (an entry that
      fails again is dead-lettered anew and stays there).
  trim [--dry-run] [--retain N]
      Trims every stream of the topology as far as is safe: never an entry
      some group has not read and acknowledged, never the newest N
      (default: RETAIN_ENTRIES, else {retain}). With --dry-run, shows what
      would be removed, the MINID bound and why, and removes nothing.

Options:
  --redis-url URL        redis://[user:pass@]host:port[/db] or rediss://
                         [env REDIS_URL; default {url}]
  --redis-ca-cert PATH   PEM CA certificate for rediss:// [env REDIS_CA_CERT]
  --json                 machine-readable output (one JSON object)
  -h, --help             print this help
  -V, --version          print the version

Exit status: 0 success, 1 Redis failed, 2 bad usage.
",
        version = env!("CARGO_PKG_VERSION"),
        retain = setting_default("RETAIN_ENTRIES"),
        url = setting_default("REDIS_URL"),
    )
}

// ---------------------------------------------------------------------------
// Errors and the entry point
// ---------------------------------------------------------------------------

/// Why `streamctl` failed.
#[derive(Debug)]
pub enum Error {
    /// The command line is wrong (exit 2).
    Usage(UsageError),
    /// No client could be built from the URL and certificate (exit 2).
    Client(ConnectError),
    /// Redis could not be reached (exit 1).
    Unreachable {
        /// The URL, password hidden.
        url: String,
        /// What the client said.
        source: RedisError,
    },
    /// A Redis command failed (exit 1).
    Redis {
        /// The command, for the message.
        what: String,
        /// What Redis said.
        source: RedisError,
    },
    /// The stream or group named on the command line does not exist (exit 1).
    NoGroup {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
    },
    /// Writing to stdout failed (exit 1, or 0 for a closed pipe).
    Output(io::Error),
}

impl Error {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Client(_) => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(e) => write!(f, "{e}; see --help"),
            Error::Client(e) => write!(f, "{e}; see --help"),
            Error::Unreachable { url, source } => {
                write!(f, "cannot connect to Redis at {url}: {source}")
            }
            Error::Redis { what, source } => write!(f, "{what} failed: {source}"),
            Error::NoGroup { stream, group } => {
                write!(f, "no consumer group {group:?} on stream {stream:?}")
            }
            Error::Output(e) => write!(f, "cannot write the output: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Usage(e) => Some(e),
            Error::Client(e) => Some(e),
            Error::Unreachable { source, .. } | Error::Redis { source, .. } => Some(source),
            Error::NoGroup { .. } => None,
            Error::Output(e) => Some(e),
        }
    }
}

impl From<UsageError> for Error {
    fn from(e: UsageError) -> Self {
        Error::Usage(e)
    }
}

/// `streamctl` as a program: parses the real command line and environment,
/// runs, and turns the outcome into an exit status and a one-line message.
pub fn main() -> ExitCode {
    let request = match parse(std::env::args_os().skip(1), |k| std::env::var(k).ok()) {
        Ok(Invocation::Run(r)) => r,
        Ok(Invocation::Help) => return print_and_exit(&help()),
        Ok(Invocation::Version) => {
            return print_and_exit(&format!("{NAME} {}\n", env!("CARGO_PKG_VERSION")))
        }
        Err(e) => return fail(&Error::Usage(e)),
    };
    match run(&request, &mut io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        // `streamctl status | head`: the reader has what it wanted.
        Err(Error::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn print_and_exit(text: &str) -> ExitCode {
    // Nowhere to report a failed write of the help text; never panic on it.
    let _ = io::stdout().lock().write_all(text.as_bytes());
    ExitCode::SUCCESS
}

/// Prints `e` as one line on stderr and returns its exit status.
fn fail(e: &Error) -> ExitCode {
    let line = e.to_string().replace(['\r', '\n'], " ");
    eprintln!("{NAME}: {line}");
    ExitCode::from(e.exit_code())
}

/// Runs one request against Redis and writes its report to `out`.
pub fn run(req: &Request, out: &mut dyn Write) -> Result<(), Error> {
    let timeout = match req.command {
        Command::Trim { .. } => TRIM_TIMEOUT,
        _ => COMMAND_TIMEOUT,
    };
    let redis = Redis::open(&req.redis_url, req.ca_cert.as_deref()).map_err(Error::Client)?;
    let conn = &mut connect(&redis, req, timeout)?;
    let json = req.json;
    match &req.command {
        Command::Status { retain } => emit(
            &status(conn, &req.redis_url, *retain, redis.master())?,
            json,
            out,
        ),
        Command::Pending {
            stream,
            group,
            count,
        } => emit(&pending(conn, stream, group, *count)?, json, out),
        Command::DlqList { stream, count } => emit(&dlq_list(conn, stream, *count)?, json, out),
        Command::DlqRedrive { stream, which } => emit(&redrive(conn, stream, which)?, json, out),
        Command::Trim { dry_run, retain } => emit(&trim(conn, *dry_run, *retain)?, json, out),
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

/// A report: printable as text, serializable as JSON.
trait Report: Serialize {
    /// The human-readable form, newline-terminated.
    fn text(&self) -> String;
}

fn emit<R: Report>(report: &R, json: bool, out: &mut dyn Write) -> Result<(), Error> {
    let text = if json {
        let mut s = serde_json::to_string_pretty(report).map_err(|e| Error::Output(e.into()))?;
        s.push('\n');
        s
    } else {
        report.text()
    };
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(Error::Output)
}

/// Maps a Redis error to [`Error::Redis`], naming the command.
fn failed(what: impl fmt::Display) -> impl FnOnce(RedisError) -> Error {
    let what = what.to_string();
    move |source| Error::Redis { what, source }
}

/// Whether Redis said the key does not exist (`XINFO` on a missing stream).
fn no_such_key(e: &RedisError) -> bool {
    e.code() == Some("ERR") && e.to_string().to_ascii_lowercase().contains("no such key")
}

// ---------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------

/// `status`: every stream of the topology.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusReport {
    redis: String,
    /// With sentinels: the master's name as they know it.
    #[serde(skip_serializing_if = "Option::is_none")]
    sentinel_master: Option<String>,
    /// With sentinels: the address of the master in use, `host:port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    master: Option<String>,
    streams: Vec<StreamStatus>,
    idempotency_keys: IdempotencyKeys,
}

/// The `Idempotency-Key`s order-service holds (each until its TTL).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct IdempotencyKeys {
    /// The `SCAN MATCH` pattern counted.
    pattern: String,
    held: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StreamStatus {
    stream: String,
    exists: bool,
    length: Option<u64>,
    first_id: Option<String>,
    last_id: Option<String>,
    groups: Vec<GroupStatus>,
    dlq: DlqStatus,
    /// A group that keeps trimming from reaching the newest `retain`.
    trim_held_back: Option<HeldBack>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct HeldBack {
    group: String,
    /// Entries beyond `retain` that stay for it.
    entries: u64,
    retain: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GroupStatus {
    group: String,
    exists: bool,
    /// Whether the topology declares it (other groups are shown too).
    in_topology: bool,
    /// `None` when Redis cannot tell (after deletions, say) or the group is
    /// missing.
    lag: Option<u64>,
    pending: Option<u64>,
    entries_read: Option<u64>,
    last_delivered_id: Option<String>,
    consumers: Vec<ConsumerStatus>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ConsumerStatus {
    name: String,
    pending: u64,
    idle_ms: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DlqStatus {
    stream: String,
    length: u64,
}

/// The fields of an `XINFO` reply, looked up by name.
struct Info(Vec<(String, Value)>);

impl Info {
    fn from_value(v: &Value) -> Info {
        Info(value::map_pairs(v).unwrap_or_default())
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    fn string(&self, name: &str) -> Option<String> {
        self.get(name).and_then(value::as_string)
    }

    fn count(&self, name: &str) -> Option<u64> {
        self.get(name)
            .and_then(value::as_i64)
            .and_then(|n| u64::try_from(n).ok())
    }

    /// The ID of an entry-valued field (`first-entry`), `None` when nil.
    fn entry_id(&self, name: &str) -> Option<String> {
        let entry = value::as_array(self.get(name)?)?;
        entry.first().and_then(value::as_string)
    }
}

fn status(
    conn: &mut Connection,
    url: &str,
    retain: u64,
    master: Option<(String, Option<String>)>,
) -> Result<StatusReport, Error> {
    let streams = TOPOLOGY
        .iter()
        .map(|spec| stream_status(conn, spec, retain))
        .collect::<Result<_, _>>()?;
    let (sentinel_master, master) = master.map_or((None, None), |(n, a)| (Some(n), a));
    Ok(StatusReport {
        redis: redact(url),
        sentinel_master,
        master,
        streams,
        idempotency_keys: idempotency_keys(conn, topology::ORDER_EVENTS)?,
    })
}

/// Counts the keys of `stream` with `SCAN MATCH <stream>:idem:* COUNT
/// 1000`: exact, and free for the write path (no counter to keep, no
/// memory), but it walks the whole keyspace, in steps of a few
/// milliseconds of Redis time each: a million keys took 12.6 s on the
/// loaded 2-vCPU machine of `BENCHMARKS.md` (6.2 ms per step).
fn idempotency_keys(conn: &mut Connection, stream: &str) -> Result<IdempotencyKeys, Error> {
    let pattern = crate::idempotency::key_pattern(stream);
    let mut cursor = 0u64;
    let mut held = 0u64;
    loop {
        let (next, keys): (u64, Vec<Value>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query(conn)
            .map_err(failed(format!("SCAN MATCH {pattern}")))?;
        held += keys.len() as u64;
        if next == 0 {
            return Ok(IdempotencyKeys { pattern, held });
        }
        cursor = next;
    }
}

fn stream_status(
    conn: &mut Connection,
    spec: &StreamSpec,
    retain: u64,
) -> Result<StreamStatus, Error> {
    let dlq_key = topology::dlq_stream(spec.stream);
    let dlq = DlqStatus {
        length: xlen(conn, &dlq_key)?,
        stream: dlq_key,
    };
    let info = match redis::cmd("XINFO")
        .arg("STREAM")
        .arg(spec.stream)
        .query::<Value>(conn)
    {
        Ok(v) => Some(Info::from_value(&v)),
        Err(e) if no_such_key(&e) => None,
        Err(e) => return Err(failed(format!("XINFO STREAM {}", spec.stream))(e)),
    };
    let groups = match info {
        Some(_) => group_statuses(conn, spec)?,
        None => spec
            .groups
            .iter()
            .map(|g| GroupStatus::missing(g))
            .collect(),
    };
    Ok(StreamStatus {
        stream: spec.stream.to_string(),
        exists: info.is_some(),
        length: info.as_ref().and_then(|i| i.count("length")),
        first_id: info.as_ref().and_then(|i| i.entry_id("first-entry")),
        last_id: info.as_ref().and_then(|i| i.entry_id("last-entry")),
        groups,
        dlq,
        trim_held_back: held_back(conn, spec.stream, retain)?,
    })
}

/// Which group keeps trimming of `stream` from its newest `retain`, if
/// any: a dry run of one chunk, as the services trim. When a whole chunk is
/// removable, trimming is under way and nothing is held back (yet).
fn held_back(conn: &mut Connection, stream: &str, retain: u64) -> Result<Option<HeldBack>, Error> {
    let plan = trim::trim_once(conn, stream, retain, trim::CHUNK, true)
        .map_err(failed(format!("dry-run trim of {stream}")))?;
    Ok(plan
        .held_back
        .filter(|_| plan.removed < trim::CHUNK)
        .map(|(group, entries)| HeldBack {
            group,
            entries,
            retain,
        }))
}

/// The topology's groups of the stream (missing ones marked), then any other
/// group found on it: an unknown group is worth seeing too.
fn group_statuses(conn: &mut Connection, spec: &StreamSpec) -> Result<Vec<GroupStatus>, Error> {
    let infos: Vec<Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(spec.stream)
        .query(conn)
        .map_err(failed(format!("XINFO GROUPS {}", spec.stream)))?;
    let infos: Vec<Info> = infos.iter().map(Info::from_value).collect();
    let name_of = |i: &Info| i.string("name").unwrap_or_default();
    let mut out = Vec::new();
    for group in spec.groups {
        match infos.iter().find(|i| name_of(i) == *group) {
            Some(info) => out.push(group_status(conn, spec.stream, info, true)?),
            None => out.push(GroupStatus::missing(group)),
        }
    }
    for info in infos
        .iter()
        .filter(|i| !spec.groups.contains(&name_of(i).as_str()))
    {
        out.push(group_status(conn, spec.stream, info, false)?);
    }
    Ok(out)
}

fn group_status(
    conn: &mut Connection,
    stream: &str,
    info: &Info,
    in_topology: bool,
) -> Result<GroupStatus, Error> {
    let group = info.string("name").unwrap_or_default();
    Ok(GroupStatus {
        consumers: consumers(conn, stream, &group)?,
        exists: true,
        in_topology,
        lag: info.count("lag"),
        pending: info.count("pending"),
        entries_read: info.count("entries-read"),
        last_delivered_id: info.string("last-delivered-id"),
        group,
    })
}

fn consumers(
    conn: &mut Connection,
    stream: &str,
    group: &str,
) -> Result<Vec<ConsumerStatus>, Error> {
    let infos: Vec<Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query(conn)
        .map_err(failed(format!("XINFO CONSUMERS {stream} {group}")))?;
    Ok(infos
        .iter()
        .map(Info::from_value)
        .map(|i| ConsumerStatus {
            name: i.string("name").unwrap_or_default(),
            pending: i.count("pending").unwrap_or(0),
            idle_ms: i.count("idle").unwrap_or(0),
        })
        .collect())
}

impl GroupStatus {
    fn missing(group: &str) -> GroupStatus {
        GroupStatus {
            group: group.to_string(),
            exists: false,
            in_topology: true,
            lag: None,
            pending: None,
            entries_read: None,
            last_delivered_id: None,
            consumers: Vec::new(),
        }
    }
}

/// `XLEN` (0 for a missing key).
fn xlen(conn: &mut Connection, stream: &str) -> Result<u64, Error> {
    redis::cmd("XLEN")
        .arg(stream)
        .query(conn)
        .map_err(failed(format!("XLEN {stream}")))
}

impl Report for StatusReport {
    fn text(&self) -> String {
        let mut streams = Table::new(&["STREAM", "LENGTH", "FIRST-ID", "LAST-ID", "DEAD-LETTERS"]);
        let mut groups = Table::new(&[
            "STREAM",
            "GROUP",
            "LAG",
            "PENDING",
            "ENTRIES-READ",
            "LAST-DELIVERED-ID",
            "CONSUMERS",
        ]);
        let mut consumers = Table::new(&["STREAM", "GROUP", "CONSUMER", "PENDING", "IDLE"]);
        for s in &self.streams {
            streams.row(vec![
                s.stream.clone(),
                s.length.map_or_else(|| "missing".into(), |n| n.to_string()),
                or_dash(s.first_id.as_deref()),
                or_dash(s.last_id.as_deref()),
                format!("{} ({})", s.dlq.length, s.dlq.stream),
            ]);
            for g in &s.groups {
                groups.row(group_row(&s.stream, g));
                for c in &g.consumers {
                    consumers.row(vec![
                        s.stream.clone(),
                        g.group.clone(),
                        c.name.clone(),
                        c.pending.to_string(),
                        human_idle(c.idle_ms),
                    ]);
                }
            }
        }
        let mut out = format!("Redis {}\n", self.redis);
        if let (Some(name), Some(addr)) = (&self.sentinel_master, &self.master) {
            out.push_str(&format!(
                "Master {name} at {addr} (named by the sentinels)\n"
            ));
        }
        out.push('\n');
        out.push_str(&streams.render());
        for s in &self.streams {
            if let Some(h) = &s.trim_held_back {
                out.push_str(&format!(
                    "trimming of {} is held back by {}: {} entries beyond the newest {} kept, not read or acknowledged by it\n",
                    s.stream,
                    h.group,
                    h.entries,
                    h.retain
                ));
            }
        }
        out.push_str(&format!(
            "idempotency keys held: {} ({}, counted with SCAN)\n",
            self.idempotency_keys.held, self.idempotency_keys.pattern
        ));
        out.push('\n');
        out.push_str(&groups.render());
        out.push('\n');
        if consumers.is_empty() {
            out.push_str("no consumers\n");
        } else {
            out.push_str(&consumers.render());
        }
        out
    }
}

fn group_row(stream: &str, g: &GroupStatus) -> Vec<String> {
    let name = if g.in_topology {
        g.group.clone()
    } else {
        format!("{} (not in topology)", g.group)
    };
    if !g.exists {
        return vec![stream.to_string(), name, "missing".into()];
    }
    let num = |n: Option<u64>| n.map_or_else(|| "?".into(), |n| n.to_string());
    vec![
        stream.to_string(),
        name,
        num(g.lag),
        num(g.pending),
        num(g.entries_read),
        or_dash(g.last_delivered_id.as_deref()),
        g.consumers.len().to_string(),
    ]
}

// ---------------------------------------------------------------------------
// pending
// ---------------------------------------------------------------------------

/// `pending`: the oldest entries a group has been delivered and not acked.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PendingReport {
    stream: String,
    group: String,
    total: u64,
    entries: Vec<PendingEntry>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PendingEntry {
    id: String,
    consumer: String,
    idle_ms: u64,
    deliveries: u64,
}

fn pending(
    conn: &mut Connection,
    stream: &str,
    group: &str,
    count: u64,
) -> Result<PendingReport, Error> {
    let nogroup = |e: RedisError| {
        if topology::is_nogroup(&e) {
            Error::NoGroup {
                stream: stream.to_string(),
                group: group.to_string(),
            }
        } else {
            failed(format!("XPENDING {stream} {group}"))(e)
        }
    };
    let summary: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query(conn)
        .map_err(nogroup)?;
    let rows: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(count)
        .query(conn)
        .map_err(nogroup)?;
    let total = value::as_array(&summary)
        .and_then(|s| s.first())
        .and_then(value::as_i64)
        .unwrap_or(0);
    Ok(PendingReport {
        stream: stream.to_string(),
        group: group.to_string(),
        total: u64::try_from(total).unwrap_or(0),
        entries: value::as_array(&rows)
            .unwrap_or_default()
            .iter()
            .filter_map(pending_entry)
            .collect(),
    })
}

/// One row of the extended `XPENDING` form: `[id, consumer, idle, count]`.
fn pending_entry(row: &Value) -> Option<PendingEntry> {
    let [id, consumer, idle, deliveries, ..] = value::as_array(row)? else {
        return None;
    };
    let num = |v: &Value| value::as_i64(v).and_then(|n| u64::try_from(n).ok());
    Some(PendingEntry {
        id: value::as_string(id)?,
        consumer: value::as_string(consumer)?,
        idle_ms: num(idle)?,
        deliveries: num(deliveries)?,
    })
}

impl Report for PendingReport {
    fn text(&self) -> String {
        let head = format!("{} / {}", self.stream, self.group);
        if self.entries.is_empty() {
            return format!("{head}: nothing pending\n");
        }
        let mut table = Table::new(&["ID", "CONSUMER", "IDLE", "DELIVERIES"]);
        for e in &self.entries {
            table.row(vec![
                e.id.clone(),
                e.consumer.clone(),
                human_idle(e.idle_ms),
                e.deliveries.to_string(),
            ]);
        }
        format!(
            "{head}: {} pending, the oldest {}:\n{}",
            self.total,
            self.entries.len(),
            table.render()
        )
    }
}

// ---------------------------------------------------------------------------
// dlq list
// ---------------------------------------------------------------------------

/// `dlq list`: the oldest dead letters of a stream.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DlqReport {
    dlq: String,
    length: u64,
    entries: Vec<DeadLetterView>,
}

/// A dead letter split into our metadata and the entry's original fields.
/// Metadata that is absent (a letter written by someone else) is `None`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DeadLetterView {
    id: String,
    original_id: Option<String>,
    original_stream: Option<String>,
    group: Option<String>,
    consumer: Option<String>,
    error: Option<String>,
    deliveries: Option<u64>,
    fields: FieldList,
}

/// Field/value pairs in stream order, serialized as a JSON object in that
/// order (a map type would sort them).
#[derive(Debug)]
struct FieldList(Vec<(String, String)>);

impl Serialize for FieldList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl FieldList {
    /// Lossy text: the tool shows fields, it never writes them back from
    /// this form (redrive uses the raw bytes).
    fn from_fields(fields: &Fields) -> FieldList {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        FieldList(fields.0.iter().map(|(k, v)| (text(k), text(v))).collect())
    }

    /// `k=v k2="v 2"`: values with spaces or quotes are quoted.
    fn render(&self) -> String {
        let quote = |s: &str| {
            let plain = !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c == '"');
            if plain {
                s.to_string()
            } else {
                format!("{s:?}")
            }
        };
        let pairs: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| format!("{}={}", quote(k), quote(v)))
            .collect();
        pairs.join(" ")
    }
}

impl DeadLetterView {
    fn new(id: String, fields: &Fields) -> DeadLetterView {
        let (original, meta) = dlq::split_fields(fields);
        let get = |name: &str| meta.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        DeadLetterView {
            id,
            original_id: get("originalId"),
            original_stream: get("originalStream"),
            group: get("group"),
            consumer: get("consumer"),
            error: get("error"),
            deliveries: get("deliveries").and_then(|d| d.parse().ok()),
            fields: FieldList::from_fields(&original),
        }
    }
}

fn dlq_list(conn: &mut Connection, stream: &str, count: u64) -> Result<DlqReport, Error> {
    let dlq = topology::dlq_stream(stream);
    let length = xlen(conn, &dlq)?;
    let entries = xrange(conn, &dlq, "-", "+", count)?
        .into_iter()
        .map(|(id, fields)| DeadLetterView::new(id, &fields))
        .collect();
    Ok(DlqReport {
        dlq,
        length,
        entries,
    })
}

/// `XRANGE stream start end COUNT count`, as IDs and raw fields.
fn xrange(
    conn: &mut Connection,
    stream: &str,
    start: &str,
    end: &str,
    count: u64,
) -> Result<Vec<(String, Fields)>, Error> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(count)
        .query(conn)
        .map_err(failed(format!("XRANGE {stream}")))?;
    Ok(parse_entries(&reply))
}

/// Entries of an `XRANGE` reply: `[[id, [k, v, ...]], ...]`.
fn parse_entries(reply: &Value) -> Vec<(String, Fields)> {
    let pairs = |kv: &[Value]| -> Vec<(Vec<u8>, Vec<u8>)> {
        kv.chunks(2)
            .filter_map(|p| match p {
                [k, v] => Some((value::as_bytes(k)?.to_vec(), value::as_bytes(v)?.to_vec())),
                _ => None,
            })
            .collect()
    };
    value::as_array(reply)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let [id, fields, ..] = value::as_array(e)? else {
                return None;
            };
            let fields = Fields(pairs(value::as_array(fields).unwrap_or_default()));
            Some((value::as_string(id)?, fields))
        })
        .collect()
}

impl Report for DlqReport {
    fn text(&self) -> String {
        if self.entries.is_empty() {
            return format!("{}: no dead letters\n", self.dlq);
        }
        let mut table = Table::new(&[
            "DLQ-ID",
            "ORIGINAL-ID",
            "GROUP",
            "DELIVERIES",
            "ERROR",
            "FIELDS",
        ]);
        for e in &self.entries {
            table.row(vec![
                e.id.clone(),
                or_dash(e.original_id.as_deref()),
                or_dash(e.group.as_deref()),
                e.deliveries.map_or_else(|| "-".into(), |d| d.to_string()),
                or_dash(e.error.as_deref()),
                e.fields.render(),
            ]);
        }
        format!(
            "{}: {}, the oldest {}:\n{}",
            self.dlq,
            plural(self.length, "dead letter"),
            self.entries.len(),
            table.render()
        )
    }
}

// ---------------------------------------------------------------------------
// dlq redrive
// ---------------------------------------------------------------------------

/// Re-adds one dead letter to its stream and deletes it from the DLQ (and
/// its index), all or nothing. KEYS[1] the DLQ, KEYS[2] the stream, KEYS[3]
/// the DLQ's index; ARGV[1] the dead letter's ID, ARGV[2] its original ID
/// (or ''), ARGV[3] the group it names (or ''), ARGV[4] the ID first
/// written (or ''), ARGV[5..] the original fields. The groups the entry is
/// for come from the index (every group that gave up on it), else from the
/// letter. Returns {new ID, groups}, or nil if the dead letter is gone
/// (someone else redrove or deleted it since we read it: it must not be
/// added twice).
const REDRIVE: &str = r#"
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return false end
local groups = ARGV[3]
if ARGV[2] ~= '' then
  local known = redis.call('HGET', KEYS[3], ARGV[2])
  if known then
    local letter, rest = string.match(known, '^([^,]+),?(.*)$')
    if letter == ARGV[1] then
      if rest ~= '' then groups = rest end
      redis.call('HDEL', KEYS[3], ARGV[2])
    end
  end
end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
if groups ~= '' then
  fields[#fields + 1] = 'redriveGroup'; fields[#fields + 1] = groups
end
if ARGV[4] ~= '' then
  fields[#fields + 1] = 'redrivenFrom'; fields[#fields + 1] = ARGV[4]
end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[1])
return {id, groups}
"#;

/// `dlq redrive`: what went back, what was not there, what was refused.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RedriveReport {
    stream: String,
    dlq: String,
    redriven: Vec<Redriven>,
    not_found: Vec<String>,
    skipped: Vec<Skipped>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Redriven {
    dlq_id: String,
    original_id: Option<String>,
    new_id: String,
    /// The groups it is for (`redriveGroup`); empty: every group.
    redrive_group: String,
    /// The ID first written (`redrivenFrom`).
    redriven_from: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Skipped {
    dlq_id: String,
    reason: String,
}

fn redrive(conn: &mut Connection, stream: &str, which: &Redrive) -> Result<RedriveReport, Error> {
    let dlq = topology::dlq_stream(stream);
    let mut report = RedriveReport {
        stream: stream.to_string(),
        dlq: dlq.clone(),
        redriven: Vec::new(),
        not_found: Vec::new(),
        skipped: Vec::new(),
    };
    match which {
        Redrive::Ids(ids) => {
            for id in ids {
                match xrange(conn, &dlq, id, id, 1)?.into_iter().next() {
                    Some((id, fields)) => redrive_entry(conn, &id, &fields, &mut report)?,
                    None => report.not_found.push(id.clone()),
                }
            }
        }
        Redrive::All => redrive_all(conn, &mut report)?,
    }
    Ok(report)
}

/// Redrives the dead letters up to the newest one present now. Stopping
/// there matters: an entry that fails again while we work is dead-lettered
/// anew, after that bound, and chasing it would loop for as long as the
/// cause of the failure lasts.
fn redrive_all(conn: &mut Connection, report: &mut RedriveReport) -> Result<(), Error> {
    let dlq = report.dlq.clone();
    let newest: Value = redis::cmd("XREVRANGE")
        .arg(&dlq)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(conn)
        .map_err(failed(format!("XREVRANGE {dlq}")))?;
    let Some((last, _)) = parse_entries(&newest).into_iter().next() else {
        return Ok(());
    };
    let mut start = "-".to_string();
    loop {
        let batch = xrange(conn, &dlq, &start, &last, REDRIVE_BATCH)?;
        for (id, fields) in &batch {
            redrive_entry(conn, id, fields, report)?;
        }
        match batch.last() {
            Some((id, _)) if batch.len() as u64 == REDRIVE_BATCH => start = format!("({id}"),
            _ => return Ok(()),
        }
    }
}

/// Puts one dead letter back with its original fields, marked for the
/// groups that gave up on it (see [`crate::dlq`]): the metadata we appended
/// (original ID, error, ...) would otherwise become fields of a new order
/// or payment. Marks of an earlier redrive are replaced, `redrivenFrom`
/// kept: it names the entry first written, whatever the number of rounds.
fn redrive_entry(
    conn: &mut Connection,
    id: &str,
    fields: &Fields,
    report: &mut RedriveReport,
) -> Result<(), Error> {
    let (original, meta) = dlq::split_fields(fields);
    let get = |name: &str| meta.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let skip = |reason: String| Skipped {
        dlq_id: id.to_string(),
        reason,
    };
    if original.0.is_empty() {
        report.skipped.push(skip("no original fields".into()));
        return Ok(());
    }
    if let Some(from) = get("originalStream").filter(|s| *s != report.stream) {
        let reason = format!("dead-lettered from {from}, not {}", report.stream);
        report.skipped.push(skip(reason));
        return Ok(());
    }
    let original_id = get("originalId");
    let first = dlq::redriven_from(&original).or_else(|| original_id.clone());
    let script = Script::new(REDRIVE);
    let mut call = script.key(&report.dlq);
    call.key(&report.stream)
        .key(topology::dlq_index(&report.stream))
        .arg(id)
        .arg(original_id.as_deref().unwrap_or_default())
        .arg(get("group").unwrap_or_default())
        .arg(first.as_deref().unwrap_or_default());
    let marks = [dlq::REDRIVE_GROUP.as_bytes(), dlq::REDRIVEN_FROM.as_bytes()];
    for (k, v) in original
        .0
        .iter()
        .filter(|(k, _)| !marks.contains(&k.as_slice()))
    {
        call.arg(k.as_slice()).arg(v.as_slice());
    }
    let added: Option<(String, String)> = call
        .invoke(conn)
        .map_err(failed(format!("redriving {id} from {}", report.dlq)))?;
    match added {
        Some((new_id, redrive_group)) => report.redriven.push(Redriven {
            dlq_id: id.to_string(),
            original_id,
            new_id,
            redrive_group,
            redriven_from: first,
        }),
        None => report.not_found.push(id.to_string()),
    }
    Ok(())
}

impl Report for RedriveReport {
    fn text(&self) -> String {
        let mut out = String::new();
        for r in &self.redriven {
            let original = r.original_id.as_deref().unwrap_or("unknown");
            let groups = match r.redrive_group.as_str() {
                "" => "every group".to_string(),
                g => g.to_string(),
            };
            out.push_str(&format!(
                "redriven {} (originalId {original}): re-added as {} on {}, for {groups}\n",
                r.dlq_id, r.new_id, self.stream
            ));
        }
        for id in &self.not_found {
            out.push_str(&format!("not found {id}: no such entry in {}\n", self.dlq));
        }
        for s in &self.skipped {
            out.push_str(&format!("skipped {}: {}\n", s.dlq_id, s.reason));
        }
        out.push_str(&format!(
            "{} redriven, {} not found, {} skipped",
            self.redriven.len(),
            self.not_found.len(),
            self.skipped.len()
        ));
        if !self.redriven.is_empty() {
            out.push_str(&format!(
                ". Redriven entries are new entries of {}: other groups than those named \
                 acknowledge them without acting.",
                self.stream
            ));
        }
        out.push('\n');
        out
    }
}

// ---------------------------------------------------------------------------
// trim
// ---------------------------------------------------------------------------

/// `trim`: per stream, what went (or would go) and where it stopped.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TrimReport {
    dry_run: bool,
    retain: u64,
    streams: Vec<TrimRow>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TrimRow {
    stream: String,
    length: u64,
    /// Dry run only.
    #[serde(skip_serializing_if = "Option::is_none")]
    removable: Option<u64>,
    /// Real run only.
    #[serde(skip_serializing_if = "Option::is_none")]
    removed: Option<u64>,
    /// Real run only: the length after trimming.
    #[serde(skip_serializing_if = "Option::is_none")]
    length_after: Option<u64>,
    /// The MINID: entries before it went (or would go).
    bound: Option<String>,
    reason: String,
}

fn trim(conn: &mut Connection, dry_run: bool, retain: u64) -> Result<TrimReport, Error> {
    let streams = TOPOLOGY
        .iter()
        .map(|spec| {
            if dry_run {
                trim_dry(conn, spec.stream, retain)
            } else {
                trim_real(conn, spec.stream, retain)
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(TrimReport {
        dry_run,
        retain,
        streams,
    })
}

/// One dry-run pass over the whole stream (a chunk as large as the stream),
/// so the count is all that trimming would remove, not just its first chunk.
fn trim_dry(conn: &mut Connection, stream: &str, retain: u64) -> Result<TrimRow, Error> {
    let length = xlen(conn, stream)?;
    let plan = trim::trim_once(conn, stream, retain, length.max(1), true)
        .map_err(failed(format!("dry-run trim of {stream}")))?;
    Ok(TrimRow {
        stream: stream.to_string(),
        length,
        removable: Some(plan.removed),
        removed: None,
        length_after: None,
        reason: explain(&plan, length.saturating_sub(plan.removed), retain),
        bound: plan.bound,
    })
}

/// Trims chunk by chunk as the services do, then asks (dry, one chunk) where
/// it stopped: after a full trim nothing before the bound is left, so one
/// chunk is enough to find it.
fn trim_real(conn: &mut Connection, stream: &str, retain: u64) -> Result<TrimRow, Error> {
    let length = xlen(conn, stream)?;
    let removed = trim::trim_stream(conn, stream, retain)
        .map_err(failed(format!("trimming {stream}")))?
        .removed;
    let after = xlen(conn, stream)?;
    let plan = trim::trim_once(conn, stream, retain, trim::CHUNK, true)
        .map_err(failed(format!("dry-run trim of {stream}")))?;
    Ok(TrimRow {
        stream: stream.to_string(),
        length,
        removable: None,
        removed: Some(removed),
        length_after: Some(after),
        reason: explain(&plan, after, retain),
        bound: plan.bound,
    })
}

/// Why trimming stops where it does, in words. `kept` is what is (or would
/// be) left; if that is exactly `retain`, the retention limit decided,
/// otherwise some group's unread or unacknowledged entry did.
fn explain(plan: &trim::Trimmed, kept: u64, retain: u64) -> String {
    match plan.reason.as_str() {
        "no stream" => "the stream does not exist".into(),
        "within RETAIN_ENTRIES" => format!("within the newest {retain}, which are always kept"),
        "ok" if kept <= retain => format!("keeps the newest {retain} entries"),
        "ok" => match plan.bound.as_deref() {
            Some("0-0") | None => "a group has read nothing yet".into(),
            Some(b) => format!("a group has not read or acknowledged everything from {b} on"),
        },
        other if other.starts_with("order still in ") => format!(
            "keeps the payments of orders still in {} (their paid markers go with them)",
            &other["order still in ".len()..]
        ),
        other if other.starts_with("group ") => {
            format!("{other}: its entries are not known to be read")
        }
        other => other.to_string(),
    }
}

impl Report for TrimReport {
    fn text(&self) -> String {
        let mut table = match self.dry_run {
            true => Table::new(&["STREAM", "LENGTH", "REMOVABLE", "MINID", "REASON"]),
            false => Table::new(&["STREAM", "LENGTH", "REMOVED", "NOW", "MINID", "REASON"]),
        };
        for r in &self.streams {
            let mut row = vec![r.stream.clone(), r.length.to_string()];
            let counts = [r.removable, r.removed, r.length_after];
            row.extend(counts.iter().flatten().map(u64::to_string));
            row.push(or_dash(r.bound.as_deref()));
            row.push(r.reason.clone());
            table.row(row);
        }
        let head = match self.dry_run {
            true => format!("dry run, nothing removed (retain {}):\n", self.retain),
            false => format!("trimmed (retain {}):\n", self.retain),
        };
        head + &table.render()
    }
}

// ---------------------------------------------------------------------------
// Presentation helpers
// ---------------------------------------------------------------------------

/// A text table: columns left-aligned, two spaces apart, no trailing blanks.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Whether it has no rows besides the header.
    fn is_empty(&self) -> bool {
        self.rows.len() <= 1
    }

    fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                let cells = self.rows.iter().filter_map(|r| r.get(c));
                cells.map(|s| s.chars().count()).max().unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (cell, width) in row.iter().zip(&widths) {
                line.push_str(&format!("{cell:<width$}  "));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `1 dead letter`, `2 dead letters`.
fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn or_dash(s: Option<&str>) -> String {
    s.unwrap_or("-").to_string()
}

/// An idle time for humans: `340ms`, `1.2s`, `3m4s`, `2h5m`, `3d4h`.
pub fn human_idle(ms: u64) -> String {
    const S: u64 = 1000;
    const M: u64 = 60 * S;
    const H: u64 = 60 * M;
    const D: u64 = 24 * H;
    if ms < S {
        format!("{ms}ms")
    } else if ms < M {
        format!("{}.{}s", ms / S, ms % S / 100)
    } else if ms < H {
        format!("{}m{}s", ms / M, ms % M / S)
    } else if ms < D {
        format!("{}h{}m", ms / H, ms % H / M)
    } else {
        format!("{}d{}h", ms / D, ms % D / H)
    }
}

pub use crate::config::redact;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse_with(args: &[&str], env: &[(&str, &str)]) -> Result<Invocation, UsageError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(args.iter().map(OsString::from), move |k| {
            env.get(k).cloned()
        })
    }

    fn request(args: &[&str]) -> Request {
        match parse_with(args, &[]) {
            Ok(Invocation::Run(r)) => r,
            other => panic!("{args:?}: expected a request, got {other:?}"),
        }
    }

    fn usage(args: &[&str]) -> UsageError {
        match parse_with(args, &[]) {
            Err(e) => e,
            other => panic!("{args:?}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_come_from_the_services_settings() {
        let r = request(&["status"]);
        assert_eq!(r.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(r.ca_cert, None);
        assert!(!r.json);
        let Command::Trim { retain, dry_run } = request(&["trim", "--dry-run"]).command else {
            panic!("not trim");
        };
        assert_eq!((retain, dry_run), (100_000, true));
    }

    #[test]
    fn flags_override_the_environment() {
        let env = [
            ("REDIS_URL", "redis://10.0.0.1:6380"),
            ("RETAIN_ENTRIES", "7"),
        ];
        let Ok(Invocation::Run(r)) = parse_with(&["trim"], &env) else {
            panic!("no request");
        };
        assert_eq!(r.redis_url, "redis://10.0.0.1:6380");
        assert_eq!(
            r.command,
            Command::Trim {
                dry_run: false,
                retain: 7
            }
        );
        let Ok(Invocation::Run(r)) = parse_with(
            &["--redis-url=redis://h:1", "trim", "--retain", "3", "--json"],
            &env,
        ) else {
            panic!("no request");
        };
        assert_eq!(r.redis_url, "redis://h:1");
        assert!(r.json);
        assert_eq!(
            r.command,
            Command::Trim {
                dry_run: false,
                retain: 3
            }
        );
    }

    #[test]
    fn subcommands_and_their_arguments() {
        assert_eq!(
            request(&["pending", "order-events", "g", "--count", "5"]).command,
            Command::Pending {
                stream: "order-events".into(),
                group: "g".into(),
                count: 5
            }
        );
        assert_eq!(
            request(&["dlq", "list", "order-events:dlq"]).command,
            Command::DlqList {
                stream: "order-events".into(),
                count: DEFAULT_COUNT
            }
        );
        assert_eq!(
            request(&["dlq", "redrive", "s", "--id", "1-0", "--id=2-5"]).command,
            Command::DlqRedrive {
                stream: "s".into(),
                which: Redrive::Ids(vec!["1-0".into(), "2-5".into()])
            }
        );
        assert_eq!(
            request(&["dlq", "redrive", "s", "--all"]).command,
            Command::DlqRedrive {
                stream: "s".into(),
                which: Redrive::All
            }
        );
    }

    #[test]
    fn help_and_version_win() {
        assert_eq!(parse_with(&["--help"], &[]), Ok(Invocation::Help));
        assert_eq!(parse_with(&["status", "-h"], &[]), Ok(Invocation::Help));
        assert_eq!(parse_with(&["-V"], &[]), Ok(Invocation::Version));
        assert!(help().contains("re-added as a NEW entry"));
    }

    #[test]
    fn bad_usage_is_named() {
        use UsageError::*;
        assert_eq!(usage(&[]), MissingCommand);
        assert_eq!(usage(&["frobnicate"]), UnknownCommand("frobnicate".into()));
        assert_eq!(
            usage(&["dlq", "show", "s"]),
            UnknownCommand("dlq show".into())
        );
        assert!(matches!(usage(&["pending", "s"]), MissingArgument { .. }));
        assert_eq!(usage(&["status", "x"]), UnexpectedArgument("x".into()));
        assert_eq!(
            usage(&["--bogus", "status"]),
            UnknownOption("--bogus".into())
        );
        assert_eq!(
            usage(&["status", "--redis-url"]),
            MissingValue("--redis-url")
        );
        assert_eq!(usage(&["status", "--json=1"]), UnexpectedValue("--json"));
        assert_eq!(
            usage(&["status", "--all"]),
            NotFor {
                option: "--all",
                command: "status"
            }
        );
        assert!(matches!(
            usage(&["pending", "s", "g", "--count", "0"]),
            BadNumber { .. }
        ));
        assert!(matches!(
            usage(&["dlq", "list", "s", "--count", "x"]),
            BadNumber { .. }
        ));
        assert_eq!(usage(&["dlq", "redrive", "s"]), IdsOrAll);
        assert_eq!(
            usage(&["dlq", "redrive", "s", "--all", "--id", "1-0"]),
            IdsAndAll
        );
        assert_eq!(
            usage(&["dlq", "redrive", "s", "--id", "17"]),
            BadId("17".into())
        );
        assert!(matches!(
            usage(&["status", "--redis-url", "http://x"]),
            BadUrl { .. }
        ));
        assert!(matches!(
            usage(&["status", "--redis-ca-cert", "/nonexistent/ca.pem"]),
            NoCaCert(_)
        ));
        let env_err = parse_with(&["trim"], &[("RETAIN_ENTRIES", "lots")]);
        assert!(matches!(
            env_err,
            Err(BadNumber {
                option: "RETAIN_ENTRIES",
                ..
            })
        ));
    }

    #[test]
    fn usage_errors_exit_2_and_point_at_help() {
        let e = Error::Usage(UsageError::MissingCommand);
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().ends_with("; see --help"), "{e}");
    }

    #[test]
    fn idle_times_read_like_a_human_wrote_them() {
        assert_eq!(human_idle(0), "0ms");
        assert_eq!(human_idle(999), "999ms");
        assert_eq!(human_idle(1_234), "1.2s");
        assert_eq!(human_idle(59_999), "59.9s");
        assert_eq!(human_idle(184_000), "3m4s");
        assert_eq!(human_idle(2 * 3_600_000 + 5 * 60_000), "2h5m");
        assert_eq!(human_idle(3 * 86_400_000 + 4 * 3_600_000), "3d4h");
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("rediss://:secret@h:1"), "rediss://:***@h:1");
        assert_eq!(redact("redis://user@h"), "redis://user@h");
        assert!(
            !usage(&["status", "--redis-url", "redis://u:secret@h:notaport"])
                .to_string()
                .contains("secret")
        );
    }

    #[test]
    fn full_ids_only() {
        assert!(is_full_id("1700000000000-0"));
        assert!(!is_full_id("1700000000000"));
        assert!(!is_full_id("-1"));
        assert!(!is_full_id("1-"));
        assert!(!is_full_id("a-1"));
    }

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let mut t = Table::new(&["A", "LONGER"]);
        t.row(vec!["wide cell".into(), "x".into()]);
        t.row(vec!["b".into(), "missing".into()]);
        assert_eq!(
            t.render(),
            "A          LONGER\nwide cell  x\nb          missing\n"
        );
    }

    #[test]
    fn fields_render_quoted_when_needed_and_serialize_in_order() {
        let f = FieldList(vec![
            ("z".into(), "1".into()),
            ("a".into(), "two words".into()),
        ]);
        assert_eq!(f.render(), "z=1 a=\"two words\"");
        assert_eq!(
            serde_json::to_string(&f).unwrap_or_default(),
            r#"{"z":"1","a":"two words"}"#
        );
    }

    #[test]
    fn trim_reasons_say_what_stopped_it() {
        let plan = |reason: &str, bound: Option<&str>| trim::Trimmed {
            removed: 0,
            bound: bound.map(str::to_string),
            reason: reason.into(),
            held_back: None,
        };
        assert!(explain(&plan("ok", Some("5-0")), 10, 2).contains("from 5-0 on"));
        let kept = explain(&plan("order still in order-events", Some("5-0")), 10, 2);
        assert!(kept.contains("orders still in order-events"), "{kept}");
        assert!(explain(&plan("ok", Some("0-0")), 10, 2).contains("read nothing"));
        assert!(explain(&plan("ok", Some("5-0")), 2, 2).contains("newest 2"));
        assert!(explain(&plan("no stream", None), 0, 2).contains("does not exist"));
        assert!(explain(&plan("group g missing", None), 9, 2).contains("group g missing"));
    }
}

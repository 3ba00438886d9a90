//! The command line: what `streamctl` is asked to do, parsed by hand so
//! that every message names the problem in the project's words, and the
//! `--help` text.
//!
//! Options are scanned first, wherever they stand, then the words make the
//! subcommand, then each option is checked against it. The environment is
//! read through a lookup function so tests pass a map.

use std::ffi::OsString;
use std::path::PathBuf;

use redis::IntoConnectionInfo;
use streamline::config::{self, redact};
use streamline::sentinel;

use crate::error::UsageError;

/// Entries shown by `pending` and `dlq list` unless `--count` says otherwise.
pub const DEFAULT_COUNT: u64 = 20;

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
    OptSpec::new("--redis-url", VALUE, None),
    OptSpec::new("--redis-ca-cert", VALUE, None),
    OptSpec::new("--json", FLAG, None),
    OptSpec::new("--count", VALUE, Some(&["pending", "dlq list"])),
    OptSpec::new("--id", VALUE, Some(&["dlq redrive"])),
    OptSpec::new("--all", FLAG, Some(&["dlq redrive"])),
    OptSpec::new("--dry-run", FLAG, Some(&["trim"])),
    OptSpec::new("--retain", VALUE, Some(&["trim", "status"])),
];

/// `takes_value` of an option with a value, and of a bare flag.
const VALUE: bool = true;
const FLAG: bool = false;

impl OptSpec {
    const fn new(
        name: &'static str,
        takes_value: bool,
        commands: Option<&'static [&'static str]>,
    ) -> OptSpec {
        OptSpec {
            name,
            takes_value,
            commands,
        }
    }
}

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
pub fn setting_default(var: &str) -> &'static str {
    config::SETTINGS
        .iter()
        .find(|s| s.var == var)
        .and_then(|s| s.default)
        .unwrap_or_default()
}

fn check_url(url: &str) -> Result<(), UsageError> {
    if sentinel::is_sentinel_url(url) {
        return sentinel::parse(url)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::help::help;
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
}

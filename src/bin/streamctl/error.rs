//! What can go wrong, in one line each, and the exit status it gives:
//! `2` for a command line that cannot be run ([`UsageError`], a client that
//! cannot be built), `1` when Redis fails or the output cannot be written.

use std::fmt;
use std::io;
use std::path::PathBuf;

use redis::RedisError;
use streamline::connection::ConnectError;
use thiserror::Error;

/// Why `streamctl` failed. `Display` is the one line printed after
/// `streamctl: `.
#[derive(Debug, Error)]
pub enum Error {
    /// The command line is wrong (exit 2).
    #[error("{0}; see --help")]
    Usage(#[from] UsageError),
    /// No client could be built from the URL and certificate (exit 2).
    #[error("{0}; see --help")]
    Client(#[source] ConnectError),
    /// Redis could not be reached (exit 1).
    #[error("cannot connect to Redis at {url}: {source}")]
    Unreachable {
        /// The URL, password hidden.
        url: String,
        /// What the client said.
        source: RedisError,
    },
    /// A Redis command failed (exit 1).
    #[error("{what} failed: {source}")]
    Redis {
        /// The command, for the message.
        what: String,
        /// What Redis said.
        source: RedisError,
    },
    /// The stream or group named on the command line does not exist (exit 1).
    #[error("no consumer group {group:?} on stream {stream:?}")]
    NoGroup {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
    },
    /// Writing to stdout failed (exit 1, or 0 for a closed pipe).
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
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

/// Maps a Redis error to [`Error::Redis`], naming the command.
pub fn failed(what: impl fmt::Display) -> impl FnOnce(RedisError) -> Error {
    let what = what.to_string();
    move |source| Error::Redis { what, source }
}

/// A command line that cannot be run. `Display` is one line naming the
/// problem; [`Error`] adds "see --help".
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UsageError {
    /// An argument that is not UTF-8.
    #[error("argument {0:?} is not valid UTF-8")]
    NotUtf8(String),
    /// An option nobody knows.
    #[error("unknown option {0}")]
    UnknownOption(String),
    /// An option given without its value.
    #[error("option {0} needs a value")]
    MissingValue(&'static str),
    /// A flag given a value (`--json=yes`).
    #[error("option {0} takes no value")]
    UnexpectedValue(&'static str),
    /// No subcommand.
    #[error("no command given (status, pending, dlq list, dlq redrive, trim)")]
    MissingCommand,
    /// A subcommand nobody knows.
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    /// A subcommand without its arguments.
    #[error("{command} needs {what}")]
    MissingArgument {
        /// The subcommand.
        command: &'static str,
        /// What it needs.
        what: &'static str,
    },
    /// One argument too many.
    #[error("unexpected argument {0:?}")]
    UnexpectedArgument(String),
    /// An option that the subcommand does not take.
    #[error("option {option} does not apply to {command}")]
    NotFor {
        /// The option.
        option: &'static str,
        /// The subcommand.
        command: &'static str,
    },
    /// A number that does not parse or is too small.
    #[error("{option} {value:?} is not a whole number of at least {min}")]
    BadNumber {
        /// The option or variable.
        option: &'static str,
        /// What was given.
        value: String,
        /// The smallest allowed value.
        min: u64,
    },
    /// A dead-letter ID that is not a full `ms-seq` stream ID.
    #[error("{0:?} is not a full stream entry ID like 1700000000000-0")]
    BadId(String),
    /// `dlq redrive` without `--id` or `--all`.
    #[error("dlq redrive needs --id DLQ_ID (repeatable) or --all")]
    IdsOrAll,
    /// `dlq redrive` with both `--id` and `--all`.
    #[error("dlq redrive takes --id or --all, not both")]
    IdsAndAll,
    /// A Redis URL the client refuses.
    #[error("invalid Redis URL {url:?}: {reason}")]
    BadUrl {
        /// The URL, password hidden.
        url: String,
        /// Why.
        reason: String,
    },
    /// A CA certificate file that does not exist.
    #[error("Redis CA certificate {}: no such file", .0.display())]
    NoCaCert(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_exit_2_and_point_at_help() {
        let e = Error::Usage(UsageError::MissingCommand);
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().ends_with("; see --help"), "{e}");
    }

    #[test]
    fn messages_name_the_problem() {
        let e = Error::NoGroup {
            stream: "order-events".into(),
            group: "g".into(),
        };
        assert_eq!(
            e.to_string(),
            r#"no consumer group "g" on stream "order-events""#
        );
        assert_eq!(e.exit_code(), 1);
        let bad = UsageError::BadNumber {
            option: "--count",
            value: "x".into(),
            min: 1,
        };
        assert_eq!(
            bad.to_string(),
            r#"--count "x" is not a whole number of at least 1"#
        );
        let ca = UsageError::NoCaCert(PathBuf::from("/x/ca.pem"));
        assert_eq!(
            ca.to_string(),
            "Redis CA certificate /x/ca.pem: no such file"
        );
    }
}

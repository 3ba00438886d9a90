//! The `log` backend: one line per record on stderr, filtered by `RUST_LOG`.
//!
//! It is small on purpose. A service on a Debian host writes to stderr and
//! lets systemd's journal store, rotate and timestamp the lines; the rest of
//! the time (a terminal, a test harness) a human or a test reads them. Neither
//! needs a logging framework, and each dependency is one more thing to audit.
//!
//! # Format
//!
//! Under journald (see [`journal_mode`]) a line is `<N>target: message`, where
//! `N` is the syslog priority (error 3, warn 4, info 6, debug and trace 7).
//! journald parses that prefix into the entry's `PRIORITY` field, so
//! `journalctl -p warning -u order-service` works, and adds its own timestamp,
//! so the line carries none.
//!
//! Anywhere else a line is `2026-11-25T01:02:03.456Z INFO target: message`,
//! with a UTC timestamp computed from [`SystemTime`] (no date crate needed).
//!
//! # Filter
//!
//! `RUST_LOG` is either one level (`error`, `warn`, `info`, `debug`, `trace`,
//! `off`) or a comma-separated list of `target=level` directives and at most
//! one bare default level: `info,streamline::consumer=debug`. A directive
//! applies to its target and to everything below it (`streamline` covers
//! `streamline::consumer`, not `streamlined`); when several apply, the
//! longest target wins. Unset or empty means `info`. A directive that cannot be
//! parsed is reported once on stderr and ignored, rather than stopping the
//! service: a typo in a log filter should not take production down.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// The level used when `RUST_LOG` is unset, empty, or names no default.
const DEFAULT_LEVEL: LevelFilter = LevelFilter::Info;

/// Set by the first [`init`]; later calls see it and do nothing.
static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Installs the logger for this process with the filter `spec` (the
/// configuration's `RUST_LOG`, from the environment or `--rust-log`), reading
/// `JOURNAL_STREAM` once.
///
/// `service` is the binary's name; it prefixes the warning printed when
/// `RUST_LOG` has directives that cannot be parsed, so the user knows which
/// process complained.
///
/// Only the first call has an effect: a second call (or a logger installed by
/// someone else, as a test harness might) is left alone, because the `log`
/// crate allows one logger per process.
pub fn init(service: &str, spec: &str) {
    let mut first = false;
    let logger = LOGGER.get_or_init(|| {
        first = true;
        let (filter, errors) = Filter::parse(spec);
        if !errors.is_empty() {
            let line = format!(
                "{service}: ignoring RUST_LOG directive(s) it cannot parse: {}\n",
                errors.join(", ")
            );
            // Nowhere better to report a failed write to stderr.
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
        let journal = journal_mode(
            std::env::var("JOURNAL_STREAM").ok().as_deref(),
            stderr_identity(),
        );
        Logger { filter, journal }
    });
    if !first {
        return;
    }
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.filter.max_level());
    }
}

/// The installed logger: a parsed filter and the output format.
struct Logger {
    filter: Filter,
    journal: bool,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter.enabled(metadata.target(), metadata.level())
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_line(
            self.journal,
            SystemTime::now(),
            record.level(),
            record.target(),
            record.args(),
        );
        // The whole line goes out in one `write_all` under stderr's lock, so
        // records from different threads never interleave. A failed write
        // (closed stderr) has nowhere to be reported and must not panic.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().lock().flush();
    }
}

/// A parsed `RUST_LOG` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    default: LevelFilter,
    /// `(target, level)`, longest target first, so the first match is the
    /// most specific one.
    directives: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// Parses a `RUST_LOG` value. Returns the filter and the directives that
    /// could not be parsed (already left out of the filter).
    pub fn parse(spec: &str) -> (Filter, Vec<String>) {
        let mut default = None;
        let mut directives = Vec::new();
        let mut errors = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                None => match parse_level(part) {
                    Some(level) if default.is_none() => default = Some(level),
                    Some(_) => errors.push(format!("{part:?} (a second default level)")),
                    None => errors.push(format!("{part:?} (not a level)")),
                },
                Some((target, level)) => {
                    let target = target.trim();
                    match parse_level(level.trim()) {
                        Some(level) if !target.is_empty() => {
                            directives.push((target.to_owned(), level));
                        }
                        Some(_) => errors.push(format!("{part:?} (empty target)")),
                        None => errors.push(format!("{part:?} (not a level)")),
                    }
                }
            }
        }
        // Stable sort: for two directives with the same target, the first
        // one written wins, as it is found first.
        directives.sort_by_key(|(target, _)| std::cmp::Reverse(target.len()));
        let filter = Filter {
            default: default.unwrap_or(DEFAULT_LEVEL),
            directives,
        };
        (filter, errors)
    }

    /// The level that applies to `target`: the longest directive whose
    /// target is `target` itself or one of its `::` parents, else the default.
    pub fn level_for(&self, target: &str) -> LevelFilter {
        self.directives
            .iter()
            .find(|(prefix, _)| covers(prefix, target))
            .map_or(self.default, |(_, level)| *level)
    }

    /// Whether a record of `level` from `target` is written.
    pub fn enabled(&self, target: &str, level: Level) -> bool {
        level <= self.level_for(target)
    }

    /// The most verbose level any directive allows; given to
    /// [`log::set_max_level`] so disabled records cost one comparison.
    pub fn max_level(&self) -> LevelFilter {
        self.directives
            .iter()
            .map(|(_, level)| *level)
            .fold(self.default, std::cmp::Ord::max)
    }
}

/// Whether the directive target `prefix` applies to `target`: equal, or a
/// parent module (`a::b` covers `a::b::c` but not `a::bc`).
fn covers(prefix: &str, target: &str) -> bool {
    match target.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with("::"),
        None => false,
    }
}

fn parse_level(s: &str) -> Option<LevelFilter> {
    // `LevelFilter::from_str` is case-insensitive and knows `off`.
    s.parse().ok()
}

/// The syslog priority journald reads from a `<N>` line prefix
/// (`sd-daemon(3)`): error is `LOG_ERR`, warn `LOG_WARNING`, info `LOG_INFO`,
/// debug and trace `LOG_DEBUG`.
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Whether stderr is connected to the journal.
///
/// systemd sets `JOURNAL_STREAM=<device>:<inode>` to identify the stream it
/// connected stderr to. The variable is inherited by children whose stderr
/// may be something else (a pipe to a test harness, a file), so, as
/// `systemd.exec(5)` recommends, journal mode needs the variable to name the
/// very file stderr is. `stderr` is that file's `(device, inode)`, when it
/// could be read.
pub fn journal_mode(journal_stream: Option<&str>, stderr: Option<(u64, u64)>) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|s| s.split_once(':')) else {
        return false;
    };
    match (dev.trim().parse::<u64>(), ino.trim().parse::<u64>(), stderr) {
        (Ok(dev), Ok(ino), Some(actual)) => (dev, ino) == actual,
        _ => false,
    }
}

/// `(st_dev, st_ino)` of this process's stderr, by `fstat` on a duplicate of
/// the descriptor (safe code: the duplicate is owned and closed on drop).
fn stderr_identity() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Formats one record as the line written to stderr, newline included.
///
/// A message that contains newlines stays one record: under journald every
/// continuation line gets the same `<N>` prefix (journald makes one entry per
/// line, and without a prefix would file the continuation at `info`);
/// elsewhere continuation lines are indented, so a line that starts with a
/// timestamp always starts a record.
pub fn format_line(
    journal: bool,
    now: SystemTime,
    level: Level,
    target: &str,
    message: &fmt::Arguments<'_>,
) -> String {
    let mut text = String::with_capacity(128);
    let _ = write!(text, "{target}: {message}");
    let mut line = String::with_capacity(text.len() + 40);
    if journal {
        let prefix = format!("<{}>", syslog_priority(level));
        for part in text.split('\n') {
            line.push_str(&prefix);
            line.push_str(part);
            line.push('\n');
        }
    } else {
        let _ = write!(line, "{} {level} ", Timestamp(now));
        line.push_str(&text.replace('\n', "\n  "));
        line.push('\n');
    }
    line
}

/// RFC 3339 UTC with milliseconds: `2026-11-25T01:02:03.456Z`. Times before
/// 1970 (a broken clock) print as the epoch.
struct Timestamp(SystemTime);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let (year, month, day) = civil_from_days(secs / 86_400);
        let rem = secs % 86_400;
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem / 60 % 60,
            rem % 60,
            since.subsec_millis()
        )
    }
}

/// The proleptic Gregorian date of a day count since 1970-01-01, by Howard
/// Hinnant's `civil_from_days` (days are non-negative here, which keeps the
/// arithmetic unsigned).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn filter(spec: &str) -> Filter {
        let (filter, errors) = Filter::parse(spec);
        assert!(errors.is_empty(), "{spec:?}: {errors:?}");
        filter
    }

    #[test]
    fn unset_or_empty_means_info() {
        for spec in ["", " ", ",", " , "] {
            let f = filter(spec);
            assert_eq!(f.level_for("anything"), LevelFilter::Info, "{spec:?}");
            assert_eq!(f.max_level(), LevelFilter::Info);
        }
    }

    #[test]
    fn a_single_level_applies_everywhere() {
        for (spec, level) in [
            ("error", LevelFilter::Error),
            ("warn", LevelFilter::Warn),
            ("info", LevelFilter::Info),
            ("DEBUG", LevelFilter::Debug),
            ("trace", LevelFilter::Trace),
            ("off", LevelFilter::Off),
        ] {
            let f = filter(spec);
            assert_eq!(f.level_for("streamline::consumer"), level, "{spec}");
            assert_eq!(f.level_for("tiny_http"), level, "{spec}");
        }
        assert!(!filter("off").enabled("x", Level::Error));
        assert!(filter("warn").enabled("x", Level::Error));
        assert!(!filter("warn").enabled("x", Level::Info));
    }

    #[test]
    fn target_directives_match_whole_path_segments() {
        let f = filter("info,streamline::consumer=debug");
        assert_eq!(f.level_for("streamline::consumer"), LevelFilter::Debug);
        assert_eq!(
            f.level_for("streamline::consumer::claim"),
            LevelFilter::Debug
        );
        assert_eq!(f.level_for("streamline::consumers"), LevelFilter::Info);
        assert_eq!(f.level_for("streamline"), LevelFilter::Info);
        assert_eq!(f.max_level(), LevelFilter::Debug);
        assert!(f.enabled("streamline::consumer", Level::Debug));
        assert!(!f.enabled("streamline::consumer", Level::Trace));
        assert!(!f.enabled("streamline::http", Level::Debug));
    }

    #[test]
    fn the_longest_matching_target_wins_whatever_the_order() {
        for spec in [
            "streamline=warn,streamline::consumer=trace",
            "streamline::consumer=trace,streamline=warn",
        ] {
            let f = filter(spec);
            assert_eq!(f.level_for("streamline::consumer::x"), LevelFilter::Trace);
            assert_eq!(f.level_for("streamline::http"), LevelFilter::Warn);
            assert_eq!(f.level_for("ureq"), LevelFilter::Info, "default stays info");
        }
    }

    #[test]
    fn a_default_may_stand_anywhere_in_the_list() {
        let f = filter("streamline=debug, error");
        assert_eq!(f.level_for("ureq::unversioned"), LevelFilter::Error);
        assert_eq!(f.level_for("streamline"), LevelFilter::Debug);
        assert_eq!(f.max_level(), LevelFilter::Debug);
    }

    #[test]
    fn a_quiet_directive_lowers_max_level_only_for_its_target() {
        let f = filter("debug,tiny_http=off");
        assert_eq!(f.level_for("tiny_http"), LevelFilter::Off);
        assert_eq!(f.max_level(), LevelFilter::Debug);
    }

    #[test]
    fn bad_directives_are_reported_and_skipped() {
        let (f, errors) = Filter::parse("inof,streamline=loud,=debug,warn,error,a=trace");
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].contains("inof"));
        assert!(errors[1].contains("streamline=loud"));
        assert!(errors[2].contains("=debug"));
        assert!(errors[3].contains("error"), "second default: {errors:?}");
        assert_eq!(f.level_for("x"), LevelFilter::Warn);
        assert_eq!(f.level_for("a"), LevelFilter::Trace);
        assert_eq!(f.level_for("streamline"), LevelFilter::Warn);
    }

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn timestamps_are_utc_rfc3339_with_millis() {
        assert_eq!(Timestamp(at(0, 0)).to_string(), "1970-01-01T00:00:00.000Z");
        // date -u -d 2026-11-25T01:02:03Z +%s
        assert_eq!(
            Timestamp(at(1_795_568_523, 456)).to_string(),
            "2026-11-25T01:02:03.456Z"
        );
        // A leap day, and the last millisecond of a century leap year.
        assert_eq!(
            Timestamp(at(1_709_164_800, 0)).to_string(),
            "2024-02-29T00:00:00.000Z"
        );
        assert_eq!(
            Timestamp(at(978_307_199, 999)).to_string(),
            "2000-12-31T23:59:59.999Z"
        );
        let before_epoch = UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(
            Timestamp(before_epoch).to_string(),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn civil_from_days_agrees_with_a_day_by_day_walk() {
        let mut date = (1970, 1, 1);
        for days in 0..(366 * 80) {
            assert_eq!(civil_from_days(days), date, "day {days}");
            let (y, m, d) = date;
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let len = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            date = if d < len {
                (y, m, d + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
        }
    }

    #[test]
    fn plain_lines_carry_time_level_and_target() {
        let line = format_line(
            false,
            at(1_795_568_523, 456),
            Level::Info,
            "streamline::http",
            &format_args!("listening on {}", "127.0.0.1:8080"),
        );
        assert_eq!(
            line,
            "2026-11-25T01:02:03.456Z INFO streamline::http: listening on 127.0.0.1:8080\n"
        );
        let warn = format_line(false, at(0, 0), Level::Warn, "t", &format_args!("m"));
        assert_eq!(warn, "1970-01-01T00:00:00.000Z WARN t: m\n");
    }

    #[test]
    fn journal_lines_carry_the_syslog_priority_and_no_time() {
        let cases = [
            (Level::Error, "<3>"),
            (Level::Warn, "<4>"),
            (Level::Info, "<6>"),
            (Level::Debug, "<7>"),
            (Level::Trace, "<7>"),
        ];
        for (level, prefix) in cases {
            let line = format_line(true, at(5, 0), level, "t", &format_args!("hello"));
            assert_eq!(line, format!("{prefix}t: hello\n"));
        }
    }

    #[test]
    fn multi_line_messages_stay_one_record() {
        let msg = format_args!("first\nsecond");
        let journal = format_line(true, at(0, 0), Level::Error, "t", &msg);
        assert_eq!(journal, "<3>t: first\n<3>second\n");
        let plain = format_line(false, at(0, 0), Level::Error, "t", &msg);
        assert_eq!(plain, "1970-01-01T00:00:00.000Z ERROR t: first\n  second\n");
    }

    #[test]
    fn journal_mode_needs_journal_stream_to_name_stderr() {
        assert!(journal_mode(Some("8:1234"), Some((8, 1234))));
        assert!(!journal_mode(Some("8:1234"), Some((8, 999))), "inherited");
        assert!(!journal_mode(Some("8:1234"), None));
        assert!(!journal_mode(None, Some((8, 1234))));
        assert!(!journal_mode(Some("garbage"), Some((8, 1234))));
        assert!(!journal_mode(Some(""), Some((0, 0))));
    }
}

//! How a report reaches the user: every subcommand gathers a plain struct
//! first, then prints it as aligned tables for a human or, with `--json`, as
//! JSON for a script. Both come from the same struct, so they always say the
//! same thing. The small formatting helpers the reports share live here too.

use std::io::Write;

use serde::Serialize;

use crate::error::Error;

/// A report: printable as text, serializable as JSON.
pub trait Report: Serialize {
    /// The human-readable form, newline-terminated.
    fn text(&self) -> String;
}

/// Writes `report` to `out` (pretty JSON with a final newline, or its text)
/// and flushes.
pub fn emit<R: Report>(report: &R, json: bool, out: &mut dyn Write) -> Result<(), Error> {
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

/// `1 dead letter`, `2 dead letters`.
pub fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The value, or `-` when there is none.
pub fn or_dash(s: Option<&str>) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

//! The `--help` text: every subcommand and option, with the defaults the
//! services use (read from their settings, so the text cannot go stale).

use crate::args::setting_default;
use crate::NAME;

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

//! Bad configuration is refused at once: exit status 2 and one line on
//! stderr that names what is wrong. `--help` and `--version` answer and
//! exit 0. The binary runs to its end here, output captured.

use std::time::Duration;

use crate::support::{free_port, run_to_exit, Finished};

/// A refusal is immediate: no connecting, no retrying.
const QUICKLY: Duration = Duration::from_secs(5);

/// A `REDIS_URL` nothing listens on, so that even a service that wrongly
/// starts never touches a real Redis (nothing listens on port 1).
const NOWHERE: &str = "redis://127.0.0.1:1";

fn order_service(env: &[(&str, &str)], args: &[&str]) -> Finished {
    // Killed after 10 s: a service that accepts bad configuration and
    // starts serving fails the test instead of hanging it.
    run_to_exit("order-service", env, args, Duration::from_secs(10))
}

/// Exit status 2, quickly, and exactly one line on stderr that contains
/// `needle`.
fn expect_refused(run: &Finished, needle: &str) {
    assert_eq!(run.status.code(), Some(2), "expected exit status 2:\n{run}");
    assert!(run.elapsed < QUICKLY, "took {:?}:\n{run}", run.elapsed);
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr:\n{run}");
    assert!(
        lines[0].contains(needle),
        "stderr should name {needle}:\n{run}"
    );
}

fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

#[test]
fn http_addr_that_is_not_an_address_is_refused() {
    let run = order_service(&[("HTTP_ADDR", "notanaddr"), ("REDIS_URL", NOWHERE)], &[]);
    expect_refused(&run, "HTTP_ADDR");
}

#[test]
fn redis_url_that_is_not_redis_is_refused() {
    let addr = free_addr();
    let run = order_service(&[("HTTP_ADDR", &addr), ("REDIS_URL", "http://x")], &[]);
    expect_refused(&run, "REDIS_URL");
}

#[test]
fn request_timeout_that_is_not_a_number_is_refused() {
    let addr = free_addr();
    let run = order_service(
        &[
            ("HTTP_ADDR", &addr),
            ("REDIS_URL", NOWHERE),
            ("REQUEST_TIMEOUT_MS", "soon"),
        ],
        &[],
    );
    expect_refused(&run, "REQUEST_TIMEOUT_MS");
}

#[test]
fn flag_with_a_bad_value_is_refused() {
    let run = order_service(&[("REDIS_URL", NOWHERE)], &["--http-addr", "notanaddr"]);
    assert_eq!(run.status.code(), Some(2), "expected exit status 2:\n{run}");
    assert!(
        run.stderr.contains("http-addr") || run.stderr.contains("HTTP_ADDR"),
        "stderr should name the flag:\n{run}"
    );
}

#[test]
fn unknown_flag_is_refused() {
    let addr = free_addr();
    let run = order_service(
        &[("HTTP_ADDR", &addr), ("REDIS_URL", NOWHERE)],
        &["--no-such-flag"],
    );
    expect_refused(&run, "--no-such-flag");
}

#[test]
fn help_exits_0_and_documents_redis_url() {
    let run = order_service(&[], &["--help"]);
    assert_eq!(run.status.code(), Some(0), "--help should exit 0:\n{run}");
    assert!(
        run.stdout.contains("REDIS_URL"),
        "--help should mention REDIS_URL on stdout:\n{run}"
    );
}

#[test]
fn version_prints_the_version_and_exits_0() {
    let run = order_service(&[], &["--version"]);
    assert_eq!(
        run.status.code(),
        Some(0),
        "--version should exit 0:\n{run}"
    );
    assert!(
        run.stdout.contains(env!("CARGO_PKG_VERSION")),
        "--version should print {} on stdout:\n{run}",
        env!("CARGO_PKG_VERSION")
    );
}

//! The harness shared by every test module: temporary directories, free
//! ports, a throwaway `redis-server`, the service binaries as child
//! processes, an HTTP client, a webhook sink and deadline-based waiting.
//!
//! Everything here is a value that cleans up after itself in `Drop`, even when
//! the test panicked, and every failure message carries what is needed to
//! understand it (the Redis log, the service log, the HTTP answer) so nobody
//! has to rerun a test to see what happened.

// Shared by all test modules of the binary; no single module uses every
// helper, and a helper written for a later module must not fail the build.
#![allow(dead_code, unused_imports)]

pub mod flow;
mod http;
mod proxy;
mod redis;
pub mod secure;
pub mod sentinel;
mod service;
mod wait;
mod webhook;

pub use self::http::{agent, order_path, raw_request, request, request_with, Response};
pub use self::proxy::RedisProxy;
pub use self::redis::{Entry, RedisOptions, RedisServer};
pub use self::service::{bin, run_to_exit, Finished, Service};
pub use self::wait::{wait_for, wait_until};
pub use self::webhook::{Gate, Received, WebhookOptions, WebhookSink};

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// A directory of its own under the system temporary directory, removed with
/// everything in it on `Drop`.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/streamline-it-<prefix>-<pid>-<counter>-<nanos>`: the
    /// pid and counter keep parallel tests and parallel test binaries apart,
    /// the nanoseconds keep a rerun away from leftovers of a killed run.
    pub fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "streamline-it-{prefix}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The kernel picks it (bind to port 0), and the port is released before it
/// is returned, so another process can take it in between: callers that
/// start a server on it retry on "address in use". Ports handed out in this
/// process are remembered and never handed out twice, because the kernel may
/// well offer the same just-released port to two parallel tests.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        drop(listener);
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no free port found in 100 attempts");
}

/// Reads a file for a failure message; never fails.
pub fn read_lossy(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Indents a multi-line text (a log) for a panic message.
pub fn indent(text: &str) -> String {
    if text.trim().is_empty() {
        return "    <empty>".to_string();
    }
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

//! The harness shared by every test module: temporary directories, free
//! ports, a throwaway `redis-server`, the service binaries as child
//! processes, an HTTP client, a webhook sink and deadline-based waiting.
//!
//! What the load tool needs as well (ports, waiting, temporary directories,
//! Redis, service processes, HTTP, stream readers) lives in the `testkit`
//! crate of this workspace and is re-exported here under the names the
//! tests use; what only tests need (the webhook sink, the Redis proxy, TLS
//! material, the order flow helpers) lives here.
//!
//! Everything here is a value that cleans up after itself in `Drop`, even when
//! the test panicked, and every failure message carries what is needed to
//! understand it (the Redis log, the service log, the HTTP answer) so nobody
//! has to rerun a test to see what happened.

// Shared by all test modules of the binary; no single module uses every
// helper, and a helper written for a later module must not fail the build.
#![allow(dead_code, unused_imports)]

pub mod flow;
mod proxy;
pub mod secure;
pub mod sentinel;
mod service;
mod webhook;

pub use self::proxy::RedisProxy;
pub use self::service::{bin, run_to_exit, Finished, Service};
pub use self::webhook::{Gate, Received, WebhookOptions, WebhookSink};
pub use testkit::{
    agent, free_port, indent, order_path, raw_request, read_lossy, request, request_with, wait_for,
    wait_until, Entry, RedisOptions, RedisServer, Response, TempDir,
};

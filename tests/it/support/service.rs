//! The crate's service binaries as child processes: [`testkit::Service`]
//! with the binaries Cargo built for this test binary, found by name.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::time::Duration;

use super::RedisServer;

pub use testkit::Finished;

/// The path of one of the crate's binaries, as Cargo built it for this test
/// binary.
///
/// `option_env!` rather than `env!`: Cargo sets `CARGO_BIN_EXE_<name>` only
/// for binaries that exist, and a missing one must fail the tests that use
/// it, not the build of every test.
pub fn bin(name: &str) -> PathBuf {
    let path = match name {
        "order-service" => option_env!("CARGO_BIN_EXE_order-service"),
        "payment-service" => option_env!("CARGO_BIN_EXE_payment-service"),
        "notification-service" => option_env!("CARGO_BIN_EXE_notification-service"),
        "streamctl" => option_env!("CARGO_BIN_EXE_streamctl"),
        other => panic!("unknown service binary {other:?}"),
    };
    PathBuf::from(
        path.unwrap_or_else(|| panic!("Cargo built no `{name}` binary for this test binary")),
    )
}

/// A running (or stopped) service: a [`testkit::Service`] (every method is
/// its), started by binary name.
#[derive(Debug)]
pub struct Service(testkit::Service);

impl Service {
    /// Spawns `name` against `redis`, with `REDIS_URL`, a free
    /// `HTTP_ADDR` on 127.0.0.1 and `RUST_LOG=info`; `env` adds variables or
    /// overrides those. Does not wait: see [`testkit::Service::wait_ready`].
    pub fn spawn(name: &str, redis: &RedisServer, env: &[(&str, &str)]) -> Service {
        Service(testkit::Service::spawn(&bin(name), redis, env))
    }

    /// [`Service::spawn`] with command-line arguments.
    pub fn spawn_with_args(
        name: &str,
        redis: &RedisServer,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Service {
        Service(testkit::Service::spawn_with_args(
            &bin(name),
            redis,
            env,
            args,
        ))
    }

    /// Spawns `name` with no [`RedisServer`]: `env` must set `REDIS_URL`.
    pub fn spawn_env(name: &str, env: &[(&str, &str)], args: &[&str]) -> Service {
        Service(testkit::Service::spawn_env(&bin(name), env, args))
    }
}

impl Deref for Service {
    type Target = testkit::Service;

    fn deref(&self) -> &testkit::Service {
        &self.0
    }
}

impl DerefMut for Service {
    fn deref_mut(&mut self) -> &mut testkit::Service {
        &mut self.0
    }
}

/// Runs the binary `name` with exactly `env` (plus `PATH`) and `args` until
/// it exits: [`testkit::run_to_exit`].
pub fn run_to_exit(name: &str, env: &[(&str, &str)], args: &[&str], timeout: Duration) -> Finished {
    testkit::run_to_exit(&bin(name), env, args, timeout)
}

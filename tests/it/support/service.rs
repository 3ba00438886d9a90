//! The crate's service binaries as child processes: [`testkit::Service`]
//! with the binaries Cargo built for this test binary, found by name.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
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
        "shipping_service" => return example(name),
        other => panic!("unknown service binary {other:?}"),
    };
    PathBuf::from(
        path.unwrap_or_else(|| panic!("Cargo built no `{name}` binary for this test binary")),
    )
}

/// The path of one of the crate's examples, `target/<profile>/examples/<name>`
/// next to this test binary's `deps/`. A plain `cargo test` builds the
/// examples before the tests; `cargo test --test it` does not, so an example
/// that is missing, or older than this test binary (which is rebuilt with
/// the library), is built here with `cargo build --example`.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps/");
    let path = profile_dir.join("examples").join(name);
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&path).is_none() || modified(&path) < modified(&exe) {
        let target_dir = profile_dir
            .parent()
            .expect("target/ above target/<profile>/");
        let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cargo
            .args(["build", "--example", name, "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cargo.arg("--release");
        }
        let status = cargo
            .status()
            .unwrap_or_else(|e| panic!("run cargo build --example {name}: {e}"));
        assert!(status.success(), "cargo build --example {name}: {status}");
    }
    path
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

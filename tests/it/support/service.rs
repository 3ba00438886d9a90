//! A service binary of this crate running as a child process, the way it
//! runs in production: configured by environment variables, talking HTTP,
//! stopped by signals.

use std::fmt::Display;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::http::{agent, request, Response};
use super::{free_port, indent, read_lossy, RedisServer, TempDir};

/// How long a service may take to answer `/healthz` after being spawned.
const READY_DEADLINE: Duration = Duration::from_secs(15);

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

/// A running (or stopped) service.
#[derive(Debug)]
pub struct Service {
    name: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    addr: Option<SocketAddr>,
    /// Whether the harness picked the HTTP port, and so may pick another
    /// one if something took it before the service could bind it.
    port_is_ours: bool,
    dir: TempDir,
    child: Option<Child>,
    exit: Option<ExitStatus>,
    /// Length of the log when the current process was started.
    log_mark: usize,
    /// Whether a failure message already showed the log.
    log_shown: std::sync::atomic::AtomicBool,
}

impl Service {
    /// Spawns `name` against `redis`, with `REDIS_URL`, a free
    /// `HTTP_ADDR` on 127.0.0.1 and `RUST_LOG=info`; `env` adds variables or
    /// overrides those. Does not wait: see [`Service::wait_ready`].
    pub fn spawn(name: &str, redis: &RedisServer, env: &[(&str, &str)]) -> Service {
        Service::spawn_with_args(name, redis, env, &[])
    }

    /// [`Service::spawn`] with command-line arguments.
    pub fn spawn_with_args(
        name: &str,
        redis: &RedisServer,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Service {
        let url = redis.url();
        let mut all = vec![("REDIS_URL", url.as_str())];
        all.extend_from_slice(env);
        Service::spawn_env(name, &all, args)
    }

    /// Spawns `name` with no [`RedisServer`]: `env` must set `REDIS_URL`
    /// (say, to a port nothing listens on yet), because the default
    /// `127.0.0.1:6379` may be somebody's real Redis.
    pub fn spawn_env(name: &str, env: &[(&str, &str)], args: &[&str]) -> Service {
        assert!(
            env.iter().any(|(k, _)| *k == "REDIS_URL"),
            "Service::spawn_env: set REDIS_URL, never rely on the default 127.0.0.1:6379"
        );
        let mut vars: Vec<(String, String)> = vec![("RUST_LOG".into(), "info".into())];
        let port_is_ours = !env.iter().any(|(k, _)| *k == "HTTP_ADDR");
        if port_is_ours {
            vars.push(("HTTP_ADDR".into(), format!("127.0.0.1:{}", free_port())));
        }
        for (k, v) in env {
            vars.retain(|(key, _)| key != k);
            vars.push((k.to_string(), v.to_string()));
        }
        let mut service = Service {
            name: name.to_string(),
            addr: None,
            env: vars,
            args: args.iter().map(|a| a.to_string()).collect(),
            port_is_ours,
            dir: TempDir::new(name),
            child: None,
            exit: None,
            log_mark: 0,
            log_shown: std::sync::atomic::AtomicBool::new(false),
        };
        service.update_addr();
        service.launch();
        service
    }

    fn update_addr(&mut self) {
        self.addr = self.var("HTTP_ADDR").and_then(|a| a.parse().ok());
    }

    /// The service's name (its binary).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value the service was given for an environment variable.
    pub fn var(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The HTTP address (`HTTP_ADDR`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
            .unwrap_or_else(|| self.fail("HTTP_ADDR is not a socket address"))
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(&format!("{}.log", self.name))
    }

    /// Everything the service wrote to stdout and stderr, over all its
    /// starts (each start begins with a `=== harness:` line).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }

    /// What the current (or last) process wrote.
    pub fn log_since_start(&self) -> String {
        let log = self.log();
        log.get(self.log_mark..).unwrap_or(&log).to_string()
    }

    /// Its temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn launch(&mut self) {
        let log_path = self.log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", log_path.display()));
        self.log_mark = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        writeln!(
            log,
            "=== harness: starting {} {} with {} ===",
            self.name,
            self.args.join(" "),
            env.join(" ")
        )
        .expect("write the service log");
        let stderr = log.try_clone().expect("clone the log file handle");
        let mut cmd = Command::new(bin(&self.name));
        // Only what the test says: a variable of the developer's shell
        // (REDIS_URL, NOTIFY_SOCKET...) must not leak into the service.
        cmd.env_clear();
        for keep in ["PATH", "LLVM_PROFILE_FILE"] {
            if let Some(v) = std::env::var_os(keep) {
                cmd.env(keep, v);
            }
        }
        let child = cmd
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin(&self.name).display()));
        self.child = Some(child);
        self.exit = None;
    }

    /// Waits (15 s) until `GET /healthz` answers 200. If the service exits
    /// first because something took its port, starts it on another one;
    /// any other exit, or the deadline, panics with the log.
    pub fn wait_ready(&mut self) {
        let probe = agent(Duration::from_secs(2));
        let start = Instant::now();
        let mut last: String;
        loop {
            if let Some(status) = self.poll_exit() {
                let log = self.log_since_start();
                if self.port_is_ours && log.contains("in use") {
                    self.env.retain(|(k, _)| k != "HTTP_ADDR");
                    self.env
                        .push(("HTTP_ADDR".into(), format!("127.0.0.1:{}", free_port())));
                    self.update_addr();
                    self.launch();
                    continue;
                }
                self.fail(format!("exited with {status} before /healthz answered"));
            }
            match super::http::request_with(&probe, "GET", &self.url("/healthz"), &[], None) {
                Ok(r) if r.status == 200 => return,
                Ok(r) => last = r.to_string(),
                Err(e) => last = e,
            }
            if start.elapsed() > READY_DEADLINE {
                self.fail(format!(
                    "/healthz did not answer 200 within {READY_DEADLINE:?}; last: {last}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (15 s) until `GET /readyz` answers 200; panics with the log.
    pub fn wait_readyz(&mut self) {
        let probe = agent(Duration::from_secs(2));
        let start = Instant::now();
        let mut last: String;
        loop {
            if let Some(status) = self.poll_exit() {
                self.fail(format!("exited with {status} before /readyz answered 200"));
            }
            match super::http::request_with(&probe, "GET", &self.url("/readyz"), &[], None) {
                Ok(r) if r.status == 200 => return,
                Ok(r) => last = r.to_string(),
                Err(e) => last = e,
            }
            if start.elapsed() > READY_DEADLINE {
                self.fail(format!(
                    "/readyz did not answer 200 within {READY_DEADLINE:?}; last: {last}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One request to `path`; a transport failure panics with the log.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        request(method, &self.url(path), headers, body).unwrap_or_else(|e| self.fail(e))
    }

    /// `GET path`; a transport failure panics with the log.
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], None)
    }

    /// `POST path` with a JSON body (`Content-Type: application/json`).
    pub fn post_json(&self, path: &str, body: &str) -> Response {
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            Some(body.as_bytes()),
        )
    }

    /// Panics with the answer and the log unless `resp` has `status`;
    /// returns `resp` for more checks.
    pub fn expect_status<'r>(&self, resp: &'r Response, status: u16) -> &'r Response {
        if resp.status != status {
            self.fail(format!("expected status {status}, got: {resp}"));
        }
        resp
    }

    /// Panics with `what` and the log unless `cond`.
    #[track_caller]
    pub fn check(&self, cond: bool, what: impl FnOnce() -> String) {
        if !cond {
            self.fail(what());
        }
    }

    /// Panics with `what` and the service log.
    #[track_caller]
    pub fn fail(&self, what: impl Display) -> ! {
        self.log_shown
            .store(true, std::sync::atomic::Ordering::Relaxed);
        panic!(
            "{what}\n--- {} log {} ---\n{}\n--- end of {} log ---",
            self.name,
            self.log_path().display(),
            indent(&self.log()),
            self.name
        )
    }

    fn signal(&self, sig: libc::c_int) {
        let Some(pid) = self.pid() else {
            self.fail(format!("cannot send signal {sig}: not running"));
        };
        // SAFETY: kill(2) on our own child, not yet reaped (we hold its
        // `Child`), so the pid cannot belong to another process.
        let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
        self.check(rc == 0, || format!("kill({pid}, {sig}) failed"));
    }

    /// Sends SIGTERM; see [`Service::wait_exit`].
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends SIGINT; see [`Service::wait_exit`].
    pub fn sigint(&self) {
        self.signal(libc::SIGINT);
    }

    /// Sends SIGKILL and reaps the process (a crash).
    pub fn sigkill(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(10));
    }

    /// Sends SIGSTOP: the process freezes with its sockets open.
    pub fn sigstop(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Sends SIGCONT.
    pub fn sigcont(&self) {
        self.signal(libc::SIGCONT);
    }

    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                self.exit = Some(status);
            }
        }
        self.exit
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.poll_exit().is_none() && self.child.is_some()
    }

    /// Waits until the process exits and returns its status; panics with
    /// the log after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.poll_exit() {
                return status;
            }
            if self.child.is_none() {
                self.fail("wait_exit: the service was never started");
            }
            if start.elapsed() > timeout {
                self.fail(format!("still running {timeout:?} later"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the service again with the same environment, arguments and
    /// port (SIGKILLing it first if it still runs). Does not wait: see
    /// [`Service::wait_ready`].
    pub fn restart(&mut self) {
        if self.is_running() {
            self.sigkill();
        }
        self.launch();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A plain `assert!` in a test does not know about the service: show
        // its log with the failure anyway (libtest prints it only for
        // failed tests).
        if std::thread::panicking() && !self.log_shown.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!(
                "--- {} log (test failed) ---\n{}\n--- end of {} log ---",
                self.name,
                indent(&self.log()),
                self.name
            );
        }
    }
}

/// What a run of a binary to its end produced.
#[derive(Debug)]
pub struct Finished {
    /// The command line and environment, for failure messages.
    pub command: String,
    /// How it exited.
    pub status: ExitStatus,
    /// What it wrote to stdout.
    pub stdout: String,
    /// What it wrote to stderr.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\nexited with {} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- end ---",
            self.command,
            self.status,
            self.elapsed,
            indent(&self.stdout),
            indent(&self.stderr)
        )
    }
}

/// Runs a service binary with exactly `env` (plus `PATH`) and `args` until
/// it exits, capturing its output. If it still runs after `timeout`, kills
/// it and panics with what it wrote: a binary that should have refused to
/// start must not hang the test.
pub fn run_to_exit(name: &str, env: &[(&str, &str)], args: &[&str], timeout: Duration) -> Finished {
    let command = format!(
        "{} {} {}",
        env.iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join(" "),
        name,
        args.join(" ")
    );
    let dir = TempDir::new(name);
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let create = |p: &Path| {
        std::fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()))
    };
    let mut cmd = Command::new(bin(name));
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    let start = Instant::now();
    let mut child = cmd
        .envs(env.iter().copied())
        .args(args)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(create(&out_path))
        .stderr(create(&err_path))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command}: {e}"));
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command}\nstill running after {timeout:?}, killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
                indent(&read_lossy(&out_path)),
                indent(&read_lossy(&err_path))
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        command,
        status,
        elapsed: start.elapsed(),
        stdout: read_lossy(&out_path),
        stderr: read_lossy(&err_path),
    }
}

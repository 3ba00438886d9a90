//! A service binary running as a child process, the way it runs in
//! production: configured by environment variables, talking HTTP, stopped
//! by signals.
//!
//! The binary is given by its path: the test crate knows it from
//! `env!("CARGO_BIN_EXE_...")`, the load tool from `--bin-dir`.

use std::fmt::Display;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::http::{request, Response};
use crate::raw::RawClient;
use crate::{free_port, indent, read_lossy, try_free_port, RedisServer, TempDir};

/// How long a service may take to answer `/healthz` (or `/readyz`) in
/// [`Service::wait_ready`] (and [`Service::wait_readyz`]).
const READY_DEADLINE: Duration = Duration::from_secs(15);
/// Between two probes of the tests' waits.
const PROBE_PAUSE: Duration = Duration::from_millis(20);

/// How to start a [`Service`]: the binary, its environment and arguments.
///
/// The service gets exactly the variables given (plus `PATH` and
/// `LLVM_PROFILE_FILE`), so a variable of the developer's shell
/// (`REDIS_URL`, `NOTIFY_SOCKET`...) cannot leak into a test; the load tool
/// asks for [`ServiceSpec::inherit_env`]. `RUST_LOG=info` and a free
/// `HTTP_ADDR` on 127.0.0.1 are the defaults; `REDIS_URL` must be given,
/// because the default `127.0.0.1:6379` may be somebody's real Redis.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    bin: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
    inherit_env: bool,
}

impl ServiceSpec {
    /// The binary at `bin`, named after its file name. A relative path is
    /// taken from this process's working directory (the service runs in a
    /// directory of its own).
    pub fn new(bin: &Path) -> ServiceSpec {
        ServiceSpec {
            bin: absolute(bin),
            env: Vec::new(),
            args: Vec::new(),
            inherit_env: false,
        }
    }

    /// One environment variable (a later one of the same name wins).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Environment variables.
    pub fn envs(mut self, vars: &[(&str, &str)]) -> Self {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    /// Command-line arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Passes this process's environment on as well (the given variables
    /// win).
    pub fn inherit_env(mut self) -> Self {
        self.inherit_env = true;
        self
    }

    /// Spawns the service; does not wait (see [`Service::wait_ready`] and
    /// [`Service::try_wait_readyz`]).
    pub fn start(self) -> Result<Service, String> {
        Service::start(self)
    }
}

/// A running (or stopped) service.
#[derive(Debug)]
pub struct Service {
    name: String,
    bin: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
    inherit_env: bool,
    addr: Option<SocketAddr>,
    /// Whether the harness picked the HTTP port, and so may pick another
    /// one if something took it before the service could bind it.
    port_is_ours: bool,
    dir: TempDir,
    child: Option<Child>,
    exit: Option<ExitStatus>,
    /// When the current process was spawned.
    started: Instant,
    /// Length of the log when the current process was started.
    log_mark: usize,
    /// Whether a failure message already showed the log.
    log_shown: std::sync::atomic::AtomicBool,
}

impl Service {
    /// Spawns the binary `bin` against `redis`, with `REDIS_URL`, a free
    /// `HTTP_ADDR` on 127.0.0.1 and `RUST_LOG=info`; `env` adds variables or
    /// overrides those. Does not wait: see [`Service::wait_ready`].
    pub fn spawn(bin: &Path, redis: &RedisServer, env: &[(&str, &str)]) -> Service {
        Service::spawn_with_args(bin, redis, env, &[])
    }

    /// [`Service::spawn`] with command-line arguments.
    pub fn spawn_with_args(
        bin: &Path,
        redis: &RedisServer,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Service {
        let url = redis.url();
        let mut all = vec![("REDIS_URL", url.as_str())];
        all.extend_from_slice(env);
        Service::spawn_env(bin, &all, args)
    }

    /// Spawns `bin` with no [`RedisServer`]: `env` must set `REDIS_URL`
    /// (say, to a port nothing listens on yet), because the default
    /// `127.0.0.1:6379` may be somebody's real Redis. Panics if it cannot
    /// be spawned.
    pub fn spawn_env(bin: &Path, env: &[(&str, &str)], args: &[&str]) -> Service {
        ServiceSpec::new(bin)
            .envs(env)
            .args(args)
            .start()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn start(spec: ServiceSpec) -> Result<Service, String> {
        let name = spec
            .bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| format!("{} names no binary", spec.bin.display()))?;
        if !spec.env.iter().any(|(k, _)| k == "REDIS_URL") {
            return Err(format!(
                "{name}: set REDIS_URL, never rely on the default 127.0.0.1:6379"
            ));
        }
        let mut vars: Vec<(String, String)> = vec![("RUST_LOG".into(), "info".into())];
        let port_is_ours = !spec.env.iter().any(|(k, _)| k == "HTTP_ADDR");
        if port_is_ours {
            vars.push((
                "HTTP_ADDR".into(),
                format!("127.0.0.1:{}", try_free_port()?),
            ));
        }
        for (k, v) in spec.env {
            vars.retain(|(key, _)| *key != k);
            vars.push((k, v));
        }
        let mut service = Service {
            dir: TempDir::try_new(&name)?,
            name,
            bin: spec.bin,
            addr: None,
            env: vars,
            args: spec.args,
            inherit_env: spec.inherit_env,
            port_is_ours,
            child: None,
            exit: None,
            started: Instant::now(),
            log_mark: 0,
            log_shown: std::sync::atomic::AtomicBool::new(false),
        };
        service.update_addr();
        service.launch()?;
        Ok(service)
    }

    fn update_addr(&mut self) {
        self.addr = self.var("HTTP_ADDR").and_then(|a| a.parse().ok());
    }

    /// The service's name (its binary's file name).
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

    fn launch(&mut self) -> Result<(), String> {
        let log_path = self.log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("open {}: {e}", log_path.display()))?;
        self.log_mark = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        writeln!(
            log,
            "=== harness: starting {} {} with {} ===",
            self.name,
            self.args.join(" "),
            env.join(" ")
        )
        .map_err(|e| format!("write {}: {e}", log_path.display()))?;
        let stderr = log
            .try_clone()
            .map_err(|e| format!("clone the handle of {}: {e}", log_path.display()))?;
        let mut cmd = Command::new(&self.bin);
        if !self.inherit_env {
            cmd.env_clear();
            for keep in ["PATH", "LLVM_PROFILE_FILE"] {
                if let Some(v) = std::env::var_os(keep) {
                    cmd.env(keep, v);
                }
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        self.started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        self.exit = None;
        Ok(())
    }

    /// Waits (15 s) until `GET /healthz` answers 200. If the service exits
    /// first because something took its port, starts it on another one;
    /// any other exit, or the deadline, panics with the log.
    pub fn wait_ready(&mut self) {
        if let Err(e) = self.probe_until_200("/healthz", READY_DEADLINE, PROBE_PAUSE, true) {
            self.fail(e);
        }
    }

    /// Waits (15 s) until `GET /readyz` answers 200; panics with the log.
    pub fn wait_readyz(&mut self) {
        if let Err(e) = self.probe_until_200("/readyz", READY_DEADLINE, PROBE_PAUSE, false) {
            self.fail(e);
        }
    }

    /// Probes `GET /readyz` every `pause`, a fresh connection each time,
    /// until it answers 200; returns the time from the spawn to that
    /// answer. Fails if the process exits first, or after `limit`.
    pub fn try_wait_readyz(
        &mut self,
        limit: Duration,
        pause: Duration,
    ) -> Result<Duration, String> {
        self.probe_until_200("/readyz", limit, pause, false)
    }

    fn probe_until_200(
        &mut self,
        path: &str,
        limit: Duration,
        pause: Duration,
        new_port_if_taken: bool,
    ) -> Result<Duration, String> {
        let start = Instant::now();
        let mut last: String;
        loop {
            if let Some(status) = self.poll_exit() {
                let log = self.log_since_start();
                if new_port_if_taken && self.port_is_ours && log.contains("in use") {
                    self.env.retain(|(k, _)| k != "HTTP_ADDR");
                    self.env
                        .push(("HTTP_ADDR".into(), format!("127.0.0.1:{}", free_port())));
                    self.update_addr();
                    self.launch()?;
                    continue;
                }
                return Err(format!("exited with {status} before {path} answered 200"));
            }
            // A fresh connection per probe: the first one is refused until
            // the service listens.
            let mut probe = RawClient::new(self.addr());
            match probe.get(path) {
                Ok(200) => return Ok(self.started.elapsed()),
                Ok(status) => {
                    let body = String::from_utf8_lossy(probe.body());
                    last = format!("{path} answered {status} {:?}", body.trim());
                }
                Err(e) => last = e,
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "{path} did not answer 200 within {limit:?}; last: {last}"
                ));
            }
            std::thread::sleep(pause);
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
        if let Err(e) = self.launch() {
            self.fail(e);
        }
    }

    /// Sends SIGTERM and waits for the exit; returns how long it took. After
    /// `limit`, SIGKILLs and reaps the process and fails.
    pub fn terminate(&mut self, limit: Duration) -> Result<Duration, String> {
        let pid = self.pid().ok_or("not running")?;
        let asked = Instant::now();
        // SAFETY: kill(2) on our own child, not yet reaped (we hold its
        // `Child`), so the pid cannot belong to another process.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        while asked.elapsed() < limit {
            if self.poll_exit().is_some() {
                return Ok(asked.elapsed());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            self.exit = child.wait().ok();
        }
        Err(format!("did not stop within {limit:?} of SIGTERM (killed)"))
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

/// Runs the binary `bin` with exactly `env` (plus `PATH`) and `args` until
/// it exits, capturing its output. If it still runs after `timeout`, kills
/// it and panics with what it wrote: a binary that should have refused to
/// start must not hang the test.
pub fn run_to_exit(bin: &Path, env: &[(&str, &str)], args: &[&str], timeout: Duration) -> Finished {
    let name = bin.file_name().map_or_else(
        || bin.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let name = name.as_str();
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
    let mut cmd = Command::new(absolute(bin));
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

/// `path` from this process's working directory: a child started in
/// another directory would look for a relative path there.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

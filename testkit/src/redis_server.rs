//! A throwaway `redis-server` for one test: its own free port, its own
//! directory, its own log, killed and reaped in `Drop`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::streams::{StreamInfoGroup, StreamRangeReply};

use crate::{free_port, indent, read_lossy, stream, wait_for, TempDir};

/// How long a start may take until `PING` answers.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// Read and write timeout of the connections handed to tests, so a paused
/// or wedged server fails a test instead of hanging it.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// How to start a [`RedisServer`]. The defaults are an in-memory server:
/// `--save "" --appendonly no`.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    appendonly: bool,
    port: Option<u16>,
    tls: Option<Tls>,
    args: Vec<String>,
}

#[derive(Debug, Clone)]
struct Tls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl RedisOptions {
    /// `--appendonly yes`: writes survive [`RedisServer::stop`] and
    /// [`RedisServer::start_again`].
    pub fn appendonly(mut self, yes: bool) -> Self {
        self.appendonly = yes;
        self
    }

    /// Listens on this port instead of a free one picked at start, e.g. a
    /// port a service was already told about before Redis started.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Serves TLS only (`--port 0 --tls-port P`, no client certificates),
    /// with the given PEM files; [`RedisServer::url`] becomes `rediss://`.
    /// The certificate must be valid for `127.0.0.1`.
    pub fn tls(mut self, cert: &Path, key: &Path, ca: &Path) -> Self {
        self.tls = Some(Tls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            ca: ca.to_path_buf(),
        });
        self
    }

    /// One more argument for `redis-server`, after the harness's own.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Starts the server; panics (with its log) if it does not answer `PING`
    /// within 10 s.
    pub fn start(self) -> RedisServer {
        RedisServer::start_with(self)
    }
}

/// One stream entry: its ID and its fields as strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry ID, `ms-seq`.
    pub id: String,
    /// The fields.
    pub fields: BTreeMap<String, String>,
}

impl Entry {
    /// The value of a field, if present.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }
}

/// A running (or stopped) `redis-server`.
#[derive(Debug)]
pub struct RedisServer {
    opts: RedisOptions,
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts an in-memory server on a free port.
    pub fn start() -> RedisServer {
        RedisOptions::default().start()
    }

    /// Options for a server that is not the default one.
    pub fn options() -> RedisOptions {
        RedisOptions::default()
    }

    fn start_with(opts: RedisOptions) -> RedisServer {
        let mut server = RedisServer {
            port: opts.port.unwrap_or_else(free_port),
            opts,
            dir: TempDir::new("redis"),
            child: None,
        };
        // The port was free when picked, but anything may have taken it
        // since: pick another one, unless the test asked for this port.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match server.launch() {
                Ok(()) => return server,
                Err(Failure::PortInUse) if server.opts.port.is_none() && attempts < 10 => {
                    server.port = free_port();
                }
                Err(f) => server.fail(&format!("redis-server did not start: {f:?}")),
            }
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:P` (`rediss://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Its directory (persistence files, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A client for this server (trusting the test CA with TLS).
    pub fn client(&self) -> redis::Client {
        let client = match &self.opts.tls {
            None => redis::Client::open(self.url()),
            Some(tls) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(&tls.ca).expect("read the CA certificate")),
                },
            ),
        };
        client.unwrap_or_else(|e| panic!("redis client for {}: {e}", self.url()))
    }

    /// A new connection with 5 s read and write timeouts; panics with the
    /// server log if it cannot connect.
    pub fn conn(&self) -> redis::Connection {
        self.try_conn()
            .unwrap_or_else(|e| self.fail(&format!("cannot connect to {}: {e}", self.url())))
    }

    fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        let conn = self
            .client()
            .get_connection_with_timeout(Duration::from_secs(1))?;
        conn.set_read_timeout(Some(CONN_TIMEOUT))?;
        conn.set_write_timeout(Some(CONN_TIMEOUT))?;
        Ok(conn)
    }

    /// `XLEN stream` (0 when the stream does not exist).
    pub fn xlen(&self, stream: &str) -> usize {
        redis::cmd("XLEN")
            .arg(stream)
            .query(&mut self.conn())
            .unwrap_or_else(|e| self.fail(&format!("XLEN {stream}: {e}")))
    }

    /// `XRANGE stream - +`, fields as strings.
    pub fn entries(&self, stream: &str) -> Vec<Entry> {
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(&mut self.conn())
            .unwrap_or_else(|e| self.fail(&format!("XRANGE {stream}: {e}")));
        reply
            .ids
            .into_iter()
            .map(|e| Entry {
                fields: e
                    .map
                    .iter()
                    .map(|(k, v)| {
                        let v: String = redis::from_redis_value_ref(v)
                            .unwrap_or_else(|err| panic!("field {k} of {}: {err}", e.id));
                        (k.clone(), v)
                    })
                    .collect(),
                id: e.id,
            })
            .collect()
    }

    /// `XINFO GROUPS stream`; empty when the stream does not exist.
    pub fn groups(&self, stream: &str) -> Vec<StreamInfoGroup> {
        stream::try_groups(&mut self.conn(), stream).unwrap_or_else(|e| self.fail(&e))
    }

    /// The group `name` of `stream`, if it exists.
    pub fn group(&self, stream: &str, name: &str) -> Option<StreamInfoGroup> {
        self.groups(stream).into_iter().find(|g| g.name == name)
    }

    /// Waits until the server answers `PING` (after a resume, for instance).
    pub fn wait_pong(&self, deadline: Duration) {
        wait_for("redis answers PING", deadline, || {
            let mut conn = self.try_conn().ok()?;
            redis::cmd("PING").query::<String>(&mut conn).ok()
        });
    }

    /// Kills the server (SIGKILL, like a crash or a power cut) and reaps it.
    /// The directory stays, for [`RedisServer::start_again`].
    pub fn stop(&mut self) {
        self.kill();
    }

    /// SIGKILL and reap; the directory stays. Does nothing if not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `SHUTDOWN`: Redis flushes its append-only file and exits; waits (10 s)
    /// until the process is gone and reaps it.
    pub fn shutdown_graceful(&mut self) {
        // The server closes the connection instead of answering.
        let _ = redis::cmd("SHUTDOWN").exec(&mut self.conn());
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let Some(child) = self.child.as_mut() else {
                return;
            };
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return;
            }
            if Instant::now() > deadline {
                self.fail("redis-server still running 10 s after SHUTDOWN");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel
    /// but nothing is answered, the way a wedged or swapped-out server looks.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Thaws a [`RedisServer::pause`]d server (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.pid().expect("redis-server is not running") as libc::pid_t;
        // SAFETY: kill(2) with our own child's pid; the child is not reaped
        // yet (we hold its `Child`), so the pid cannot have been reused.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// Starts the server again after [`RedisServer::stop`] or
    /// [`RedisServer::shutdown_graceful`]: same port, same directory, so
    /// persistence files are read back. Panics with the log on failure.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again: redis-server is running");
        // Something (an outgoing connection's ephemeral port) may hold our
        // port for a moment; it must be this port, so wait for it.
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(Failure::PortInUse) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(f) => self.fail(&format!("redis-server did not start again: {f:?}")),
            }
        }
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => matches!(child.try_wait(), Ok(None)),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    fn args(&self) -> Vec<String> {
        let port = self.port.to_string();
        let mut args: Vec<String> = match &self.opts.tls {
            None => vec!["--port".into(), port],
            Some(tls) => vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port,
                "--tls-cert-file".into(),
                tls.cert.display().to_string(),
                "--tls-key-file".into(),
                tls.key.display().to_string(),
                "--tls-ca-cert-file".into(),
                tls.ca.display().to_string(),
                "--tls-auth-clients".into(),
                "no".into(),
            ],
        };
        args.extend([
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            if self.opts.appendonly { "yes" } else { "no" }.into(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--logfile".into(),
            self.log_path().display().to_string(),
        ]);
        args.extend(self.opts.args.iter().cloned());
        args
    }

    /// Spawns the process on `self.port` and waits until it answers `PING`.
    fn launch(&mut self) -> Result<(), Failure> {
        let log_before = std::fs::metadata(self.log_path()).map_or(0, |m| m.len() as usize);
        let child = Command::new(redis_server_path())
            .args(self.args())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Failure::Spawn(e.to_string()))?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(mut conn) = self.try_conn() {
                if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                    return Ok(());
                }
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                let log = self.log();
                let this_start = log.get(log_before..).unwrap_or(&log);
                return Err(if this_start.contains("Address already in use") {
                    Failure::PortInUse
                } else {
                    Failure::Exited(status.to_string())
                });
            }
            if start.elapsed() > START_DEADLINE {
                self.kill();
                return Err(Failure::NoPing);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics with `what`, the command line and the server log.
    fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\nredis-server {}\n--- redis log {} ---\n{}\n--- end of redis log ---",
            self.args().join(" "),
            self.log_path().display(),
            indent(&self.log())
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A paused server dies of SIGKILL as well.
        self.kill();
    }
}

// The fields are read only through `Debug`, in the failure message.
#[allow(dead_code)]
#[derive(Debug)]
enum Failure {
    Spawn(String),
    PortInUse,
    Exited(String),
    NoPing,
}

/// `redis-server` from `PATH`, found once.
fn redis_server_path() -> PathBuf {
    static PATH: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join("redis-server"))
            .find(|p| p.is_file())
    })
    .clone()
    .unwrap_or_else(|| {
        panic!("redis-server not found on PATH: install it with `apt-get install -y redis-server`")
    })
}

//! A throwaway Redis Sentinel setup for one test: a master, two replicas
//! and three sentinels (`redis-server <conf> --sentinel`, a config file
//! each), all on free ports in temporary directories, killed in `Drop`.
//!
//! The sentinels judge a master down after 1 s (`down-after-milliseconds
//! 1000`) with a quorum of two, so a failover completes a few seconds
//! after the master dies.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::Value;

use super::{
    free_port, indent, read_lossy, wait_for, wait_until, RedisOptions, RedisServer, TempDir,
};

/// The master's name, as the sentinels know it.
pub const MASTER_NAME: &str = "mymaster";
/// How long the whole setup may take to be ready.
const SETUP_DEADLINE: Duration = Duration::from_secs(30);

/// One `redis-server --sentinel` process.
#[derive(Debug)]
pub struct SentinelProcess {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl SentinelProcess {
    fn start(master_port: u16) -> SentinelProcess {
        let mut s = SentinelProcess {
            port: free_port(),
            dir: TempDir::new("sentinel"),
            child: None,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            s.write_config(master_port);
            match s.launch() {
                Ok(()) => return s,
                Err(log) if log.contains("Address already in use") && attempts < 10 => {
                    s.port = free_port();
                }
                Err(log) => panic!(
                    "sentinel on port {} did not start:\n{}",
                    s.port,
                    indent(&log)
                ),
            }
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("sentinel.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("sentinel.log")
    }

    fn write_config(&self, master_port: u16) {
        let config = format!(
            "port {port}\n\
             bind 127.0.0.1\n\
             dir {dir}\n\
             logfile {log}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
             sentinel failover-timeout {MASTER_NAME} 3000\n\
             sentinel parallel-syncs {MASTER_NAME} 2\n",
            port = self.port,
            dir = self.dir.path().display(),
            log = self.log_path().display(),
        );
        std::fs::write(self.config_path(), config)
            .unwrap_or_else(|e| panic!("write {}: {e}", self.config_path().display()));
    }

    /// Spawns the sentinel and waits until it answers `PING`; the log of
    /// this start if it exits or does not answer.
    fn launch(&mut self) -> Result<(), String> {
        let before = std::fs::metadata(self.log_path()).map_or(0, |m| m.len() as usize);
        let child = Command::new("redis-server")
            .arg(self.config_path())
            .arg("--sentinel")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn redis-server --sentinel: {e}"))?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if self.query(&["PING"]).is_some() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || start.elapsed() > Duration::from_secs(10) {
                self.kill();
                let log = read_lossy(&self.log_path());
                return Err(log.get(before..).unwrap_or(&log).to_string());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether it runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL and reap; the config file (which the sentinel rewrote with
    /// what it learned) stays for [`SentinelProcess::start_again`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with its own config file.
    pub fn start_again(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(log) if log.contains("Address already in use") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(log) => panic!(
                    "sentinel {} did not start again:\n{}",
                    self.port,
                    indent(&log)
                ),
            }
        }
    }

    /// A command's reply, `None` if the sentinel does not answer.
    pub fn query(&self, args: &[&str]) -> Option<Value> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).ok()?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn).ok()
    }

    /// The master's port as this sentinel names it.
    pub fn master_port(&self) -> Option<u16> {
        let reply = self.query(&["SENTINEL", "get-master-addr-by-name", MASTER_NAME])?;
        match reply {
            Value::Array(v) => match v.as_slice() {
                [_, Value::BulkString(p)] => std::str::from_utf8(p).ok()?.parse().ok(),
                _ => None,
            },
            _ => None,
        }
    }

    /// A field of `SENTINEL master mymaster`.
    fn master_field(&self, name: &str) -> Option<String> {
        let Value::Array(kv) = self.query(&["SENTINEL", "master", MASTER_NAME])? else {
            return None;
        };
        kv.chunks(2).find_map(|p| match p {
            [Value::BulkString(k), Value::BulkString(v)] if k == name.as_bytes() => {
                Some(String::from_utf8_lossy(v).into_owned())
            }
            _ => None,
        })
    }

    /// Its log.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A master, two replicas and three sentinels watching them.
#[derive(Debug)]
pub struct SentinelSetup {
    /// The data nodes; the first started as the master.
    pub nodes: Vec<RedisServer>,
    /// The sentinels.
    pub sentinels: Vec<SentinelProcess>,
}

impl SentinelSetup {
    /// Starts everything and waits until every sentinel knows both
    /// replicas and both other sentinels (so a failover can happen).
    pub fn start() -> SentinelSetup {
        let master = data_node().start();
        let replicas = (0..2)
            .map(|_| replica_of(master.port()))
            .collect::<Vec<_>>();
        let mut nodes = vec![master];
        nodes.extend(replicas);
        let sentinels = (0..3)
            .map(|_| SentinelProcess::start(nodes[0].port()))
            .collect();
        let setup = SentinelSetup { nodes, sentinels };
        let started = Instant::now();
        while !setup.sentinels.iter().all(|s| {
            s.master_field("num-slaves").as_deref() == Some("2")
                && s.master_field("num-other-sentinels").as_deref() == Some("2")
        }) {
            if started.elapsed() > SETUP_DEADLINE {
                setup.fail("the sentinels did not find both replicas and each other");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        setup.wait_replicas_in_sync(SETUP_DEADLINE);
        setup
    }

    /// `redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/mymaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The master's port as the first running sentinel that answers says.
    pub fn master_port(&self) -> u16 {
        wait_for(
            "a sentinel names the master",
            Duration::from_secs(10),
            || self.sentinels.iter().find_map(SentinelProcess::master_port),
        )
    }

    /// The data node on `port`.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no data node on port {port}"))
    }

    /// The data node on `port`, to kill or restart.
    pub fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no data node on port {port}"))
    }

    /// Waits until every running sentinel names a master other than
    /// `old`, and that node says it is the master; returns its port.
    pub fn wait_new_master(&self, old: u16, deadline: Duration) -> u16 {
        let start = Instant::now();
        loop {
            let named: Vec<Option<u16>> = self
                .sentinels
                .iter()
                .filter(|s| s.is_running())
                .map(SentinelProcess::master_port)
                .collect();
            if let Some(Some(port)) = named.first() {
                if *port != old
                    && named.iter().all(|p| *p == Some(*port))
                    && role(self.node(*port)).as_deref() == Some("master")
                {
                    return *port;
                }
            }
            if start.elapsed() > deadline {
                self.fail(&format!(
                    "no failover away from port {old} within {deadline:?}: sentinels name {named:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the node on `port` says `ROLE` is `role`.
    pub fn wait_role(&self, port: u16, want: &str, deadline: Duration) {
        wait_until(
            &format!("the node on port {port} says it is a {want}"),
            deadline,
            || role(self.node(port)).as_deref() == Some(want),
        );
    }

    /// Waits until every running replica's link to its master is up.
    pub fn wait_replicas_in_sync(&self, deadline: Duration) {
        wait_until("every replica is in sync", deadline, || {
            self.nodes
                .iter()
                .filter(|n| role(n).as_deref() == Some("slave"))
                .all(|n| info_field(n, "master_link_status").as_deref() == Some("up"))
        });
    }

    /// Kills every sentinel (SIGKILL).
    pub fn kill_sentinels(&mut self) {
        for s in &mut self.sentinels {
            s.kill();
        }
    }

    /// Starts every sentinel again, each on its port with its config.
    pub fn start_sentinels(&mut self) {
        for s in &mut self.sentinels {
            s.start_again();
        }
    }

    /// Prints every sentinel's log.
    pub fn dump_logs(&self) {
        for s in &self.sentinels {
            eprintln!("--- sentinel {} ---\n{}", s.port(), indent(&s.log()));
        }
    }

    /// Panics with `what` and every sentinel's log.
    pub fn fail(&self, what: &str) -> ! {
        let logs: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("--- sentinel {} ---\n{}", s.port(), indent(&s.log())))
            .collect();
        panic!("{what}\n{}", logs.join("\n"));
    }
}

/// Options of a data node: as [`RedisServer::options`], and a new
/// replica is synchronized at once (Redis waits 5 s by default, for more
/// replicas to share a diskless transfer).
pub fn data_node() -> RedisOptions {
    RedisServer::options()
        .arg("--repl-diskless-sync-delay")
        .arg("0")
}

/// A replica of the master on `master_port`.
pub fn replica_of(master_port: u16) -> RedisServer {
    data_node()
        .arg("--replicaof")
        .arg("127.0.0.1")
        .arg(master_port.to_string())
        .start()
}

/// The first word of `ROLE`, `None` if the node does not answer.
pub fn role(node: &RedisServer) -> Option<String> {
    let client = redis::Client::open(node.url()).ok()?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let reply: Value = redis::cmd("ROLE").query(&mut conn).ok()?;
    match reply {
        Value::Array(v) => match v.first() {
            Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        },
        _ => None,
    }
}

/// A field of `INFO replication`.
pub fn info_field(node: &RedisServer, name: &str) -> Option<String> {
    let client = redis::Client::open(node.url()).ok()?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(&mut conn)
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_string())
}

//! What the security tests need beyond the plain harness: a private CA and
//! a server certificate for `127.0.0.1` made with `openssl`, the shipped
//! ACL file with test passwords filled in, and a `redis-server` that the
//! harness does not manage (its default user is off, so the harness could
//! not even `PING` it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, indent, read_lossy, wait_for, TempDir};

/// A CA and a server certificate it signed, valid for IP `127.0.0.1`, as
/// PEM files in a directory of their own.
pub struct Certs {
    dir: TempDir,
}

impl Certs {
    /// Makes a fresh CA (`ca.crt`) and a server key and certificate
    /// (`server.key`, `server.crt`). Panics with openssl's output on
    /// failure.
    pub fn generate() -> Certs {
        let dir = TempDir::new("certs");
        let ext = dir.join("server.ext");
        std::fs::write(
            &ext,
            "basicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\n\
             subjectAltName=IP:127.0.0.1\n",
        )
        .expect("write server.ext");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        openssl(
            dir.path(),
            &[
                &["req", "-x509"],
                &ec[..],
                &[
                    "-nodes",
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=streamline test CA",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
        );
        openssl(
            dir.path(),
            &[
                &["req"],
                &ec[..],
                &[
                    "-nodes",
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            ]
            .concat(),
        );
        openssl(
            dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        Certs { dir }
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The server certificate.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    /// The server's private key.
    pub fn key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "openssl {} failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shipped `systemd/redis-acl.conf`.
pub fn shipped_acl() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/redis-acl.conf");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The test password of an ACL user.
pub fn password(user: &str) -> String {
    format!("test-password-of-{user}")
}

/// The hex SHA-256 of `text`, with `sha256sum` (coreutils): what the
/// documentation tells an operator to run.
pub fn sha256_hex(text: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a hash")
        .to_string()
}

/// The shipped ACL file with each `#CHANGE-ME-...-<user>-password`
/// placeholder replaced by the SHA-256 of [`password`]`(user)`, as the
/// documentation says to do.
pub fn acl_with_passwords() -> String {
    shipped_acl()
        .lines()
        .map(|line| {
            let user = line.split_whitespace().nth(1).unwrap_or_default();
            let placeholder = format!("#CHANGE-ME-sha256-of-the-{user}-password");
            line.replace(&placeholder, &format!("#{}", sha256_hex(&password(user))))
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// `redis://user:password@127.0.0.1:port`.
pub fn user_url(user: &str, port: u16) -> String {
    format!("redis://{user}:{}@127.0.0.1:{port}", password(user))
}

/// A `redis-server` started with exactly the given ACL file, reached as
/// the `admin` user. Killed in `Drop`.
pub struct AclRedis {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl AclRedis {
    /// Starts it and waits (10 s) until `admin` gets `PONG`.
    pub fn start(acl: &str) -> AclRedis {
        let dir = TempDir::new("acl-redis");
        std::fs::write(dir.join("users.acl"), acl).expect("write users.acl");
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--aclfile")
            .arg(dir.join("users.acl"))
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut redis = AclRedis { child, port, dir };
        let start = Instant::now();
        loop {
            if redis.conn_as("admin").is_ok() {
                return redis;
            }
            if let Ok(Some(status)) = redis.child.try_wait() {
                redis.fail(&format!("redis-server exited with {status}"));
            }
            if start.elapsed() > Duration::from_secs(10) {
                redis.fail("redis-server did not answer admin's PING within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection as `user` (with its test password) that has answered
    /// `PING`.
    pub fn conn_as(&self, user: &str) -> redis::RedisResult<redis::Connection> {
        conn(&user_url(user, self.port))
    }

    /// A connection with no credentials (the `default` user).
    pub fn anonymous(&self) -> redis::RedisResult<redis::Connection> {
        conn(&format!("redis://127.0.0.1:{}", self.port))
    }

    /// Panics with `what` and the server log.
    pub fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n--- redis log ---\n{}",
            indent(&read_lossy(&self.dir.join("redis.log")))
        )
    }
}

impl Drop for AclRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn conn(url: &str) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    redis::cmd("PING").query::<String>(&mut conn)?;
    Ok(conn)
}

/// Waits until `f` is `Some`; a shorthand for tests of this module.
pub fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_for(what, Duration::from_secs(20), f)
}

/// What `ACL LOG` recorded as refused, one line per entry, leaving out
/// `CLIENT SETINFO`: redis-rs sends it on connect and ignores the answer,
/// and Redis 7.2+ logs the refusal; it is not a service command.
pub fn acl_refusals(admin: &mut redis::Connection) -> Vec<String> {
    let log: redis::Value = redis::cmd("ACL").arg("LOG").query(admin).expect("ACL LOG");
    match &log {
        redis::Value::Array(entries) => entries
            .iter()
            .map(|e| format!("{e:?}"))
            .filter(|e| !e.to_lowercase().contains("setinfo"))
            .collect(),
        _ => Vec::new(),
    }
}

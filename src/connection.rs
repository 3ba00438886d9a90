//! Redis connections that never hang and come back by themselves.
//!
//! The sync `redis` client neither reconnects nor times out unless told to.
//! [`Redis`] opens connections with a connect timeout and read/write
//! timeouts; [`Link`] owns one connection, drops it after any I/O error or
//! timeout (a reply that arrives late would otherwise be read as the answer
//! to the next command), and reconnects with capped, jittered exponential
//! backoff. Each thread that talks to Redis owns its own `Link`: a blocking
//! `XREADGROUP ... BLOCK` must not share a connection with anything else.
//!
//! With a `redis+sentinel://` URL, [`Redis`] asks the sentinels where the
//! master is ([`crate::sentinel`]), and every connection carries the
//! *generation* of the master it was opened to. A [`Link`] whose
//! generation is not the current one (a failover was followed) drops its
//! connection and reconnects before its next command, at once, whatever
//! its backoff; a `READONLY` answer (the node was demoted) counts as a lost
//! connection, never as a failure of the work.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use redis::{Client, Connection, RedisError};

use crate::config::Config;
use crate::sentinel::{self, Sentinels};

/// Longest wait for a TCP (and TLS) connection. redis-rs applies its
/// connect timeout to the TCP connect and again to the handshake, so a
/// connection can take twice this long to fail; [`Redis::connect`] uses
/// half the read timeout when that is shorter, so that a link that must
/// answer within its read timeout (order-service's writers) also gives up
/// connecting within it. Not less: a TLS handshake with a Redis a WAN link
/// away takes two or three round trips (a quarter, 125 ms at the default
/// request timeout, never connected across 50 ms of RTT, nor on a loaded
/// 2-core host).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Read/write timeout for ordinary commands.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay; doubles per failed attempt up to [`BACKOFF_CAP`].
const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Longest delay between reconnect attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// How often a thread waiting out a backoff looks whether a failover was
/// followed meanwhile.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Why a Redis client could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The CA certificate file could not be read.
    #[error("cannot read REDIS_CA_CERT {path}: {1}", path = .0.display())]
    CaCert(std::path::PathBuf, std::io::Error),
    /// The client rejected the URL or TLS settings.
    #[error("invalid REDIS_URL: {0}")]
    Client(RedisError),
    /// A `redis+sentinel://` URL that does not parse.
    #[error("invalid REDIS_URL: {0}")]
    Sentinel(sentinel::UrlError),
}

/// Opens Redis connections with timeouts. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    target: Target,
    /// Whether connections are TLS sessions (`rediss://`).
    tls: bool,
}

#[derive(Clone)]
enum Target {
    /// One Redis at a fixed address.
    Direct(Box<Client>),
    /// The master of a set of sentinels, wherever it is now.
    Sentinel(Arc<Sentinels>),
}

impl Redis {
    /// A client for the configured URL (and CA certificate for `rediss://`).
    pub fn new(config: &Config) -> Result<Self, ConnectError> {
        Self::open(&config.redis_url, config.redis_ca_cert.as_deref())
    }

    /// A client for `url`, trusting `ca_cert` (PEM) for TLS if given.
    pub fn open(url: &str, ca_cert: Option<&std::path::Path>) -> Result<Self, ConnectError> {
        let pem = match ca_cert {
            Some(path) => {
                Some(std::fs::read(path).map_err(|e| ConnectError::CaCert(path.to_path_buf(), e))?)
            }
            None => None,
        };
        if sentinel::is_sentinel_url(url) {
            let parsed = sentinel::SentinelUrl::parse(url).map_err(ConnectError::Sentinel)?;
            // Fail now, not at the first failover, if the data nodes'
            // URL would not make a client.
            let data = client(&parsed.data_url("127.0.0.1", 6379), pem.as_deref())
                .map_err(ConnectError::Client)?;
            let tls = is_tls(&data);
            let factory = move |u: &str| client(u, pem.as_deref());
            return Ok(Redis {
                target: Target::Sentinel(Sentinels::new(parsed, Box::new(factory))),
                tls,
            });
        }
        let client = client(url, pem.as_deref()).map_err(ConnectError::Client)?;
        Ok(Redis {
            tls: is_tls(&client),
            target: Target::Direct(Box::new(client)),
        })
    }

    /// Whether connections are TLS sessions, which [`crate::wire`] cannot
    /// split into halves.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// A new connection whose reads give up after `read_timeout`; connecting
    /// gives up within `read_timeout` or twice [`CONNECT_TIMEOUT`].
    pub fn connect(&self, read_timeout: Duration) -> Result<Connection, RedisError> {
        self.connect_tracked(read_timeout).map(|(conn, _)| conn)
    }

    /// [`Redis::connect`], and the generation of the master it reached.
    pub fn connect_tracked(&self, read_timeout: Duration) -> Result<(Connection, u64), RedisError> {
        let connect_timeout = CONNECT_TIMEOUT
            .min(read_timeout / 2)
            .max(Duration::from_millis(10));
        match &self.target {
            Target::Direct(client) => {
                let conn = client.get_connection_with_timeout(connect_timeout)?;
                conn.set_read_timeout(Some(read_timeout))?;
                conn.set_write_timeout(Some(COMMAND_TIMEOUT))?;
                Ok((conn, 0))
            }
            Target::Sentinel(s) => s.connect(connect_timeout, read_timeout, COMMAND_TIMEOUT),
        }
    }

    /// The address and credentials connections go to now (with sentinels:
    /// the master's, asking them if needed), its generation, and whether
    /// that address came from sentinels (so `ROLE` must be checked).
    pub fn connection_info(&self) -> Result<(redis::ConnectionInfo, u64, bool), RedisError> {
        match &self.target {
            Target::Direct(client) => Ok((client.get_connection_info().clone(), 0, false)),
            Target::Sentinel(s) => {
                let (info, generation) = s.master_info()?;
                Ok((info, generation, true))
            }
        }
    }

    /// The generation of the master: changes when a failover is followed
    /// (always 0 without sentinels).
    pub fn generation(&self) -> u64 {
        match &self.target {
            Target::Direct(_) => 0,
            Target::Sentinel(s) => s.generation(),
        }
    }

    /// A connection of `generation` was lost or answered `READONLY`: the
    /// next connection asks the sentinels again.
    pub fn lost(&self, generation: u64) {
        if let Target::Sentinel(s) = &self.target {
            s.forget(generation);
        }
    }

    /// With sentinels: the master's name and its address as last found
    /// (`None` before the first discovery).
    pub fn master(&self) -> Option<(String, Option<String>)> {
        match &self.target {
            Target::Direct(_) => None,
            Target::Sentinel(s) => Some((s.master_name().to_string(), s.master_addr())),
        }
    }

    /// With sentinels: starts following their failover events (once per
    /// process). Without: nothing.
    pub fn watch_failovers(&self) {
        if let Target::Sentinel(s) = &self.target {
            s.watch();
        }
    }
}

fn is_tls(client: &Client) -> bool {
    matches!(
        client.get_connection_info().addr(),
        redis::ConnectionAddr::TcpTls { .. }
    )
}

/// A client for a `redis://` or `rediss://` URL, trusting `ca` (PEM).
fn client(url: &str, ca: Option<&[u8]>) -> Result<Client, RedisError> {
    match ca {
        Some(pem) => {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            };
            Client::build_with_tls(url, certs)
        }
        None => Client::open(url),
    }
}

/// Whether `e` leaves the connection unusable: I/O errors, timeouts, a
/// closed socket, and `READONLY` (the node was demoted to a replica by a
/// failover: the master is elsewhere now). Other server errors (`NOGROUP`,
/// `ERR ...`) do not.
pub fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || is_readonly(e)
}

/// Whether Redis said it is a read-only replica, directly or from inside a
/// script (`READONLY You can't write against a read only replica`).
pub fn is_readonly(e: &RedisError) -> bool {
    e.code() == Some("READONLY") || e.to_string().contains("READONLY")
}

/// Whether `e` is a server state that passes by itself: Redis loading its
/// data after a restart, busy with a script, or a replica not yet in sync.
pub fn is_transient(e: &RedisError) -> bool {
    matches!(
        e.code(),
        Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN")
    )
}

/// `REDIS_WAIT_REPLICAS` and `REDIS_WAIT_TIMEOUT_MS`: how many replicas
/// must confirm a write, and how long to wait for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitFor {
    /// Replicas that must confirm (at least 1).
    pub replicas: u64,
    /// Longest wait.
    pub timeout: Duration,
}

impl WaitFor {
    /// The configured wait; `None` with `REDIS_WAIT_REPLICAS=0`.
    pub fn from_config(config: &Config) -> Option<WaitFor> {
        (config.wait_replicas > 0).then_some(WaitFor {
            replicas: config.wait_replicas,
            timeout: config.wait_timeout,
        })
    }

    /// The `WAIT` timeout argument for a wait that must end within
    /// `budget`: never `0`, which would mean "forever".
    pub fn millis_within(&self, budget: Duration) -> u64 {
        (self.timeout.min(budget).as_millis() as u64).max(1)
    }
}

/// `WAIT replicas millis`: how many replicas confirmed every write made
/// so far on this connection.
pub fn wait(conn: &mut Connection, replicas: u64, millis: u64) -> Result<u64, RedisError> {
    let n: i64 = redis::cmd("WAIT").arg(replicas).arg(millis).query(conn)?;
    Ok(n.max(0) as u64)
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The delay before the next attempt, growing with each call.
    pub fn next_delay(&mut self) -> Duration {
        let exp = BACKOFF_BASE.saturating_mul(1 << self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        let cap = exp.min(BACKOFF_CAP);
        // Full jitter: uniformly in [cap/2, cap], so a fleet of services
        // that lost Redis together does not come back in lockstep.
        let half = cap / 2;
        half + half.mul_f64(jitter())
    }

    /// Forgets past failures after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A number in [0, 1) that differs between threads and calls; good enough
/// for spreading retries, not for anything else.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// A connection that is re-established after errors.
///
/// `on_connect` runs on every new connection before it is used (the
/// services use it to make sure the topology's groups exist).
pub struct Link {
    redis: Redis,
    read_timeout: Duration,
    conn: Option<Connection>,
    /// The master generation `conn` was opened to.
    generation: u64,
    /// The master generation when the last attempt failed: a newer one
    /// (a failover was followed) ends the backoff at once.
    failed_generation: u64,
    /// Connections opened so far: tells a caller whether two commands ran
    /// on the same connection (a `WAIT` only speaks for its own).
    opened: u64,
    backoff: Backoff,
    next_attempt: Option<Instant>,
    /// Why the last connection attempt failed, for the errors answered
    /// while waiting out the backoff (`/readyz` says why).
    last_failure: Option<String>,
    connected_before: bool,
    on_connect: fn(&mut Connection) -> Result<(), RedisError>,
}

/// Does nothing to a new connection.
pub fn nothing(_: &mut Connection) -> Result<(), RedisError> {
    Ok(())
}

impl Link {
    /// A link that connects lazily; reads time out after `read_timeout`.
    pub fn new(
        redis: Redis,
        read_timeout: Duration,
        on_connect: fn(&mut Connection) -> Result<(), RedisError>,
    ) -> Self {
        Link {
            redis,
            read_timeout,
            conn: None,
            generation: 0,
            failed_generation: 0,
            opened: 0,
            backoff: Backoff::default(),
            next_attempt: None,
            last_failure: None,
            connected_before: false,
            on_connect,
        }
    }

    /// The client this link connects with.
    pub fn redis(&self) -> Redis {
        self.redis.clone()
    }

    /// Whether a connection is open, to the current master.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some() && self.generation == self.redis.generation()
    }

    /// How many connections this link has opened: the same number before
    /// and after two commands means they ran on one connection.
    pub fn connections_opened(&self) -> u64 {
        self.opened
    }

    /// The connection, connecting first if needed. Fails at once, without
    /// trying, while the backoff after the last failure runs (unless a
    /// failover was followed since): callers that must answer promptly
    /// (HTTP) never wait for a reconnect.
    pub fn get(&mut self) -> Result<&mut Connection, RedisError> {
        let current = self.redis.generation();
        if self.conn.is_some() && self.generation != current {
            log::info!("following the failover: reconnecting to the new master");
            self.conn = None;
            self.next_attempt = None;
        }
        if self.conn.is_none() {
            if let Some(at) = self.next_attempt {
                if Instant::now() < at && self.failed_generation == current {
                    return Err(unavailable(self.last_failure.as_deref()));
                }
            }
            match self.open() {
                Ok((conn, generation)) => {
                    if self.connected_before {
                        crate::metrics::reconnect();
                        log::info!("reconnected to Redis");
                    }
                    self.connected_before = true;
                    self.backoff.reset();
                    self.next_attempt = None;
                    self.last_failure = None;
                    self.generation = generation;
                    self.opened += 1;
                    self.conn = Some(conn);
                }
                Err(e) => {
                    self.failed_generation = current;
                    self.next_attempt = Some(Instant::now() + self.backoff.next_delay());
                    self.last_failure = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        let last = self.last_failure.as_deref();
        self.conn.as_mut().ok_or_else(|| unavailable(last))
    }

    fn open(&self) -> Result<(Connection, u64), RedisError> {
        let (mut conn, generation) = self.redis.connect_tracked(self.read_timeout)?;
        if let Err(e) = (self.on_connect)(&mut conn) {
            if is_connection_error(&e) {
                self.redis.lost(generation);
            }
            return Err(e);
        }
        Ok((conn, generation))
    }

    /// Runs `f` on the connection; a connection error drops the connection
    /// so the next call reconnects.
    pub fn run<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, RedisError> {
        let result = f(self.get()?);
        if let Err(e) = &result {
            self.check(e);
        }
        result
    }

    /// Drops the connection if `e` left it unusable (and, with sentinels,
    /// makes the next connection ask them where the master is).
    pub fn check(&mut self, e: &RedisError) {
        if is_connection_error(e) && self.conn.take().is_some() {
            log::warn!("lost the Redis connection: {e}");
            self.redis.lost(self.generation);
            self.failed_generation = self.generation;
            self.next_attempt = Some(Instant::now() + self.backoff.next_delay());
            self.last_failure = Some(e.to_string());
        }
    }

    /// Lets the next [`Link::get`] try to connect at once, whatever the
    /// backoff says. For callers with work that has a deadline: each of
    /// order-service's writers has its own link, and one still in backoff
    /// must not turn orders away while Redis is back (another writer
    /// already reconnected). A refused connection fails at once, a frozen
    /// Redis within the connect timeout, so this never blocks past it.
    pub fn skip_backoff(&mut self) {
        self.next_attempt = None;
    }

    /// Drops the connection (after a protocol surprise, say).
    pub fn reset(&mut self) {
        self.conn = None;
    }

    /// Waits until connected, sleeping the backoff between attempts and
    /// calling `alive` before each (waiting out a Redis outage is not being
    /// wedged: the watchdog must not restart a service for it). Returns
    /// `false` if `shutdown` fired first: no thread sleeps through a
    /// shutdown.
    pub fn wait_connected(&mut self, shutdown: &Receiver<()>, alive: &dyn Fn()) -> bool {
        let mut logged = false;
        loop {
            alive();
            match self.get() {
                Ok(_) => return true,
                Err(e) => {
                    if !logged {
                        log::warn!("Redis unavailable, retrying: {e}");
                        logged = true;
                    }
                }
            }
            // In slices, so that a failover followed meanwhile (which
            // ends the backoff) is noticed within one.
            let wait = self
                .next_attempt
                .map_or(BACKOFF_BASE, |at| {
                    at.saturating_duration_since(Instant::now())
                })
                .min(WAIT_SLICE);
            if crate::shutdown::wait(shutdown, wait) {
                return false;
            }
        }
    }
}

fn unavailable(last_failure: Option<&str>) -> RedisError {
    let why = match last_failure {
        Some(e) => format!("Redis is unavailable (reconnecting; last attempt: {e})"),
        None => "Redis is unavailable (reconnecting)".to_string(),
    };
    RedisError::from(std::io::Error::new(std::io::ErrorKind::NotConnected, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(
            first <= BACKOFF_BASE && first >= BACKOFF_BASE / 2,
            "{first:?}"
        );
        for _ in 0..40 {
            let d = b.next_delay();
            assert!(d <= BACKOFF_CAP, "{d:?}");
        }
        assert!(b.next_delay() >= BACKOFF_CAP / 2);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_BASE);
    }
}

//! Redis connections that never hang and come back by themselves.
//!
//! The sync `redis` client neither reconnects nor times out unless told to.
//! [`Redis`] opens connections with a connect timeout and read/write
//! timeouts; [`Link`] owns one connection, drops it after any I/O error or
//! timeout (a reply that arrives late would otherwise be read as the answer
//! to the next command), and reconnects with capped, jittered exponential
//! backoff. Each thread that talks to Redis owns its own `Link`: a blocking
//! `XREADGROUP ... BLOCK` must not share a connection with anything else.

use std::fmt;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use redis::{Client, Connection, RedisError};

use crate::config::Config;

/// Longest wait for a TCP (and TLS) connection. redis-rs applies its
/// connect timeout to the TCP connect and again to the handshake, so a
/// connection can take twice this long to fail; [`Redis::connect`] uses a
/// quarter of the read timeout when that is shorter, so that a link that
/// must answer within its read timeout (order-service's writers) also
/// gives up connecting within it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Read/write timeout for ordinary commands.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay; doubles per failed attempt up to [`BACKOFF_CAP`].
const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Longest delay between reconnect attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Why a Redis client could not be built from the configuration.
#[derive(Debug)]
pub enum ConnectError {
    /// The CA certificate file could not be read.
    CaCert(std::path::PathBuf, std::io::Error),
    /// The client rejected the URL or TLS settings.
    Client(RedisError),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::CaCert(p, e) => {
                write!(f, "cannot read REDIS_CA_CERT {}: {e}", p.display())
            }
            ConnectError::Client(e) => write!(f, "invalid REDIS_URL: {e}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Opens Redis connections with timeouts. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    client: Client,
}

impl Redis {
    /// A client for the configured URL (and CA certificate for `rediss://`).
    pub fn new(config: &Config) -> Result<Self, ConnectError> {
        Self::open(&config.redis_url, config.redis_ca_cert.as_deref())
    }

    /// A client for `url`, trusting `ca_cert` (PEM) for TLS if given.
    pub fn open(url: &str, ca_cert: Option<&std::path::Path>) -> Result<Self, ConnectError> {
        let client = match ca_cert {
            Some(path) => {
                let pem =
                    std::fs::read(path).map_err(|e| ConnectError::CaCert(path.to_path_buf(), e))?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                Client::build_with_tls(url, certs)
            }
            None => Client::open(url),
        }
        .map_err(ConnectError::Client)?;
        Ok(Redis { client })
    }

    /// A new connection whose reads give up after `read_timeout`; connecting
    /// gives up within `read_timeout / 2` or twice [`CONNECT_TIMEOUT`].
    pub fn connect(&self, read_timeout: Duration) -> Result<Connection, RedisError> {
        let connect_timeout = CONNECT_TIMEOUT
            .min(read_timeout / 4)
            .max(Duration::from_millis(10));
        let conn = self.client.get_connection_with_timeout(connect_timeout)?;
        conn.set_read_timeout(Some(read_timeout))?;
        conn.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        Ok(conn)
    }
}

/// Whether `e` leaves the connection unusable: I/O errors, timeouts, a
/// closed socket. Server errors (`NOGROUP`, `ERR ...`) do not.
pub fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

/// Whether `e` is a server state that passes by itself: Redis loading its
/// data after a restart, busy with a script, or a replica not yet in sync.
pub fn is_transient(e: &RedisError) -> bool {
    matches!(
        e.code(),
        Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN")
    )
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
            backoff: Backoff::default(),
            next_attempt: None,
            last_failure: None,
            connected_before: false,
            on_connect,
        }
    }

    /// Whether a connection is currently open.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The connection, connecting first if needed. Fails at once, without
    /// trying, while the backoff after the last failure runs: callers that
    /// must answer promptly (HTTP) never wait for a reconnect.
    pub fn get(&mut self) -> Result<&mut Connection, RedisError> {
        if self.conn.is_none() {
            if let Some(at) = self.next_attempt {
                if Instant::now() < at {
                    return Err(unavailable(self.last_failure.as_deref()));
                }
            }
            match self.open() {
                Ok(conn) => {
                    if self.connected_before {
                        crate::metrics::reconnect();
                        log::info!("reconnected to Redis");
                    }
                    self.connected_before = true;
                    self.backoff.reset();
                    self.next_attempt = None;
                    self.last_failure = None;
                    self.conn = Some(conn);
                }
                Err(e) => {
                    self.next_attempt = Some(Instant::now() + self.backoff.next_delay());
                    self.last_failure = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        let last = self.last_failure.as_deref();
        self.conn.as_mut().ok_or_else(|| unavailable(last))
    }

    fn open(&self) -> Result<Connection, RedisError> {
        let mut conn = self.redis.connect(self.read_timeout)?;
        (self.on_connect)(&mut conn)?;
        Ok(conn)
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

    /// Drops the connection if `e` left it unusable.
    pub fn check(&mut self, e: &RedisError) {
        if is_connection_error(e) && self.conn.take().is_some() {
            log::warn!("lost the Redis connection: {e}");
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
            let wait = self.next_attempt.map_or(BACKOFF_BASE, |at| {
                at.saturating_duration_since(Instant::now())
            });
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

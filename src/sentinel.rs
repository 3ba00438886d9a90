//! Redis Sentinel: find the master, and follow it through a failover.
//!
//! `REDIS_URL=redis+sentinel://[user:pass@]h1:p1,h2:p2,h3:p3/<master>[/db]`
//! (`rediss+sentinel://` for TLS to the data nodes) names the sentinels and
//! the master they watch instead of a Redis host. What happens with it
//! follows Redis's "Sentinel client spec":
//!
//! * **Discovery**: the sentinels are asked in turn
//!   (`SENTINEL get-master-addr-by-name <master>`); the first that answers
//!   with an address moves to the front of the list, so the next discovery
//!   asks it first. Every new connection to the address is checked with
//!   `ROLE`: a node that says it is a replica is never used, the address is
//!   forgotten and the sentinels are asked again.
//! * **Following a failover**: a watcher thread per sentinel is subscribed
//!   to `+switch-master` (a failover is done: here is the new master) and
//!   `+failover-state-send-slaveof-noone` (the sentinels are promoting this
//!   replica now). Either moves the known master to the new address and
//!   bumps a *generation* counter. Every [`crate::connection::Link`]
//!   compares the generation of its connection with the current one before
//!   each use, and reconnects (at once, whatever its backoff) when they
//!   differ: order writers, readers, handlers, the trimmer and the
//!   readiness probe all move to the new master within one command, instead
//!   of waiting for a timeout on the old one.
//! * **Errors**: a lost connection or a `READONLY` answer (the node was
//!   demoted) forgets the address, so the next connection asks the
//!   sentinels again. No sentinel answering means no connection: an address
//!   that no sentinel vouches for is never written to.
//!
//! Sentinels are spoken to in plain text, without credentials unless one
//! answers `NOAUTH`; then the URL's credentials are tried.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::{Client, Connection, RedisError, Value};

/// Port of a sentinel named without one.
pub const DEFAULT_PORT: u16 = 26379;
/// Longest wait for one sentinel, connecting and answering: a dead or
/// frozen sentinel must not hold up discovery for long.
const SENTINEL_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a watcher waits for an event before it checks its sentinel
/// is still there (`PING`).
const WATCH_IDLE: Duration = Duration::from_secs(2);

/// How long a replica being promoted may keep saying it is a replica.
const PROMOTION_GRACE: Duration = Duration::from_secs(5);
/// The two events a watcher follows.
const EVENTS: [&str; 2] = ["+switch-master", "+failover-state-send-slaveof-noone"];

/// A `redis+sentinel://` URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// `rediss+sentinel://`: TLS to the master.
    pub tls: bool,
    /// `user:pass` as written in the URL (still percent-encoded), used for
    /// the data nodes.
    pub userinfo: Option<String>,
    /// The sentinels, in the order given.
    pub sentinels: Vec<(String, u16)>,
    /// The master's name, as the sentinels know it.
    pub master: String,
    /// The database number.
    pub db: u32,
}

/// Why a `redis+sentinel://` URL does not parse. `Display` says what is
/// wrong and, where it helps, what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Neither `redis+sentinel://` nor `rediss+sentinel://`.
    #[error("expected redis+sentinel:// or rediss+sentinel://")]
    Scheme,
    /// A `?query` or `#fragment`.
    #[error("query parameters are not supported in a sentinel URL")]
    Query,
    /// No `/<master>` after the sentinels.
    #[error("no master name: expected .../<master name>[/db] after the sentinels")]
    NoMaster,
    /// A master name with whitespace or control characters.
    #[error("master name {0:?} has spaces or control characters")]
    BadMaster(String),
    /// A database that is not a number.
    #[error("database {0:?} is not a number")]
    BadDb(String),
    /// More path after `/<master>/<db>`.
    #[error("expected .../<master name>[/db], found more path segments")]
    ExtraPath,
    /// An empty entry in the list of sentinels.
    #[error("empty sentinel address (expected host:port[,host:port...])")]
    EmptyAddress,
    /// `[v6` without its `]`.
    #[error("sentinel address {0:?}: missing ']'")]
    UnclosedV6(String),
    /// Something other than `:port` after `[v6]`.
    #[error("sentinel address {0:?}: expected [v6]:port")]
    AfterV6(String),
    /// `:port` without a host.
    #[error("sentinel address {0:?} has no host")]
    NoHost(String),
    /// A port that is not 1 to 65535.
    #[error("sentinel address {addr:?}: bad port {port:?}")]
    BadPort {
        /// The sentinel address as written.
        addr: String,
        /// Its port part.
        port: String,
    },
}

/// Whether `url` names sentinels rather than a Redis host.
pub fn is_sentinel_url(url: &str) -> bool {
    url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://")
}

/// [`SentinelUrl::parse`], with the error as text (what streamctl's usage
/// errors carry).
pub fn parse(url: &str) -> Result<SentinelUrl, String> {
    SentinelUrl::parse(url).map_err(|e| e.to_string())
}

fn parse_url(url: &str) -> Result<SentinelUrl, UrlError> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("rediss+sentinel://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("redis+sentinel://") {
        (false, r)
    } else {
        return Err(UrlError::Scheme);
    };
    if rest.contains(['?', '#']) {
        return Err(UrlError::Query);
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
        Some((_, h)) => (None, h),
        None => (None, authority),
    };
    let sentinels = hosts
        .split(',')
        .map(host_port)
        .collect::<Result<Vec<_>, _>>()?;
    let mut parts = path.split('/');
    let master = parts.next().unwrap_or_default();
    if master.is_empty() {
        return Err(UrlError::NoMaster);
    }
    if master
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(UrlError::BadMaster(master.to_string()));
    }
    let db = match parts.next() {
        None | Some("") => 0,
        Some(d) => d
            .parse::<u32>()
            .map_err(|_| UrlError::BadDb(d.to_string()))?,
    };
    if parts.any(|p| !p.is_empty()) {
        return Err(UrlError::ExtraPath);
    }
    Ok(SentinelUrl {
        tls,
        userinfo,
        sentinels,
        master: master.to_string(),
        db,
    })
}

fn host_port(s: &str) -> Result<(String, u16), UrlError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(UrlError::EmptyAddress);
    }
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| UrlError::UnclosedV6(s.to_string()))?;
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(UrlError::AfterV6(s.to_string())),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(UrlError::NoHost(s.to_string()));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(UrlError::BadPort {
                    addr: s.to_string(),
                    port: p.to_string(),
                })
            }
        },
    };
    Ok((host.to_string(), port))
}

/// `host:port`, with brackets for an IPv6 host.
pub fn addr_text(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl SentinelUrl {
    /// Parses `redis+sentinel://[user:pass@]host[:port][,host[:port]...]/<master>[/db]`.
    ///
    /// ```
    /// use streamline::sentinel::{SentinelUrl, UrlError};
    ///
    /// let u = SentinelUrl::parse("redis+sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2,[::1]:26380/orders/2").unwrap();
    /// assert_eq!(u.sentinels, [("10.0.0.1".to_string(), 26379), ("10.0.0.2".to_string(), 26379), ("::1".to_string(), 26380)]);
    /// assert_eq!((u.master.as_str(), u.db, u.tls), ("orders", 2, false));
    /// assert_eq!(u.data_url("10.0.0.7", 6379), "redis://app:s3cret@10.0.0.7:6379/2");
    /// let e = SentinelUrl::parse("redis+sentinel://10.0.0.1:26379").unwrap_err();
    /// assert_eq!(e, UrlError::NoMaster);
    /// assert!(e.to_string().contains("master name"));
    /// ```
    pub fn parse(url: &str) -> Result<SentinelUrl, UrlError> {
        parse_url(url)
    }

    /// The `redis://` (or `rediss://`) URL of a data node at `host:port`,
    /// with this URL's credentials and database.
    pub fn data_url(&self, host: &str, port: u16) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let auth = self
            .userinfo
            .as_deref()
            .map_or(String::new(), |u| format!("{u}@"));
        format!("{scheme}://{auth}{}/{}", addr_text(host, port), self.db)
    }

    fn sentinel_url(&self, host: &str, port: u16, with_auth: bool) -> String {
        let auth = match (&self.userinfo, with_auth) {
            (Some(u), true) => format!("{u}@"),
            _ => String::new(),
        };
        format!("redis://{auth}{}", addr_text(host, port))
    }
}

/// Builds a client for a data node's URL, trusting `ca` (PEM) if given.
pub type ClientFactory = dyn Fn(&str) -> Result<Client, RedisError> + Send + Sync;

/// The master as last known, and which generation it belongs to.
struct Known {
    /// Where it is, `None` after it was forgotten.
    master: Option<Master>,
    /// The address last used, kept when forgotten: a discovery that finds
    /// the same address again is not a failover.
    last_addr: Option<(String, u16)>,
    /// A master the sentinels are replacing right now, and until when it
    /// must not be used even if a sentinel still names it.
    demoting: Option<((String, u16), Instant)>,
    generation: u64,
}

#[derive(Clone)]
struct Master {
    addr: (String, u16),
    client: Client,
    generation: u64,
    /// Set for a replica the sentinels are promoting right now: until
    /// then, its `ROLE` may still say replica without that being a reason
    /// to ask the sentinels again (they would still name the old master).
    promoting_until: Option<Instant>,
}

/// The sentinels of one master, and what they said last.
pub struct Sentinels {
    url: SentinelUrl,
    client_for: Box<ClientFactory>,
    /// Sentinels in the order they are asked; the last one that answered first.
    order: Mutex<Vec<(String, u16)>>,
    known: Mutex<Known>,
    /// A copy of `known.generation`, read before every command.
    generation: AtomicU64,
    /// Held while asking the sentinels, so that a dozen connections that
    /// lost the master together ask once, not a dozen times.
    discovering: Mutex<()>,
    watching: std::sync::Once,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An I/O-kind error: every caller treats it as "no connection" and
/// retries, never as a failure of the work.
fn no_master(what: String) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::NotConnected, what))
}

impl fmt::Debug for Sentinels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sentinels")
            .field("master", &self.url.master)
            .field("sentinels", &self.url.sentinels)
            .field("generation", &self.generation())
            .finish()
    }
}

impl Sentinels {
    /// Sentinels from a parsed URL; `client_for` builds a client for a data
    /// node's URL (with the TLS settings of the configuration).
    pub fn new(url: SentinelUrl, client_for: Box<ClientFactory>) -> Arc<Sentinels> {
        Arc::new(Sentinels {
            order: Mutex::new(url.sentinels.clone()),
            url,
            client_for,
            known: Mutex::new(Known {
                master: None,
                last_addr: None,
                demoting: None,
                generation: 0,
            }),
            generation: AtomicU64::new(0),
            discovering: Mutex::new(()),
            watching: std::sync::Once::new(),
        })
    }

    /// The master's name.
    pub fn master_name(&self) -> &str {
        &self.url.master
    }

    /// Bumped every time the master's address changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The master's address as last found, `host:port`.
    pub fn master_addr(&self) -> Option<String> {
        let known = lock(&self.known);
        known.last_addr.as_ref().map(|(h, p)| addr_text(h, *p))
    }

    /// A connection to the master, checked with `ROLE`, and the generation
    /// it belongs to.
    pub fn connect(
        &self,
        connect_timeout: Duration,
        read_timeout: Duration,
        write_timeout: Duration,
    ) -> Result<(Connection, u64), RedisError> {
        let master = self.master()?;
        let result = (|| {
            let conn = master.client.get_connection_with_timeout(connect_timeout)?;
            conn.set_read_timeout(Some(read_timeout))?;
            conn.set_write_timeout(Some(write_timeout))?;
            Ok(conn)
        })();
        let mut conn = match result {
            Ok(c) => c,
            Err(e) => {
                self.forget(master.generation);
                return Err(e);
            }
        };
        match role(&mut conn) {
            Ok(r) if r == "master" => Ok((conn, master.generation)),
            Ok(r) => {
                let (h, p) = &master.addr;
                let being_promoted = master.promoting_until.is_some_and(|t| Instant::now() < t);
                if being_promoted {
                    return Err(no_master(format!(
                        "{} is being promoted to master of {} and still says {r}",
                        addr_text(h, *p),
                        self.url.master
                    )));
                }
                self.forget(master.generation);
                Err(no_master(format!(
                    "{} says it is a {r}, not the master of {}: asking the sentinels again",
                    addr_text(h, *p),
                    self.url.master
                )))
            }
            Err(e) => {
                self.forget(master.generation);
                Err(e)
            }
        }
    }

    /// The master's address and credentials, and its generation, for a
    /// connection opened by other means ([`crate::wire`]); its `ROLE` is
    /// the caller's to check.
    pub fn master_info(&self) -> Result<(redis::ConnectionInfo, u64), RedisError> {
        let master = self.master()?;
        Ok((
            master.client.get_connection_info().clone(),
            master.generation,
        ))
    }

    /// Forgets the master of `generation` (its connection failed, or it
    /// answered `READONLY`): the next connection asks the sentinels again.
    ///
    /// A replica being promoted is not forgotten: while the promotion runs
    /// the sentinels still name the old master, and going back to it is
    /// exactly what loses writes (its other replicas would confirm them,
    /// then resynchronize from the new master and drop them).
    pub fn forget(&self, generation: u64) {
        let mut known = lock(&self.known);
        let now = Instant::now();
        if known.master.as_ref().is_some_and(|m| {
            m.generation == generation && m.promoting_until.is_none_or(|t| now >= t)
        }) {
            known.master = None;
        }
    }

    fn master(&self) -> Result<Master, RedisError> {
        if let Some(m) = lock(&self.known).master.clone() {
            return Ok(m);
        }
        let _one_at_a_time = lock(&self.discovering);
        // Someone else may have asked while we waited.
        if let Some(m) = lock(&self.known).master.clone() {
            return Ok(m);
        }
        let addr = self.discover()?;
        if let Some((old, until)) = &lock(&self.known).demoting {
            if *old == addr && Instant::now() < *until {
                return Err(no_master(format!(
                    "the sentinels are failing {} over: waiting for the new master of {}",
                    addr_text(&old.0, old.1),
                    self.url.master
                )));
            }
        }
        self.switch_to(addr, "the sentinels", false)
    }

    /// Asks each sentinel in turn; the first that knows the master moves to
    /// the front.
    fn discover(&self) -> Result<(String, u16), RedisError> {
        let order = lock(&self.order).clone();
        let mut problems = Vec::new();
        for (i, (host, port)) in order.iter().enumerate() {
            match self.ask(host, *port) {
                Ok(Some(addr)) => {
                    if i > 0 {
                        let mut order = lock(&self.order);
                        if let Some(pos) = order.iter().position(|s| s.0 == *host && s.1 == *port) {
                            let s = order.remove(pos);
                            order.insert(0, s);
                        }
                    }
                    return Ok(addr);
                }
                Ok(None) => problems.push(format!(
                    "{} does not know {}",
                    addr_text(host, *port),
                    self.url.master
                )),
                Err(e) => problems.push(format!("{}: {e}", addr_text(host, *port))),
            }
        }
        Err(no_master(format!(
            "no sentinel named the master {}: {}",
            self.url.master,
            problems.join("; ")
        )))
    }

    /// `SENTINEL get-master-addr-by-name` on one sentinel.
    fn ask(&self, host: &str, port: u16) -> Result<Option<(String, u16)>, RedisError> {
        let reply: Value = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.url.master)
            .query(&mut self.sentinel_conn(host, port)?)?;
        Ok(parse_addr(&reply))
    }

    /// A connection to one sentinel that answered `PING`: without
    /// credentials, or with the URL's if it asks for them (`NOAUTH`).
    fn sentinel_conn(&self, host: &str, port: u16) -> Result<Connection, RedisError> {
        let open = |auth: bool| -> Result<Connection, RedisError> {
            let client = Client::open(self.url.sentinel_url(host, port, auth))?;
            let mut conn = client.get_connection_with_timeout(SENTINEL_TIMEOUT)?;
            conn.set_read_timeout(Some(SENTINEL_TIMEOUT))?;
            conn.set_write_timeout(Some(SENTINEL_TIMEOUT))?;
            redis::cmd("PING").query::<Value>(&mut conn)?;
            Ok(conn)
        };
        match open(false) {
            Err(e) if e.code() == Some("NOAUTH") && self.url.userinfo.is_some() => open(true),
            other => other,
        }
    }

    /// Follows a failover event: the old master is never used again while
    /// the failover runs, the new one at once.
    fn follow_event(&self, ev: FailoverEvent, source: &str) -> Result<Master, RedisError> {
        lock(&self.known).demoting =
            (!ev.done).then(|| (ev.old.clone(), Instant::now() + PROMOTION_GRACE));
        self.switch_to(ev.new, source, !ev.done)
    }

    /// Makes `addr` the master (`promoting`: a replica the sentinels are
    /// promoting now). A new address bumps the generation (every connection
    /// moves), and counts as a failover if there was one before.
    fn switch_to(
        &self,
        addr: (String, u16),
        source: &str,
        promoting: bool,
    ) -> Result<Master, RedisError> {
        let mut known = lock(&self.known);
        if let Some(m) = known.master.as_mut() {
            if m.addr == addr {
                if !promoting {
                    m.promoting_until = None;
                }
                return Ok(m.clone());
            }
        }
        let client = (self.client_for)(&self.url.data_url(&addr.0, addr.1))?;
        let changed = known.last_addr.as_ref() != Some(&addr);
        if changed {
            known.generation += 1;
            self.generation.store(known.generation, Ordering::Release);
            match &known.last_addr {
                Some((h, p)) => {
                    crate::metrics::failover();
                    log::warn!(
                        "master {} moved from {} to {} (told by {source}): following it",
                        self.url.master,
                        addr_text(h, *p),
                        addr_text(&addr.0, addr.1)
                    );
                }
                None => log::info!(
                    "master {} is at {} (told by {source})",
                    self.url.master,
                    addr_text(&addr.0, addr.1)
                ),
            }
        }
        let master = Master {
            addr: addr.clone(),
            client,
            generation: known.generation,
            promoting_until: promoting.then(|| Instant::now() + PROMOTION_GRACE),
        };
        known.master = Some(master.clone());
        known.last_addr = Some(addr);
        Ok(master)
    }

    /// Starts the watcher threads, once; they run until the process exits.
    pub fn watch(self: &Arc<Self>) {
        self.watching.call_once(|| {
            for (host, port) in self.url.sentinels.clone() {
                let me = Arc::clone(self);
                let name = format!("sentinel:{}", addr_text(&host, port));
                let spawned = std::thread::Builder::new()
                    .name(name)
                    .spawn(move || me.watch_one(&host, port));
                if let Err(e) = spawned {
                    log::error!("cannot start a sentinel watcher: {e}");
                }
            }
        });
    }

    fn watch_one(&self, host: &str, port: u16) {
        let mut backoff = crate::connection::Backoff::default();
        let mut lost = false;
        loop {
            let mut subscribed = false;
            let e = self.follow(host, port, lost, &mut subscribed);
            if subscribed {
                backoff.reset();
            }
            if !lost {
                log::warn!(
                    "sentinel {} unavailable, retrying: {e}",
                    addr_text(host, port)
                );
            }
            lost = true;
            // Stay quick to come back: a sentinel restarts in a second.
            std::thread::sleep(backoff.next_delay().min(Duration::from_secs(1)));
        }
    }

    /// Subscribes to the failover events on one sentinel and follows them
    /// until the connection fails, returning why. `resync`: events may have
    /// been missed while disconnected, so the sentinel is asked for the
    /// master once subscribed.
    fn follow(&self, host: &str, port: u16, resync: bool, subscribed: &mut bool) -> RedisError {
        match self.subscribe_and_follow(host, port, resync, subscribed) {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    fn subscribe_and_follow(
        &self,
        host: &str,
        port: u16,
        resync: bool,
        subscribed: &mut bool,
    ) -> Result<std::convert::Infallible, RedisError> {
        let mut conn = self.sentinel_conn(host, port)?;
        let mut pubsub = conn.as_pubsub();
        pubsub.subscribe(&EVENTS[..])?;
        *subscribed = true;
        if resync {
            log::info!("sentinel {} is back", addr_text(host, port));
            if let Ok(Some(addr)) = self.ask(host, port) {
                let known = lock(&self.known).last_addr.clone();
                if known.is_some_and(|k| k != addr) {
                    let source = format!("sentinel {}", addr_text(host, port));
                    self.switch_to(addr, &source, false)?;
                }
            }
        }
        pubsub.set_read_timeout(Some(WATCH_IDLE))?;
        loop {
            match pubsub.get_message() {
                Ok(msg) => {
                    let payload: String = msg.get_payload().unwrap_or_default();
                    let event = msg.get_channel_name().to_string();
                    if let Some(ev) = failover_event(&event, &payload, &self.url.master) {
                        let source = format!("{event} from sentinel {}", addr_text(host, port));
                        if let Err(e) = self.follow_event(ev, &source) {
                            log::warn!("cannot follow {source}: {e}");
                        }
                    }
                }
                Err(e) if e.is_timeout() => {
                    pubsub.ping::<Value>()?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// What a sentinel's failover event says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverEvent {
    /// The master being replaced.
    pub old: (String, u16),
    /// The replica that becomes the master.
    pub new: (String, u16),
    /// `+switch-master`: done. Otherwise the sentinels are promoting `new`
    /// right now (`+failover-state-send-slaveof-noone`).
    pub done: bool,
}

/// The failover named by a sentinel event about `master`, if it is one.
///
/// ```
/// use streamline::sentinel::failover_event;
///
/// let switch = "mymaster 127.0.0.1 6379 127.0.0.1 6380";
/// let e = failover_event("+switch-master", switch, "mymaster").unwrap();
/// assert_eq!((e.old.1, e.new.1, e.done), (6379, 6380, true));
/// assert_eq!(failover_event("+switch-master", switch, "other"), None);
/// let promote = "slave 127.0.0.1:6381 127.0.0.1 6381 @ mymaster 127.0.0.1 6379";
/// let e = failover_event("+failover-state-send-slaveof-noone", promote, "mymaster").unwrap();
/// assert_eq!((e.old.1, e.new.1, e.done), (6379, 6381, false));
/// ```
pub fn failover_event(event: &str, payload: &str, master: &str) -> Option<FailoverEvent> {
    let words: Vec<&str> = payload.split_whitespace().collect();
    let addr = |ip: &str, port: &str| Some((ip.to_string(), port.parse::<u16>().ok()?));
    match (event, words.as_slice()) {
        // <master name> <old ip> <old port> <new ip> <new port>
        ("+switch-master", [name, oip, oport, ip, port, ..]) if *name == master => {
            Some(FailoverEvent {
                old: addr(oip, oport)?,
                new: addr(ip, port)?,
                done: true,
            })
        }
        // slave <name> <ip> <port> @ <master name> <master ip> <master port>
        (
            "+failover-state-send-slaveof-noone",
            ["slave", _, ip, port, "@", name, oip, oport, ..],
        ) if *name == master => Some(FailoverEvent {
            old: addr(oip, oport)?,
            new: addr(ip, port)?,
            done: false,
        }),
        _ => None,
    }
}

/// `[ip, port]` from `get-master-addr-by-name`; `None` for nil or junk.
fn parse_addr(reply: &Value) -> Option<(String, u16)> {
    let [ip, port, ..] = crate::value::as_array(reply)? else {
        return None;
    };
    let ip = crate::value::as_string(ip)?;
    let port = crate::value::as_string(port)?.parse().ok()?;
    Some((ip, port))
}

/// The first word of `ROLE`: `master`, `slave` or `sentinel`.
pub fn role(conn: &mut Connection) -> Result<String, RedisError> {
    let reply: Value = redis::cmd("ROLE").query(conn)?;
    crate::value::as_array(&reply)
        .and_then(|r| r.first())
        .and_then(crate::value::as_string)
        .ok_or_else(|| no_master("unexpected reply to ROLE".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_errors_say_what_is_wrong() {
        let u = parse("rediss+sentinel://s1:1,s2:2,s3/m").unwrap();
        assert!(u.tls);
        assert_eq!(u.sentinels.len(), 3);
        assert_eq!(u.sentinels[2], ("s3".into(), DEFAULT_PORT));
        assert_eq!(u.data_url("h", 7), "rediss://h:7/0");
        assert_eq!(u.data_url("::1", 7), "rediss://[::1]:7/0");
        let u = parse("redis+sentinel://:pw@s1:1/m/3").unwrap();
        assert_eq!(u.userinfo.as_deref(), Some(":pw"));
        assert_eq!(u.db, 3);
        for (bad, says) in [
            ("redis://h:1", "redis+sentinel"),
            ("redis+sentinel://s1:1/", "master name"),
            ("redis+sentinel://s1:x/m", "bad port"),
            ("redis+sentinel://s1:1,,s2/m", "empty sentinel"),
            ("redis+sentinel://s1:1/m/x", "not a number"),
            ("redis+sentinel://s1:1/m/1/2", "more path"),
            ("redis+sentinel://s1:1/m?x=1", "query"),
            ("redis+sentinel://[::1/m", "']'"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert_eq!(SentinelUrl::parse(bad).unwrap_err().to_string(), e);
        }
    }

    #[test]
    fn sentinel_replies_read_back() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(
            parse_addr(&Value::Array(vec![bulk("10.0.0.1"), bulk("6380")])),
            Some(("10.0.0.1".into(), 6380))
        );
        assert_eq!(parse_addr(&Value::Nil), None);
        assert_eq!(parse_addr(&Value::Array(vec![bulk("x"), bulk("y")])), None);
        assert_eq!(failover_event("+sdown", "master m 1 2", "m"), None);
        assert_eq!(failover_event("+switch-master", "m 1 2 3", "m"), None);
        assert_eq!(failover_event("+switch-master", "m h x h 2", "m"), None);
    }
}

//! What every service runs besides its work: the small HTTP listener of
//! the consumers (`/healthz`, `/readyz`, `/metrics`) and the probe behind
//! it, joining threads at a stop, and [`ServiceError`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::connection::{self, ConnectError, Link, Redis};
use crate::http::{BindError, HttpServer};
use crate::metrics::GroupGauge;
use crate::{notify, topology};

/// Why a service could not run. `Display` is one line an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The Redis client could not be built (URL, TLS settings).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The HTTP listener could not start.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// Why a service is not ready; `Display` is the `error` of its `503`
/// `/readyz` answer.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// Redis does not answer.
    #[error("Redis unavailable: {0}")]
    Unavailable(redis::RedisError),
    /// A group of the topology is missing and creating it failed.
    #[error("consumer groups are missing and cannot be created: {0}")]
    CannotCreateGroups(redis::RedisError),
    /// A group of the topology is still missing after it was created.
    #[error("consumer groups of the topology are missing")]
    GroupsMissing,
    /// Any of the above, with the sentinel master in use.
    #[error("{why} (sentinel master {name}, {})", last_seen(.addr))]
    Sentinel {
        /// What is wrong.
        why: Box<NotReady>,
        /// The master's name.
        name: String,
        /// Where it was last found (`host:port`), if ever.
        addr: Option<String>,
    },
}

fn last_seen(addr: &Option<String>) -> String {
    addr.as_ref()
        .map_or_else(|| "not found yet".to_string(), |a| format!("last at {a}"))
}

/// A connection of its own for `/readyz` and `/metrics`, so a probe never
/// waits behind work (and work never behind a probe).
#[derive(Clone)]
pub struct Probe(Arc<Mutex<Link>>);

impl Probe {
    /// A probe whose commands give up after a second.
    pub fn new(redis: &Redis) -> Probe {
        Probe(Arc::new(Mutex::new(Link::new(
            redis.clone(),
            Duration::from_secs(1),
            connection::nothing,
        ))))
    }

    fn run<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).run(f)
    }

    /// `Ok` when Redis answers and every group of the topology exists,
    /// with what `/readyz` adds to its body: with sentinels, the master in
    /// use (`master`, `host:port`) and its name (`sentinelMaster`).
    pub fn ready(&self) -> Result<serde_json::Map<String, serde_json::Value>, NotReady> {
        let redis = self.0.lock().unwrap_or_else(|e| e.into_inner()).redis();
        let result = self.check_ready();
        let Some((name, addr)) = redis.master() else {
            return result.map(|()| serde_json::Map::new());
        };
        if let Err(why) = result {
            let why = Box::new(why);
            return Err(NotReady::Sentinel { why, name, addr });
        }
        let mut extra = serde_json::Map::new();
        extra.insert("sentinelMaster".into(), name.into());
        if let Some(a) = addr {
            extra.insert("master".into(), a.into());
        }
        Ok(extra)
    }

    /// Missing groups are created here, not only when work arrives: after
    /// Redis restarted empty, a load balancer waits for `/readyz` before it
    /// sends the order that would have recreated them, so a probe that only
    /// looked would say 503 forever. Creating a group at ID `0` is what
    /// every service does at start, so it is safe at any moment.
    fn check_ready(&self) -> Result<(), NotReady> {
        // XINFO GROUPS answering is the proof that Redis answers.
        let gauges = self
            .run(topology::group_gauges)
            .map_err(NotReady::Unavailable)?;
        if topology::groups_present(&gauges) {
            return Ok(());
        }
        self.run(topology::ensure_groups)
            .map_err(NotReady::CannotCreateGroups)?;
        log::info!("recreated the missing consumer groups of the topology");
        let gauges = self
            .run(topology::group_gauges)
            .map_err(NotReady::Unavailable)?;
        if topology::groups_present(&gauges) {
            Ok(())
        } else {
            Err(NotReady::GroupsMissing)
        }
    }

    /// The metrics text, with group lag and pending read from Redis (left
    /// out, not failed, when Redis does not answer).
    pub fn metrics(&self) -> String {
        let gauges: Vec<GroupGauge> = self.run(topology::group_gauges).unwrap_or_default();
        crate::metrics::render(&gauges)
    }

    /// Makes sure the topology's groups exist, retrying until Redis answers
    /// or `shutdown` fires (then `false`).
    pub fn ensure_topology(&self, shutdown: &Receiver<()>) -> bool {
        let mut backoff = connection::Backoff::default();
        let mut logged = false;
        loop {
            match self.run(topology::ensure_groups) {
                Ok(()) => return true,
                Err(e) => {
                    if !logged {
                        log::warn!("waiting for Redis to create the consumer groups: {e}");
                        notify::status(&format!("waiting for Redis: {e}"));
                        logged = true;
                    }
                }
            }
            if crate::shutdown::wait(shutdown, backoff.next_delay()) {
                return false;
            }
        }
    }
}

/// Starts the small HTTP listener of a consumer service: `/healthz`,
/// `/readyz`, `/metrics`, everything else `404`.
pub fn spawn_ops_http(
    server: &Arc<HttpServer>,
    probe: &Probe,
    shutdown: &Receiver<()>,
    beats: &notify::Heartbeats,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let (ready, metrics) = (probe.clone(), probe.clone());
    server.spawn_workers("http", 2, shutdown, beats, move |request, _beat| {
        if let Some(request) =
            crate::http::ops_route(request, || ready.ready(), || metrics.metrics())
        {
            crate::http::respond(request, crate::http::error(404, "not found"));
        }
    })
}

/// Joins threads, logging (not propagating) a panic.
pub fn join_all(threads: Vec<std::thread::JoinHandle<()>>) {
    for t in threads {
        let name = t.thread().name().unwrap_or("?").to_string();
        if t.join().is_err() {
            log::error!("thread {name} panicked");
        }
    }
}

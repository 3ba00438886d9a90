//! The HTTP clients the load threads use: one connection per thread, kept
//! alive across requests.
//!
//! Two implementations, chosen with `--client`: `ureq` (an `Agent` per
//! thread), and `raw`, the test kit's [`RawClient`]: HTTP/1.1 written by
//! hand on a `TcpStream` with a minimal response parser (status line,
//! `Content-Length`, chunked bodies, `Connection: close`). `raw` is the default because, measured against the
//! bare tiny_http server, it costs the client side less CPU: on a small
//! machine the client shares the cores with the server it measures, so a
//! cheaper client leaves more of them to the server (see BENCHMARKS.md).

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use testkit::raw::RawClient;

use crate::args::is_local_host;

/// Every request is bounded: a request never hangs a load thread.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Which client implementation to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    /// Hand-written HTTP/1.1 on a `TcpStream`.
    Raw,
    /// A `ureq::Agent`.
    Ureq,
}

impl ClientKind {
    /// `raw` or `ureq`.
    pub fn parse(s: &str) -> Result<ClientKind, String> {
        match s {
            "raw" => Ok(ClientKind::Raw),
            "ureq" => Ok(ClientKind::Ureq),
            _ => Err(format!("--client wants raw or ureq, not {s:?}")),
        }
    }

    /// The name `--client` takes.
    pub fn name(self) -> &'static str {
        match self {
            ClientKind::Raw => "raw",
            ClientKind::Ureq => "ureq",
        }
    }
}

/// An HTTP server on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Where to connect.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`, for ureq and for messages.
    pub base: String,
}

impl Target {
    /// `http://127.0.0.1:port`.
    pub fn local(port: u16) -> Target {
        Target {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Parses `http://HOST:PORT[/]` where HOST is this machine.
    pub fn parse(url: &str) -> Result<Target, String> {
        let bad = || format!("--url wants http://127.0.0.1:PORT, not {url:?}");
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let authority = rest.trim_end_matches('/');
        let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "80"));
        if !is_local_host(host) {
            return Err(format!(
                "--url {url:?}: this tool only talks to 127.0.0.1 (got host {host:?})"
            ));
        }
        port.parse().map(Target::local).map_err(|_| bad())
    }
}

/// One keep-alive HTTP connection.
pub enum Client {
    /// See [`RawClient`].
    Raw(RawClient),
    /// See [`UreqClient`].
    Ureq(UreqClient),
}

impl Client {
    /// A client of `kind` for `target`; connects on the first request.
    pub fn new(kind: ClientKind, target: &Target) -> Client {
        match kind {
            ClientKind::Raw => Client::Raw(RawClient::new(target.addr)),
            ClientKind::Ureq => Client::Ureq(UreqClient::new(target)),
        }
    }

    /// `GET path`; the status, or why there is none. The body is in
    /// [`Client::body`] until the next request.
    pub fn get(&mut self, path: &str) -> Result<u16, String> {
        self.get_keyed(path, None)
    }

    /// [`Client::get`] with an `Idempotency-Key` header when `key` is
    /// given.
    pub fn get_keyed(&mut self, path: &str, key: Option<&str>) -> Result<u16, String> {
        match self {
            Client::Raw(c) => c.get_keyed(path, key),
            Client::Ureq(c) => c.get(path, key),
        }
    }

    /// Opens the connection with one untimed `GET /healthz` (any status),
    /// one client at a time.
    ///
    /// One at a time because of tiny_http 0.12's thread pool: a connection
    /// is a task that holds its pool thread for as long as it is kept
    /// alive, and when two connections arrive while a single pool thread is
    /// idle, both are queued for it and the second waits until another
    /// connection closes (seen here as clients timing out at start-up).
    /// Connecting in turn, each answered before the next connects, never
    /// has two arrive together.
    pub fn warm_up(&mut self) -> Result<(), String> {
        static TURN: Mutex<()> = Mutex::new(());
        let _turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
        self.get("/healthz").map(drop)
    }

    /// The body of the last answer.
    pub fn body(&self) -> &[u8] {
        match self {
            Client::Raw(c) => c.body(),
            Client::Ureq(c) => &c.body,
        }
    }
}

/// A `ureq::Agent` of its own (its pool keeps the connection alive).
pub struct UreqClient {
    agent: ureq::Agent,
    base: String,
    url: String,
    body: Vec<u8>,
}

impl UreqClient {
    /// A client for `target`; connects on the first request.
    pub fn new(target: &Target) -> UreqClient {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(IO_TIMEOUT))
            .build()
            .into();
        UreqClient {
            agent,
            base: target.base.clone(),
            url: String::with_capacity(256),
            body: Vec::new(),
        }
    }

    /// `GET path`, body read to the end so the connection goes back to the
    /// pool.
    pub fn get(&mut self, path: &str, key: Option<&str>) -> Result<u16, String> {
        self.url.clear();
        self.url.push_str(&self.base);
        self.url.push_str(path);
        let mut request = self.agent.get(&self.url);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let mut resp = request.call().map_err(|e| format!("{}: {e}", self.base))?;
        self.body = resp
            .body_mut()
            .read_to_vec()
            .map_err(|e| format!("{}: {e}", self.base))?;
        Ok(resp.status().as_u16())
    }
}

//! The HTTP clients the load threads use: one connection per thread, kept
//! alive across requests.
//!
//! Two implementations, chosen with `--client`: `ureq` (an `Agent` per
//! thread), and `raw`, HTTP/1.1 written by hand on a `TcpStream` with a
//! minimal response parser (status line, `Content-Length`, chunked bodies,
//! `Connection: close`). `raw` is the default because, measured against the
//! bare tiny_http server, it costs the client side less CPU: on a small
//! machine the client shares the cores with the server it measures, so a
//! cheaper client leaves more of them to the server (see BENCHMARKS.md).

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::args::is_local_host;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Every read and write is bounded: a request never hangs a load thread.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_LINE: u64 = 8 * 1024;
const MAX_HEADERS: usize = 100;
const MAX_BODY: usize = 1 << 20;

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
            ClientKind::Raw => Client::Raw(RawClient::new(target)),
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
            Client::Raw(c) => c.get(path, key),
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
            Client::Raw(c) => &c.body,
            Client::Ureq(c) => &c.body,
        }
    }
}

/// HTTP/1.1 by hand: one buffered `TcpStream`, reconnected after an error or
/// a `Connection: close`.
pub struct RawClient {
    addr: SocketAddr,
    host: String,
    conn: Option<BufReader<TcpStream>>,
    request: String,
    line: String,
    body: Vec<u8>,
}

impl RawClient {
    /// A client for `target`; connects on the first request.
    pub fn new(target: &Target) -> RawClient {
        RawClient {
            addr: target.addr,
            host: target.addr.to_string(),
            conn: None,
            request: String::with_capacity(256),
            line: String::with_capacity(256),
            body: Vec::with_capacity(256),
        }
    }

    /// `GET path`, with `Idempotency-Key: key` if given. Never retried:
    /// the point is to measure each request once.
    pub fn get(&mut self, path: &str, key: Option<&str>) -> Result<u16, String> {
        match self.exchange(path, key) {
            Ok((status, keep_alive)) => {
                if !keep_alive {
                    self.conn = None;
                }
                Ok(status)
            }
            Err(e) => {
                self.conn = None;
                Err(format!("{}: {e}", self.addr))
            }
        }
    }

    fn exchange(&mut self, path: &str, key: Option<&str>) -> io::Result<(u16, bool)> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => connect(self.addr)?,
        };
        let conn = self.conn.insert(conn);
        self.request.clear();
        // Writing to a String cannot fail.
        let _ = write!(
            self.request,
            "GET {path} HTTP/1.1\r\nHost: {}\r\n",
            self.host
        );
        if let Some(key) = key {
            let _ = write!(self.request, "Idempotency-Key: {key}\r\n");
        }
        self.request.push_str("\r\n");
        conn.get_mut().write_all(self.request.as_bytes())?;
        read_response(conn, &mut self.line, &mut self.body)
    }
}

fn connect(addr: SocketAddr) -> io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(BufReader::with_capacity(8 * 1024, stream))
}

/// What the headers say about the body and the connection.
#[derive(Default)]
struct Head {
    length: Option<usize>,
    chunked: bool,
    close: bool,
    keep_alive: bool,
}

/// Reads one response; returns its status and whether the connection can
/// carry another request.
fn read_response(
    r: &mut BufReader<TcpStream>,
    line: &mut String,
    body: &mut Vec<u8>,
) -> io::Result<(u16, bool)> {
    let (status, http10) = read_status(r, line)?;
    let head = read_headers(r, line)?;
    let keep_alive = !head.close && (!http10 || head.keep_alive);
    body.clear();
    if head.chunked {
        read_chunked(r, line, body)?;
    } else if let Some(n) = head.length {
        if n > MAX_BODY {
            return Err(invalid("body too large"));
        }
        body.resize(n, 0);
        r.read_exact(body)?;
    } else if !(status == 204 || status == 304 || status < 200) {
        // No length: the body ends when the server closes.
        r.take(MAX_BODY as u64).read_to_end(body)?;
        return Ok((status, false));
    }
    Ok((status, keep_alive))
}

fn read_line(r: &mut BufReader<TcpStream>, line: &mut String) -> io::Result<()> {
    line.clear();
    if r.by_ref().take(MAX_LINE).read_line(line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed by the server",
        ));
    }
    Ok(())
}

fn read_status(r: &mut BufReader<TcpStream>, line: &mut String) -> io::Result<(u16, bool)> {
    read_line(r, line)?;
    let mut parts = line.split_ascii_whitespace();
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(invalid("not an HTTP/1.x status line"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("bad status code"))?;
    Ok((status, version == "HTTP/1.0"))
}

fn read_headers(r: &mut BufReader<TcpStream>, line: &mut String) -> io::Result<Head> {
    let mut head = Head::default();
    for _ in 0..MAX_HEADERS {
        read_line(r, line)?;
        let text = line.trim_end();
        if text.is_empty() {
            return Ok(head);
        }
        let Some((name, value)) = text.split_once(':') else {
            return Err(invalid("header without a colon"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.length = Some(value.parse().map_err(|_| invalid("bad Content-Length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            head.close |= value.eq_ignore_ascii_case("close");
            head.keep_alive |= value.eq_ignore_ascii_case("keep-alive");
        }
    }
    Err(invalid("too many headers"))
}

fn read_chunked(
    r: &mut BufReader<TcpStream>,
    line: &mut String,
    body: &mut Vec<u8>,
) -> io::Result<()> {
    while body.len() <= MAX_BODY {
        read_line(r, line)?;
        let size = line.trim_end().split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size.trim(), 16).map_err(|_| invalid("bad chunk size"))?;
        if size == 0 {
            // Trailers, then the blank line that ends the message.
            for _ in 0..MAX_HEADERS {
                read_line(r, line)?;
                if line.trim_end().is_empty() {
                    return Ok(());
                }
            }
            return Err(invalid("too many trailers"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        read_line(r, line)?;
    }
    Err(invalid("body too large"))
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
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

//! The HTTP layer shared by every service: a small HTTP/1.1 server that
//! clients on an untrusted network cannot crash, exhaust or tie up, a fixed
//! pool of worker threads, JSON answers, and the operational routes
//! (`/healthz`, `/readyz`, `/metrics`).
//!
//! # Why not tiny_http
//!
//! The services used tiny_http 0.12 until it was measured against abusive
//! clients: it starts one thread per open connection without limit (300
//! half-open connections: 275 threads), has no request timeout, and keeps a
//! request header line in memory however long it gets (one 200 MB header:
//! 217 MB of RSS). None of that can be fixed from outside it, because it
//! owns the sockets. So the connection layer is ours, on `httparse` (the
//! parser ureq and hyper use), with a bound on everything:
//!
//! * **Connections**: at most [`MAX_CONNECTIONS`], each with its own small
//!   `http-conn` thread. When the table is full, a new connection evicts
//!   the one that has waited longest for its client (to send a head or a
//!   body, or to read an answer); a connection whose request is being
//!   handled is never evicted. If all of them are busy, the new one gets
//!   `503` at once. Threads are therefore bounded: `MAX_CONNECTIONS`, plus
//!   at most 16 of evicted connections still exiting (past that the
//!   acceptor waits for them), plus the service's fixed few. A slowloris
//!   attack only evicts its own connections: a client that sends its
//!   request promptly is the newest, hence the last to go.
//! * **Keep-alive**: a connection serves its requests one at a time; bytes
//!   of a next request that arrive early stay buffered (pipelining works)
//!   and count against the limits above.
//! * **Time**: a request head must arrive within [`IO_TIMEOUT`] of the
//!   moment the connection starts waiting for it (idle keep-alive time
//!   included), and its body within another `IO_TIMEOUT`. These are
//!   deadlines, not per-read timeouts: a client that sends a byte every few
//!   seconds does not stretch them.
//! * **Memory**: a head is at most [`wire::MAX_HEAD`] bytes and
//!   [`wire::MAX_HEADERS`] headers (else `431`), a body at most [`MAX_BODY`]
//!   (else `413`, before reading it when `Content-Length` says so, before
//!   the chunk that passes the limit when chunked). So a connection holds
//!   at most about 80 KiB, all of them together about 20 MiB.
//! * **Workers**: requests reach the worker threads through a queue that
//!   holds at most one request per connection. Workers never touch a
//!   socket: [`Request::respond`] hands the answer to the connection's
//!   thread, so a client that does not read cannot stall a worker, or the
//!   order writers that answer orders.
//!
//! What this does not do: limit connections per client address, or the
//! rate of new connections. A flood from many addresses can still keep the
//! table full; that is for a firewall or a reverse proxy in front.

mod conn;
pub mod wire;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde_json::json;

pub use self::wire::Method;

/// How long a client may take to send a request head (counted from the
/// moment the connection starts waiting for it), to send a body, or to take
/// an answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body accepted; larger ones get `413`.
pub const MAX_BODY: usize = 64 * 1024;
/// Most connections open at once; see the module documentation.
pub const MAX_CONNECTIONS: usize = 256;
/// How often the acceptor looks up from `accept` to check for shutdown.
const ACCEPT_POLL: Duration = Duration::from_millis(200);
/// How long dropping an [`HttpServer`] waits for answers already given to
/// be written.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the HTTP listener could not start.
#[derive(Debug)]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot listen on HTTP_ADDR {}: {}",
            self.addr, self.source
        )
    }
}

impl std::error::Error for BindError {}

/// A listening HTTP server. Connections are accepted once
/// [`HttpServer::spawn_workers`] has started the threads.
pub struct HttpServer {
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<conn::Shared>,
    requests: Receiver<Request>,
}

impl HttpServer {
    /// Listens on `addr`.
    pub fn bind(addr: SocketAddr) -> Result<Arc<HttpServer>, BindError> {
        let err = |source| BindError { addr, source };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(err)?;
        socket.set_reuse_address(true).map_err(err)?;
        // On a listening socket the read timeout bounds `accept`: the
        // acceptor wakes up to notice a shutdown.
        socket.set_read_timeout(Some(ACCEPT_POLL)).map_err(err)?;
        socket.bind(&addr.into()).map_err(err)?;
        socket.listen(1024).map_err(err)?;
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().map_err(err)?;
        // One request per connection at most is queued (see conn).
        let (tx, rx) = crossbeam_channel::bounded(MAX_CONNECTIONS);
        Ok(Arc::new(HttpServer {
            listener,
            addr,
            shared: Arc::new(conn::Shared::new(tx)),
            requests: rx,
        }))
    }

    /// The address actually listened on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts the `http-accept` thread and `workers` threads named
    /// `<name>-N` that answer requests with `handle`. All stop when
    /// `shutdown` fires; workers first answer what is queued with `503`.
    pub fn spawn_workers<H>(
        self: &Arc<Self>,
        name: &str,
        workers: usize,
        shutdown: &Receiver<()>,
        handle: H,
    ) -> std::io::Result<Vec<JoinHandle<()>>>
    where
        H: Fn(Request) + Send + Sync + 'static,
    {
        let handle = Arc::new(handle);
        let mut threads = Vec::with_capacity(workers + 1);
        for i in 1..=workers {
            let (requests, handle, shutdown) =
                (self.requests.clone(), handle.clone(), shutdown.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || work(&requests, &shutdown, &*handle))?,
            );
        }
        let (me, shutdown) = (self.clone(), shutdown.clone());
        threads.push(
            std::thread::Builder::new()
                .name("http-accept".into())
                .spawn(move || conn::accept_loop(&me.listener, &me.shared, &shutdown))?,
        );
        Ok(threads)
    }
}

impl Drop for HttpServer {
    /// Waits (at most [`FLUSH_TIMEOUT`]) until the answers already given
    /// are written: a service stops after its last answer left, not before.
    fn drop(&mut self) {
        self.shared.stop();
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        while self.shared.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn work(
    requests: &Receiver<Request>,
    shutdown: &Receiver<()>,
    handle: &(dyn Fn(Request) + Send + Sync),
) {
    while !crate::shutdown::is_started(shutdown) {
        if let Ok(request) = requests.recv_timeout(Duration::from_millis(200)) {
            handle(request);
        }
    }
    while let Ok(request) = requests.try_recv() {
        respond(request, error(503, "the server is stopping; retry later"));
    }
}

/// One request, read whole (head and body) by its connection's thread.
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    reply: Option<Sender<Response>>,
}

impl Request {
    /// A request that did not come from the network (tests, tools), and
    /// where its answer will arrive.
    pub fn new(
        method: Method,
        url: &str,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
    ) -> (Request, Receiver<Response>) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let request = Request {
            method,
            url: url.to_string(),
            headers,
            body,
            reply: Some(tx),
        };
        (request, rx)
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request target, path and query (`/order?userId=...`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The first value of header `name` (case-insensitive), raw.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The body (at most [`MAX_BODY`] bytes).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Hands the answer to the connection, which writes it; never blocks.
    /// Fails if the connection is gone.
    pub fn respond(mut self, response: Response) -> std::io::Result<()> {
        let sent = self.reply.take().map(|tx| tx.send(response));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the client connection is gone",
            )),
        }
    }
}

/// An answer: status, headers and a body.
#[derive(Debug, Clone)]
pub struct Response {
    status: u16,
    headers: Vec<Header>,
    body: Vec<u8>,
    /// Close the connection after it.
    close: bool,
}

impl Response {
    /// An answer with `status` and `body`, no headers.
    pub fn new(status: u16, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body,
            close: false,
        }
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// Adds a header.
    pub fn add_header(&mut self, header: Header) {
        self.headers.push(header);
    }

    /// With one more header.
    pub fn with_header(mut self, header: Header) -> Response {
        self.add_header(header);
        self
    }

    fn header_pairs(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect()
    }
}

/// A response header, checked to be safe to send: a token for a name,
/// visible ASCII (and spaces) for a value, so no line break can be injected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    name: String,
    value: String,
}

/// A header name or value that cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidHeader;

impl std::fmt::Display for InvalidHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid header name or value")
    }
}

impl std::error::Error for InvalidHeader {}

impl Header {
    /// A header from its name and value, if both are safe to send.
    pub fn from_bytes(
        name: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Header, InvalidHeader> {
        let (name, value) = (name.as_ref(), value.as_ref());
        let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
        let text = |b: &u8| *b == b'\t' || (b' '..=b'~').contains(b);
        if name.is_empty() || !name.iter().all(token) || !value.iter().all(text) {
            return Err(InvalidHeader);
        }
        // Only ASCII passed the checks above.
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Ok(Header {
            name: s(name),
            value: s(value),
        })
    }
}

/// A JSON answer.
pub fn json(status: u16, body: &serde_json::Value) -> Response {
    Response::new(status, body.to_string().into_bytes())
        .with_header(header("Content-Type", "application/json"))
}

/// A JSON error answer: `{"error": message}`.
pub fn error(status: u16, message: &str) -> Response {
    json(status, &json!({ "error": message }))
}

/// A plain-text answer.
pub fn text(status: u16, body: String, content_type: &str) -> Response {
    Response::new(status, body.into_bytes()).with_header(header("Content-Type", content_type))
}

fn header(name: &str, value: &str) -> Header {
    // Both are ASCII literals of ours, so this cannot fail.
    Header::from_bytes(name, value).expect("valid header")
}

/// Sends `response`, counting it in the metrics; a client that went away
/// is not an error worth more than a debug line.
pub fn respond(request: Request, response: Response) {
    crate::metrics::http_request(response.status);
    if let Err(e) = request.respond(response) {
        log::debug!("could not send the answer: {e}");
    }
}

/// Why a body could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Over the limit.
    TooLarge,
}

/// The body, refused if over `limit` bytes. The connection layer already
/// refused bodies over [`MAX_BODY`] (`413`) before reading them whole.
pub fn read_body(request: &mut Request, limit: usize) -> Result<Vec<u8>, BodyError> {
    if request.body.len() > limit {
        return Err(BodyError::TooLarge);
    }
    Ok(std::mem::take(&mut request.body))
}

/// The path of a request URL, without the query.
pub fn path(url: &str) -> &str {
    url.split_once('?').map_or(url, |(p, _)| p)
}

/// A query parameter that is not valid UTF-8 once percent-decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct NotUtf8(pub String);

/// Parses the query string of `url` (`+` is a space, `%XX` a byte). The
/// first occurrence of a name wins.
pub fn query(url: &str) -> Result<HashMap<String, String>, NotUtf8> {
    let mut out = HashMap::new();
    let Some((_, q)) = url.split_once('?') else {
        return Ok(out);
    };
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = String::from_utf8(percent_decode(k)).map_err(|_| NotUtf8(k.to_string()))?;
        let value = String::from_utf8(percent_decode(v)).map_err(|_| NotUtf8(key.clone()))?;
        out.entry(key).or_insert(value);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Answers the routes every service has; `None` if `request` is not one
/// of them (the caller answers it).
pub fn ops_route(
    request: Request,
    ready: impl Fn() -> Result<(), String>,
    metrics: impl Fn() -> String,
) -> Option<Request> {
    let is_get = matches!(request.method(), Method::Get | Method::Head);
    let response = match path(request.url()) {
        "/healthz" if is_get => json(200, &json!({ "status": "ok" })),
        "/readyz" if is_get => match ready() {
            Ok(()) => json(200, &json!({ "status": "ready" })),
            Err(why) => json(503, &json!({ "status": "not ready", "error": why })),
        },
        "/metrics" if is_get => text(200, metrics(), "text/plain; version=0.0.4"),
        "/healthz" | "/readyz" | "/metrics" => error(405, "method not allowed"),
        _ => return Some(request),
    };
    respond(request, response);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = query("/order?userId=u%201&productId=p+2&price=100&userId=x").unwrap();
        assert_eq!(q["userId"], "u 1");
        assert_eq!(q["productId"], "p 2");
        assert_eq!(q["price"], "100");
        assert_eq!(
            query("/order?userId=%FF").unwrap_err(),
            NotUtf8("userId".into())
        );
        assert_eq!(query("/order?a=%zz&b=%4").unwrap()["a"], "%zz");
        assert_eq!(query("/order?b=%4").unwrap()["b"], "%4");
        assert!(query("/order").unwrap().is_empty());
    }

    #[test]
    fn paths() {
        assert_eq!(path("/order?x=1"), "/order");
        assert_eq!(path("/orders"), "/orders");
    }
}

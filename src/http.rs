//! The HTTP layer shared by every service: a tiny_http server that clients
//! on an untrusted network cannot crash, exhaust or tie up, a fixed pool of
//! worker threads, JSON answers, bounded body reading, and the operational
//! routes (`/healthz`, `/readyz`, `/metrics`).
//!
//! # Limits
//!
//! tiny_http 0.12 as published has no request timeout, starts a thread per
//! connection without limit, buffers a header line however long it grows,
//! reads bodies lazily on whichever thread handles the request, and stops
//! accepting for good after one failed `accept`. We use it with small
//! patches (`vendor/tiny_http/PATCHES.md`) and set the rest up here:
//!
//! * **Time**: a read and write timeout of [`IO_TIMEOUT`] on the listening
//!   socket, inherited by every accepted connection on Linux; a request head
//!   (idle keep-alive time included), then its body, must each arrive within
//!   [`HEAD_DEADLINE`], however slowly the client trickles it.
//! * **Connections**: at most [`MAX_CONNECTIONS`], each with one small
//!   thread; past that a new connection gets `503` at once.
//! * **Memory**: a head line is at most 8 KiB and a request at most 100
//!   headers (`431`); a body at most [`MAX_BODY`] (`413`, before reading it
//!   when `Content-Length` says so). Bodies up to that size are read on the
//!   connection's own thread before the request reaches a worker, so a slow
//!   body never holds a worker or an order writer. That includes bodies
//!   after `Expect: 100-continue` (the connection's thread sends the
//!   `100 Continue`, after checking the size) and bodies of
//!   `Connection: Upgrade` requests (answered like any other, never
//!   upgraded, then the connection is closed); [`read_body`] only ever
//!   reads memory.
//!
//! What this does not do: limit connections per client address, or the rate
//! of new connections. A flood from many addresses can still fill the
//! connection table; that is for a firewall or a reverse proxy in front.

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Receiver;
use serde_json::json;
use tiny_http::{Header, Request, Response, Server, StatusCode};

use crate::notify::{Heartbeat, Heartbeats};

pub use tiny_http::{HEAD_DEADLINE, MAX_CONNECTIONS};

/// Longest wait for one read or write on a connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body accepted; larger ones get `413`.
pub const MAX_BODY: usize = 64 * 1024;

/// Why the HTTP listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on HTTP_ADDR {addr}: {error}")]
pub struct BindError {
    addr: SocketAddr,
    // Not named `source`: thiserror would make it `Error::source` too, and
    // the message already says it (a chain printer would say it twice).
    error: std::io::Error,
}

/// A listening HTTP server.
pub struct HttpServer {
    server: Server,
    addr: SocketAddr,
}

impl HttpServer {
    /// Listens on `addr` with [`IO_TIMEOUT`] on every connection.
    pub fn bind(addr: SocketAddr) -> Result<Arc<HttpServer>, BindError> {
        let err = |error| BindError { addr, error };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(err)?;
        socket.set_reuse_address(true).map_err(err)?;
        socket.set_read_timeout(Some(IO_TIMEOUT)).map_err(err)?;
        socket.set_write_timeout(Some(IO_TIMEOUT)).map_err(err)?;
        socket.set_nodelay(true).map_err(err)?;
        socket.bind(&addr.into()).map_err(err)?;
        socket.listen(1024).map_err(err)?;
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().map_err(err)?;
        let server = Server::from_listener(listener, None)
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        Ok(Arc::new(HttpServer { server, addr }))
    }

    /// The address actually listened on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts `workers` threads named `<name>-N` that answer requests with
    /// `handle`, each with a heartbeat in `beats` (it beats at least every
    /// 200 ms while idle; `handle` gets it to report progress on long
    /// work). They stop when `shutdown` fires.
    pub fn spawn_workers<H>(
        self: &Arc<Self>,
        name: &str,
        workers: usize,
        shutdown: &Receiver<()>,
        beats: &Heartbeats,
        handle: H,
    ) -> std::io::Result<Vec<JoinHandle<()>>>
    where
        H: Fn(Request, &Heartbeat) + Send + Sync + 'static,
    {
        let handle = Arc::new(handle);
        (1..=workers)
            .map(|i| {
                let (me, handle, shutdown) = (self.clone(), handle.clone(), shutdown.clone());
                let beat = beats.register(&format!("{name}-{i}"));
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || me.work(&shutdown, &beat, &*handle))
            })
            .collect()
    }

    fn work(
        &self,
        shutdown: &Receiver<()>,
        beat: &Heartbeat,
        handle: &(dyn Fn(Request, &Heartbeat) + Send + Sync),
    ) {
        while !crate::shutdown::is_started(shutdown) {
            beat.beat();
            match self.server.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(request)) => handle(request, beat),
                Ok(None) => {}
                Err(e) => log::warn!("HTTP server: {e}"),
            }
        }
    }
}

/// A JSON answer.
pub fn json(status: u16, body: &serde_json::Value) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_data(body.to_string().into_bytes())
        .with_status_code(StatusCode(status))
        .with_header(header("Content-Type", "application/json"))
}

/// A JSON error answer: `{"error": message}`.
pub fn error(status: u16, message: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    json(status, &json!({ "error": message }))
}

/// A plain-text answer.
pub fn text(status: u16, body: String, content_type: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_data(body.into_bytes())
        .with_status_code(StatusCode(status))
        .with_header(header("Content-Type", content_type))
}

fn header(name: &str, value: &str) -> Header {
    // Both are ASCII literals of ours, so this cannot fail.
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

/// Sends `response`, counting it in the metrics; a client that went away
/// is not an error worth more than a debug line.
pub fn respond(request: Request, response: Response<std::io::Cursor<Vec<u8>>>) {
    let status = response.status_code().0;
    crate::metrics::http_request(status);
    if let Err(e) = request.respond(response) {
        log::debug!("could not send the answer: {e}");
    }
}

/// Why a body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// Over [`MAX_BODY`].
    TooLarge,
    /// The connection failed or timed out mid-body.
    Io(std::io::Error),
}

/// Reads the body, refusing it as soon as it passes `limit` bytes: a
/// declared `Content-Length` over the limit is refused before reading
/// anything, a chunked body after at most `limit + 1` bytes.
pub fn read_body(request: &mut Request, limit: usize) -> Result<Vec<u8>, BodyError> {
    if request.body_length().is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::with_capacity(request.body_length().unwrap_or(0).min(limit));
    request
        .as_reader()
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .map_err(BodyError::Io)?;
    if body.len() > limit {
        return Err(BodyError::TooLarge);
    }
    Ok(body)
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
///
/// ```
/// let q = streamline::http::query("/order?userId=u%201&price=100").unwrap();
/// assert_eq!(q["userId"], "u 1");
/// assert!(streamline::http::query("/order?userId=%FF").is_err());
/// ```
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
/// of them (the caller answers it). `ready` says why not, or what to add
/// to the `200` body of `/readyz` (the master in use, with sentinels).
pub fn ops_route<E: std::fmt::Display>(
    request: Request,
    ready: impl Fn() -> Result<serde_json::Map<String, serde_json::Value>, E>,
    metrics: impl Fn() -> String,
) -> Option<Request> {
    let is_get = matches!(
        request.method(),
        tiny_http::Method::Get | tiny_http::Method::Head
    );
    let response = match path(request.url()) {
        "/healthz" if is_get => json(200, &json!({ "status": "ok" })),
        "/readyz" if is_get => match ready() {
            Ok(mut extra) => {
                extra.insert("status".into(), "ready".into());
                json(200, &serde_json::Value::Object(extra))
            }
            Err(why) => json(
                503,
                &json!({ "status": "not ready", "error": why.to_string() }),
            ),
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

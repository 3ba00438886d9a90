//! HTTP/1.1 written by hand on a `TcpStream`, with a minimal response
//! parser (status line, headers, `Content-Length`, chunked bodies,
//! `Connection: close`).
//!
//! The load tool's default client ([`RawClient`], one keep-alive connection
//! per load thread: cheaper for the client side than ureq, see
//! BENCHMARKS.md), the readiness probe of [`crate::Service`], and, for
//! requests no client library sends, [`crate::raw_request`] use it.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Every read and write is bounded: a request never hangs a load thread.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_LINE: u64 = 8 * 1024;
const MAX_HEADERS: usize = 100;
const MAX_BODY: usize = 1 << 20;

/// The status line and what the headers say about the body and the
/// connection.
#[derive(Debug, Default)]
pub struct Head {
    /// The status code.
    pub status: u16,
    /// `HTTP/1.0` (no keep-alive unless asked for).
    pub http10: bool,
    /// `Content-Length`.
    pub length: Option<usize>,
    /// `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive`.
    pub keep_alive: bool,
}

impl Head {
    /// Whether the connection can carry another request.
    pub fn reusable(&self) -> bool {
        !self.close && (!self.http10 || self.keep_alive)
    }

    /// Whether the status has no body whatever the headers say.
    fn bodyless(&self) -> bool {
        self.status == 204 || self.status == 304 || self.status < 200
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
    /// A client for `addr`; connects on the first request.
    pub fn new(addr: SocketAddr) -> RawClient {
        RawClient {
            addr,
            host: addr.to_string(),
            conn: None,
            request: String::with_capacity(256),
            line: String::with_capacity(256),
            body: Vec::with_capacity(256),
        }
    }

    /// `GET path`; the status, or why there is none. The body is in
    /// [`RawClient::body`] until the next request.
    pub fn get(&mut self, path: &str) -> Result<u16, String> {
        self.get_keyed(path, None)
    }

    /// `GET path`, with `Idempotency-Key: key` if given. Never retried:
    /// the load tool measures each request once.
    pub fn get_keyed(&mut self, path: &str, key: Option<&str>) -> Result<u16, String> {
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

    /// The body of the last answer.
    pub fn body(&self) -> &[u8] {
        &self.body
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

/// Reads one response into `body`; returns its status and whether the
/// connection can carry another request.
fn read_response(
    r: &mut impl BufRead,
    line: &mut String,
    body: &mut Vec<u8>,
) -> io::Result<(u16, bool)> {
    let head = read_head(r, line, |_, _| {})?;
    body.clear();
    if head.chunked {
        read_chunked(r, line, body)?;
    } else if let Some(n) = head.length {
        if n > MAX_BODY {
            return Err(invalid("body too large"));
        }
        body.resize(n, 0);
        r.read_exact(body)?;
    } else if !head.bodyless() {
        // No length: the body ends when the server closes.
        r.take(MAX_BODY as u64).read_to_end(body)?;
        return Ok((head.status, false));
    }
    Ok((head.status, head.reusable()))
}

/// Reads the status line and the headers up to the blank line; calls
/// `header(name, value)` for each header (value trimmed).
pub fn read_head(
    r: &mut impl BufRead,
    line: &mut String,
    mut header: impl FnMut(&str, &str),
) -> io::Result<Head> {
    read_line(r, line)?;
    let mut parts = line.split_ascii_whitespace();
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(invalid("not an HTTP/1.x status line"));
    }
    let mut head = Head {
        http10: version == "HTTP/1.0",
        status: parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("bad status code"))?,
        ..Head::default()
    };
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
        header(name, value);
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

fn read_line(r: &mut impl BufRead, line: &mut String) -> io::Result<()> {
    line.clear();
    if r.by_ref().take(MAX_LINE).read_line(line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed by the server",
        ));
    }
    Ok(())
}

/// Reads a chunked body (and its trailers) into `body`.
pub fn read_chunked(r: &mut impl BufRead, line: &mut String, body: &mut Vec<u8>) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(answer: &[u8]) -> io::Result<(u16, bool, Vec<u8>)> {
        let (mut line, mut body) = (String::new(), Vec::new());
        let mut reader = answer;
        let (status, reusable) = read_response(&mut reader, &mut line, &mut body)?;
        Ok((status, reusable, body))
    }

    #[test]
    fn a_body_of_content_length_keeps_the_connection() {
        let answer = b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nokNEXT";
        assert_eq!(parse(answer).unwrap(), (202, true, b"ok".to_vec()));
    }

    #[test]
    fn a_chunked_body_is_joined_and_close_ends_the_connection() {
        let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                       3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse(answer).unwrap(), (200, false, b"abcde".to_vec()));
    }

    #[test]
    fn http10_without_keep_alive_is_not_reused() {
        let answer = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse(answer).unwrap(), (200, false, Vec::new()));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for answer in [
            &b""[..],
            b"SSH-2.0\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200\r\nX\r\n\r\n",
        ] {
            assert!(
                parse(answer).is_err(),
                "{:?}",
                String::from_utf8_lossy(answer)
            );
        }
    }
}

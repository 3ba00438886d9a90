//! HTTP/1.1 on the wire, as much of it as the services need, with a limit
//! on everything a client controls.
//!
//! [`Incoming`] reads requests from any [`Read`]: the request head (parsed
//! by `httparse`) and then the body, framed by `Content-Length` or chunked.
//! Nothing grows past a limit: a head is at most [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] headers, a body at most the limit the caller gives, a
//! chunk-size line at most [`MAX_LINE`] bytes. A declared `Content-Length`
//! over the limit is refused before a byte of the body is read; a chunked
//! body as soon as the next chunk would pass it.
//!
//! Timeouts are not this module's business: the reader it is given fails
//! with `WouldBlock`/`TimedOut` when time is up (see `conn`), and every
//! error here says whether a request had started, so the caller knows
//! whether anyone is waiting for an answer.
//!
//! Everything here is plain code over byte slices and readers, so the unit
//! tests and the property tests can throw arbitrary bytes at it.

use std::io::{self, Read, Write};

/// Most bytes of a request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers in a request head.
pub const MAX_HEADERS: usize = 64;
/// Longest chunk-size line (with extensions) or trailer line.
pub const MAX_LINE: usize = 1024;
/// Bytes asked of the reader at a time.
const READ_CHUNK: usize = 8 * 1024;

/// A request method. Methods the services do not use are kept as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`: answered like `GET`, without the body.
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
    /// Any other token.
    Other(String),
}

impl Method {
    fn from_token(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            other => Method::Other(other.to_string()),
        }
    }

    /// The method as sent.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Other(s) => s,
        }
    }
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The method.
    pub method: Method,
    /// The request target as sent (`/order?userId=...`).
    pub target: String,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor_version: u8,
    /// Header names (as sent) and raw values, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    /// The values of every header called `name` (case-insensitive).
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Whether a comma-separated header lists `token` (case-insensitive).
    fn lists(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(|v| v.split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    }

    /// Whether the client lets the connection stay open after the answer:
    /// HTTP/1.1 without `Connection: close`. HTTP/1.0 always closes.
    pub fn keep_alive(&self) -> bool {
        self.minor_version == 1 && !self.lists("connection", "close")
    }

    /// How the body is delimited (RFC 9112 §6.3). A request with both
    /// `Transfer-Encoding` and `Content-Length`, or with `Content-Length`
    /// values that disagree, is refused: two parties reading it differently
    /// is how requests are smuggled.
    pub fn framing(&self) -> Result<Framing, WireError> {
        let has_te = self.header("transfer-encoding").is_some();
        let mut lengths = self.values("content-length");
        if has_te {
            if lengths.next().is_some() {
                return Err(WireError::Malformed(
                    "both Content-Length and Transfer-Encoding",
                ));
            }
            if self.minor_version == 0 {
                return Err(WireError::Malformed("Transfer-Encoding in HTTP/1.0"));
            }
            let codings: Vec<&[u8]> = self
                .values("transfer-encoding")
                .flat_map(|v| v.split(|&b| b == b','))
                .map(<[u8]>::trim_ascii)
                .filter(|t| !t.is_empty())
                .collect();
            return match codings.as_slice() {
                [only] if only.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
                _ => Err(WireError::UnsupportedEncoding),
            };
        }
        let Some(first) = lengths.next() else {
            return Ok(Framing::None);
        };
        if lengths.any(|other| other != first) {
            return Err(WireError::Malformed("conflicting Content-Length headers"));
        }
        parse_length(first).map(Framing::Length)
    }

    /// `Ok(true)` for `Expect: 100-continue`, `Ok(false)` without `Expect`,
    /// an error for any other expectation (answered `417`).
    pub fn expects_continue(&self) -> Result<bool, WireError> {
        match self.header("expect") {
            None => Ok(false),
            Some(v) if v.trim_ascii().eq_ignore_ascii_case(b"100-continue") => Ok(true),
            Some(_) => Err(WireError::ExpectationFailed),
        }
    }
}

/// A `Content-Length` value: decimal digits only. A number too large for
/// `u64` is certainly over any limit, so it saturates.
fn parse_length(v: &[u8]) -> Result<u64, WireError> {
    let v = v.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return Err(WireError::Malformed("Content-Length is not a number"));
    }
    Ok(v.iter().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

/// Why no request (or no whole body) could be read.
#[derive(Debug)]
pub enum WireError {
    /// The client closed the connection before a request was complete.
    Closed,
    /// Time ran out; `started` says whether part of a request had arrived.
    TimedOut {
        /// Whether some of a request had arrived.
        started: bool,
    },
    /// The connection failed.
    Io(io::Error),
    /// The head is over [`MAX_HEAD`] bytes or [`MAX_HEADERS`] headers.
    HeadTooLarge,
    /// The body is over the limit.
    BodyTooLarge,
    /// Not a request we can read; says why.
    Malformed(&'static str),
    /// A transfer coding other than `chunked`.
    UnsupportedEncoding,
    /// An `Expect` other than `100-continue`.
    ExpectationFailed,
}

impl WireError {
    /// The status to answer with, or `None` when nobody is left to answer
    /// (closed, failed, or idle without having sent anything).
    pub fn status(&self) -> Option<u16> {
        match self {
            WireError::Closed | WireError::Io(_) | WireError::TimedOut { started: false } => None,
            WireError::TimedOut { started: true } => Some(408),
            WireError::HeadTooLarge => Some(431),
            WireError::BodyTooLarge => Some(413),
            WireError::Malformed(_) => Some(400),
            WireError::UnsupportedEncoding => Some(501),
            WireError::ExpectationFailed => Some(417),
        }
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Closed => f.write_str("the client closed the connection"),
            WireError::TimedOut { .. } => f.write_str("the request did not arrive in time"),
            WireError::Io(e) => write!(f, "connection failed: {e}"),
            WireError::HeadTooLarge => write!(
                f,
                "request head larger than {MAX_HEAD} bytes or {MAX_HEADERS} headers"
            ),
            WireError::BodyTooLarge => f.write_str("body too large"),
            WireError::Malformed(why) => write!(f, "malformed request: {why}"),
            WireError::UnsupportedEncoding => {
                f.write_str("only the chunked transfer coding is supported")
            }
            WireError::ExpectationFailed => f.write_str("only Expect: 100-continue is supported"),
        }
    }
}

impl std::error::Error for WireError {}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Requests read from a byte stream, one after the other (bytes of the
/// next request that arrived early stay buffered: pipelining works).
#[derive(Debug)]
pub struct Incoming<R> {
    src: R,
    /// Bytes read and not yet consumed.
    buf: Vec<u8>,
}

impl<R: Read> Incoming<R> {
    /// Reads requests from `src`.
    pub fn new(src: R) -> Self {
        Incoming {
            src,
            buf: Vec::new(),
        }
    }

    /// The reader, e.g. to move its deadline.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.src
    }

    /// Whether bytes of a next request are already buffered.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Reads up to [`READ_CHUNK`] more bytes. `Ok(0)` at end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        let old = self.buf.len();
        self.buf.resize(old + READ_CHUNK, 0);
        let read = loop {
            match self.src.read(&mut self.buf[old..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        self.buf.truncate(old + *read.as_ref().unwrap_or(&0));
        read
    }

    /// [`Incoming::fill`], with end of stream and failures as [`WireError`]s.
    /// `started`: whether part of a request has arrived already.
    fn more(&mut self, started: bool) -> Result<(), WireError> {
        match self.fill() {
            Ok(0) => Err(WireError::Closed),
            Ok(_) => Ok(()),
            Err(e) if is_timeout(&e) => Err(WireError::TimedOut { started }),
            Err(e) => Err(WireError::Io(e)),
        }
    }

    /// Reads the next request head.
    ///
    /// Empty lines before it are skipped (RFC 9112 §2.2). Fails with
    /// [`WireError::HeadTooLarge`] once [`MAX_HEAD`] bytes have arrived
    /// without the empty line that ends a head.
    pub fn read_head(&mut self) -> Result<Head, WireError> {
        let mut scanned = 0;
        loop {
            let blank = self
                .buf
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            if blank > 0 {
                self.buf.drain(..blank);
                scanned = 0;
            }
            if let Some(end) = head_end(&self.buf, scanned) {
                if end > MAX_HEAD {
                    return Err(WireError::HeadTooLarge);
                }
                let head = parse_head(&self.buf[..end])?;
                self.buf.drain(..end);
                return Ok(head);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(WireError::HeadTooLarge);
            }
            // The end marker is at most 3 bytes long: what was searched
            // before cannot hold it, except its last 3 bytes.
            scanned = self.buf.len().saturating_sub(3);
            let started = !self.buf.is_empty();
            self.more(started)?;
        }
    }

    /// Reads the body `framing` announces, refusing it as soon as it is
    /// known to be over `limit` bytes: a `Content-Length` before reading
    /// anything, a chunked body before reading the chunk that passes it.
    pub fn read_body(&mut self, framing: Framing, limit: usize) -> Result<Vec<u8>, WireError> {
        match framing {
            Framing::None => Ok(Vec::new()),
            Framing::Length(n) if n > limit as u64 => Err(WireError::BodyTooLarge),
            Framing::Length(n) => {
                let mut body = Vec::with_capacity(n as usize);
                self.read_exact_into(&mut body, n as usize)?;
                Ok(body)
            }
            Framing::Chunked => self.read_chunked(limit),
        }
    }

    /// Moves exactly `n` bytes into `out`.
    fn read_exact_into(&mut self, out: &mut Vec<u8>, mut n: usize) -> Result<(), WireError> {
        while n > 0 {
            if self.buf.is_empty() {
                self.more(true)?;
            }
            let take = n.min(self.buf.len());
            out.extend(self.buf.drain(..take));
            n -= take;
        }
        Ok(())
    }

    /// One line (without its `\r\n` or `\n`), at most [`MAX_LINE`] bytes.
    fn read_line(&mut self) -> Result<Vec<u8>, WireError> {
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + i;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(WireError::Malformed("chunk-size or trailer line too long"));
            }
            scanned = self.buf.len();
            self.more(true)?;
        }
    }

    fn read_chunked(&mut self, limit: usize) -> Result<Vec<u8>, WireError> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let size = parse_chunk_size(&line)?;
            if size == 0 {
                break;
            }
            if body.len() as u64 + size > limit as u64 {
                return Err(WireError::BodyTooLarge);
            }
            self.read_exact_into(&mut body, size as usize)?;
            if !self.read_line()?.is_empty() {
                return Err(WireError::Malformed("chunk longer than its size"));
            }
        }
        // Trailers: read and ignored, within the head's limit.
        let mut trailers = 0;
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                return Ok(body);
            }
            trailers += line.len() + 2;
            if trailers > MAX_HEAD {
                return Err(WireError::HeadTooLarge);
            }
        }
    }

    /// Reads and throws away whatever arrives until the stream ends or
    /// fails (the reader's deadline): a lingering close, so a client still
    /// sending a refused body reads our answer instead of a reset.
    pub fn discard(&mut self) {
        self.buf.clear();
        let mut sink = [0u8; 4096];
        loop {
            match self.src.read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

/// Where the head in `buf` ends (just past its empty line), searching from
/// `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let from = from.min(buf.len());
    buf[from..].iter().enumerate().find_map(|(i, &b)| {
        if b != b'\n' {
            return None;
        }
        let at = from + i;
        match buf.get(at + 1..) {
            Some([b'\n', ..]) => Some(at + 2),
            Some([b'\r', b'\n', ..]) => Some(at + 3),
            _ => None,
        }
    })
}

/// Parses a complete head (request line, headers, empty line).
pub fn parse_head(bytes: &[u8]) -> Result<Head, WireError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(WireError::Malformed("incomplete head")),
        Err(httparse::Error::TooManyHeaders) => return Err(WireError::HeadTooLarge),
        Err(httparse::Error::Version) => {
            return Err(WireError::Malformed("not HTTP/1.0 or HTTP/1.1"))
        }
        Err(httparse::Error::Token | httparse::Error::Status) => {
            return Err(WireError::Malformed("bad request line"))
        }
        Err(_) => return Err(WireError::Malformed("bad header")),
    }
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(WireError::Malformed("incomplete request line"));
    };
    Ok(Head {
        method: Method::from_token(method),
        target: target.to_string(),
        minor_version,
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_string(), h.value.to_vec()))
            .collect(),
    })
}

/// A chunk-size line: hex digits, then optional extensions after `;`.
fn parse_chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let bad = WireError::Malformed("bad chunk size");
    let size = line.split(|&b| b == b';').next().unwrap_or_default();
    let size = size.trim_ascii();
    // 15 hex digits already exceed any limit we use; more could overflow.
    if size.is_empty() || size.len() > 15 {
        return Err(bad);
    }
    size.iter().try_fold(0u64, |n, &b| {
        let d = (b as char)
            .to_digit(16)
            .ok_or(WireError::Malformed("bad chunk size"))?;
        Ok(n << 4 | u64::from(d))
    })
}

/// The reason phrase of the statuses we send.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Writes a whole answer with one `write_all`: status line, `headers`,
/// `Content-Length`, `Connection: close` if `close`, and the body unless
/// `head_only` (an answer to `HEAD`).
pub fn write_response(
    out: &mut impl Write,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    head_only: bool,
    close: bool,
) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(128 + body.len());
    write!(bytes, "HTTP/1.1 {status} {}\r\n", reason(status))?;
    for (name, value) in headers {
        write!(bytes, "{name}: {value}\r\n")?;
    }
    write!(bytes, "Content-Length: {}\r\n", body.len())?;
    if close {
        bytes.extend_from_slice(b"Connection: close\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    if !head_only {
        bytes.extend_from_slice(body);
    }
    out.write_all(&bytes)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(bytes: &[u8]) -> Incoming<&[u8]> {
        Incoming::new(bytes)
    }

    /// A reader that hands out one byte per call: every boundary case of
    /// the buffering is hit.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((&b, rest)), Some(slot)) => {
                    *slot = b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn reads_a_request_and_its_body() {
        let raw = b"POST /orders?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n";
        for trickle in [false, true] {
            let (head, body, next) = if trickle {
                let mut inc = Incoming::new(Trickle(raw));
                let head = inc.read_head().unwrap();
                let body = inc.read_body(head.framing().unwrap(), 64).unwrap();
                (head, body, inc.read_head().unwrap())
            } else {
                let mut inc = incoming(raw);
                let head = inc.read_head().unwrap();
                let body = inc.read_body(head.framing().unwrap(), 64).unwrap();
                (head, body, inc.read_head().unwrap())
            };
            assert_eq!(head.method, Method::Post);
            assert_eq!(head.target, "/orders?x=1");
            assert_eq!(head.header("HOST"), Some(&b"a"[..]));
            assert!(head.keep_alive());
            assert_eq!(body, b"hello");
            assert_eq!(next.method, Method::Get);
        }
    }

    #[test]
    fn chunked_bodies() {
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let mut inc = incoming(raw);
        let head = inc.read_head().unwrap();
        assert_eq!(head.framing().unwrap(), Framing::Chunked);
        assert_eq!(inc.read_body(Framing::Chunked, 64).unwrap(), b"hello world");
        let mut inc = Incoming::new(Trickle(raw));
        inc.read_head().unwrap();
        assert_eq!(inc.read_body(Framing::Chunked, 11).unwrap(), b"hello world");
        let mut inc = incoming(raw);
        inc.read_head().unwrap();
        assert!(matches!(
            inc.read_body(Framing::Chunked, 10),
            Err(WireError::BodyTooLarge)
        ));
    }

    #[test]
    fn limits() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 2, b'a');
        let err = incoming(&big).read_head().unwrap_err();
        assert!(matches!(err, WireError::HeadTooLarge), "{err:?}");
        // Complete but too large, arriving in one read.
        big.extend_from_slice(b"\r\n\r\n");
        let err = incoming(&big).read_head().unwrap_err();
        assert!(matches!(err, WireError::HeadTooLarge), "{err:?}");
        let mut exact = b"GET / HTTP/1.1\r\nX: ".to_vec();
        exact.resize(MAX_HEAD - 4, b'a');
        exact.extend_from_slice(b"\r\n\r\n");
        assert!(incoming(&exact).read_head().is_ok());
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let err = incoming(&many).read_head().unwrap_err();
        assert_eq!(err.status(), Some(431), "{err:?}");
        // A declared length over the limit is refused without reading.
        let mut inc = incoming(b"");
        assert!(matches!(
            inc.read_body(Framing::Length(65), 64),
            Err(WireError::BodyTooLarge)
        ));
        assert!(matches!(
            inc.read_body(Framing::Length(64), 64),
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn framing_rules() {
        let head = |extra: &str| {
            let raw = format!("POST / HTTP/1.1\r\n{extra}\r\n");
            parse_head(raw.as_bytes()).unwrap()
        };
        assert_eq!(head("").framing().unwrap(), Framing::None);
        assert_eq!(
            head("Content-Length: 12\r\n").framing().unwrap(),
            Framing::Length(12)
        );
        assert_eq!(
            head("Content-Length: 3\r\ncontent-length: 3\r\n")
                .framing()
                .unwrap(),
            Framing::Length(3)
        );
        assert_eq!(
            head("Content-Length: 99999999999999999999999\r\n")
                .framing()
                .unwrap(),
            Framing::Length(u64::MAX)
        );
        for bad in [
            "Content-Length: 3\r\nContent-Length: 4\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: 1e3\r\n",
            "Content-Length:\r\n",
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        ] {
            assert_eq!(
                head(bad).framing().unwrap_err().status(),
                Some(400),
                "{bad}"
            );
        }
        assert_eq!(
            head("Transfer-Encoding: gzip, chunked\r\n")
                .framing()
                .unwrap_err()
                .status(),
            Some(501)
        );
        assert!(!head("Connection: keep-alive, close\r\n").keep_alive());
        assert!(head("Expect: 100-Continue\r\n").expects_continue().unwrap());
        assert!(head("Expect: magic\r\n").expects_continue().is_err());
    }

    #[test]
    fn malformed_heads_and_endings() {
        for bad in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            b"GET  HTTP/1.1\r\n\r\n",
        ] {
            let err = incoming(bad).read_head().unwrap_err();
            assert_eq!(
                err.status(),
                Some(400),
                "{:?}: {err:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(incoming(b"").read_head(), Err(WireError::Closed)));
        assert!(matches!(
            incoming(b"GET / HT").read_head(),
            Err(WireError::Closed)
        ));
        // Bare LF line endings and leading empty lines are tolerated.
        let head = incoming(b"\r\n\r\nGET /x HTTP/1.0\nA: b\n\n")
            .read_head()
            .unwrap();
        assert_eq!((head.target.as_str(), head.keep_alive()), ("/x", false));
    }

    #[test]
    fn timeouts_say_whether_a_request_started() {
        struct Stall<'a>(&'a [u8]);
        impl Read for Stall<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let n = self.0.len().min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let err = Incoming::new(Stall(b"")).read_head().unwrap_err();
        assert_eq!(err.status(), None);
        let err = Incoming::new(Stall(b"GET / HTTP/1.1\r\n"))
            .read_head()
            .unwrap_err();
        assert_eq!(err.status(), Some(408));
    }

    #[test]
    fn responses() {
        let mut out = Vec::new();
        let headers = [("Content-Type".to_string(), "text/plain".to_string())];
        write_response(&mut out, 200, &headers, b"hi", false, true).unwrap();
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        );
        let mut out = Vec::new();
        write_response(&mut out, 404, &[], b"gone", true, false).unwrap();
        assert_eq!(out, b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\n");
    }

    mod properties {
        //! Property tests: a short run in `cargo test`; a long one with
        //! `PROPTEST_CASES=200000 cargo test --lib http::wire`.

        use super::super::*;
        use proptest::prelude::*;

        /// Hands out `data` in pieces of the given sizes (cycled), so
        /// every way a request can be split across reads is tried.
        struct Pieces {
            data: Vec<u8>,
            sizes: Vec<usize>,
            at: usize,
            turn: usize,
        }

        impl Read for Pieces {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let size = self.sizes[self.turn % self.sizes.len()];
                self.turn += 1;
                let n = size.min(buf.len()).min(self.data.len() - self.at);
                buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
                self.at += n;
                Ok(n)
            }
        }

        /// 512 cases, or `PROPTEST_CASES` when set (a long run).
        fn config() -> ProptestConfig {
            let mut config = ProptestConfig::default();
            if std::env::var_os("PROPTEST_CASES").is_none() {
                config.cases = 512;
            }
            config
        }

        fn pieces(data: Vec<u8>, sizes: Vec<usize>) -> Incoming<Pieces> {
            Incoming::new(Pieces {
                data,
                sizes,
                at: 0,
                turn: 0,
            })
        }

        /// Reads requests until an error, checking the buffer stays
        /// bounded; returns how many were read.
        fn drain(inc: &mut Incoming<Pieces>, limit: usize) -> usize {
            let mut n = 0;
            loop {
                let Ok(head) = inc.read_head() else { return n };
                assert!(inc.buf.len() <= MAX_HEAD + READ_CHUNK);
                let Ok(framing) = head.framing() else {
                    return n;
                };
                let _ = head.keep_alive();
                let _ = head.expects_continue();
                let Ok(body) = inc.read_body(framing, limit) else {
                    return n;
                };
                assert!(body.len() <= limit);
                assert!(inc.buf.len() <= MAX_HEAD + READ_CHUNK);
                n += 1;
            }
        }

        fn request_bytes() -> impl Strategy<Value = Vec<u8>> {
            let valid = prop_oneof![
                Just(b"GET /order?userId=u&productId=p&price=1 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
                Just(b"POST /orders HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".to_vec()),
                Just(b"POST /orders HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()),
            ];
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..2048),
                // A valid request with bytes overwritten and inserted.
                (
                    valid,
                    proptest::collection::vec((any::<usize>(), any::<u8>(), any::<bool>()), 0..8)
                )
                    .prop_map(|(mut bytes, edits)| {
                        for (at, b, insert) in edits {
                            let at = at % (bytes.len() + 1);
                            if insert || at == bytes.len() {
                                bytes.insert(at, b);
                            } else {
                                bytes[at] = b;
                            }
                        }
                        bytes
                    }),
            ]
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn arbitrary_bytes_never_panic_or_grow_the_buffer(
                data in request_bytes(),
                sizes in proptest::collection::vec(1usize..64, 1..8),
                limit in 0usize..256,
            ) {
                drain(&mut pieces(data, sizes), limit);
            }

            #[test]
            fn well_formed_requests_read_back_exactly(
                method in prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("PATCH")],
                target in "/[a-zA-Z0-9/?=&%._~-]{0,60}",
                headers in proptest::collection::vec(("X-[A-Za-z0-9-]{1,12}", "[!-~]([ -~]{0,30}[!-~])?"), 0..6),
                body in proptest::collection::vec(any::<u8>(), 0..400),
                chunks in proptest::option::of(proptest::collection::vec(1usize..100, 1..6)),
                sizes in proptest::collection::vec(1usize..50, 1..6),
            ) {
                let mut raw = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
                for (name, value) in &headers {
                    raw.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                }
                match &chunks {
                    None => raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes()),
                    Some(_) => raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n"),
                }
                match &chunks {
                    None => raw.extend_from_slice(&body),
                    Some(sizes) => {
                        let mut rest = body.as_slice();
                        let mut turn = 0;
                        while !rest.is_empty() {
                            let n = sizes[turn % sizes.len()].min(rest.len());
                            turn += 1;
                            raw.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                            raw.extend_from_slice(&rest[..n]);
                            raw.extend_from_slice(b"\r\n");
                            rest = &rest[n..];
                        }
                        raw.extend_from_slice(b"0\r\n\r\n");
                    }
                }
                // Twice: the second request must start where the first ended.
                let mut twice = raw.clone();
                twice.extend_from_slice(&raw);
                let mut inc = pieces(twice, sizes);
                for _ in 0..2 {
                    let head = inc.read_head().unwrap();
                    prop_assert_eq!(head.method.as_str(), method);
                    prop_assert_eq!(&head.target, &target);
                    for (name, value) in &headers {
                        prop_assert!(head.values(name).any(|v| v == value.as_bytes()));
                    }
                    let framing = head.framing().unwrap();
                    prop_assert_eq!(inc.read_body(framing, body.len()).unwrap(), body.clone());
                    if !body.is_empty() {
                        // One byte less is over the limit, and refused.
                        prop_assert!(matches!(
                            pieces(raw.clone(), vec![7]).read_head().map(|h| h.framing()),
                            Ok(Ok(_))
                        ));
                        let mut short = pieces(raw.clone(), vec![7]);
                        let f = short.read_head().unwrap().framing().unwrap();
                        prop_assert!(matches!(short.read_body(f, body.len() - 1), Err(WireError::BodyTooLarge)));
                    }
                }
            }
        }
    }
}

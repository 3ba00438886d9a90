use ascii::AsciiString;

use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::sync::mpsc::{channel, Receiver, Sender};

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Instant;

use crate::common::{HTTPVersion, Method};
use crate::util::RefinedTcpStream;
use crate::util::{SequentialReader, SequentialReaderBuilder, SequentialWriterBuilder};
use crate::Request;

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
pub struct ClientConnection {
    // address of the client
    remote_addr: IoResult<Option<SocketAddr>>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<RefinedTcpStream>>,

    // sequence of Writers to the stream, to avoid writing response #2 before
    //  response #1
    sink: SequentialWriterBuilder<BufWriter<RefinedTcpStream>>,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<RefinedTcpStream>>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // true if the connection goes through SSL
    secure: bool,

    // streamline patch: the answer of the request handed out last, written
    // by this connection's own thread (see `ReplyWriter`)
    reply: Option<Receiver<Vec<u8>>>,

    // streamline patch: 0 while a request is being handled, else 1 + the
    // milliseconds since `epoch` at which it started waiting for its client
    // (see the server's connection table)
    waiting: Option<(std::sync::Arc<std::sync::atomic::AtomicU64>, Instant)>,

    // streamline patch: a handle on the socket's read timeout for `linger`
    // (the readers above own the socket behind buffers and locks)
    timeouts: Option<crate::connection::Connection>,
}

/// streamline patch: the writer a request's answer goes to. It collects the
/// bytes and, on flush, hands them to the connection's own thread, which
/// writes them to the socket. Unpatched, the thread that answered (a worker)
/// wrote to the socket itself, so a client that stops reading could hold
/// the workers for the write timeout; now it only holds its own connection.
struct ReplyWriter {
    buf: Vec<u8>,
    to_connection: Sender<Vec<u8>>,
}

impl Write for ReplyWriter {
    fn write(&mut self, bytes: &[u8]) -> IoResult<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> IoResult<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::take(&mut self.buf);
            self.to_connection
                .send(chunk)
                .map_err(|_| IoError::new(ErrorKind::BrokenPipe, "connection closed"))?;
        }
        Ok(())
    }
}

impl Drop for ReplyWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Error that can happen when reading a request.
#[derive(Debug)]
enum ReadError {
    WrongRequestLine,
    WrongHeader(HTTPVersion),
    /// the client sent an unrecognized `Expect` header
    ExpectationFailed(HTTPVersion),
    /// streamline patch: a line over MAX_LINE, or over MAX_HEADERS headers
    HeadTooLarge,
    /// streamline patch: a body over MAX_BODY
    BodyTooLarge,
    /// streamline patch: a body not in within HEAD_DEADLINE
    BodyTooSlow,
    ReadIoError(IoError),
}

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    pub fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
    ) -> ClientConnection {
        let remote_addr = read_socket.peer_addr();
        let secure = read_socket.secure();
        let timeouts = read_socket.timeout_handle();

        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(1024, read_socket));
        let first_header = source.next().unwrap();

        ClientConnection {
            source,
            sink: SequentialWriterBuilder::new(BufWriter::with_capacity(1024, write_socket)),
            remote_addr,
            next_header_source: first_header,
            no_more_requests: false,
            secure,
            reply: None,
            waiting: None,
            timeouts,
        }
    }

    /// streamline patch: where to publish this connection's wait state.
    pub(crate) fn with_wait_state(
        mut self,
        state: std::sync::Arc<std::sync::atomic::AtomicU64>,
        epoch: Instant,
    ) -> Self {
        self.waiting = Some((state, epoch));
        self
    }

    /// streamline patch: after refusing a request, reads and drops what the
    /// client still sends (at most 2 s and 8 MiB) before the connection is
    /// closed, so a client still sending its body reads the answer rather
    /// than a reset.
    fn linger(&mut self) {
        let until = Instant::now() + std::time::Duration::from_secs(2);
        let mut buf = [0u8; 8192];
        let mut dropped = 0;
        while Instant::now() < until && dropped < 8 * 1024 * 1024 {
            // Each read ends by `until`: the socket's own timeout (10 s)
            // would keep a silent client's connection 10 s past its answer.
            let left = until.saturating_duration_since(Instant::now());
            if let Some(t) = &self.timeouts {
                if left.is_zero() || t.set_read_timeout(Some(left)).is_err() {
                    return;
                }
            }
            match self.next_header_source.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => dropped += n,
            }
        }
    }

    fn set_waiting(&self, waiting: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some((state, epoch)) = &self.waiting {
            if waiting {
                // Only from busy (0): a connection already waiting keeps
                // the moment it started to, which for a new one is when it
                // was accepted (its thread may start later, and out of
                // order with the threads of connections accepted after it).
                let since = epoch.elapsed().as_millis() as u64 + 1;
                let _ = state.compare_exchange(0, since, Relaxed, Relaxed);
            } else {
                state.store(0, Relaxed);
            }
        }
    }

    /// true if the connection is HTTPS
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Reads the next line from self.next_header_source.
    ///
    /// Reads until `CRLF` is reached. The next read will start
    ///  at the first byte of the new line.
    fn read_next_line(&mut self, deadline: Instant) -> IoResult<AsciiString> {
        // streamline patch: a request or header line is at most MAX_LINE
        // bytes (unpatched, one endless header line grew without bound), and
        // the whole head must arrive before `deadline` (unpatched, a client
        // sending a byte now and then held its connection for ever).
        let mut buf = Vec::with_capacity(64);
        let mut prev_byte_was_cr = false;

        loop {
            let byte = self.next_header_source.by_ref().bytes().next();

            let byte = match byte {
                Some(b) => b?,
                None => return Err(IoError::new(ErrorKind::ConnectionAborted, "Unexpected EOF")),
            };

            if byte == b'\n' && prev_byte_was_cr {
                buf.pop(); // removing the '\r'
                return AsciiString::from_ascii(buf)
                    .map_err(|_| IoError::new(ErrorKind::InvalidInput, "Header is not in ASCII"));
            }

            prev_byte_was_cr = byte == b'\r';

            if buf.len() >= crate::MAX_LINE {
                return Err(IoError::new(ErrorKind::InvalidData, "header line too long"));
            }
            // Checked every 4 bytes: a clock read per byte would cost about
            // as much as the parsing, and 4 bytes of a trickle are little.
            if buf.len() % 4 == 0 && Instant::now() > deadline {
                return Err(IoError::new(ErrorKind::TimedOut, "request head too slow"));
            }
            buf.push(byte);
        }
    }

    /// Reads a request from the stream.
    /// Blocks until the header has been read.
    fn read(&mut self) -> Result<Request, ReadError> {
        // streamline patch: the head (idle keep-alive time included) and
        // then the body must each arrive within HEAD_DEADLINE.
        let deadline = Instant::now() + crate::HEAD_DEADLINE;
        self.set_waiting(true);
        let line_error = |e: IoError| match e.kind() {
            ErrorKind::InvalidData => ReadError::HeadTooLarge,
            _ => ReadError::ReadIoError(e),
        };
        let (method, path, version, headers) = {
            // reading the request line
            let (method, path, version) = {
                let line = self.read_next_line(deadline).map_err(line_error)?;

                parse_request_line(
                    line.as_str().trim(), // TODO: remove this conversion
                )?
            };

            // getting all headers
            let headers = {
                let mut headers = Vec::new();
                loop {
                    let line = self.read_next_line(deadline).map_err(line_error)?;

                    if line.is_empty() {
                        break;
                    };
                    // streamline patch: bounded number of headers.
                    if headers.len() >= crate::MAX_HEADERS {
                        return Err(ReadError::HeadTooLarge);
                    }
                    headers.push(match FromStr::from_str(line.as_str().trim()) {
                        // TODO: remove this conversion
                        Ok(h) => h,
                        _ => return Err(ReadError::WrongHeader(version)),
                    });
                }

                headers
            };

            (method, path, version, headers)
        };

        // building the writer for the request
        // (streamline patch: a ReplyWriter; see there)
        let (to_connection, reply) = channel();
        self.reply = Some(reply);
        let writer = ReplyWriter {
            buf: Vec::new(),
            to_connection,
        };

        // follow-up for next potential request
        let mut data_source = self.source.next().unwrap();
        std::mem::swap(&mut self.next_header_source, &mut data_source);

        // streamline patch: `100 Continue` is written by this thread, straight
        // to the socket, just before it reads the body (unpatched, the
        // handler's first read of the body sent it).
        let sink = &mut self.sink;
        let send_continue = move || -> IoResult<()> {
            let mut writer = sink.next().unwrap();
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            writer.flush()
        };

        // building the next reader
        let request = crate::request::new_request(
            self.secure,
            method,
            path,
            version.clone(),
            headers,
            *self.remote_addr.as_ref().unwrap(),
            data_source,
            writer,
            send_continue,
        )
        .map_err(|e| {
            use crate::request;
            match e {
                request::RequestCreationError::CreationIoError(e) => ReadError::ReadIoError(e),
                request::RequestCreationError::ExpectationFailed => {
                    ReadError::ExpectationFailed(version)
                }
                request::RequestCreationError::BodyTooLarge => ReadError::BodyTooLarge,
                request::RequestCreationError::BodyTooSlow => ReadError::BodyTooSlow,
            }
        })?;
        // streamline patch: the head and the body are in; now it is ours.
        self.set_waiting(false);

        // return the request
        Ok(request)
    }
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    fn next(&mut self) -> Option<Request> {
        use crate::{Response, StatusCode};

        // streamline patch: first write the answer to the previous request,
        // as it arrives from whoever answers it; the request is done when its
        // writer is dropped. A client that does not take it in time (the
        // socket's write timeout) loses its connection.
        if let Some(reply) = self.reply.take() {
            let mut sink = self.sink.next().unwrap();
            for chunk in reply.iter() {
                if sink.write_all(&chunk).and_then(|()| sink.flush()).is_err() {
                    return None;
                }
            }
        }

        // the client sent a "connection: close" header in this previous request
        //  or is using HTTP 1.0, meaning that no new request will come
        if self.no_more_requests {
            return None;
        }

        loop {
            let rq = match self.read() {
                Err(ReadError::WrongRequestLine) => {
                    let writer = self.sink.next().unwrap();
                    let response = Response::new_empty(StatusCode(400));
                    response
                        .raw_print(writer, HTTPVersion(1, 1), &[], false, None)
                        .ok();
                    return None; // we don't know where the next request would start,
                                 // se we have to close
                }

                Err(ReadError::WrongHeader(ver)) => {
                    let writer = self.sink.next().unwrap();
                    let response = Response::new_empty(StatusCode(400));
                    response.raw_print(writer, ver, &[], false, None).ok();
                    return None; // we don't know where the next request would start,
                                 // se we have to close
                }

                Err(ReadError::ReadIoError(ref err)) if err.kind() == ErrorKind::TimedOut => {
                    // request timeout
                    let writer = self.sink.next().unwrap();
                    let response = Response::new_empty(StatusCode(408));
                    response
                        .raw_print(writer, HTTPVersion(1, 1), &[], false, None)
                        .ok();
                    return None; // closing the connection
                }

                Err(ReadError::ExpectationFailed(ver)) => {
                    let writer = self.sink.next().unwrap();
                    let response = Response::new_empty(StatusCode(417));
                    response.raw_print(writer, ver, &[], true, None).ok();
                    return None; // TODO: should be recoverable, but needs handling in case of body
                }

                Err(
                    e
                    @ (ReadError::HeadTooLarge | ReadError::BodyTooLarge | ReadError::BodyTooSlow),
                ) => {
                    // streamline patch: 431, 413 or 408, then close (the
                    // rest is not read, so the next request's start is lost).
                    let (status, error) = match e {
                        ReadError::HeadTooLarge => (431, "request head too large"),
                        ReadError::BodyTooSlow => (408, "request body too slow"),
                        _ => (413, "request body too large"),
                    };
                    let mut writer = self.sink.next().unwrap();
                    let json = "Content-Type: application/json".parse::<crate::Header>();
                    let mut response = Response::from_string(format!("{{\"error\":\"{}\"}}", error))
                        .with_status_code(StatusCode(status));
                    if let Ok(header) = json {
                        response.add_header(header);
                    }
                    response
                        .raw_print(&mut writer, HTTPVersion(1, 1), &[], false, None)
                        .ok();
                    // Unpatched, dropping the connection flushed the answer;
                    // it must go out before lingering.
                    writer.flush().ok();
                    drop(writer);
                    self.linger();
                    return None;
                }

                Err(ReadError::ReadIoError(_)) => return None,

                Ok(rq) => rq,
            };

            // checking HTTP version
            if *rq.http_version() > (1, 1) {
                let writer = self.sink.next().unwrap();
                let response = Response::from_string(
                    "This server only supports HTTP versions 1.0 and 1.1".to_owned(),
                )
                .with_status_code(StatusCode(505));
                response
                    .raw_print(writer, HTTPVersion(1, 1), &[], false, None)
                    .ok();
                continue;
            }

            // updating the status of the connection
            let connection_header = rq
                .headers()
                .iter()
                .find(|h| h.field.equiv("Connection"))
                .map(|h| h.value.as_str());

            let lowercase = connection_header.map(|h| h.to_ascii_lowercase());

            match lowercase {
                Some(ref val) if val.contains("close") => self.no_more_requests = true,
                Some(ref val) if val.contains("upgrade") => self.no_more_requests = true,
                Some(ref val)
                    if !val.contains("keep-alive") && *rq.http_version() == HTTPVersion(1, 0) =>
                {
                    self.no_more_requests = true
                }
                None if *rq.http_version() == HTTPVersion(1, 0) => self.no_more_requests = true,
                _ => (),
            };

            // returning the request
            return Some(rq);
        }
    }
}

/// Parses a "HTTP/1.1" string.
fn parse_http_version(version: &str) -> Result<HTTPVersion, ReadError> {
    let (major, minor) = match version {
        "HTTP/0.9" => (0, 9),
        "HTTP/1.0" => (1, 0),
        "HTTP/1.1" => (1, 1),
        "HTTP/2.0" => (2, 0),
        "HTTP/3.0" => (3, 0),
        _ => return Err(ReadError::WrongRequestLine),
    };

    Ok(HTTPVersion(major, minor))
}

/// Parses the request line of the request.
/// eg. GET / HTTP/1.1
fn parse_request_line(line: &str) -> Result<(Method, String, HTTPVersion), ReadError> {
    let mut parts = line.split(' ');

    let method = parts.next().and_then(|w| w.parse().ok());
    let path = parts.next().map(ToOwned::to_owned);
    let version = parts.next().and_then(|w| parse_http_version(w).ok());

    method
        .and_then(|method| Some((method, path?, version?)))
        .ok_or(ReadError::WrongRequestLine)
}

#[cfg(test)]
mod test {
    #[test]
    fn test_parse_request_line() {
        let (method, path, ver) = super::parse_request_line("GET /hello HTTP/1.1").unwrap();

        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == crate::common::HTTPVersion(1, 1));

        assert!(super::parse_request_line("GET /hello").is_err());
        assert!(super::parse_request_line("qsd qsd qsd").is_err());
    }
}

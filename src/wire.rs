//! A Redis connection split into a sending half and a reply-reading half,
//! so that one thread can send command after command while another reads
//! the replies in order: pipelining across round trips, which redis-rs's
//! sync `Connection` (one owner, a reply read before the next command) cannot
//! do. With Redis a WAN link away that is what keeps many batches in flight
//! on one connection (see [`crate::producer`]).
//!
//! Commands are packed by redis-rs ([`redis::Cmd`], [`redis::Pipeline`]) and
//! replies decoded by it ([`redis::parse_redis_value`]); this module only
//! opens the socket, authenticates, and cuts the byte stream into whole
//! replies ([`frame_len`]), so that a read timeout never leaves half a reply
//! behind (bytes are kept until a reply is complete).
//!
//! Plain TCP and Unix sockets only: a TLS session cannot be split this way
//! ([`Redis::wire_target`] says `None` for `rediss://`, and callers fall back
//! to [`crate::connection::Link`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
#[cfg(unix)]
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use redis::{ConnectionAddr, ConnectionInfo, RedisError, Value};

use crate::connection::Redis;

/// Most bytes a reply may take before the connection is given up: far above
/// any reply of a batch (`MAX_BATCH` entry IDs), far below what would hurt.
const MAX_REPLY: usize = 16 << 20;

enum Stream {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            #[cfg(unix)]
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn set_timeouts(&self, read: Duration, write: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
            #[cfg(unix)]
            Stream::Unix(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
        }
    }

    fn set_read_timeout(&self, read: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(Some(read)),
            #[cfg(unix)]
            Stream::Unix(s) => s.set_read_timeout(Some(read)),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            #[cfg(unix)]
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            #[cfg(unix)]
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(bytes),
            #[cfg(unix)]
            Stream::Unix(s) => s.write_all(bytes),
        }
    }
}

/// The sending half.
pub struct Sender {
    stream: Stream,
}

impl Sender {
    /// Sends packed commands (their replies come to the [`Replies`] half).
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Closes both halves: the reader's next read fails, so whatever was in
    /// flight is failed by the one path that fails things.
    pub fn close(&self) {
        self.stream.shutdown();
    }
}

/// The reply-reading half.
pub struct Replies {
    stream: Stream,
    buf: Vec<u8>,
    /// Where the first reply not yet returned starts in `buf`.
    start: usize,
}

/// Why the replies cannot be read any more: the connection is done for.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed or was closed.
    #[error("Redis connection lost: {0}")]
    Io(#[from] io::Error),
    /// Redis sent bytes that are not RESP.
    #[error("unexpected bytes from Redis: {0}")]
    Protocol(String),
}

impl Replies {
    /// The next whole reply, waiting at most `wait` for its bytes; `None` if
    /// it is not complete by then (what arrived is kept for the next call).
    pub fn next(&mut self, wait: Duration) -> Result<Option<Value>, WireError> {
        if let Some(v) = self.take()? {
            return Ok(Some(v));
        }
        self.stream
            .set_read_timeout(wait.max(Duration::from_millis(1)))?;
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(WireError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.take()
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Closes both halves.
    pub fn close(&self) {
        self.stream.shutdown();
    }

    /// The next reply, waiting until `deadline`.
    fn next_by(&mut self, deadline: Instant) -> Result<Value, WireError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WireError::Io(io::ErrorKind::TimedOut.into()));
            }
            if let Some(v) = self.next(left)? {
                return Ok(v);
            }
        }
    }

    /// Decodes the first whole reply in the buffer, if there is one.
    fn take(&mut self) -> Result<Option<Value>, WireError> {
        let pending = &self.buf[self.start..];
        let Some(len) = frame_len(pending).map_err(WireError::Protocol)? else {
            if pending.len() > MAX_REPLY {
                return Err(WireError::Protocol(format!(
                    "a reply longer than {MAX_REPLY} bytes"
                )));
            }
            return Ok(None);
        };
        let value = redis::parse_redis_value(&pending[..len])
            .map_err(|e| WireError::Protocol(e.to_string()))?;
        self.start += len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some(value))
    }
}

/// An open, authenticated connection, in two halves, and the master
/// generation it was opened to.
pub struct Wire {
    /// Sends commands.
    pub sender: Sender,
    /// Reads their replies, in order.
    pub replies: Replies,
    /// See [`Redis::generation`].
    pub generation: u64,
}

/// Where a [`Wire`] connects: the address and credentials of the Redis
/// (with sentinels: of the master now), and its generation.
pub struct Target {
    /// Address, credentials, database.
    pub info: ConnectionInfo,
    /// See [`Redis::generation`].
    pub generation: u64,
    /// Whether `ROLE` must say `master` (the address came from sentinels).
    pub check_role: bool,
}

/// Opens a [`Wire`] to `target`: connects within `connect_timeout`, sends
/// `AUTH`/`SELECT` (and `ROLE` with sentinels) in one round trip, and
/// checks their replies within `connect_timeout` too. Sends then give up
/// after `write_timeout`.
pub fn open(
    target: &Target,
    connect_timeout: Duration,
    write_timeout: Duration,
) -> Result<Wire, RedisError> {
    let stream = connect(target.info.addr(), connect_timeout)?;
    stream.set_timeouts(connect_timeout, connect_timeout)?;
    let mut sender = Sender {
        stream: stream.try_clone()?,
    };
    let mut replies = Replies {
        stream,
        buf: Vec::with_capacity(4096),
        start: 0,
    };
    let settings = target.info.redis_settings();
    let mut hello = redis::pipe();
    if let Some(password) = settings.password() {
        let auth = hello.cmd("AUTH");
        if let Some(user) = settings.username() {
            auth.arg(user);
        }
        auth.arg(password);
    }
    if settings.db() != 0 {
        hello.cmd("SELECT").arg(settings.db());
    }
    if target.check_role {
        hello.cmd("ROLE");
    }
    let expected = hello.len();
    if expected > 0 {
        sender.send(&hello.get_packed_pipeline())?;
        let deadline = Instant::now() + connect_timeout;
        for i in 0..expected {
            let reply = replies.next_by(deadline).map_err(to_redis)?;
            let reply = reply.extract_error()?;
            if target.check_role && i + 1 == expected {
                check_master(&reply)?;
            }
        }
    }
    replies
        .stream
        .set_timeouts(connect_timeout, write_timeout)?;
    Ok(Wire {
        sender,
        replies,
        generation: target.generation,
    })
}

fn check_master(role: &Value) -> Result<(), RedisError> {
    let first = crate::value::as_array(role)
        .and_then(|parts| parts.first())
        .and_then(crate::value::as_string);
    match first.as_deref() {
        Some("master") => Ok(()),
        other => Err(RedisError::from(io::Error::new(
            io::ErrorKind::NotConnected,
            format!(
                "the address the sentinels gave says it is a {}, not the master",
                other.unwrap_or("?")
            ),
        ))),
    }
}

fn connect(addr: &ConnectionAddr, timeout: Duration) -> io::Result<Stream> {
    match addr {
        ConnectionAddr::Tcp(host, port) => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address"));
            for a in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
        #[cfg(unix)]
        ConnectionAddr::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path)?)),
        _ => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a TLS connection cannot be split into halves",
        )),
    }
}

/// A [`WireError`] as the error every caller of Redis already handles (an
/// I/O kind: "no connection", never a failure of the work).
pub fn to_redis(e: WireError) -> RedisError {
    match e {
        WireError::Io(e) => RedisError::from(e),
        WireError::Protocol(why) => {
            RedisError::from(io::Error::new(io::ErrorKind::InvalidData, why))
        }
    }
}

impl Redis {
    /// Where a [`Wire`] would connect now, or `None` for TLS (a TLS session
    /// cannot be split into halves).
    pub fn wire_target(&self) -> Result<Option<Target>, RedisError> {
        let (info, generation, check_role) = self.connection_info()?;
        Ok(match info.addr() {
            ConnectionAddr::Tcp(..) => Some(Target {
                info,
                generation,
                check_role,
            }),
            #[cfg(unix)]
            ConnectionAddr::Unix(_) => Some(Target {
                info,
                generation,
                check_role,
            }),
            _ => None,
        })
    }
}

/// The length of the first whole RESP2/RESP3 value in `buf`, `None` if its
/// bytes have not all arrived, or why they are not RESP.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, String> {
    let mut pos = 0;
    // Values still to skip: an aggregate adds its elements.
    let mut todo: usize = 1;
    while todo > 0 {
        todo -= 1;
        let Some(&kind) = buf.get(pos) else {
            return Ok(None);
        };
        let Some(line_end) = find_crlf(buf, pos + 1) else {
            return Ok(None);
        };
        let line = &buf[pos + 1..line_end];
        pos = line_end + 2;
        match kind {
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {}
            b'$' | b'!' | b'=' => {
                let n = number(line)?;
                if n >= 0 {
                    let end = pos + n as usize + 2;
                    if buf.len() < end {
                        return Ok(None);
                    }
                    pos = end;
                }
            }
            b'*' | b'~' | b'>' => todo += number(line)?.max(0) as usize,
            b'%' => todo += 2 * number(line)?.max(0) as usize,
            // An attribute map, then the value it describes.
            b'|' => todo += 2 * number(line)?.max(0) as usize + 1,
            other => return Err(format!("RESP type byte {other:#04x}")),
        }
    }
    Ok(Some(pos))
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

fn number(line: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "a length that is not a number: {:?}",
                String::from_utf8_lossy(line)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::frame_len;

    #[test]
    fn a_reply_is_cut_where_it_ends_and_not_before_it_is_whole() {
        let id = b"$15\r\n1700000000000-0\r\n";
        assert_eq!(frame_len(id), Ok(Some(id.len())));
        for cut in 0..id.len() {
            assert_eq!(frame_len(&id[..cut]), Ok(None), "cut at {cut}");
        }
        let two = b"*2\r\n$1\r\na\r\n:7\r\n+OK\r\n";
        assert_eq!(frame_len(two), Ok(Some(two.len() - 5)));
        assert_eq!(frame_len(b"$-1\r\n:1\r\n"), Ok(Some(5)));
        assert_eq!(frame_len(b"*-1\r\n"), Ok(Some(5)));
        assert_eq!(frame_len(b"-ERR no\r\n"), Ok(Some(9)));
        assert_eq!(frame_len(b"%1\r\n+k\r\n:1\r\n"), Ok(Some(12)));
        assert!(frame_len(b"?what\r\n").is_err());
        assert!(frame_len(b"$x\r\n").is_err());
    }
}

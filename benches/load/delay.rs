//! A TCP proxy on 127.0.0.1 that delays every byte by a fixed time in each
//! direction: Redis "a WAN link away" on a kernel without `netem`.
//!
//! Delay, not a bandwidth cap: bytes read at instant `t` are written at
//! `t + one_way`, and reading goes on meanwhile, so pipelined commands stay
//! pipelined (a link with a long round trip, not a slow one). Each
//! direction of each connection has a reader thread that stamps what it
//! reads and a writer thread that waits for the stamp to come due; two
//! threads per direction keep a late write from holding up the next read.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};

/// A running proxy; it lives as long as the process (the load tool exits
/// when it is done, which closes every connection).
pub struct DelayProxy {
    /// Where the services connect instead of Redis.
    pub addr: SocketAddr,
}

impl DelayProxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to
    /// `upstream`, `rtt / 2` late each way.
    pub fn start(upstream: SocketAddr, rtt: Duration) -> Result<DelayProxy, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("delay proxy: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("delay proxy: {e}"))?;
        let one_way = rtt / 2;
        thread::Builder::new()
            .name("delay-accept".into())
            .spawn(move || {
                for client in listener.incoming().flatten() {
                    if let Err(e) = splice(client, upstream, one_way) {
                        eprintln!("delay proxy: {e}");
                    }
                }
            })
            .map_err(|e| format!("delay proxy: {e}"))?;
        Ok(DelayProxy { addr })
    }
}

/// Connects `client` to `upstream` through two delayed directions.
fn splice(client: TcpStream, upstream: SocketAddr, one_way: Duration) -> Result<(), String> {
    let server = TcpStream::connect(upstream).map_err(|e| format!("{upstream}: {e}"))?;
    for s in [&client, &server] {
        s.set_nodelay(true).map_err(|e| e.to_string())?;
    }
    let clone = |s: &TcpStream| s.try_clone().map_err(|e| e.to_string());
    direction("up", clone(&client)?, clone(&server)?, one_way)?;
    direction("down", server, client, one_way)
}

/// Bytes read from `from` at `t`, stamped `t + one_way`.
type Chunk = (Instant, Vec<u8>);

fn direction(name: &str, from: TcpStream, to: TcpStream, one_way: Duration) -> Result<(), String> {
    let (tx, rx) = unbounded();
    spawn(format!("delay-{name}-read"), move || {
        read_side(from, tx, one_way)
    })?;
    spawn(format!("delay-{name}-write"), move || write_side(to, rx))
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    thread::Builder::new()
        .name(name)
        .spawn(f)
        .map(drop)
        .map_err(|e| format!("delay proxy: {e}"))
}

/// Reads until the peer closes; dropping `tx` then tells the writer to
/// finish once everything read was written.
fn read_side(mut from: TcpStream, tx: Sender<Chunk>, one_way: Duration) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx
                    .send((Instant::now() + one_way, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

fn write_side(mut to: TcpStream, rx: Receiver<Chunk>) {
    for (due, bytes) in rx {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        if to.write_all(&bytes).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

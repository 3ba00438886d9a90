//! A TCP proxy in front of a test's `redis-server` that the test can
//! freeze: while [`RedisProxy::hold`] is in force, nothing is forwarded in
//! either direction (commands wait before reaching Redis, replies wait
//! before reaching the service), until [`RedisProxy::release`].
//!
//! This makes "Redis is slow" or "a consumer is stuck with entries in hand"
//! a state the test controls, instead of a race against a timer: a service
//! behind a held proxy waits exactly as long as the test wants.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::RedisServer;

#[derive(Default)]
struct State {
    held: Mutex<bool>,
    changed: Condvar,
    stop: AtomicBool,
    /// Every socket of every connection, to cut them all at once.
    sockets: Mutex<Vec<TcpStream>>,
    /// Connections accepted so far.
    accepted: AtomicUsize,
}

impl State {
    /// Blocks while the proxy is held; returns false once it is stopping.
    fn wait_open(&self) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held && !self.stop.load(Ordering::SeqCst) {
            held = self
                .changed
                .wait_timeout(held, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        !self.stop.load(Ordering::SeqCst)
    }

    fn set_held(&self, yes: bool) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = yes;
        self.changed.notify_all();
    }

    fn cut_all(&self) {
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A proxy on its own port of 127.0.0.1, forwarding to one Redis.
pub struct RedisProxy {
    port: u16,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

impl RedisProxy {
    /// Starts a proxy to `redis` (plain TCP), open.
    pub fn start(redis: &RedisServer) -> RedisProxy {
        let upstream = redis.port();
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: bind");
        let port = listener.local_addr().expect("proxy: local_addr").port();
        let state = Arc::new(State::default());
        let accept = {
            let state = Arc::clone(&state);
            std::thread::Builder::new()
                .name(format!("redis-proxy:{port}"))
                .spawn(move || accept_loop(listener, upstream, state))
                .expect("spawn the proxy thread")
        };
        RedisProxy {
            port,
            state,
            accept: Some(accept),
        }
    }

    /// `redis://127.0.0.1:P`, the proxy's address, for a service's `REDIS_URL`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Freezes every connection, present and future: nothing more is
    /// forwarded either way until [`RedisProxy::release`].
    pub fn hold(&self) {
        self.state.set_held(true);
    }

    /// Lets traffic flow again, what was held first.
    pub fn release(&self) {
        self.state.set_held(false);
    }

    /// Closes every connection made so far (both sides), as a network cut
    /// or a Redis restart looks to the client.
    pub fn cut(&self) {
        self.state.cut_all();
    }

    /// Connections accepted so far (a reconnect adds one).
    pub fn connections(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for RedisProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.state.set_held(false);
        self.state.cut_all();
        // Wake the blocking accept.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, upstream: u16, state: Arc<State>) {
    for client in listener.incoming() {
        if state.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        state.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        {
            let mut sockets = state.sockets.lock().unwrap_or_else(|e| e.into_inner());
            for s in [&client, &server] {
                if let Ok(c) = s.try_clone() {
                    sockets.push(c);
                }
            }
        }
        for (from, to) in [(&client, &server), (&server, &client)] {
            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                continue;
            };
            let state = Arc::clone(&state);
            let _ = std::thread::Builder::new()
                .name("redis-proxy-pump".into())
                .spawn(move || pump(from, to, &state));
        }
    }
}

/// Copies `from` to `to`, each chunk waiting while the proxy is held.
fn pump(mut from: TcpStream, mut to: TcpStream, state: &State) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        // Held: read nothing either, so the sender's kernel buffers fill
        // and nothing of what it sends reaches the other side.
        if !state.wait_open() {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !state.wait_open() || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

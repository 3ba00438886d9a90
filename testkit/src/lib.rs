//! What the integration tests (`tests/it`) and the load tool
//! (`benches/load`) share: free ports, waiting with a deadline, temporary
//! directories, a throwaway `redis-server`, the service binaries as child
//! processes, an HTTP client (ureq, and HTTP/1.1 by hand) and readers of
//! `XRANGE`, `XREAD` and `XINFO` replies.
//!
//! An unpublished workspace crate, used as a dev-dependency only: the
//! services never link it.
//!
//! Two styles of failure, because the two users differ: a test wants a panic
//! that carries everything needed to understand it (the Redis log, the
//! service log, the HTTP answer), the load tool wants an error it can print
//! and exit with. Where both need a thing, the `try_` function returns the
//! error and the plain one panics with it.
//!
//! Everything that owns a process or a directory cleans up in `Drop`, even
//! when the test panicked. Paths of the service binaries are passed in:
//! only the test crate knows them (`env!("CARGO_BIN_EXE_...")`), the load
//! tool takes them from `--bin-dir`.

mod dir;
pub mod http;
mod port;
pub mod raw;
mod redis_server;
mod service;
pub mod stream;
mod wait;

pub use self::dir::{indent, read_lossy, tail, TempDir};
pub use self::http::{agent, order_path, raw_request, request, request_with, Response};
pub use self::port::{free_port, try_free_port};
pub use self::redis_server::{Entry, RedisOptions, RedisServer};
pub use self::service::{run_to_exit, Finished, Service, ServiceSpec};
pub use self::wait::{poll_for, wait_for, wait_until};

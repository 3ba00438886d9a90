//! Order, payment and notification services on Redis Streams that lose
//! nothing.
//!
//! A record's way through the system, file by file:
//!
//! * [`http`]: order-service's HTTP layer takes an order and validates it
//!   ([`record`]);
//! * [`producer`]: concurrent orders are group-committed into pipelined
//!   `XADD`s to `order-events` ([`topology`] names the streams and groups);
//!   orders with an `Idempotency-Key` ride the same batches, written with
//!   their keys in one script call ([`idempotency`]);
//! * [`consumer`]: a reader thread per subscription hands entries over a
//!   bounded channel to handler threads, which acknowledge only after the
//!   work is done, claim what dead consumers left, and dead-letter what can
//!   never succeed;
//! * [`services`]: what payment-service and notification-service do with an
//!   entry;
//! * [`trim`]: keeps streams bounded without removing anything a group still
//!   needs.
//!
//! Operating it: [`config`], [`connection`] (Redis with timeouts and
//! reconnection), [`sentinel`] (finding and following the master),
//! [`metrics`], [`notify`] (systemd), [`logger`], [`shutdown`].
//! The operator's tool, `streamctl`, is a binary of its own
//! (`src/bin/streamctl/`) built on [`topology`], [`dlq`], [`trim`],
//! [`connection`], [`sentinel`], [`idempotency`], [`config`], [`record`]
//! and [`value`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod connection;
pub mod consumer;
pub mod dlq;
pub mod http;
pub mod idempotency;
mod lease;
pub mod logger;
pub mod metrics;
pub mod notify;
pub mod ops;
pub mod producer;
pub mod record;
pub mod sentinel;
pub mod services;
pub mod shutdown;
pub mod topology;
pub mod trim;
pub mod value;

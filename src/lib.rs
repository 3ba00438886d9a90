//! Order, payment and notification services on Redis Streams that lose
//! nothing.
//!
//! A record's way through the system, file by file:
//!
//! * `http.rs`, `services/order.rs`: order-service's HTTP layer takes an
//!   order and validates it ([`record`]);
//! * `producer.rs`: concurrent orders are group-committed into pipelined
//!   `XADD`s to `order-events` ([`topology`] names the streams and groups);
//!   orders with an `Idempotency-Key` ride the same batches, written with
//!   their keys in one script call (`idempotency.rs`);
//! * [`consumer`]: a reader thread per subscription (`consumer/reader.rs`)
//!   hands entries over a bounded channel to handler threads
//!   (`consumer/handler.rs`), which acknowledge only after the work is done,
//!   claim what dead consumers left, and dead-letter what can never succeed
//!   (`dlq.rs`); `consumer/service.rs` runs it as a whole service;
//! * [`services`]: what payment-service and notification-service do with an
//!   entry;
//! * `trim.rs`: keeps streams bounded without removing anything a group
//!   still needs.
//!
//! Operating it: [`config`], `connection.rs` (Redis with timeouts and
//! reconnection), `sentinel.rs` (finding and following the master),
//! `metrics.rs`, `notify.rs` (systemd), `logger.rs`, [`shutdown`], `ops.rs`
//! (the consumers' `/healthz`, `/readyz`, `/metrics`). The operator's
//! tool, `streamctl`, is a binary of its own (`src/bin/streamctl/`) built on
//! the library's modules.
//!
//! # Writing a consumer service of your own
//!
//! The consumer runtime is this library's public face. A service that reads
//! a stream of the [`topology`] implements [`consumer::Handler`] and calls
//! [`consumer::run`] from `main`. It gets, without writing them: its own
//! pending entries re-read at start, idle entries of dead consumers claimed
//! (`CLAIM_IDLE_MS`), failures counted and dead-lettered to `<stream>:dlq`
//! after `MAX_DELIVERIES` (at once for [`consumer::Failure::permanent`]),
//! a clean stop on SIGTERM with the work in hand acknowledged, metrics,
//! `/healthz`, `/readyz` and `/metrics`, and systemd `READY=1` and watchdog
//! notifications. It is configured like payment-service (see `--help`).
//! A service that calls something per entry (a webhook, a carrier) can
//! implement the simpler [`consumer::EachDelivery`] instead, as
//! `examples/shipping_service.rs` does, a whole service. In short:
//!
//! ```no_run
//! use redis::{Connection, RedisError};
//! use streamline::consumer::{self, Delivery, Failure, Handler, Outcome, Progress, Subscription};
//! use streamline::record::Payment;
//! use streamline::topology::PAYMENT_EVENTS;
//!
//! struct Shipping;
//!
//! impl Handler for Shipping {
//!     fn handle(
//!         &self,
//!         _conn: &mut Connection,
//!         batch: &[Delivery],
//!         _progress: &Progress<'_>,
//!     ) -> Result<Vec<Outcome>, RedisError> {
//!         Ok(batch
//!             .iter()
//!             .map(|d| match Payment::from_fields(&d.fields) {
//!                 // Book the shipment here; `Failure::transient` retries.
//!                 Ok(_payment) => Outcome::Done,
//!                 Err(e) => Failure::permanent(e.to_string()),
//!             })
//!             .collect())
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     consumer::run(
//!         "shipping-service",
//!         &[Subscription { stream: PAYMENT_EVENTS, group: "shipping-service-group" }],
//!         Shipping,
//!     )
//! }
//! ```
//!
//! A group outside the topology, as `shipping-service-group`, is created at
//! ID `0` by the service itself. Trimming waits for it like for any group
//! on the stream: nothing it has not acknowledged is removed (a group that
//! stops reading holds trimming back, which is logged and exported as
//! `trim_held_back_entries`).
//!
//! The documented API is [`consumer`], [`config::Config`], [`topology`]
//! (the names of the wire contract), [`record`] (its entries), [`shutdown`]
//! and the services' run functions ([`services`]). The other public modules
//! serve this package's binaries, tests and benches, and are not API.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod config;
pub mod consumer;
pub mod record;
pub mod services;
pub mod shutdown;
pub mod topology;

// Public only because this package's binaries (`src/bin/`, streamctl),
// integration tests (`tests/`) and benches (`benches/`) are crates of their
// own and use them; not API, so hidden from the docs.
#[doc(hidden)]
pub mod cli;
#[doc(hidden)]
pub mod connection;
#[doc(hidden)]
pub mod dlq;
#[doc(hidden)]
pub mod http;
#[doc(hidden)]
pub mod idempotency;
#[doc(hidden)]
pub mod sentinel;
#[doc(hidden)]
pub mod trim;
#[doc(hidden)]
pub mod value;
#[doc(hidden)]
pub mod wire;

mod lease;
mod logger;
mod metrics;
mod notify;
mod ops;
// Not used outside the library either, but `Producer::submit` (kept for
// the producer's owners, issue 13) is unused inside it: `pub` keeps it
// out of the dead-code lint until they decide.
#[doc(hidden)]
pub mod producer;

//! The integration tests: one test binary made of modules, so the services are
//! built once and the harness in [`support`] is shared.
//!
//! Every test starts its own `redis-server` on a free port in its own
//! temporary directory and the real service binaries against it; nothing here
//! touches a Redis that may already run on this host.

mod support;

mod config;
mod order_http;

// payment-service and notification-service end to end (issue 3), and fault
// injection under load (issue 4).
mod consumers;
mod faults;

// Dead letters put back without paying twice; bounded DLQs; trimming held
// back by a group that never reads, made visible (issue 10.3, 10.5).
mod redrive;

// Operating it: metrics, systemd (units, journald log lines, the notify
// protocol), the streamctl admin CLI.
mod metrics;
mod notify_protocol;
mod streamctl;
mod systemd;

// An edge host on an untrusted network (issue 7): TLS and ACL users for
// Redis, HTTP that survives abuse, values checked at both doors; property
// tests on everything that decodes bytes from outside.
mod fuzz;
mod security;
// Bodies after `Expect: 100-continue` or on `Connection: Upgrade` (issue 10.2).
mod slow_bodies;
// Redis a WAN link away (issue 14).
mod far_redis;
// The orders of one user in the order they were written (CONTRACT "Ordering").
mod ordering;

// What a service does before any order: readiness that repairs the topology,
// the log filter flag, default consumer names, redacted configuration errors.
mod startup;

// Promises of the README's "Guarantees" and "Security" that had no test
// (issue 11).
mod promises;

// Guarantees under real conditions (issue 10, items 1 and 5): a slow webhook
// receiver, and faults that must never count as failed deliveries.
mod fault_counting;
mod slow_webhook;

// High availability (issue 15): following a Sentinel failover, WAIT for
// replicas before answering or acknowledging.
mod sentinel;

// A retried order is never a second order: the Idempotency-Key (issue 13).
mod idempotent_intake;

// The lines the library's errors print stay word for word (issue 12.5).
mod error_messages;

// Issue 12: a fourth service on the public consumer API (the example).
mod shipping_example;

// Trimming waits for every group on the stream, not only the topology's.
mod trim_groups;

//! A whole consumer service around the runtime: the small HTTP listener
//! (`/healthz`, `/readyz`, `/metrics`), the groups, the readers and handler
//! threads, trimming, the systemd watchdog, and a clean stop.

use std::process::ExitCode;
use std::sync::Arc;

use crossbeam_channel::Receiver;

use super::{Handler, Settings, Subscription};
use crate::config::{Config, Service};
use crate::connection::{self, Link, Redis, COMMAND_TIMEOUT};
use crate::http::HttpServer;
use crate::ops::{join_all, spawn_ops_http, Probe, ServiceError};
use crate::{notify, trim};

/// What a consumer service reads, what it does with it, and what it trims.
pub struct Consumer {
    /// The streams and groups it reads. A group outside the topology (see
    /// [`crate::topology`]) is created at ID `0` like the topology's own.
    pub subscriptions: &'static [Subscription],
    /// What it does with each batch.
    pub handler: Arc<dyn Handler>,
    /// The stream it writes and so keeps trimmed, if any.
    pub trims: Option<&'static str>,
    /// For `systemctl status`: "paying orders", "notifying".
    pub doing: &'static str,
}

/// Runs a consumer service of your own as the whole program, and returns
/// its exit status: call it from `main`.
///
/// `name` is the service's name in logs, `--help` and its default consumer
/// name (`<hostname>-<machine ID>-<HTTP port>`). It is configured like
/// payment-service and notification-service (`REDIS_URL`, `HTTP_ADDR`,
/// default `127.0.0.1:8083`, `MAX_DELIVERIES`, `CLAIM_IDLE_MS`, ...: see
/// `--help`), reads `subscriptions` and hands each batch to `handler` until
/// SIGTERM or SIGINT, then stops cleanly. Exit status `0` after a clean
/// stop, `1` if it could not run, `2` for a bad configuration.
pub fn run(
    name: &'static str,
    subscriptions: &'static [Subscription],
    handler: impl Handler,
) -> ExitCode {
    let handler: Arc<dyn Handler> = Arc::new(handler);
    crate::cli::program(Service::Consumer(name), move |config, shutdown| {
        let consumer = Consumer {
            subscriptions,
            handler,
            trims: None,
            doing: "consuming",
        };
        run_until(config, shutdown, consumer)
    })
}

/// Runs a consumer service until `shutdown` fires (see
/// [`crate::shutdown`]): its small HTTP listener, the groups, the readers
/// and handlers, trimming, the watchdog; then a clean stop with everything
/// in hand acknowledged. What [`run`] does once it has a configuration and
/// signals, for a program that has its own.
pub fn run_until(
    config: &Config,
    shutdown: Receiver<()>,
    consumer: Consumer,
) -> Result<(), ServiceError> {
    let redis = Redis::new(config)?;
    redis.watch_failovers();
    let server = HttpServer::bind(config.http_addr)?;
    let probe = Probe::new(&redis);
    let beats = notify::Heartbeats::new();
    let mut threads = spawn_ops_http(&server, &probe, &shutdown, &beats)?;
    if !probe.ensure_topology(&shutdown) {
        notify::stopping();
        join_all(threads);
        return Ok(());
    }
    create_own_groups(&redis, consumer.subscriptions);
    let settings = Settings::from_config(config);
    threads.extend(super::start(
        &redis,
        consumer.subscriptions,
        consumer.handler,
        &settings,
        &shutdown,
        &beats,
    )?);
    if let (Some(stream), Some(interval)) = (consumer.trims, config.trim_interval) {
        threads.push(trim::spawn(
            redis.clone(),
            stream,
            config.retain_entries,
            interval,
            &shutdown,
        )?);
    }
    let watchdog = notify::spawn_watchdog(beats, shutdown.clone());
    log::info!(
        "{} running as {} (http://{})",
        config.service.name(),
        settings.consumer,
        server.addr()
    );
    notify::ready();
    notify::status(&format!("{} as {}", consumer.doing, settings.consumer));
    let _ = shutdown.recv();
    notify::stopping();
    log::info!("stopping: finishing and acknowledging the entries in hand");
    join_all(threads);
    join_all(watchdog.into_iter().collect());
    log::info!("stopped");
    Ok(())
}

/// Creates the groups of `subscriptions` outside the topology before the
/// first read, so that none starts with a `NOGROUP` warning. Best effort:
/// a reader that meets `NOGROUP` creates its group then.
fn create_own_groups(redis: &Redis, subscriptions: &[Subscription]) {
    let mut link = Link::new(redis.clone(), COMMAND_TIMEOUT, connection::nothing);
    for &sub in subscriptions {
        if let Err(e) = link.run(|c| sub.ensure_groups(c)) {
            log::warn!("cannot create group {} on {}: {e}", sub.group, sub.stream);
        }
    }
}

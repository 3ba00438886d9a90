//! The three services, started by the load tool itself from `--bin-dir`
//! (mode `wan`), so it can put its delay proxy between them and Redis.
//!
//! Each gets a free port, `RUST_LOG=warn`, and a consumer name of its own
//! (`bench-wan`), and is stopped with SIGTERM when [`Services`] is dropped.

use std::path::Path;

use testkit::Service;

use crate::client::Target;
use crate::procs::SERVICES;
use crate::ready::{spawn, stop, wait_ready};

/// The running services.
pub struct Services {
    /// order-service.
    pub target: Target,
    running: Vec<Service>,
}

impl Services {
    /// Starts order-, payment- and notification-service against
    /// `redis_url` and waits until each answers `/readyz` with 200.
    pub fn start(bin_dir: &Path, redis_url: &str) -> Result<Services, String> {
        let mut services = Services {
            target: Target::local(0),
            running: Vec::new(),
        };
        for name in SERVICES {
            let mut service = spawn(&bin_dir.join(name), redis_url, "bench-wan")?;
            let target = Target::local(service.addr().port());
            wait_ready(&mut service)?;
            services.running.push(service);
            if name == "order-service" {
                services.target = target;
            }
        }
        Ok(services)
    }

    /// Their pids, in [`SERVICES`] order.
    pub fn pids(&self) -> Vec<u32> {
        self.running.iter().filter_map(Service::pid).collect()
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for service in &mut self.running {
            let pid = service.pid().unwrap_or(0);
            if stop(service).is_err() {
                eprintln!("load: pid {pid} did not stop on SIGTERM (killed)");
            }
        }
    }
}

//! The three services, started by the load tool itself from `--bin-dir`
//! (mode `wan`), so it can put its delay proxy between them and Redis.
//!
//! Each gets a free port, `RUST_LOG=warn`, and a consumer name of its own
//! (`bench-wan`), and is stopped with SIGTERM when [`Services`] is dropped.

use std::path::Path;
use std::process::Child;

use crate::client::Target;
use crate::procs::SERVICES;
use crate::ready::{spawn, tail, terminate, wait_ready};

/// The running services.
pub struct Services {
    /// order-service.
    pub target: Target,
    children: Vec<Child>,
}

impl Services {
    /// Starts order-, payment- and notification-service against
    /// `redis_url` and waits until each answers `/readyz` with 200.
    pub fn start(bin_dir: &Path, redis_url: &str) -> Result<Services, String> {
        let mut services = Services {
            target: Target::local(0),
            children: Vec::new(),
        };
        for name in SERVICES {
            let (mut child, port, log) = spawn(&bin_dir.join(name), name, redis_url, "bench-wan")?;
            let target = Target::local(port);
            let ready = wait_ready(&mut child, &target, std::time::Instant::now());
            services.children.push(child);
            if let Err(e) = ready {
                return Err(format!("{name}: {e}; its log:\n{}", tail(&log)));
            }
            if name == "order-service" {
                services.target = target;
            }
        }
        Ok(services)
    }

    /// Their pids, in [`SERVICES`] order.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for child in &mut self.children {
            if terminate(child).is_err() {
                eprintln!("load: pid {} did not stop on SIGTERM (killed)", child.id());
            }
        }
    }
}

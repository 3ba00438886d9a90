//! Shutdown as a channel: SIGTERM or SIGINT disconnects it.
//!
//! Every long-running thread holds a clone of the [`Receiver`] and
//! `select!`s on it (or calls [`wait`] instead of sleeping), so none sleeps
//! through a shutdown. Disconnection, not a message, is the signal: it
//! reaches every receiver at once and cannot be missed.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

/// Dropping (or calling [`Trigger::fire`]) starts the shutdown.
pub struct Trigger(Option<Sender<()>>);

impl Trigger {
    /// Starts the shutdown.
    pub fn fire(&mut self) {
        self.0.take();
    }
}

/// A shutdown channel not tied to signals (tests, or code that decides to stop).
pub fn channel() -> (Trigger, Receiver<()>) {
    let (tx, rx) = crossbeam_channel::bounded(0);
    (Trigger(Some(tx)), rx)
}

/// A shutdown channel fired by the first SIGTERM or SIGINT. A second signal
/// exits at once with status 130, for an operator who really means it.
pub fn on_signals() -> std::io::Result<Receiver<()>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    let (mut trigger, rx) = channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                seen += 1;
                if seen == 1 {
                    log::info!("signal {sig} received: finishing in-flight work, then exiting");
                    trigger.fire();
                } else {
                    log::warn!("second signal: exiting now");
                    std::process::exit(130);
                }
            }
        })?;
    Ok(rx)
}

/// Waits up to `timeout`; `true` if the shutdown started meanwhile.
pub fn wait(shutdown: &Receiver<()>, timeout: Duration) -> bool {
    matches!(
        shutdown.recv_timeout(timeout),
        Err(RecvTimeoutError::Disconnected)
    )
}

/// Whether the shutdown has started.
pub fn is_started(shutdown: &Receiver<()>) -> bool {
    matches!(shutdown.try_recv(), Err(TryRecvError::Disconnected))
}

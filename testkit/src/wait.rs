//! Waiting for a condition with a deadline instead of sleeping and hoping.

use std::time::{Duration, Instant};

/// How often [`wait_until`] and [`wait_for`] poll.
const POLL: Duration = Duration::from_millis(20);

/// Polls `f` every ~20 ms until it returns `true`; panics naming `what` when
/// `deadline` has passed without it.
pub fn wait_until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    wait_for(what, deadline, || f().then_some(()));
}

/// Polls `f` every ~20 ms until it returns `Some`, and returns the value;
/// panics naming `what` when `deadline` has passed without it.
pub fn wait_for<T>(what: &str, deadline: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll_for(deadline, POLL, f)
        .unwrap_or_else(|_| panic!("timed out after {deadline:?} waiting until {what}"))
}

/// Calls `f` every `pause` until it returns `Some`, and returns the value;
/// `Err` with the time waited once `limit` has passed without it. `f` is
/// called at least once.
pub fn poll_for<T>(
    limit: Duration,
    pause: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, Duration> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        let waited = start.elapsed();
        if waited >= limit {
            return Err(waited);
        }
        std::thread::sleep(pause);
    }
}

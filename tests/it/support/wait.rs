//! Waiting for a condition with a deadline instead of sleeping and hoping.

use std::time::{Duration, Instant};

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);

/// Polls `f` every ~20 ms until it returns `true`; panics naming `what` when
/// `deadline` has passed without it.
pub fn wait_until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    wait_for(what, deadline, || f().then_some(()));
}

/// Polls `f` every ~20 ms until it returns `Some`, and returns the value;
/// panics naming `what` when `deadline` has passed without it.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        std::thread::sleep(POLL);
    }
}

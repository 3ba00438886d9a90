//! The progress line: one `\r`-updated line on stderr, redrawn four times a
//! second by a thread of its own, fed by counters the load threads bump.
//!
//! When stderr is not a terminal there is no redrawing (it would fill a log
//! file with carriage returns): each phase is announced on a line instead.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

const REDRAW: Duration = Duration::from_millis(250);

struct Shared {
    /// What is running; empty means "draw nothing".
    label: Mutex<Phase>,
    done: AtomicU64,
    failed: AtomicU64,
    tty: bool,
}

struct Phase {
    /// Which round, when there are rounds.
    round: String,
    label: String,
    total: u64,
    since: Instant,
}

/// The progress line; the printer thread stops when this is dropped.
pub struct Progress {
    shared: Arc<Shared>,
    stop: Option<Sender<()>>,
    printer: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts the printer thread (only when stderr is a terminal).
    pub fn start() -> Progress {
        let shared = Arc::new(Shared {
            label: Mutex::new(Phase {
                round: String::new(),
                label: String::new(),
                total: 0,
                since: Instant::now(),
            }),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            tty: std::io::stderr().is_terminal(),
        });
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let printer = shared.tty.then(|| {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("progress".into())
                .spawn(move || print_loop(&shared, &stopped))
                .ok()
        });
        Progress {
            shared,
            stop: Some(stop),
            printer: printer.flatten(),
        }
    }

    /// A new phase of `total` steps (0 when unknown); counters restart.
    pub fn phase(&self, label: &str, total: u64) {
        let mut p = self.lock();
        p.label = label.to_string();
        p.total = total;
        p.since = Instant::now();
        self.shared.done.store(0, Ordering::Relaxed);
        self.shared.failed.store(0, Ordering::Relaxed);
        if !self.shared.tty {
            eprintln!("{}{label}...", p.round);
        }
    }

    /// Prefixes every later phase with `round` (such as `round 2/3`).
    pub fn round(&self, round: String) {
        self.lock().round = format!("{round}: ");
    }

    /// Changes the label without announcing it (for a phase that reports
    /// its own state, such as the drain).
    pub fn relabel(&self, label: String) {
        self.lock().label = label;
    }

    /// Nothing running: clears the line, so results print cleanly.
    pub fn idle(&self) {
        let mut p = self.lock();
        p.label.clear();
        if self.shared.tty {
            eprint!("\r\x1b[K");
        }
    }

    /// One step done.
    pub fn ok(&self) {
        self.shared.done.fetch_add(1, Ordering::Relaxed);
    }

    /// One step failed.
    pub fn failed(&self) {
        self.shared.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the number of steps done.
    pub fn set_done(&self, n: u64) {
        self.shared.done.store(n, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.shared
            .label
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.idle();
        drop(self.stop.take());
        if let Some(printer) = self.printer.take() {
            let _ = printer.join();
        }
    }
}

fn print_loop(shared: &Shared, stopped: &Receiver<()>) {
    loop {
        match stopped.recv_timeout(REDRAW) {
            Err(RecvTimeoutError::Timeout) => draw(shared),
            _ => return,
        }
    }
}

fn draw(shared: &Shared) {
    let p = shared.label.lock().unwrap_or_else(PoisonError::into_inner);
    if p.label.is_empty() {
        return;
    }
    let done = shared.done.load(Ordering::Relaxed);
    let failed = shared.failed.load(Ordering::Relaxed);
    let secs = p.since.elapsed().as_secs_f64();
    let mut line = format!("\r\x1b[K{}{}", p.round, p.label);
    if p.total > 0 || done > 0 {
        line += &format!(": {done}");
        if p.total > 0 {
            line += &format!("/{}", p.total);
        }
        if failed > 0 {
            line += &format!(", {failed} failed");
        }
        line += &format!(" ({:.0}/s, {secs:.1} s)", done as f64 / secs.max(1e-3));
    } else {
        line += &format!(" ({secs:.1} s)");
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(line.as_bytes());
    let _ = err.flush();
}

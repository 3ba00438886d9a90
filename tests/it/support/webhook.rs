//! A webhook receiver for notification tests: records every request and
//! answers 200, or 500 when told to fail (to exercise retries). With a
//! [`Gate`], the test decides when requests are answered: a closed gate
//! keeps notification-service waiting with its entries in hand, however
//! fast or slow the machine is.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use super::wait_until;

/// One request the sink received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The method, `POST` normally.
    pub method: String,
    /// The path and query.
    pub path: String,
    /// The headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// The body as text (lossily decoded).
    pub raw: String,
    /// The body as JSON (`Null` if it is not JSON).
    pub body: Value,
    /// The status the sink answered.
    pub answered: u16,
}

impl Received {
    /// Whether the sink accepted it (answered 2xx).
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.answered)
    }
}

type Predicate = Box<dyn Fn(&Value) -> bool + Send>;

/// A gate the test holds: while closed, the sink answers nothing (the
/// request that arrived waits, and those behind it queue up).
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    /// A gate that starts closed.
    pub fn closed() -> Gate {
        let gate = Gate::default();
        gate.close();
        gate
    }

    /// Closes it: requests from now on wait.
    pub fn close(&self) {
        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Opens it: waiting requests are answered.
    pub fn open(&self) {
        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.0 .1.notify_all();
    }

    /// Waits while closed (or until `stop`).
    fn pass(&self, stop: &AtomicBool) {
        let mut closed = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        while *closed && !stop.load(Ordering::SeqCst) {
            closed = self
                .0
                 .1
                .wait_timeout(closed, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// How a [`WebhookSink`] answers.
#[derive(Default)]
pub struct WebhookOptions {
    fail_first: usize,
    fail_when: Option<Predicate>,
    gate: Option<Gate>,
    delay: Duration,
}

impl WebhookOptions {
    /// Answers 500 to the first `n` requests.
    pub fn fail_first(mut self, n: usize) -> Self {
        self.fail_first = n;
        self
    }

    /// Answers 500 to every request whose JSON body matches `pred`.
    pub fn fail_when(mut self, pred: impl Fn(&Value) -> bool + Send + 'static) -> Self {
        self.fail_when = Some(Box::new(pred));
        self
    }

    /// Answers only while `gate` is open.
    pub fn gate(mut self, gate: &Gate) -> Self {
        self.gate = Some(gate.clone());
        self
    }

    /// Answers each request `delay` after it arrived: a slow but working
    /// receiver. Requests are answered one at a time, as by a receiver with
    /// one worker.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Starts the sink.
    pub fn start(self) -> WebhookSink {
        WebhookSink::start_with(self)
    }
}

/// An HTTP server on a free port, in its own thread, until dropped.
pub struct WebhookSink {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WebhookSink {
    /// A sink that accepts everything.
    pub fn start() -> WebhookSink {
        WebhookOptions::default().start()
    }

    /// Options for a sink that fails some requests.
    pub fn options() -> WebhookOptions {
        WebhookOptions::default()
    }

    fn start_with(opts: WebhookOptions) -> WebhookSink {
        // Port 0 here: the kernel's choice is ours at once, no race.
        let server = tiny_http::Server::http("127.0.0.1:0").expect("webhook sink: bind");
        let port = server
            .server_addr()
            .to_ip()
            .expect("webhook sink: an IP address")
            .port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let received = Arc::clone(&received);
            let arrived = Arc::clone(&arrived);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(format!("webhook-sink:{port}"))
                .spawn(move || serve(server, opts, received, arrived, stop))
                .expect("spawn the webhook sink thread")
        };
        WebhookSink {
            port,
            received,
            arrived,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:P/hook`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Everything received so far, accepted or not, in order of arrival.
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The requests answered 2xx.
    pub fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(Received::accepted)
            .collect()
    }

    /// How many requests arrived, answered or still waiting at the gate.
    pub fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests arrived (answered or held at the
    /// gate); panics after `deadline`.
    pub fn wait_arrived(&self, n: usize, deadline: Duration) {
        wait_until(&format!("{n} webhook requests arrived"), deadline, || {
            self.arrived() >= n
        });
    }

    /// How many requests were answered (accepted or not).
    pub fn count(&self) -> usize {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Waits until `n` requests have been accepted; panics with what
    /// arrived after `deadline`.
    pub fn wait_accepted(&self, n: usize, deadline: Duration) -> Vec<Received> {
        let what = format!("the webhook sink accepted {n} requests");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until(&what, deadline, || self.accepted().len() >= n)
        }));
        if result.is_err() {
            panic!(
                "timed out after {deadline:?} waiting until {what}; received: {:#?}",
                self.received()
            );
        }
        self.accepted()
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    server: tiny_http::Server,
    opts: WebhookOptions,
    received: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let mut seen = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let mut req = match server.recv_timeout(Duration::from_millis(50)) {
            Ok(Some(req)) => req,
            Ok(None) => continue,
            Err(_) => continue,
        };
        let mut bytes = Vec::new();
        let _ = req.as_reader().read_to_end(&mut bytes);
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|h| {
                (
                    h.field.as_str().as_str().to_ascii_lowercase(),
                    h.value.as_str().to_string(),
                )
            })
            .collect();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        arrived.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &opts.gate {
            gate.pass(&stop);
        }
        seen += 1;
        let fail = seen <= opts.fail_first || opts.fail_when.as_ref().is_some_and(|p| p(&body));
        let answered = if fail { 500 } else { 200 };
        if !opts.delay.is_zero() {
            std::thread::sleep(opts.delay);
        }
        received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Received {
                method: req.method().as_str().to_string(),
                path: req.url().to_string(),
                idempotency_key: headers
                    .iter()
                    .find(|(k, _)| k == "idempotency-key")
                    .map(|(_, v)| v.clone()),
                headers,
                raw: String::from_utf8_lossy(&bytes).into_owned(),
                body,
                answered,
            });
        let _ = req.respond(tiny_http::Response::from_string("").with_status_code(answered));
    }
}

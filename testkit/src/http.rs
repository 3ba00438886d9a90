//! A small HTTP client for the tests, on `ureq` 3.
//!
//! Statuses are answers, not errors (`http_status_as_error(false)`), and every
//! call has a global timeout so a service that hangs fails the test instead
//! of hanging it. A [`Response`] keeps the status, headers, the body as text
//! and, when it parses, as JSON, plus how long the call took.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::raw;

/// The timeout of every call made by [`request`].
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// An agent that returns 4xx/5xx as answers and gives up after `timeout`.
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        // A test must see exactly what the service answered.
        .max_redirects(0)
        .build()
        .into()
}

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// The request, as `METHOD url`, for failure messages.
    pub request: String,
    /// The status code.
    pub status: u16,
    /// The headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body (lossily decoded).
    pub body: String,
    /// The body as JSON, if it is JSON.
    pub json: Option<Value>,
    /// How long the call took, from sending to the end of the body.
    pub elapsed: Duration,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The string at `key` of a JSON object body.
    pub fn json_str(&self, key: &str) -> Option<&str> {
        self.json.as_ref()?.get(key)?.as_str()
    }
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {} after {:?}, content-type {:?}, body {:?}",
            self.request,
            self.status,
            self.elapsed,
            self.header("content-type"),
            self.body
        )
    }
}

/// Sends one request with [`CALL_TIMEOUT`]. `Err` is a transport failure
/// (refused, reset, timed out), described.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, String> {
    request_with(&agent(CALL_TIMEOUT), method, url, headers, body)
}

/// Like [`request`], with a given agent.
pub fn request_with(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, String> {
    let what = format!("{method} {url}");
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let start = Instant::now();
    let result = match body {
        Some(bytes) => {
            let req = builder.body(bytes).map_err(|e| format!("{what}: {e}"))?;
            agent.run(req)
        }
        None => {
            let req = builder.body(()).map_err(|e| format!("{what}: {e}"))?;
            agent.run(req)
        }
    };
    let mut resp = result.map_err(|e| format!("{what}: {e} (after {:?})", start.elapsed()))?;
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(16 * 1024 * 1024)
        .read_to_vec()
        .map_err(|e| format!("{what}: reading the body: {e}"))?;
    let elapsed = start.elapsed();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    Ok(Response {
        request: what,
        status: resp.status().as_u16(),
        headers,
        json: serde_json::from_slice(&bytes).ok(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
        elapsed,
    })
}

/// Writes `raw` bytes as they are to `addr` and reads the answer until the
/// server closes the connection (send `Connection: close`). For requests no
/// well-behaved client library will send: raw non-UTF-8 bytes in the request
/// line, hand-made chunked bodies.
///
/// A write error (the server answered early and closed) is not fatal: the
/// answer is read anyway.
pub fn raw_request(addr: SocketAddr, raw: &[u8]) -> Result<Response, String> {
    let what = format!("raw request to {addr}: {:?}", preview(raw));
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, CALL_TIMEOUT)
        .map_err(|e| format!("{what}: connect: {e}"))?;
    stream
        .set_read_timeout(Some(CALL_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CALL_TIMEOUT)))
        .map_err(|e| format!("{what}: {e}"))?;
    let _ = stream.write_all(raw).and_then(|()| stream.flush());
    let mut answer = Vec::new();
    // A reset after the answer arrived still leaves the answer in `answer`.
    let read = stream.read_to_end(&mut answer);
    let elapsed = start.elapsed();
    if answer.is_empty() {
        return Err(format!("{what}: no answer ({read:?})"));
    }
    parse_raw(what, &answer, elapsed)
}

fn preview(raw: &[u8]) -> String {
    let head = &raw[..raw.len().min(120)];
    let mut s = String::from_utf8_lossy(head).into_owned();
    if raw.len() > head.len() {
        s.push_str(&format!("... ({} bytes)", raw.len()));
    }
    s
}

/// Parses what [`raw_request`] read: the head with [`crate::raw::read_head`],
/// a chunked body with [`crate::raw::read_chunked`], any other body as
/// everything after the head (what the connection carried, whatever
/// `Content-Length` says).
fn parse_raw(what: String, answer: &[u8], elapsed: Duration) -> Result<Response, String> {
    let mut reader = answer;
    let mut line = String::new();
    let mut headers: Vec<(String, String)> = Vec::new();
    let head = raw::read_head(&mut reader, &mut line, |k, v| {
        headers.push((k.trim().to_ascii_lowercase(), v.to_string()))
    })
    .map_err(|e| format!("{what}: {e} in {:?}", String::from_utf8_lossy(answer)))?;
    let body = if head.chunked {
        let mut body = Vec::new();
        raw::read_chunked(&mut reader, &mut line, &mut body).map_err(|e| {
            format!(
                "{what}: chunked body: {e} in {:?}",
                String::from_utf8_lossy(answer)
            )
        })?;
        String::from_utf8_lossy(&body).into_owned()
    } else {
        String::from_utf8_lossy(reader).into_owned()
    };
    Ok(Response {
        request: what,
        status: head.status,
        headers,
        json: serde_json::from_str(&body).ok(),
        body,
        elapsed,
    })
}

/// `/order?userId=..&productId=..&price=..`, each value percent-encoded
/// (everything but RFC 3986 unreserved characters), so any text, control
/// characters and non-ASCII included, reaches the service as written.
pub fn order_path(user: &str, product: &str, price: &str) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    format!(
        "/order?userId={}&productId={}&price={}",
        enc(user),
        enc(product),
        enc(price)
    )
}

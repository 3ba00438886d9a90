//! order-service: takes orders over HTTP and writes each to `order-events`.
//!
//! `GET /order?userId=U&productId=P&price=N` (the seed's call) answers `200`,
//! `POST /orders` with a JSON body answers `201`; both with
//! `{"status":"ok","orderId":"<entry ID>"}`. Anything invalid is a `400`
//! naming the field, and nothing is written.

use std::sync::Arc;

use crossbeam_channel::Receiver;
use serde_json::Value as Json;
use tiny_http::{Header, Method, Request};

use crate::config::Config;
use crate::connection::{Redis, WaitFor};
use crate::http::{self, BodyError, HttpServer};
use crate::ops::{join_all, Probe, ServiceError};
use crate::producer::Producer;
use crate::record::{FieldError, Order, Problem};
use crate::{idempotency, notify, topology, trim};

/// Runs order-service until `shutdown` fires.
pub fn run(config: &Config, shutdown: Receiver<()>) -> Result<(), ServiceError> {
    let redis = Redis::new(config)?;
    redis.watch_failovers();
    let server = HttpServer::bind(config.http_addr)?;
    log::info!("order-service listening on http://{}", server.addr());
    let probe = Probe::new(&redis);
    let beats = notify::Heartbeats::new();
    let producer = Producer::new(
        &redis,
        2,
        config.request_timeout,
        WaitFor::from_config(config),
        config.idempotency_ttl_s,
        &beats,
    )?;

    // Orders are answered 503 until the groups exist; every connection that
    // writes orders creates them too when it connects, so this only decides
    // when to tell systemd we are ready.
    let mut threads = spawn_http(
        &server,
        &probe,
        producer.clone(),
        config.http_workers,
        &shutdown,
        &beats,
    )?;
    let watchdog = notify::spawn_watchdog(beats, shutdown.clone());
    if let Some(interval) = config.trim_interval {
        threads.push(trim::spawn(
            redis.clone(),
            topology::ORDER_EVENTS,
            config.retain_entries,
            interval,
            &shutdown,
        )?);
    }
    if probe.ensure_topology(&shutdown) {
        notify::ready();
        notify::status(&format!("accepting orders on {}", server.addr()));
        let _ = shutdown.recv();
    }
    notify::stopping();
    log::info!("stopping: answering the orders in flight");
    join_all(threads);
    producer.finish(config.request_timeout);
    join_all(watchdog.into_iter().collect());
    log::info!("stopped");
    Ok(())
}

fn spawn_http(
    server: &Arc<HttpServer>,
    probe: &Probe,
    producer: Producer,
    workers: usize,
    shutdown: &Receiver<()>,
    beats: &notify::Heartbeats,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let probe = probe.clone();
    server.spawn_workers("http", workers, shutdown, beats, move |request, beat| {
        if let Some(request) = http::ops_route(request, || probe.ready(), || probe.metrics()) {
            route(request, &producer, beat);
        }
    })
}

fn route(mut request: Request, producer: &Producer, beat: &notify::Heartbeat) {
    let method = request.method().clone();
    match (http::path(request.url()), method) {
        ("/order", Method::Get) => match keyed(&request, order_from_query(request.url())) {
            Ok((order, key)) => producer.submit_keyed(order, key, request, 200, beat),
            Err(e) => http::respond(request, http::error(400, &e)),
        },
        ("/orders", Method::Post) => {
            let order = order_from_body(&mut request);
            match keyed(&request, order) {
                Ok((order, key)) => producer.submit_keyed(order, key, request, 201, beat),
                Err((status, e)) => http::respond(request, http::error(status, &e)),
            }
        }
        ("/order", _) => method_not_allowed(request, "GET"),
        ("/orders", _) => method_not_allowed(request, "POST"),
        _ => http::respond(
            request,
            http::error(404, "not found: try GET /order or POST /orders"),
        ),
    }
}

/// The order with the request's `Idempotency-Key` (a malformed key is a
/// `400` before anything else is looked at, so it is named even when the
/// order is invalid too).
fn keyed<E: KeyError>(
    request: &Request,
    order: Result<Order, E>,
) -> Result<(Order, Option<String>), E> {
    let key = idempotency::key_of(request.headers()).map_err(|e| E::bad_key(e.to_string()))?;
    Ok((order?, key))
}

/// An error type that can carry a malformed `Idempotency-Key` (`400`).
trait KeyError {
    fn bad_key(message: String) -> Self;
}

impl KeyError for String {
    fn bad_key(message: String) -> Self {
        message
    }
}

impl KeyError for (u16, String) {
    fn bad_key(message: String) -> Self {
        (400, message)
    }
}

fn method_not_allowed(request: Request, allow: &str) {
    let mut response = http::error(405, &format!("method not allowed: use {allow}"));
    if let Ok(h) = Header::from_bytes("Allow", allow) {
        response.add_header(h);
    }
    http::respond(request, response);
}

fn order_from_query(url: &str) -> Result<Order, String> {
    let mut q =
        http::query(url).map_err(|e| format!("query parameter {} is not valid UTF-8", e.0))?;
    let mut take = |name: &'static str| {
        q.remove(name).ok_or(FieldError {
            field: name,
            problem: Problem::Missing,
        })
    };
    let order = (|| Order::new(take("userId")?, take("productId")?, take("price")?))();
    order.map_err(|e| e.to_string())
}

fn order_from_body(request: &mut Request) -> Result<Order, (u16, String)> {
    let body = http::read_body(request, http::MAX_BODY).map_err(|e| match e {
        BodyError::TooLarge => (413, format!("body larger than {} bytes", http::MAX_BODY)),
        BodyError::Io(e) => (400, format!("could not read the body: {e}")),
    })?;
    order_from_json(&body).map_err(|e| (400, e))
}

/// Reads and checks the JSON body of `POST /orders`:
/// `{"userId":"U","productId":"P","price":"N"}`, price as a string or a
/// number. The error names what is wrong.
pub fn order_from_json(body: &[u8]) -> Result<Order, String> {
    let text = std::str::from_utf8(body).map_err(|_| "body is not valid UTF-8".to_string())?;
    let json: Json =
        serde_json::from_str(text).map_err(|e| format!("body is not valid JSON: {e}"))?;
    let Json::Object(map) = json else {
        return Err("body must be a JSON object with userId, productId and price".into());
    };
    let text_field = |name: &'static str| match map.get(name) {
        None | Some(Json::Null) => Err(FieldError {
            field: name,
            problem: Problem::Missing,
        }),
        Some(Json::String(s)) => Ok(s.clone()),
        Some(_) => Err(FieldError {
            field: name,
            problem: Problem::NotAString,
        }),
    };
    let price = match map.get("price") {
        Some(Json::Number(n)) => Ok(n.to_string()),
        _ => text_field("price").map_err(|e| match e.problem {
            Problem::NotAString => FieldError {
                field: "price",
                problem: Problem::NotAPrice,
            },
            _ => e,
        }),
    };
    (|| Order::new(text_field("userId")?, text_field("productId")?, price?))()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_orders() {
        let o = order_from_query("/order?userId=u1&productId=p1&price=100").unwrap();
        assert_eq!(
            (o.user_id.as_str(), o.product_id.as_str(), o.price.as_str()),
            ("u1", "p1", "100")
        );
        assert_eq!(
            order_from_query("/order?userId=u1&price=1").unwrap_err(),
            "productId is missing"
        );
        assert_eq!(
            order_from_query("/order?userId=&productId=p&price=1").unwrap_err(),
            "userId is empty"
        );
        assert!(order_from_query("/order?userId=%FF&productId=p&price=1")
            .unwrap_err()
            .contains("userId"));
        assert!(order_from_query("/order?userId=u&productId=p&price=-1")
            .unwrap_err()
            .starts_with("price"));
    }
}

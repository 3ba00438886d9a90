//! notification-service: notifies about each order (`order-events`) and each
//! payment (`payment-events`), both through `notification-service-group`.
//!
//! A notification is a log line, as the seed's `System.out.println`. With
//! `NOTIFY_WEBHOOK_URL` set it is also `POST`ed there as JSON with an
//! `Idempotency-Key: <stream>:<entry ID>` header: an entry can be delivered
//! more than once (a crash after the POST, before the acknowledgement), and
//! the key lets the receiver drop the repeat. A redriven entry is a new
//! entry with a key of its own, as the contract fixes the key; its
//! `redrivenFrom` field names the entry first written. A non-2xx answer or
//! a timeout is a failed delivery: the entry stays pending, is retried after
//! `CLAIM_IDLE_MS`, and dead-lettered after `MAX_DELIVERIES` failures. A slow
//! receiver is not a failing one: calls are made one by one, each reported
//! as progress to the watchdog, and a batch stops starting calls after its
//! budget (the rest wait for the thread's next turn, uncounted).

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use serde_json::{json, Value as Json};

use super::ServiceError;
use crate::config::Config;
use crate::consumer::{
    run_until, Consumer, Delivery, EachDelivery, Failure, Outcome, Subscription,
};
use crate::record::{Order, Payment};
use crate::topology::{NOTIFICATION_GROUP, ORDER_EVENTS, PAYMENT_EVENTS};

/// Notifies about orders and payments.
pub struct Notifications {
    webhook: Option<(String, ureq::Agent)>,
}

impl Notifications {
    /// Notifies by log line, and by `POST` to `webhook_url` if given.
    pub fn new(webhook_url: Option<String>, timeout: Duration) -> Notifications {
        let webhook = webhook_url.map(|url| {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(timeout))
                .http_status_as_error(false)
                .build()
                .into();
            (url, agent)
        });
        Notifications { webhook }
    }

    fn notify(&self, d: &Delivery) -> Outcome {
        let body = match d.sub.stream {
            PAYMENT_EVENTS => match Payment::from_fields(&d.fields) {
                Ok(p) => {
                    log::info!(
                        "[Payment consumed] userId: {}   paymentProcessId: {}",
                        p.user_id,
                        p.payment_process_id
                    );
                    json!({
                        "kind": "payment", "stream": PAYMENT_EVENTS, "eventId": d.id,
                        "userId": p.user_id, "productId": p.product_id, "price": p.price,
                        "paymentProcessId": p.payment_process_id, "orderId": p.order_id,
                    })
                }
                Err(e) => return Failure::permanent(e.to_string()),
            },
            _ => match Order::from_fields(&d.fields) {
                Ok(o) => {
                    log::info!(
                        "[Order consumed] userId: {}   productId: {}",
                        o.user_id,
                        o.product_id
                    );
                    json!({
                        "kind": "order", "stream": ORDER_EVENTS, "eventId": d.id,
                        "userId": o.user_id, "productId": o.product_id, "price": o.price,
                    })
                }
                Err(e) => return Failure::permanent(e.to_string()),
            },
        };
        match &self.webhook {
            None => Outcome::Done,
            Some((url, agent)) => post(agent, url, &format!("{}:{}", d.sub.stream, d.id), &body),
        }
    }
}

fn post(agent: &ureq::Agent, url: &str, key: &str, body: &Json) -> Outcome {
    let sent = agent
        .post(url)
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", key)
        .send(body.to_string().as_bytes());
    match sent {
        Ok(r) if r.status().is_success() => Outcome::Done,
        Ok(r) => Failure::transient(format!("webhook answered {}", r.status().as_u16())),
        Err(e) => Failure::transient(format!("webhook failed: {e}")),
    }
}

// One webhook call at a time, reporting progress before each, and none
// started once the batch's time is up or the service stops.
impl EachDelivery for Notifications {
    fn handle_one(&self, delivery: &Delivery) -> Outcome {
        self.notify(delivery)
    }
}

/// Runs notification-service until `shutdown` fires.
pub fn run(config: &Config, shutdown: Receiver<()>) -> Result<(), ServiceError> {
    let consumer = Consumer {
        subscriptions: &[
            Subscription {
                stream: ORDER_EVENTS,
                group: NOTIFICATION_GROUP,
            },
            Subscription {
                stream: PAYMENT_EVENTS,
                group: NOTIFICATION_GROUP,
            },
        ],
        handler: Arc::new(Notifications::new(
            config.webhook_url.clone(),
            config.webhook_timeout,
        )),
        trims: None,
        doing: "notifying",
    };
    run_until(config, shutdown, consumer)
}

//! shipping-service: a fourth service written on the consumer runtime.
//!
//! It reads `payment-events` in a group of its own,
//! `shipping-service-group`, and books a shipment for each paid order by
//! `POST`ing it to a carrier (`CARRIER_URL`), with the header
//! `Idempotency-Key: payment-events:<entry ID>` so a repeated call (a crash
//! after the `POST`, before the acknowledgement) books nothing twice.
//!
//! All it writes is what to do with one payment ([`EachDelivery`], the
//! simple form of `consumer::Handler`); [`consumer::run`] gives it the rest:
//! own pending entries re-read at start, idle entries claimed, a carrier
//! that keeps failing dead-lettered to `payment-events:dlq` after
//! `MAX_DELIVERIES`, a malformed payment at once, a clean stop on SIGTERM,
//! `/healthz`, `/readyz`, `/metrics` and systemd notify.
//!
//! ```text
//! CARRIER_URL=http://127.0.0.1:9000/shipments REDIS_URL=redis://127.0.0.1:6379 \
//!     cargo run --example shipping_service
//! ```

use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use streamline::consumer::{self, Delivery, EachDelivery, Failure, Outcome, Subscription};
use streamline::record::Payment;
use streamline::topology::PAYMENT_EVENTS;

/// What shipping-service reads: every payment, in its own group.
const SUBSCRIPTIONS: &[Subscription] = &[Subscription {
    stream: PAYMENT_EVENTS,
    group: "shipping-service-group",
}];

/// Books a shipment per paid order with the carrier.
struct Shipping {
    carrier_url: String,
    agent: ureq::Agent,
}

impl Shipping {
    fn new(carrier_url: String) -> Shipping {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build()
            .into();
        Shipping { carrier_url, agent }
    }

    fn ship(&self, d: &Delivery) -> Outcome {
        let payment = match Payment::from_fields(&d.fields) {
            Ok(p) => p,
            // Retrying cannot fix a malformed payment: dead-letter it now.
            Err(e) => return Failure::permanent(e.to_string()),
        };
        let body = json!({
            "orderId": payment.order_id,
            "paymentProcessId": payment.payment_process_id,
            "userId": payment.user_id,
            "productId": payment.product_id,
        });
        let sent = self
            .agent
            .post(&self.carrier_url)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", &format!("{PAYMENT_EVENTS}:{}", d.id))
            .send(body.to_string().as_bytes());
        match sent {
            Ok(r) if r.status().is_success() => {
                log::info!("[Payment consumed] shipment booked for payment {}", d.id);
                Outcome::Done
            }
            // Retried after CLAIM_IDLE_MS, dead-lettered after MAX_DELIVERIES.
            Ok(r) => Failure::transient(format!("carrier answered {}", r.status().as_u16())),
            Err(e) => Failure::transient(format!("carrier failed: {e}")),
        }
    }
}

// One carrier call at a time: the runtime starts none once the batch's time
// is up or the service is stopping (those stay pending, uncounted).
impl EachDelivery for Shipping {
    fn handle_one(&self, delivery: &Delivery) -> Outcome {
        self.ship(delivery)
    }
}

fn main() -> ExitCode {
    let Some(carrier_url) = std::env::var("CARRIER_URL").ok().filter(|u| !u.is_empty()) else {
        eprintln!("shipping-service: set CARRIER_URL to the carrier's shipments URL");
        return ExitCode::from(2);
    };
    consumer::run(
        "shipping-service",
        SUBSCRIPTIONS,
        Shipping::new(carrier_url),
    )
}

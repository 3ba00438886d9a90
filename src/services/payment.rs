//! payment-service: pays each order in `order-events` (group
//! `payment-service-group`) and writes one `payment-events` entry for it.
//!
//! # Exactly one payment per order
//!
//! "Write the payment, acknowledge the order" is one Lua script per batch,
//! so it is atomic: either both happened or neither. The script first checks
//! that the order is still pending for the group; an order that is no longer
//! pending has already been paid and acknowledged (by this consumer before a
//! crash, or by another instance that claimed it), so it is skipped. That
//! makes redelivery, claiming and several instances harmless: whoever runs
//! the script first pays, everyone after finds nothing to do.
//!
//! # Never twice for one order, whatever the route
//!
//! "Still pending" only covers one entry. An order can come back as another
//! entry, or be read again after its acknowledgement is lost: a redriven
//! copy (`streamctl dlq redrive`), a group destroyed and recreated at `0`,
//! a failover that brings acknowledgements back as pending. So the same
//! script also keeps [`PAID_KEY`], a hash from order ID (`redrivenFrom` for
//! a redriven copy, else the entry's own ID) to the ID of the
//! `order-events` entry that was paid: `HEXISTS` before paying, `HSET` with
//! the `XADD` of the payment. An order found there is acknowledged and not
//! paid again (outcome `duplicate`).
//!
//! The markers are bounded by the payments: trimming `payment-events`
//! deletes the marker of each payment it removes, and never removes the
//! payment of an order whose entry is still in `order-events` (see
//! [`crate::trim`]), so an order that can still be read is never without
//! its marker. A marker costs about 107 bytes of Redis memory (10.7 MB
//! per 100,000 paid orders, measured on Redis 7.0).
//!
//! `paymentProcessId` comes from `INCR` on [`SEQUENCE_KEY`] inside the same
//! script: unique across restarts and instances (the seed's in-memory
//! counter restarted at 0), as durable as the streams themselves.

use std::sync::Arc;

use crossbeam_channel::Receiver;
use redis::{Cmd, Connection, FromRedisValue, RedisError, Script, Value};

use super::ServiceError;
use crate::config::Config;
use crate::consumer::{
    run_until, Consumer, Delivery, Failure, Handler, Outcome, Pipelined, Progress, Subscription,
};
use crate::record::Order;
use crate::topology::{ORDER_EVENTS, PAYMENT_EVENTS, PAYMENT_GROUP};

/// The counter `paymentProcessId`s are drawn from.
pub const SEQUENCE_KEY: &str = "payment-service:payment-process-id";

/// The paid orders: a hash from order ID to the `order-events` entry paid.
pub const PAID_KEY: &str = "payment-service:paid";

/// KEYS: order-events, payment-events, sequence, paid markers. ARGV[1]:
/// group; then per order: entry id, order id, userId, productId, price.
/// Returns per order the payment's entry ID, false if the entry was no
/// longer pending (paid through it already), or 0 if the order was paid
/// through another entry (acknowledged, not paid again).
const PAY: &str = r#"
local out = {}
for i = 2, #ARGV, 5 do
  local id, order = ARGV[i], ARGV[i + 1]
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #pending == 0 then
    out[#out + 1] = false
  elseif redis.call('HEXISTS', KEYS[4], order) == 1 then
    redis.call('XACK', KEYS[1], ARGV[1], id)
    out[#out + 1] = 0
  else
    local seq = redis.call('INCR', KEYS[3])
    out[#out + 1] = redis.call('XADD', KEYS[2], '*',
      'userId', ARGV[i + 2], 'productId', ARGV[i + 3], 'price', ARGV[i + 4],
      'paymentProcessId', tostring(seq), 'orderId', order)
    redis.call('HSET', KEYS[4], order, id)
    redis.call('XACK', KEYS[1], ARGV[1], id)
  end
end
return out
"#;

/// Pays orders.
pub struct Payments {
    script: Script,
}

impl Default for Payments {
    fn default() -> Self {
        Payments {
            script: Script::new(PAY),
        }
    }
}

impl Payments {
    /// Each delivery's order, or why it is not one.
    fn orders(batch: &[Delivery]) -> Vec<Result<Order, String>> {
        batch
            .iter()
            .map(|d| Order::from_fields(&d.fields).map_err(|e| e.to_string()))
            .collect()
    }
}

impl Handler for Payments {
    fn handle(
        &self,
        conn: &mut Connection,
        batch: &[Delivery],
        _progress: &Progress<'_>,
    ) -> Result<Vec<Outcome>, RedisError> {
        self.handle_at_once(conn, batch)
    }

    fn pipelined(&self) -> Option<&dyn Pipelined> {
        Some(self)
    }
}

impl Pipelined for Payments {
    fn script(&self) -> &Script {
        &self.script
    }

    /// One `EVALSHA` of the `PAY` script for the valid orders of `batch`.
    fn command(&self, batch: &[Delivery]) -> Option<Cmd> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash())
            .arg(4)
            .arg(ORDER_EVENTS)
            .arg(PAYMENT_EVENTS)
            .arg(SEQUENCE_KEY)
            .arg(PAID_KEY)
            .arg(PAYMENT_GROUP);
        let mut valid = 0;
        for (d, order) in batch.iter().zip(Self::orders(batch)) {
            if let Ok(o) = order {
                cmd.arg(&d.id)
                    .arg(crate::dlq::redriven_from(&d.fields).unwrap_or_else(|| d.id.clone()))
                    .arg(&o.user_id)
                    .arg(&o.product_id)
                    .arg(&o.price);
                valid += 1;
            }
        }
        (valid > 0).then_some(cmd)
    }

    fn outcomes(
        &self,
        batch: &[Delivery],
        reply: Option<Value>,
    ) -> Result<Vec<Outcome>, RedisError> {
        let orders = Self::orders(batch);
        let mut paid = match reply {
            Some(reply) => Vec::<Value>::from_redis_value(reply)?.into_iter(),
            None => Vec::new().into_iter(),
        };
        let mut outcomes = Vec::with_capacity(batch.len());
        for (d, order) in batch.iter().zip(orders) {
            outcomes.push(match order {
                Err(why) => Failure::permanent(why),
                Ok(o) => match paid.next() {
                    Some(Value::Nil) | None => {
                        log::debug!("order {} was already paid", d.id);
                        Outcome::DoneAndAcked
                    }
                    Some(Value::Int(_)) => {
                        log::warn!(
                            "order {} was paid before; entry {} acknowledged, not paid again",
                            crate::dlq::redriven_from(&d.fields).unwrap_or_else(|| d.id.clone()),
                            d.id
                        );
                        Outcome::Duplicate
                    }
                    Some(v) => {
                        log::info!(
                            "[Order consumed] Created payment {} for order {} (userId {}, price {})",
                            crate::value::as_string(&v).unwrap_or_default(),
                            d.id,
                            o.user_id,
                            o.price
                        );
                        Outcome::DoneAndAcked
                    }
                },
            });
        }
        Ok(outcomes)
    }
}

/// Runs payment-service until `shutdown` fires.
pub fn run(config: &Config, shutdown: Receiver<()>) -> Result<(), ServiceError> {
    let consumer = Consumer {
        subscriptions: &[Subscription {
            stream: ORDER_EVENTS,
            group: PAYMENT_GROUP,
        }],
        handler: Arc::new(Payments::default()),
        trims: Some(PAYMENT_EVENTS),
        doing: "paying orders",
    };
    run_until(config, shutdown, consumer)
}

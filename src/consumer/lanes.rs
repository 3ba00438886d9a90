//! Lanes: one bounded channel per handler thread, and which lane an entry
//! takes.
//!
//! **Ordering** (`CONTRACT.md`): the entries of one `userId` are handled in
//! the order they were written. Handler threads work in parallel, so the
//! entries of one user must never be in two of them at once: every entry
//! with the same `userId` takes the same lane, and so the same thread,
//! which handles its batches one after the other, each in stream order.
//! Readers put entries on the lanes in the order Redis returned them (the
//! stream's order), so a lane holds each user's entries in that order.
//! Different users still spread over the threads.
//!
//! An entry without `userId` (malformed, or a stream of your own without
//! one) is routed by its entry ID: spread, in no particular order.
//! What the contract allows out of order is an entry retried after a
//! failure: it comes back through a claim, after later ones.
//!
//! The price of ordering: a lane whose thread is slow (a slow webhook for
//! one user's entry) fills up, and a reader that must put an entry on a
//! full lane waits, as it waited for the one shared channel before.

use std::time::Duration;

use crossbeam_channel::{Receiver, SendTimeoutError, Sender};

use super::Delivery;

/// The field whose value keeps entries in order.
const ORDERING_FIELD: &str = "userId";

/// The sending side of every lane; each reader holds a clone.
#[derive(Clone)]
pub(super) struct Lanes {
    lanes: Vec<Sender<Delivery>>,
}

impl Lanes {
    /// `n` lanes (at least one) of `capacity` entries each, and their
    /// receiving sides, one per handler thread.
    pub(super) fn new(n: usize, capacity: usize) -> (Lanes, Vec<Receiver<Delivery>>) {
        let (lanes, receivers) = (0..n.max(1))
            .map(|_| crossbeam_channel::bounded(capacity.max(1)))
            .unzip();
        (Lanes { lanes }, receivers)
    }

    /// Puts `delivery` on its lane, waiting at most `timeout` for room.
    pub(super) fn send_timeout(
        &self,
        delivery: Delivery,
        timeout: Duration,
    ) -> Result<(), SendTimeoutError<Delivery>> {
        let lane = lane_of(&delivery, self.lanes.len());
        self.lanes[lane].send_timeout(delivery, timeout)
    }

    /// Whether every lane is at most half full: the handlers keep up.
    pub(super) fn keep_up(&self) -> bool {
        self.lanes
            .iter()
            .all(|l| l.len() <= l.capacity().unwrap_or(0) / 2)
    }
}

/// The lane (of `n`) that `delivery` takes: by its `userId`, else by its
/// entry ID.
fn lane_of(delivery: &Delivery, n: usize) -> usize {
    let key = delivery
        .fields
        .get(ORDERING_FIELD)
        .unwrap_or(delivery.id.as_bytes());
    (fnv1a(key) % n as u64) as usize
}

/// FNV-1a, 64 bits: short, stable and spreads short keys well.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::{Fields, Subscription};

    fn delivery(id: &str, user: Option<&str>) -> Delivery {
        let fields = user
            .map(|u| vec![(b"userId".to_vec(), u.as_bytes().to_vec())])
            .unwrap_or_default();
        Delivery {
            sub: Subscription {
                stream: "order-events",
                group: "g",
            },
            id: id.into(),
            fields: Fields(fields),
            redelivered: false,
        }
    }

    #[test]
    fn the_entries_of_one_user_take_one_lane_in_order() {
        let (lanes, receivers) = Lanes::new(4, 100);
        for i in 0..20 {
            for user in ["alice", "bob", "carol", "dave", "erin"] {
                let d = delivery(&format!("{i}-0"), Some(user));
                lanes.send_timeout(d, Duration::ZERO).unwrap();
            }
        }
        let mut lanes_used = 0;
        for rx in &receivers {
            let got: Vec<Delivery> = rx.try_iter().collect();
            lanes_used += usize::from(!got.is_empty());
            for user in ["alice", "bob", "carol", "dave", "erin"] {
                let ids: Vec<&str> = got
                    .iter()
                    .filter(|d| d.fields.get("userId") == Some(user.as_bytes()))
                    .map(|d| d.id.as_str())
                    .collect();
                assert!(ids.is_empty() || ids.len() == 20, "{user} split over lanes");
                let expected: Vec<String> = (0..ids.len()).map(|i| format!("{i}-0")).collect();
                assert_eq!(ids, expected, "{user} out of order");
            }
        }
        assert!(lanes_used > 1, "five users all on one lane of four");
    }

    #[test]
    fn entries_without_a_user_spread_over_the_lanes() {
        let (lanes, receivers) = Lanes::new(2, 100);
        for i in 0..50 {
            lanes
                .send_timeout(delivery(&format!("{i}-0"), None), Duration::ZERO)
                .unwrap();
        }
        assert!(receivers.iter().all(|rx| !rx.is_empty()));
    }
}

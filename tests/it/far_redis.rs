//! Redis a WAN link away (issue 14): an order costs one round trip to
//! Redis, however many orders are already on their way, and the consumers
//! follow the stream without waiting for each read to cross the link.
//!
//! Redis sits behind the load tool's delay proxy (this kernel has no
//! `netem`), with a round trip long enough (400 ms) that a loaded CI
//! machine's scheduling noise is small beside it.

use std::time::{Duration, Instant};

use crate::support::flow::start_ready;
use crate::support::{order_path, wait_for, RedisServer};

#[path = "../../benches/load/delay.rs"]
#[allow(dead_code)]
mod delay;

const RTT: Duration = Duration::from_millis(400);

fn far_url(redis: &RedisServer) -> (delay::DelayProxy, String) {
    let upstream = format!("127.0.0.1:{}", redis.port())
        .parse()
        .expect("an address");
    let proxy = delay::DelayProxy::start(upstream, RTT).expect("the delay proxy starts");
    let url = format!("redis://{}", proxy.addr);
    (proxy, url)
}

#[test]
fn orders_sent_while_others_are_on_their_way_each_wait_one_round_trip() {
    let redis = RedisServer::start();
    let (_proxy, url) = far_url(&redis);
    let order = start_ready("order-service", &redis, &[("REDIS_URL", &url)]);
    // Connected and warm: the first order opens the connection.
    wait_for(
        "a first order through the far link",
        Duration::from_secs(20),
        || (order.get(&order_path("warm", "p", "1")).status == 200).then_some(()),
    );

    // Eight clients, one order each, 50 ms apart: when the third starts,
    // two batches are already on their way. With two connections each
    // waiting for its reply (before issue 14), it waited for one of them
    // to come back first: nearly two round trips.
    let started = Instant::now();
    let took: Vec<(usize, Duration, u16)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let order = &order;
                s.spawn(move || {
                    let start_at = started + Duration::from_millis(50 * i as u64);
                    std::thread::sleep(start_at.saturating_duration_since(Instant::now()));
                    let sent = Instant::now();
                    let status = order.get(&order_path(&format!("far-{i}"), "p", "1")).status;
                    (i, sent.elapsed(), status)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a client thread"))
            .collect()
    });
    for (i, elapsed, status) in &took {
        assert_eq!(*status, 200, "order {i} was answered {status}");
        // One round trip, plus room for a loaded machine; two would be 800.
        assert!(
            *elapsed < RTT * 3 / 2,
            "order {i} took {elapsed:?} with Redis {RTT:?} away: it waited for \
             earlier batches, not only for its own round trip (all: {took:?})"
        );
    }
}

//! High availability (issue 15): the services point at three sentinels
//! instead of a Redis host, follow a failover by themselves, and with
//! `REDIS_WAIT_REPLICAS` lose no order they answered `2xx`.
//!
//! Real processes only: a master, two replicas and three sentinels
//! (`down-after-milliseconds 1000`), the three services, HTTP clients.

use std::time::{Duration, Instant};

use crate::support::flow::{
    self, describe_groups, drained, ms, readyz, xrange, Ledger, Load, Metrics, ALL_GROUPS,
    ORDER_EVENTS, PAYMENT_EVENTS,
};
use crate::support::sentinel::{
    data_node, info_field, replica_of, role, SentinelSetup, MASTER_NAME,
};
use crate::support::{order_path, run_to_exit, wait_for, wait_until, RedisServer, Service};

/// Orders must flow again this soon after the master is killed (the
/// issue's bound; Sentinel itself needs about 2.3 s to name a new master).
const BACK_WITHIN: Duration = Duration::from_secs(5);

fn spawn_ready(name: &str, env: &[(&str, &str)]) -> Service {
    let mut svc = Service::spawn_env(name, env, &[]);
    svc.wait_ready();
    svc.wait_readyz();
    svc
}

fn wait_in_sync(replica: &RedisServer) {
    wait_until(
        "the replica is in sync with its master",
        flow::DEADLINE,
        || info_field(replica, "master_link_status").as_deref() == Some("up"),
    );
}

/// `GET /readyz`'s `master`, if it answers 200 with one.
fn ready_master(svc: &Service) -> Option<String> {
    let r = svc.get("/readyz");
    (r.status == 200)
        .then(|| r.json_str("master").map(str::to_string))
        .flatten()
}

#[test]
fn a_killed_master_is_followed_and_no_acknowledged_order_is_lost() {
    let mut setup = SentinelSetup::start();
    let url = setup.url();
    let env = flow::env(&[
        ("REDIS_URL", url.as_str()),
        ("REDIS_WAIT_REPLICAS", "1"),
        ("CLAIM_IDLE_MS", "1000"),
    ]);
    let order = spawn_ready("order-service", &env);
    let payment = spawn_ready("payment-service", &env);
    let notification = spawn_ready("notification-service", &env);

    let first = setup.master_port();
    for svc in [&order, &payment, &notification] {
        let r = svc.get("/readyz");
        svc.check(
            r.status == 200
                && r.json_str("master") == Some(format!("127.0.0.1:{first}").as_str())
                && r.json_str("sentinelMaster") == Some(MASTER_NAME),
            || format!("/readyz should name the master 127.0.0.1:{first}: {r}"),
        );
    }

    // A steady stream of orders, then the master dies.
    let load = Load::start(&order, "ha", 4);
    let started = Instant::now();
    wait_until("orders flow before the kill", flow::DEADLINE, || {
        load.ok_since(started) >= 200
    });
    setup.node_mut(first).kill();
    let killed = Instant::now();

    // Orders flow again, without restarting anything.
    let back = wait_for(
        "an order sent after the kill is accepted",
        Duration::from_secs(20),
        || {
            load.placed()
                .iter()
                .filter(|p| p.ok() && p.sent >= killed)
                .map(|p| p.sent + p.elapsed)
                .min()
        },
    );
    let recovered = back.duration_since(killed);
    let second = setup.wait_new_master(first, Duration::from_secs(10));
    eprintln!(
        "failover: orders accepted again {} ms after the master was killed (new master :{second})",
        ms(recovered)
    );
    assert!(
        recovered < BACK_WITHIN,
        "orders flowed again only {} ms after the kill (bound {} ms)",
        ms(recovered),
        ms(BACK_WITHIN)
    );
    for svc in [&order, &payment, &notification] {
        wait_until(
            &format!("{} names the new master in /readyz", svc.name()),
            Duration::from_secs(10),
            || ready_master(svc).as_deref() == Some(format!("127.0.0.1:{second}").as_str()),
        );
        let failovers = Metrics::of(svc).sum("redis_failovers_total", &[]);
        svc.check(failovers >= 1.0, || {
            format!("redis_failovers_total is {failovers} after a failover")
        });
    }

    // The old master comes back, as a replica of the new one: nothing
    // changes for the services.
    let calm_from = back + Duration::from_secs(1);
    setup.node_mut(first).start_again();
    setup.wait_role(first, "slave", Duration::from_secs(30));
    let converted = Instant::now();
    wait_until(
        "orders flow after the old master's return",
        flow::DEADLINE,
        || load.ok_since(converted) >= 100,
    );
    let placed = load.stop();
    // On a loaded host the sentinels may fail over a second time while the
    // returning node takes its full resync (the new master stalls past
    // down-after-milliseconds in the fork): that is Sentinel's call, not a
    // change the old master's return made through the services. The
    // services must then follow it too; the calm-period check no longer
    // applies, every other check is made on the master in the end.
    let last = setup.master_port();
    let again = last != second;
    if again {
        eprintln!("failover: the sentinels failed over again, to :{last}; following that master");
        for svc in [&order, &payment, &notification] {
            wait_until(
                &format!("{} follows the second failover", svc.name()),
                flow::DEADLINE,
                || ready_master(svc).as_deref() == Some(format!("127.0.0.1:{last}").as_str()),
            );
        }
    }
    let failed_after: Vec<_> = placed
        .iter()
        .filter(|p| !p.ok() && p.sent >= calm_from)
        .collect();
    let accepted = accepted_ids(&placed);
    eprintln!(
        "failover: {} orders accepted, {} refused ({} of them sent more than 1 s after the recovery)",
        accepted.len(),
        placed.len() - accepted.len(),
        failed_after.len()
    );
    assert!(
        again || failed_after.is_empty(),
        "orders failed long after the failover (first 5): {:?}",
        &failed_after[..failed_after.len().min(5)]
    );
    assert_eq!(role(setup.node(last)).as_deref(), Some("master"));
    if !again {
        assert_eq!(
            setup.master_port(),
            second,
            "the old master's return moved the master"
        );
    }

    // Every group drains on the new master; every accepted order is there
    // and paid exactly once.
    let mut conn = setup.node(last).conn();
    wait_until(
        "every group drains on the new master",
        flow::DEADLINE,
        || ALL_GROUPS.iter().all(|(s, g)| drained(&mut conn, s, g)),
    );
    let orders = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    let payments = xrange(&mut conn, PAYMENT_EVENTS, "-", "+");
    let lost = missing_from(&accepted, &orders);
    eprintln!(
        "failover with REDIS_WAIT_REPLICAS=1: {} accepted orders lost, {} orders and {} payments on the new master",
        lost.len(),
        orders.len(),
        payments.len()
    );
    assert!(
        lost.is_empty(),
        "{} orders answered 2xx are not on the new master (first 5: {:?})",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let ledger = Ledger::of(&orders, &payments);
    assert!(
        ledger.exactly_once(),
        "{ledger}\n{}",
        describe_groups(&mut conn)
    );

    // streamctl finds the master through the sentinels too.
    let status = run_to_exit(
        "streamctl",
        &[("REDIS_URL", url.as_str())],
        &["status"],
        Duration::from_secs(20),
    );
    assert!(
        status.status.success()
            && status
                .stdout
                .contains(&format!("Master {MASTER_NAME} at 127.0.0.1:{last}")),
        "{status}"
    );
}

/// What a manual failover under load did.
struct Switched {
    accepted: usize,
    refused: usize,
    lost: usize,
}

/// `SENTINEL FAILOVER` under a steady stream of orders: the old master
/// stays up and keeps taking writes until the sentinels demote it, which
/// is when asynchronous replication loses what it took meanwhile.
fn manual_failover_under_load(wait_replicas: &str) -> Switched {
    let setup = SentinelSetup::start();
    let url = setup.url();
    let env = flow::env(&[
        ("REDIS_URL", url.as_str()),
        ("REDIS_WAIT_REPLICAS", wait_replicas),
        ("CLAIM_IDLE_MS", "1000"),
    ]);
    let order = spawn_ready("order-service", &env);
    let payment = spawn_ready("payment-service", &env);
    let first = setup.master_port();
    let load = Load::start(&order, "switch", 4);
    let started = Instant::now();
    wait_until("orders flow before the failover", flow::DEADLINE, || {
        load.ok_since(started) >= 200
    });
    let reply = setup.sentinels[0].query(&["SENTINEL", "FAILOVER", MASTER_NAME]);
    assert!(reply.is_some(), "SENTINEL FAILOVER was refused");
    let second = setup.wait_new_master(first, Duration::from_secs(15));
    let switched = Instant::now();
    wait_until("orders flow on the new master", flow::DEADLINE, || {
        load.ok_since(switched) >= 200
    });
    let placed = load.stop();
    let mut conn = setup.node(second).conn();
    wait_until(
        "payments catch up on the new master",
        flow::DEADLINE,
        || drained(&mut conn, ORDER_EVENTS, flow::PAYMENT_GROUP),
    );
    let orders = xrange(&mut conn, ORDER_EVENTS, "-", "+");
    let payments = xrange(&mut conn, PAYMENT_EVENTS, "-", "+");
    let ledger = Ledger::of(&orders, &payments);
    assert!(
        ledger.exactly_once(),
        "{ledger}\n{}",
        describe_groups(&mut conn)
    );
    let accepted = accepted_ids(&placed);
    let lost = missing_from(&accepted, &orders).len();
    if lost > 0 {
        eprintln!("--- order-service log ---\n{}", order.log());
        setup.dump_logs();
    }
    drop(payment);
    Switched {
        accepted: accepted.len(),
        refused: placed.len() - accepted.len(),
        lost,
    }
}

#[test]
fn a_manual_failover_with_wait_loses_no_acknowledged_order() {
    let s = manual_failover_under_load("1");
    eprintln!(
        "manual failover, REDIS_WAIT_REPLICAS=1: {} accepted, {} refused, {} accepted orders lost",
        s.accepted, s.refused, s.lost
    );
    assert_eq!(s.lost, 0, "orders answered 2xx were lost in the failover");
}

/// The same without `WAIT`: what asynchronous replication loses. A
/// measurement for the README, not a promise: `cargo test --test it
/// sentinel::measure -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_what_a_manual_failover_loses_without_wait() {
    let s = manual_failover_under_load("0");
    eprintln!(
        "manual failover, REDIS_WAIT_REPLICAS=0: {} accepted, {} refused, {} accepted orders lost",
        s.accepted, s.refused, s.lost
    );
}

/// The master crashes 500 ms after it lost its replicas (frozen with
/// SIGSTOP, their connections closed: a cut link, or replicas too slow to
/// keep up): what the master acknowledged in those 500 ms exists nowhere
/// else. A measurement for the
/// README: `cargo test --test it sentinel::measure -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_what_a_crash_with_lagging_replicas_loses() {
    for wait in ["0", "1"] {
        let mut setup = SentinelSetup::start();
        let url = setup.url();
        let env = flow::env(&[("REDIS_URL", url.as_str()), ("REDIS_WAIT_REPLICAS", wait)]);
        let order = spawn_ready("order-service", &env);
        let first = setup.master_port();
        let replicas: Vec<u16> = setup
            .nodes
            .iter()
            .map(RedisServer::port)
            .filter(|p| *p != first)
            .collect();
        let load = Load::start(&order, "lag", 4);
        let started = Instant::now();
        wait_until("orders flow", flow::DEADLINE, || {
            load.ok_since(started) >= 200
        });
        for p in &replicas {
            setup.node(*p).pause();
        }
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("replica")
            .query(&mut setup.node(first).conn())
            .expect("CLIENT KILL TYPE replica");
        let paused = Instant::now();
        wait_until("500 ms pass", Duration::from_secs(5), || {
            paused.elapsed() >= Duration::from_millis(500)
        });
        setup.node_mut(first).kill();
        for p in &replicas {
            setup.node(*p).resume();
        }
        let second = setup.wait_new_master(first, Duration::from_secs(20));
        let back = Instant::now();
        wait_until("orders flow on the new master", flow::DEADLINE, || {
            load.ok_since(back) >= 100
        });
        let placed = load.stop();
        let mut conn = setup.node(second).conn();
        let orders = xrange(&mut conn, ORDER_EVENTS, "-", "+");
        let accepted = accepted_ids(&placed);
        let lost = missing_from(&accepted, &orders).len();
        eprintln!(
            "crash 500 ms after the replicas were cut off, REDIS_WAIT_REPLICAS={wait}: {} accepted, {} refused, {lost} accepted orders lost",
            accepted.len(),
            placed.len() - accepted.len()
        );
    }
}

#[test]
fn without_any_sentinel_orders_are_refused_until_one_is_back() {
    let mut setup = SentinelSetup::start();
    let url = setup.url();
    let env = flow::env(&[("REDIS_URL", url.as_str())]);
    let order = spawn_ready("order-service", &env);
    let path = order_path("u1", "p1", "10");
    order.expect_status(&order.get(&path), 200);

    // The sentinels die; the master still answers, and so do we.
    let master = setup.master_port();
    setup.kill_sentinels();
    order.expect_status(&order.get(&path), 200);

    // Then the connections to the master drop: without a sentinel to
    // vouch for an address, nothing is written anywhere.
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query(&mut setup.node(master).conn())
        .expect("CLIENT KILL TYPE normal");
    wait_until(
        "/readyz says 503 without sentinels",
        Duration::from_secs(10),
        || readyz(&order) == 503,
    );
    let r = order.get("/readyz");
    order.check(r.body.contains("sentinel"), || {
        format!("/readyz should say the sentinels are missing: {r}")
    });
    let refused = order.get(&path);
    order.expect_status(&refused, 503);
    order.check(refused.elapsed < Duration::from_secs(2), || {
        format!("a 503 must come within REQUEST_TIMEOUT_MS: {refused}")
    });

    // The sentinels come back: orders are accepted again by themselves.
    setup.start_sentinels();
    let back = Instant::now();
    wait_until(
        "an order is accepted again",
        Duration::from_secs(15),
        || order.get(&path).status == 200,
    );
    eprintln!(
        "sentinels back: orders accepted again after {} ms",
        ms(back.elapsed())
    );
    wait_until("/readyz says 200 again", Duration::from_secs(5), || {
        readyz(&order) == 200
    });
}

#[test]
fn a_wait_that_cannot_be_satisfied_is_a_quick_503_and_holds_acknowledgements() {
    // A master with one replica, and services that want two.
    let master = data_node().start();
    let replica = replica_of(master.port());
    wait_in_sync(&replica);
    let url = master.url();
    let order = spawn_ready(
        "order-service",
        &[
            ("REDIS_URL", url.as_str()),
            ("REDIS_WAIT_REPLICAS", "2"),
            // Longer than the request timeout: the wait is cut to fit.
            ("REDIS_WAIT_TIMEOUT_MS", "10000"),
            ("REQUEST_TIMEOUT_MS", "1000"),
        ],
    );
    let refused = order.get(&order_path("u1", "p1", "10"));
    order.expect_status(&refused, 503);
    eprintln!(
        "REDIS_WAIT_REPLICAS=2 with one replica: 503 after {} ms",
        ms(refused.elapsed)
    );
    order.check(
        refused.elapsed < Duration::from_millis(1000)
            && refused.body.contains("REDIS_WAIT_REPLICAS"),
        || {
            format!(
                "expected a 503 naming REDIS_WAIT_REPLICAS within REQUEST_TIMEOUT_MS: {refused}"
            )
        },
    );

    // What one replica can confirm is answered 200.
    let satisfied = spawn_ready(
        "order-service",
        &[("REDIS_URL", url.as_str()), ("REDIS_WAIT_REPLICAS", "1")],
    );
    satisfied.expect_status(&satisfied.get(&order_path("u2", "p1", "10")), 200);

    // A consumer that wants two replicas handles the entries but holds
    // their acknowledgement until a second replica confirms it; waiting
    // is not a failed delivery.
    let notification = spawn_ready(
        "notification-service",
        &flow::env(&[
            ("REDIS_URL", url.as_str()),
            ("REDIS_WAIT_REPLICAS", "2"),
            ("REDIS_WAIT_TIMEOUT_MS", "200"),
            ("MAX_DELIVERIES", "1"),
        ]),
    );
    let mut conn = master.conn();
    wait_until(
        "the orders are delivered to the notifications",
        flow::DEADLINE,
        || flow::unread(&mut conn, ORDER_EVENTS, flow::NOTIFICATION_GROUP) == Some(0),
    );
    wait_until("a WAIT is not confirmed", flow::DEADLINE, || {
        Metrics::of(&notification).sum("redis_wait_unconfirmed_total", &[]) >= 1.0
    });
    let (held, _) = flow::pending(&mut conn, ORDER_EVENTS, flow::NOTIFICATION_GROUP);
    assert_eq!(held, 2, "{}", describe_groups(&mut conn));
    let second_replica = replica_of(master.port());
    wait_in_sync(&second_replica);
    wait_until("the notifications are acknowledged", flow::DEADLINE, || {
        drained(&mut conn, ORDER_EVENTS, flow::NOTIFICATION_GROUP)
    });
    assert_eq!(flow::xlen(&mut conn, flow::ORDER_DLQ), 0);
    drop(notification);
}

/// The order IDs answered 2xx.
fn accepted_ids(placed: &[flow::Placed]) -> Vec<&str> {
    placed
        .iter()
        .filter_map(|p| p.order_id.as_deref().filter(|_| p.ok()))
        .collect()
}

/// Those of `accepted` that are not among `orders` (lost in a failover).
fn missing_from<'a>(accepted: &[&'a str], orders: &[flow::RawEntry]) -> Vec<&'a str> {
    let on_master: std::collections::HashSet<&str> = orders.iter().map(|o| o.id.as_str()).collect();
    accepted
        .iter()
        .copied()
        .filter(|id| !on_master.contains(id))
        .collect()
}

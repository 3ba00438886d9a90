//! What an operator reads when something is wrong: the exact lines the
//! library's errors print (a service prints them after its name and exits
//! 1; order-service answers a bad `Idempotency-Key` with them in a `400`).
//! Scripts and runbooks match on these lines, so they stay word for word.

use std::net::TcpListener;
use std::time::Duration;

use streamline::config::{self, Command, Config, Service};
use streamline::connection::Redis;
use streamline::idempotency::{self, check_key};

use crate::support::flow::{readyz, start_ready};
use crate::support::{wait_until, RedisServer};

const KEY_RULE: &str = "it must be 1 to 255 visible ASCII characters (0x21-0x7E)";

fn config_error(args: &[&str], env: &[(&str, &str)]) -> String {
    let args = args.iter().map(|a| a.to_string());
    let env = |var: &str| {
        env.iter()
            .find(|(k, _)| *k == var)
            .map(|(_, v)| v.to_string())
    };
    match config::parse(Service::Order, args, env) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("expected a configuration error"),
    }
}

fn order_config(env: &[(&str, &str)]) -> Config {
    let env = |var: &str| {
        env.iter()
            .find(|(k, _)| *k == var)
            .map(|(_, v)| v.to_string())
    };
    match config::parse(Service::Order, Vec::<String>::new(), env) {
        Ok(Command::Run(config)) => *config,
        other => panic!("expected a configuration, got {other:?}"),
    }
}

#[test]
fn a_wrong_command_line_is_named_in_one_line() {
    assert_eq!(
        config_error(&["--nope=1"], &[]),
        r#"unknown option "--nope" (see --help)"#
    );
    assert_eq!(
        config_error(&["nope"], &[]),
        r#"unknown option "nope" (see --help)"#
    );
    assert_eq!(
        config_error(&["--max-deliveries"], &[]),
        "option --max-deliveries needs a value"
    );
    assert!(
        config_error(&[], &[("HTTP_ADDR", "nope")]).starts_with(r#"invalid HTTP_ADDR "nope": "#)
    );
}

#[test]
fn a_sentinel_url_that_does_not_parse_says_what_is_wrong() {
    // Through the configuration (credentials hidden) ...
    assert_eq!(
        config_error(&[], &[("REDIS_URL", "redis+sentinel://app:pw@s1:1/")]),
        r#"invalid REDIS_URL "redis+sentinel://app:***@s1:1/": no master name: expected .../<master name>[/db] after the sentinels"#
    );
    // ... and straight to the client.
    let open = |url: &str| Redis::open(url, None).err().expect("an error").to_string();
    assert_eq!(
        open("redis+sentinel://s1:x/m"),
        r#"invalid REDIS_URL: sentinel address "s1:x": bad port "x""#
    );
    assert_eq!(
        open("redis+sentinel://[::1/m"),
        r#"invalid REDIS_URL: sentinel address "[::1": missing ']'"#
    );
    assert_eq!(
        open("redis+sentinel://s1,,s2/m"),
        "invalid REDIS_URL: empty sentinel address (expected host:port[,host:port...])"
    );
    assert_eq!(
        open("redis+sentinel://s1/m/x"),
        r#"invalid REDIS_URL: database "x" is not a number"#
    );
    assert_eq!(
        open("redis+sentinel://:1/m"),
        r#"invalid REDIS_URL: sentinel address ":1" has no host"#
    );
    assert_eq!(
        open("redis+sentinel://[::1]x/m"),
        r#"invalid REDIS_URL: sentinel address "[::1]x": expected [v6]:port"#
    );
    assert_eq!(
        open("redis+sentinel://s1/m x"),
        r#"invalid REDIS_URL: master name "m x" has spaces or control characters"#
    );
    assert_eq!(
        open("redis+sentinel://s1/m?db=1"),
        "invalid REDIS_URL: query parameters are not supported in a sentinel URL"
    );
    assert_eq!(
        open("redis+sentinel://s1/m/1/2"),
        "invalid REDIS_URL: expected .../<master name>[/db], found more path segments"
    );
}

#[test]
fn a_missing_ca_certificate_is_named_with_its_path() {
    let dir = std::env::temp_dir().join(format!("streamline-no-ca-{}", std::process::id()));
    let path = dir.join("ca.pem");
    let e = Redis::open("rediss://127.0.0.1:1", Some(&path))
        .err()
        .expect("an error");
    let os = std::io::Error::from_raw_os_error(libc::ENOENT);
    assert_eq!(
        e.to_string(),
        format!("cannot read REDIS_CA_CERT {}: {os}", path.display())
    );
}

#[test]
fn a_taken_http_address_is_what_the_service_exits_with() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    // A Redis nobody listens on: the service must fail before it connects.
    let config = order_config(&[("HTTP_ADDR", &addr), ("REDIS_URL", "redis://127.0.0.1:1")]);
    let (_stop, shutdown) = crossbeam_channel::bounded::<()>(0);
    let e = streamline::services::order::run(&config, shutdown).unwrap_err();
    let os = std::io::Error::from_raw_os_error(libc::EADDRINUSE);
    assert_eq!(
        e.to_string(),
        format!("cannot listen on HTTP_ADDR {addr}: {os}")
    );
}

#[test]
fn a_bad_idempotency_key_is_explained() {
    let says = |key: &str| check_key(key).unwrap_err().to_string();
    assert_eq!(says(""), format!("Idempotency-Key is empty: {KEY_RULE}"));
    assert_eq!(
        says("a b"),
        format!("Idempotency-Key contains a space at position 2: {KEY_RULE}")
    );
    assert_eq!(
        says("a\tb"),
        format!("Idempotency-Key contains a tab at position 2: {KEY_RULE}")
    );
    assert_eq!(
        says("ab\u{7f}"),
        format!("Idempotency-Key contains control character 0x7F at position 3: {KEY_RULE}")
    );
    assert_eq!(
        says("clé"),
        format!("Idempotency-Key contains the non-ASCII character 'é' at position 3: {KEY_RULE}")
    );
    assert_eq!(
        says(&"k".repeat(256)),
        format!("Idempotency-Key is 256 characters long: {KEY_RULE}")
    );
    let h = |v: &str| tiny_http::Header::from_bytes("Idempotency-Key", v).unwrap();
    assert_eq!(
        idempotency::key_of(&[h("k1"), h("k2")])
            .unwrap_err()
            .to_string(),
        "Idempotency-Key is given more than once"
    );
}

#[test]
fn readyz_says_redis_is_unavailable_when_it_is() {
    let mut redis = RedisServer::start();
    let order = start_ready("order-service", &redis, &[]);
    redis.kill();
    wait_until(
        "/readyz says 503 while Redis is down",
        Duration::from_secs(10),
        || readyz(&order) == 503,
    );
    let r = order.get("/readyz");
    order.check(r.json_str("status") == Some("not ready"), || format!("{r}"));
    // What follows is the client's own text (connection refused, ...).
    let error = r.json_str("error").unwrap_or_default();
    order.check(error.starts_with("Redis unavailable: "), || format!("{r}"));
}

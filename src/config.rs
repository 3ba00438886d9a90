//! Configuration: parsed once, at start, into a typed [`Config`].
//!
//! Every setting is an environment variable (systemd `EnvironmentFile=`
//! friendly) that a command-line flag may override: `HTTP_ADDR` is also
//! `--http-addr VALUE` or `--http-addr=VALUE`. All defaults live in
//! [`SETTINGS`], the one table `--help` is printed from too.
//!
//! Parsing reads the environment through a lookup function, so tests pass a
//! map instead of touching the process-global environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use redis::IntoConnectionInfo;

/// Which of the three services a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Takes orders over HTTP and writes them to `order-events`.
    Order,
    /// Pays each order and writes `payment-events`.
    Payment,
    /// Notifies about each order and each payment.
    Notification,
    /// A consumer service of your own, built on [`crate::consumer::run`]
    /// (see `examples/shipping_service.rs`), by its name. It reads the
    /// settings payment-service and notification-service share.
    Consumer(&'static str),
}

impl Service {
    /// The binary's name, used in messages and the default consumer name.
    pub fn name(self) -> &'static str {
        match self {
            Service::Order => "order-service",
            Service::Payment => "payment-service",
            Service::Notification => "notification-service",
            Service::Consumer(name) => name,
        }
    }

    /// Whether this service reads `setting`.
    fn reads(self, setting: &Setting) -> bool {
        match self {
            // What every consumer of the runtime reads.
            Service::Consumer(_) => {
                setting.services.contains(&Service::Payment)
                    && setting.services.contains(&Service::Notification)
            }
            _ => setting.services.contains(&self),
        }
    }

    fn default_http_addr(self) -> &'static str {
        match self {
            Service::Order => "127.0.0.1:8080",
            Service::Payment => "127.0.0.1:8081",
            Service::Notification => "127.0.0.1:8082",
            Service::Consumer(_) => "127.0.0.1:8083",
        }
    }
}

const ALL: &[Service] = &[Service::Order, Service::Payment, Service::Notification];
const CONSUMERS: &[Service] = &[Service::Payment, Service::Notification];
const ORDER: &[Service] = &[Service::Order];
const PRODUCERS: &[Service] = &[Service::Order, Service::Payment];
const NOTIFICATION: &[Service] = &[Service::Notification];

/// One configuration variable: its name, default and meaning.
#[derive(Debug)]
pub struct Setting {
    /// Environment variable name; the flag is its lowercase, dashed form.
    pub var: &'static str,
    /// Default value; `None` means unset, `Some("")` a computed default.
    pub default: Option<&'static str>,
    /// One line for `--help`.
    pub help: &'static str,
    /// The services that read it.
    pub services: &'static [Service],
}

/// Every setting, with its default: the one place defaults live.
pub const SETTINGS: &[Setting] = &[
    Setting { var: "REDIS_URL", default: Some("redis://127.0.0.1:6379"), help: "redis://[user:pass@]host:port[/db], rediss:// for TLS, or redis+sentinel://[user:pass@]host:port[,host:port...]/<master>[/db]", services: ALL },
    Setting { var: "REDIS_WAIT_REPLICAS", default: Some("0"), help: "with N >= 1: an order is answered 2xx, and an entry acknowledged, only once WAIT confirms it on N replicas", services: ALL },
    Setting { var: "REDIS_WAIT_TIMEOUT_MS", default: Some("1000"), help: "longest WAIT for REDIS_WAIT_REPLICAS; not confirmed in time: 503 (an order) or wait again (an entry)", services: ALL },
    Setting { var: "REDIS_CA_CERT", default: None, help: "PEM file of the CA that signed the Redis server's certificate (rediss://); default: the system's roots", services: ALL },
    Setting { var: "HTTP_ADDR", default: Some(""), help: "listen address (order 127.0.0.1:8080, payment :8081, notification :8082)", services: ALL },
    Setting { var: "CONSUMER_NAME", default: Some(""), help: "consumer name in the group; default <hostname>-<machine ID, 8 hex>-<HTTP port>, stable across restarts", services: CONSUMERS },
    Setting { var: "NOTIFY_WEBHOOK_URL", default: None, help: "also POST each notification as JSON to this URL", services: NOTIFICATION },
    Setting { var: "WEBHOOK_TIMEOUT_MS", default: Some("5000"), help: "timeout of one webhook delivery", services: NOTIFICATION },
    Setting { var: "REQUEST_TIMEOUT_MS", default: Some("2000"), help: "an order not written within this time is answered 503", services: ORDER },
    Setting { var: "IDEMPOTENCY_TTL_S", default: Some("86400"), help: "how long an Idempotency-Key is remembered (a retry within it is answered with the first order)", services: ORDER },
    Setting { var: "HTTP_WORKERS", default: Some("4"), help: "threads answering HTTP requests (they send order batches; with TLS up to two also wait for Redis)", services: ORDER },
    Setting { var: "HANDLER_THREADS", default: Some("2"), help: "threads handling events (payment-service pipelines on two threads instead, unless TLS or REDIS_WAIT_REPLICAS)", services: CONSUMERS },
    Setting { var: "BATCH_SIZE", default: Some("64"), help: "entries read (XREADGROUP COUNT) and handled per batch", services: CONSUMERS },
    Setting { var: "BLOCK_MS", default: Some("1000"), help: "longest XREADGROUP BLOCK; also bounds how long shutdown waits for a reader", services: CONSUMERS },
    Setting { var: "CLAIM_IDLE_MS", default: Some("30000"), help: "pending entries idle this long are claimed (XAUTOCLAIM) and retried", services: CONSUMERS },
    Setting { var: "MAX_DELIVERIES", default: Some("5"), help: "failed deliveries before an entry goes to <stream>:dlq", services: CONSUMERS },
    Setting { var: "DLQ_RETAIN_ENTRIES", default: Some("10000"), help: "dead letters kept per <stream>:dlq, the newest; older ones are deleted", services: CONSUMERS },
    Setting { var: "RETAIN_ENTRIES", default: Some("100000"), help: "trimming keeps at least this many recent entries per stream", services: PRODUCERS },
    Setting { var: "TRIM_INTERVAL_MS", default: Some("60000"), help: "how often the stream this service writes is trimmed (0: never)", services: PRODUCERS },
    Setting { var: "RUST_LOG", default: Some("info"), help: "log filter: a level, or target=level,...", services: ALL },
];

/// The configuration of one service, parsed and checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// The service this is for.
    pub service: Service,
    /// Where Redis is. Checked to be a valid Redis URL.
    pub redis_url: String,
    /// CA certificate for `rediss://`.
    pub redis_ca_cert: Option<PathBuf>,
    /// Replicas that must confirm a write (`WAIT`) before it is answered
    /// or acknowledged; 0: do not wait.
    pub wait_replicas: u64,
    /// Longest `WAIT`.
    pub wait_timeout: Duration,
    /// HTTP listen address.
    pub http_addr: SocketAddr,
    /// Consumer name in the groups (consumers only).
    pub consumer_name: String,
    /// Notification webhook (notification-service only).
    pub webhook_url: Option<String>,
    /// Timeout of one webhook delivery.
    pub webhook_timeout: Duration,
    /// Time within which an order is written or answered 503.
    pub request_timeout: Duration,
    /// Seconds an `Idempotency-Key` is remembered.
    pub idempotency_ttl_s: u64,
    /// HTTP worker threads.
    pub http_workers: usize,
    /// Handler threads.
    pub handler_threads: usize,
    /// Entries read and handled per batch.
    pub batch_size: usize,
    /// Longest XREADGROUP BLOCK.
    pub block: Duration,
    /// Idle time after which pending entries are claimed.
    pub claim_idle: Duration,
    /// Failed deliveries before dead-lettering.
    pub max_deliveries: u64,
    /// Dead letters kept per `<stream>:dlq`, the newest.
    pub dlq_retain_entries: u64,
    /// Entries trimming always keeps.
    pub retain_entries: u64,
    /// Trimming period; `None` disables trimming.
    pub trim_interval: Option<Duration>,
    /// Log filter.
    pub log_filter: String,
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Command {
    /// Run the service.
    Run(Box<Config>),
    /// Print this help text and exit 0.
    Help(String),
    /// Print this version line and exit 0.
    Version(String),
}

/// A configuration that cannot be used. `Display` is one line naming the
/// variable and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A variable's value does not parse.
    #[error("invalid {var} {value:?}: {reason}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A flag that no setting has.
    #[error("unknown option {0:?} (see --help)")]
    UnknownFlag(String),
    /// A flag given without its value.
    #[error("option {0} needs a value")]
    MissingValue(String),
}

/// Parses the command line (without the program name) and the environment,
/// read through `env`, for `service`.
///
/// ```
/// use streamline::config::{parse, Command, Service};
///
/// let env = |var: &str| (var == "REDIS_URL").then(|| "redis://10.0.0.5:6379".to_string());
/// let Ok(Command::Run(config)) = parse(Service::Payment, ["--max-deliveries=3".to_string()], env) else {
///     panic!("a valid configuration");
/// };
/// assert_eq!(config.redis_url, "redis://10.0.0.5:6379");
/// assert_eq!(config.max_deliveries, 3);
/// assert_eq!(config.http_addr.to_string(), "127.0.0.1:8081");
///
/// let bad = parse(Service::Order, Vec::<String>::new(), |v| (v == "HTTP_ADDR").then(|| "nope".into()));
/// assert!(bad.unwrap_err().to_string().contains("HTTP_ADDR"));
/// ```
pub fn parse(
    service: Service,
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Command, ConfigError> {
    let mut raw = Raw {
        service,
        flags: Vec::new(),
        env: &env,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help(help(service))),
            "-V" | "--version" => {
                return Ok(Command::Version(format!(
                    "{} {}",
                    service.name(),
                    env!("CARGO_PKG_VERSION")
                )))
            }
            _ => {}
        }
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(ConfigError::UnknownFlag(arg));
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => {
                let v = args
                    .next()
                    .ok_or_else(|| ConfigError::MissingValue(arg.clone()))?;
                (flag.to_string(), v)
            }
        };
        let var = name.replace('-', "_").to_ascii_uppercase();
        let setting = SETTINGS
            .iter()
            .find(|s| s.var == var && service.reads(s))
            .ok_or_else(|| ConfigError::UnknownFlag(format!("--{name}")))?;
        raw.flags.push((setting.var, value));
    }
    raw.build().map(|c| Command::Run(Box::new(c)))
}

/// Parses the real command line and environment.
pub fn from_process(service: Service) -> Result<Command, ConfigError> {
    parse(service, std::env::args().skip(1), |k| std::env::var(k).ok())
}

struct Raw<'a, E: Fn(&str) -> Option<String>> {
    service: Service,
    flags: Vec<(&'static str, String)>,
    env: &'a E,
}

impl<E: Fn(&str) -> Option<String>> Raw<'_, E> {
    /// The value of `var`: last flag, else environment, else default.
    /// An empty environment value counts as unset.
    fn get(&self, var: &'static str) -> Option<String> {
        if let Some((_, v)) = self.flags.iter().rev().find(|(k, _)| *k == var) {
            return Some(v.clone());
        }
        if let Some(v) = (self.env)(var).filter(|v| !v.is_empty()) {
            return Some(v);
        }
        SETTINGS
            .iter()
            .find(|s| s.var == var)
            .and_then(|s| s.default)
            .filter(|d| !d.is_empty())
            .map(str::to_string)
    }

    fn number(&self, var: &'static str, min: u64) -> Result<u64, ConfigError> {
        let value = self.get(var).unwrap_or_default();
        match value.trim().parse::<u64>() {
            Ok(n) if n >= min => Ok(n),
            Ok(_) => Err(invalid(var, &value, format!("must be at least {min}"))),
            Err(_) => Err(invalid(var, &value, "not a whole number".into())),
        }
    }

    fn millis(&self, var: &'static str, min: u64) -> Result<Duration, ConfigError> {
        self.number(var, min).map(Duration::from_millis)
    }

    fn build(&self) -> Result<Config, ConfigError> {
        let redis_url = self.get("REDIS_URL").unwrap_or_default();
        check_redis_url(&redis_url)?;
        let http_raw = self
            .get("HTTP_ADDR")
            .unwrap_or_else(|| self.service.default_http_addr().to_string());
        let http_addr: SocketAddr = http_raw.parse().map_err(|_| {
            invalid(
                "HTTP_ADDR",
                &http_raw,
                "expected host:port, e.g. 127.0.0.1:8080".into(),
            )
        })?;
        let consumer_name = match self.get("CONSUMER_NAME") {
            Some(name) => {
                if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(invalid(
                        "CONSUMER_NAME",
                        &name,
                        "must not contain spaces or control characters".into(),
                    ));
                }
                name
            }
            None => default_consumer_name(&hostname(), machine_id().as_deref(), http_addr.port()),
        };
        let webhook_url = self.get("NOTIFY_WEBHOOK_URL");
        if let Some(url) = &webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    "NOTIFY_WEBHOOK_URL",
                    url,
                    "expected an http:// or https:// URL".into(),
                ));
            }
        }
        let redis_ca_cert = self.get("REDIS_CA_CERT").map(PathBuf::from);
        if let Some(path) = &redis_ca_cert {
            if !path.is_file() {
                return Err(invalid(
                    "REDIS_CA_CERT",
                    &path.display().to_string(),
                    "no such file".into(),
                ));
            }
        }
        let trim_ms = self.number("TRIM_INTERVAL_MS", 0)?;
        Ok(Config {
            service: self.service,
            redis_url,
            redis_ca_cert,
            wait_replicas: self.number("REDIS_WAIT_REPLICAS", 0)?,
            wait_timeout: self.millis("REDIS_WAIT_TIMEOUT_MS", 1)?,
            http_addr,
            consumer_name,
            webhook_url,
            webhook_timeout: self.millis("WEBHOOK_TIMEOUT_MS", 1)?,
            request_timeout: self.millis("REQUEST_TIMEOUT_MS", 10)?,
            idempotency_ttl_s: self.number("IDEMPOTENCY_TTL_S", 1)?,
            http_workers: self.number("HTTP_WORKERS", 1)? as usize,
            handler_threads: self.number("HANDLER_THREADS", 1)? as usize,
            batch_size: self.number("BATCH_SIZE", 1)? as usize,
            block: self.millis("BLOCK_MS", 1)?,
            claim_idle: self.millis("CLAIM_IDLE_MS", 1)?,
            max_deliveries: self.number("MAX_DELIVERIES", 1)?,
            dlq_retain_entries: self.number("DLQ_RETAIN_ENTRIES", 1)?,
            retain_entries: self.number("RETAIN_ENTRIES", 0)?,
            trim_interval: (trim_ms > 0).then(|| Duration::from_millis(trim_ms)),
            log_filter: self.get("RUST_LOG").unwrap_or_else(|| "info".into()),
        })
    }
}

fn invalid(var: &'static str, value: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        var,
        value: value.to_string(),
        reason,
    }
}

fn check_redis_url(url: &str) -> Result<(), ConfigError> {
    if crate::sentinel::is_sentinel_url(url) {
        return crate::sentinel::SentinelUrl::parse(url)
            .map(|_| ())
            .map_err(|e| invalid("REDIS_URL", &redact(url), e.to_string()));
    }
    let scheme_ok = ["redis://", "rediss://", "unix://", "redis+unix://"]
        .iter()
        .any(|s| url.starts_with(s));
    if !scheme_ok {
        return Err(invalid(
            "REDIS_URL",
            &redact(url),
            "expected redis://host:port[/db], rediss://... or redis+sentinel://...".into(),
        ));
    }
    url.into_connection_info()
        .map(|_| ())
        .map_err(|e| invalid("REDIS_URL", &redact(url), e.to_string()))
}

/// `url` with its password, if any, replaced by `***`, for messages and
/// logs: `redis://order-service:***@10.0.0.5:6379`. The user name stays, so
/// the reader can tell which URL it was.
///
/// ```
/// use streamline::config::redact;
/// assert_eq!(redact("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
/// assert_eq!(redact("redis://h:1"), "redis://h:1");
/// ```
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => url.to_string(),
    }
}

/// The consumer name used when `CONSUMER_NAME` is unset:
/// `<hostname>-<machine ID, 8 hex digits>-<HTTP port>`.
///
/// Stable across restarts (a restarted consumer must find its own pending
/// entries), distinct per instance on one host (the port), and distinct
/// between hosts cloned from one image that kept its hostname: the machine
/// ID is made anew on a clone's first boot (`systemd-machine-id-setup`).
/// Without a machine ID it is `<hostname>-<HTTP port>`.
///
/// ```
/// use streamline::config::default_consumer_name;
/// assert_eq!(default_consumer_name("edge", Some("3d1219c7c4c5404a"), 8081), "edge-3d1219c7-8081");
/// assert_eq!(default_consumer_name("edge", None, 8081), "edge-8081");
/// ```
pub fn default_consumer_name(host: &str, machine_id: Option<&str>, port: u16) -> String {
    match machine_id {
        Some(id) => format!("{host}-{}-{port}", &id[..id.len().min(8)]),
        None => format!("{host}-{port}"),
    }
}

/// This host's machine ID (`/etc/machine-id`, else D-Bus's copy), if it is
/// the 32 hex digits it should be.
pub fn machine_id() -> Option<String> {
    ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_ascii_lowercase())
        .find(|s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// This host's name, for default consumer names; `localhost` if unknown.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The `--help` text of `service`, generated from [`SETTINGS`].
pub fn help(service: Service) -> String {
    let mut out = format!(
        "{name} {version}\n\nUsage: {name} [--option VALUE]...\n\n\
         Every option is an environment variable; a flag (its lowercase, dashed\n\
         form, e.g. --http-addr) overrides it.\n\n",
        name = service.name(),
        version = env!("CARGO_PKG_VERSION"),
    );
    let width = SETTINGS
        .iter()
        .map(|s| s.var.len())
        .max()
        .unwrap_or(20)
        .max(20);
    for s in SETTINGS.iter().filter(|s| service.reads(s)) {
        let default = match (s.var, s.default) {
            ("HTTP_ADDR", _) => service.default_http_addr().to_string(),
            (_, Some("")) => "computed".into(),
            (_, Some(d)) => d.to_string(),
            (_, None) => "unset".into(),
        };
        out.push_str(&format!(
            "  {:<width$} {} [default: {}]\n",
            s.var, s.help, default
        ));
    }
    out.push_str(&format!(
        "\n  {:<width$} print this help\n  {:<width$} print the version\n",
        "-h, --help", "-V, --version"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse_with(
        service: Service,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Command, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(service, args.iter().map(|s| s.to_string()), move |k| {
            env.get(k).cloned()
        })
    }

    fn config(service: Service, args: &[&str], env: &[(&str, &str)]) -> Config {
        match parse_with(service, args, env) {
            Ok(Command::Run(c)) => *c,
            other => panic!("expected a config, got {other:?}"),
        }
    }

    #[test]
    fn defaults_work_for_a_single_host() {
        let c = config(Service::Order, &[], &[]);
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config(Service::Payment, &[], &[]).http_addr.port(), 8081);
        assert_eq!(
            config(Service::Notification, &[], &[]).http_addr.port(),
            8082
        );
    }

    #[test]
    fn flags_override_environment() {
        let c = config(
            Service::Order,
            &["--http-addr", "127.0.0.1:9000"],
            &[("HTTP_ADDR", "127.0.0.1:7000")],
        );
        assert_eq!(c.http_addr.port(), 9000);
        let c = config(Service::Order, &["--http-addr=127.0.0.1:9001"], &[]);
        assert_eq!(c.http_addr.port(), 9001);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = parse_with(Service::Order, &[], &[("HTTP_ADDR", "notanaddr")]).unwrap_err();
        assert!(e.to_string().contains("HTTP_ADDR"), "{e}");
        let e = parse_with(Service::Order, &[], &[("REDIS_URL", "http://x")]).unwrap_err();
        assert!(e.to_string().contains("REDIS_URL"), "{e}");
        let e = parse_with(Service::Payment, &[], &[("MAX_DELIVERIES", "0")]).unwrap_err();
        assert!(e.to_string().contains("MAX_DELIVERIES"), "{e}");
        let e = parse_with(Service::Order, &["--nope", "1"], &[]).unwrap_err();
        assert!(e.to_string().contains("--nope"), "{e}");
    }

    #[test]
    fn sentinel_urls_and_wait_settings() {
        let url = "redis+sentinel://app:pw@10.0.0.1:26379,10.0.0.2:26379/orders";
        let c = config(
            Service::Payment,
            &[],
            &[("REDIS_URL", url), ("REDIS_WAIT_REPLICAS", "1")],
        );
        assert_eq!(c.redis_url, url);
        assert_eq!(c.wait_replicas, 1);
        assert_eq!(c.wait_timeout, Duration::from_millis(1000));
        assert_eq!(config(Service::Order, &[], &[]).wait_replicas, 0);
        let e = parse_with(
            Service::Order,
            &[],
            &[("REDIS_URL", "redis+sentinel://u:secret@10.0.0.1:26379")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("REDIS_URL") && e.contains("master name"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let e = parse_with(Service::Order, &[], &[("REDIS_WAIT_TIMEOUT_MS", "0")]).unwrap_err();
        assert!(e.to_string().contains("REDIS_WAIT_TIMEOUT_MS"), "{e}");
    }

    #[test]
    fn consumer_name_is_stable_and_differs_by_port() {
        let a = config(Service::Payment, &[], &[("HTTP_ADDR", "127.0.0.1:8091")]);
        let a2 = config(Service::Payment, &[], &[("HTTP_ADDR", "127.0.0.1:8091")]);
        let b = config(Service::Payment, &[], &[("HTTP_ADDR", "127.0.0.1:8092")]);
        assert_eq!(a.consumer_name, a2.consumer_name);
        assert_ne!(a.consumer_name, b.consumer_name);
        let named = config(Service::Payment, &[], &[("CONSUMER_NAME", "pay-1")]);
        assert_eq!(named.consumer_name, "pay-1");
    }

    #[test]
    fn help_lists_only_this_services_settings() {
        let h = help(Service::Order);
        assert!(h.contains("REDIS_URL") && h.contains("REQUEST_TIMEOUT_MS"));
        assert!(!h.contains("NOTIFY_WEBHOOK_URL"));
    }

    #[test]
    fn idempotency_keys_are_remembered_for_a_day_unless_told() {
        assert_eq!(config(Service::Order, &[], &[]).idempotency_ttl_s, 86_400);
        let c = config(Service::Order, &[], &[("IDEMPOTENCY_TTL_S", "60")]);
        assert_eq!(c.idempotency_ttl_s, 60);
        let e = parse_with(Service::Order, &[], &[("IDEMPOTENCY_TTL_S", "0")]).unwrap_err();
        assert!(e.to_string().contains("IDEMPOTENCY_TTL_S"), "{e}");
        let e = parse_with(Service::Payment, &["--idempotency-ttl-s", "5"], &[]).unwrap_err();
        assert!(e.to_string().contains("--idempotency-ttl-s"), "{e}");
    }
}

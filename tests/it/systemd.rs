//! The systemd units in `systemd/` and the settings files in
//! `debian/default/`, as the Debian package installs them.
//!
//! Three promises are checked: every unit is one `systemd-analyze verify`
//! has nothing to say about; every unit's sandbox rates an exposure of at
//! most [`MAX_EXPOSURE`] in `systemd-analyze security`; and every unit and
//! settings file says what the services rely on (readiness notification,
//! the watchdog, one port and consumer name per template instance).
//!
//! The first two need `systemd-analyze` (Debian's `systemd` package, which
//! `.ci/run` installs when it is missing); where it is not installed they
//! fail, naming the package: a promise the suite cannot check is not kept.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::TempDir;

/// The binaries the package installs a unit (and a template) for.
const SERVICES: [&str; 3] = ["order-service", "payment-service", "notification-service"];

/// The highest `systemd-analyze security` exposure a unit may have: the
/// README's "rates each 1.1" (what the units cannot take away is the
/// network, which is the services' job).
const MAX_EXPOSURE: f64 = 1.1;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A unit file of `systemd/`.
struct Unit {
    /// File name, e.g. `payment-service@.service`.
    file: String,
    /// The binary it runs, e.g. `payment-service`.
    service: String,
    template: bool,
    text: String,
}

/// Every `*.service` file in `systemd/`, sorted by name. Panics unless it is
/// exactly a plain unit and a template for each of [`SERVICES`], so a unit
/// that is renamed or deleted is noticed here, not on a user's host.
fn units() -> Vec<Unit> {
    let dir = repo().join("systemd");
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    let mut units = Vec::new();
    for entry in entries {
        let path = entry.expect("read_dir entry").path();
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        let Some(stem) = file.strip_suffix(".service") else {
            continue;
        };
        let (service, template) = match stem.strip_suffix('@') {
            Some(service) => (service, true),
            None => (stem, false),
        };
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        units.push(Unit {
            file: file.to_string(),
            service: service.to_string(),
            template,
            text,
        });
    }
    units.sort_by(|a, b| a.file.cmp(&b.file));
    let mut found: Vec<&str> = units.iter().map(|u| u.file.as_str()).collect();
    found.sort_unstable();
    let mut expected: Vec<String> = SERVICES
        .iter()
        .flat_map(|s| [format!("{s}.service"), format!("{s}@.service")])
        .collect();
    expected.sort_unstable();
    assert_eq!(found, expected, "unit files in {}", dir.display());
    units
}

/// The built binary of `service`, next to the one Cargo names for this test
/// binary (every `[[bin]]` of the package is built before integration tests).
fn binary(service: &str) -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_order-service")).with_file_name(service)
}

/// The unit's text with `ExecStart=/usr/bin/<service>` pointing at the
/// built binary instead, since `verify` checks that the command exists and
/// the package is not installed here.
fn with_built_binary(unit: &Unit) -> String {
    let installed = format!("ExecStart=/usr/bin/{}", unit.service);
    let lines: Vec<&str> = unit
        .text
        .lines()
        .filter(|l| l.starts_with("ExecStart="))
        .collect();
    assert_eq!(
        lines,
        [installed.as_str()],
        "{}: ExecStart must run the installed binary",
        unit.file
    );
    let built = format!("ExecStart={}", binary(&unit.service).display());
    unit.text.replace(&installed, &built)
}

/// Writes the unit into `dir` under `name`, with the built binary.
fn stage(dir: &TempDir, unit: &Unit, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, with_built_binary(unit))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// Runs `systemd-analyze` with `args`; `None` when it is not installed.
fn systemd_analyze(args: &[&str]) -> Option<Output> {
    match Command::new("systemd-analyze").args(args).output() {
        Ok(output) => Some(output),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run systemd-analyze {args:?}: {e}"),
    }
}

fn describe(args: &[&str], output: &Output) -> String {
    format!(
        "systemd-analyze {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Panics unless `systemd-analyze` runs: the README promises what it
/// checks, so its absence is a failure, not a skip.
fn require_systemd_analyze() {
    assert!(
        systemd_analyze(&["--version"]).is_some(),
        "systemd-analyze not found: install Debian's `systemd` package \
         (`apt-get install -y systemd`; .ci/run does it when it is missing)"
    );
}

/// `verify` exits 0 even when it complains (an unknown key, a value it
/// cannot parse: systemd ignores those lines and starts the unit anyway), so
/// "clean" means: exit 0 and not a word on stdout or stderr. A template is
/// checked as the template file and as an instance (`@8091`), which is how
/// systemd loads it.
#[test]
fn every_unit_passes_systemd_analyze_verify_silently() {
    require_systemd_analyze();
    let dir = TempDir::new("verify");
    let mut failures = Vec::new();
    for unit in units() {
        let mut names = vec![unit.file.clone()];
        if unit.template {
            names.push(format!("{}@8091.service", unit.service));
        }
        for name in names {
            let path = stage(&dir, &unit, &name);
            let path = path.to_str().expect("temp path is UTF-8");
            let args = ["verify", path];
            let output = systemd_analyze(&args).expect("systemd-analyze vanished");
            if !output.status.success() || !output.stdout.is_empty() || !output.stderr.is_empty() {
                failures.push(describe(&args, &output));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

/// The number on `systemd-analyze security`'s summary line,
/// `→ Overall exposure level for order-service.service: 1.1 OK 🙂`.
fn overall_exposure(stdout: &str) -> Option<f64> {
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, rest) = line.rsplit_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn overall_exposure_is_read_from_the_summary_line() {
    let out = "✗ PrivateNetwork=   Service has access to the host's network   0.5\n\
               \n\
               → Overall exposure level for payment-service@i.service: 1.1 OK 🙂\n";
    assert_eq!(overall_exposure(out), Some(1.1));
    let bad = "→ Overall exposure level for x.service: 9.6 UNSAFE 😨";
    assert_eq!(overall_exposure(bad), Some(9.6));
    assert_eq!(overall_exposure("no summary"), None);
}

#[test]
fn every_unit_is_sandboxed_to_the_readmes_exposure_of_1_1() {
    require_systemd_analyze();
    let dir = TempDir::new("security");
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for unit in units() {
        let path = stage(&dir, &unit, &unit.file);
        let path = path.to_str().expect("temp path is UTF-8");
        // --offline=true: judge the file alone, without asking a running
        // systemd (there may be none, as in a container).
        let args = ["security", "--offline=true", path];
        let output = systemd_analyze(&args).expect("systemd-analyze vanished");
        let stdout = String::from_utf8_lossy(&output.stdout);
        match overall_exposure(&stdout) {
            Some(exposure) if exposure <= MAX_EXPOSURE => {
                report.push(format!("{}: {exposure}", unit.file));
            }
            Some(exposure) => failures.push(format!(
                "{}: exposure {exposure} > {MAX_EXPOSURE}\n{}",
                unit.file,
                describe(&args, &output)
            )),
            None => failures.push(format!(
                "{}: no exposure line\n{}",
                unit.file,
                describe(&args, &output)
            )),
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
    println!("exposure: {}", report.join(", "));
}

/// The `key=value` settings of a unit file, comments and section headers
/// left out, in order (keys may repeat).
fn settings(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';', '[']))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

fn values<'a>(settings: &[(&'a str, &'a str)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .collect()
}

#[test]
fn units_say_what_the_services_rely_on() {
    for unit in units() {
        let s = settings(&unit.text);
        let svc = unit.service.as_str();
        let one = |key: &str, want: &str| {
            assert_eq!(values(&s, key), [want], "{}: {key}", unit.file);
        };
        // Readiness and the watchdog are what src/notify.rs speaks.
        one("Type", "notify");
        one("NotifyAccess", "main");
        one("WatchdogSec", "30s");
        one("Restart", "on-failure");
        one("TimeoutStopSec", "30s");
        one("DynamicUser", "yes");
        one("ExecStart", &format!("/usr/bin/{svc}"));
        one("Wants", "network-online.target");
        one("After", "network-online.target redis-server.service");
        one("WantedBy", "multi-user.target");
        let families = values(&s, "RestrictAddressFamilies");
        assert_eq!(families, ["AF_INET AF_INET6 AF_UNIX"], "{}", unit.file);

        let mut env_files = vec![format!("-/etc/default/{svc}")];
        let mut env = Vec::new();
        if unit.template {
            env_files.push(format!("-/etc/default/{svc}@%i"));
            // Only the port differs per instance: CONSUMER_NAME's default
            // (hostname, machine ID and port, README "Configuration") already
            // tells instances apart, on cloned images too.
            env.push("HTTP_ADDR=127.0.0.1:%i".to_string());
        }
        assert_eq!(values(&s, "EnvironmentFile"), env_files, "{}", unit.file);
        assert_eq!(values(&s, "Environment"), env, "{}", unit.file);
    }
}

/// Every variable `service` reads, with its default (`""` where there is
/// none, or it is computed), from the README's configuration table: the
/// documented names and values, not the code's own table.
fn variables(service: &str) -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("read README.md");
    let short = service.trim_end_matches("-service");
    let rows = readme_config_rows(&readme);
    assert!(
        rows.len() >= 10,
        "README.md: no configuration table found (rows: {rows:?})"
    );
    rows.into_iter()
        .filter(|(_, _, services)| {
            services == "all" || services.split(',').any(|s| s.trim() == short)
        })
        .map(|(var, default, _)| {
            let default = match (var.as_str(), service) {
                // One cell for three services: `127.0.0.1:8080` / `:8081` / `:8082`.
                ("HTTP_ADDR", "order-service") => "127.0.0.1:8080".to_string(),
                ("HTTP_ADDR", "payment-service") => "127.0.0.1:8081".to_string(),
                ("HTTP_ADDR", _) => "127.0.0.1:8082".to_string(),
                // A default in backticks is a value; prose ("unset",
                // "system roots", a computed name) is none.
                _ => match default.strip_prefix('`').and_then(|d| d.strip_suffix('`')) {
                    Some(d) if !d.contains('<') => d.to_string(),
                    _ => String::new(),
                },
            };
            (var, default)
        })
        .collect()
}

/// The rows `| `VAR` | default | services | meaning |` of the README's
/// "Configuration" table, as (variable, default cell, services cell).
fn readme_config_rows(readme: &str) -> Vec<(String, String, String)> {
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Configuration"))
        .expect("README.md has a \"## Configuration\" section");
    section
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l
                .trim()
                .strip_prefix('|')?
                .split('|')
                .map(str::trim)
                .collect();
            let var = cells.first()?.strip_prefix('`')?.strip_suffix('`')?;
            Some((
                var.to_string(),
                cells.get(1)?.to_string(),
                cells.get(2)?.to_string(),
            ))
        })
        .collect()
}

/// `/etc/default/<service>` changes nothing until edited (every line is a
/// comment), and lists every variable the README's configuration table
/// names for the service, and no other, with its default, as a line
/// `#VAR=default` ready to be uncommented.
#[test]
fn default_files_list_every_variable_commented_out() {
    for service in SERVICES {
        let path = repo().join("debian/default").join(service);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        for line in text.lines() {
            assert!(
                line.is_empty() || line.starts_with('#'),
                "{}: not commented out: {line:?}",
                path.display()
            );
        }
        let listed: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| l.starts_with(|c: char| c.is_ascii_uppercase()))
            .filter_map(|l| l.split_once('='))
            .collect();
        let mut names: Vec<&str> = listed.iter().map(|(k, _)| *k).collect();
        names.sort_unstable();
        let expected = variables(service);
        let mut expected_names: Vec<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
        expected_names.sort_unstable();
        assert_eq!(names, expected_names, "{}", path.display());
        for (var, default) in expected {
            if default.is_empty() {
                continue; // no default: the file shows an example or nothing
            }
            let value = listed.iter().find(|(k, _)| *k == var).map(|(_, v)| *v);
            assert_eq!(value, Some(default.as_str()), "{}: {var}", path.display());
        }
    }
}

/// A child process killed and reaped when dropped, even by a failing test.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs order-service with stderr to a file and `JOURNAL_STREAM` set to
/// `journal_stream(file's device, file's inode)`, against a Redis port
/// nothing listens on (so it logs both at info and at warn), and returns
/// its log lines once a warning is there.
fn log_lines_with(journal_stream: impl Fn(u64, u64) -> String) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;

    let dir = TempDir::new("journal");
    let path = dir.join("stderr");
    let file =
        std::fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let meta = file.metadata().expect("stat the log file");
    let stdout = file.try_clone().expect("clone the log file handle");
    let mut cmd = Command::new(binary("order-service"));
    cmd.env_clear();
    if let Some(p) = std::env::var_os("PATH") {
        cmd.env("PATH", p);
    }
    let redis_url = format!("redis://127.0.0.1:{}", crate::support::free_port());
    let http_addr = format!("127.0.0.1:{}", crate::support::free_port());
    let _child = Child(
        cmd.env("JOURNAL_STREAM", journal_stream(meta.dev(), meta.ino()))
            .env("REDIS_URL", &redis_url)
            .env("HTTP_ADDR", &http_addr)
            .env("RUST_LOG", "info")
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .expect("spawn order-service"),
    );
    let start = std::time::Instant::now();
    loop {
        let log = crate::support::read_lossy(&path);
        let warned = log
            .lines()
            .any(|l| l.contains("WARN") || l.starts_with("<4>"));
        if warned {
            return log.lines().map(String::from).collect();
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(15),
            "order-service with Redis down logged no warning in 15 s:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Under journald (`JOURNAL_STREAM` names the very file stderr is), every
/// line starts with its syslog priority, so `journalctl -p warning` works,
/// and carries no timestamp of its own (the journal adds one).
#[test]
fn under_journald_lines_carry_a_syslog_priority_and_no_timestamp() {
    let lines = log_lines_with(|dev, ino| format!("{dev}:{ino}"));
    let priority = |l: &str| l.len() > 3 && l.starts_with('<') && l.as_bytes()[2] == b'>';
    assert!(lines.iter().all(|l| priority(l)), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.starts_with("<6>")),
        "an info line: {lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("<4>")),
        "a warning: {lines:#?}"
    );
}

/// `JOURNAL_STREAM` inherited from a parent whose stderr was the journal
/// (here: naming some other file) must not switch the format: these lines go
/// to a file or a terminal, where a timestamp is what a reader needs.
#[test]
fn an_inherited_journal_stream_leaves_timestamps_on() {
    let lines = log_lines_with(|dev, ino| format!("{dev}:{}", ino + 1));
    let stamped = |l: &str| {
        let b = l.as_bytes();
        b.len() > 24 && b[4] == b'-' && b[10] == b'T' && b[23] == b'Z'
    };
    assert!(lines.iter().all(|l| stamped(l)), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains(" WARN ")), "{lines:#?}");
}

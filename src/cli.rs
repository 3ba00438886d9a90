//! What every binary's `main` does: parse the configuration, set up logging
//! and signals, run the service, and turn the result into an exit status.
//!
//! Exit statuses: `0` after a clean stop (SIGTERM/SIGINT, work finished),
//! `1` when the service could not run, `2` for a bad configuration, with one
//! line on stderr naming the variable.

use std::process::ExitCode;

use crossbeam_channel::Receiver;

use crate::config::{self, Command, Config, Service};
use crate::ops::ServiceError;

/// Runs `service` as a program: its configuration from the command line
/// and the environment (`--help`, `--version`), logging, SIGTERM/SIGINT as
/// the shutdown channel given to `run`, and `run`'s result as the exit
/// status.
pub fn program(
    service: Service,
    run: impl FnOnce(&Config, Receiver<()>) -> Result<(), ServiceError>,
) -> ExitCode {
    let config = match config::from_process(service) {
        Ok(Command::Run(c)) => c,
        Ok(Command::Help(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version(line)) => {
            println!("{line}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{}: {e}", service.name());
            return ExitCode::from(2);
        }
    };
    crate::logger::init(service.name(), &config.log_filter);
    let shutdown = match crate::shutdown::on_signals() {
        Ok(rx) => rx,
        Err(e) => {
            eprintln!("{}: cannot install signal handlers: {e}", service.name());
            return ExitCode::from(1);
        }
    };
    match run(&config, shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("{}: {e}", service.name());
            ExitCode::from(1)
        }
    }
}

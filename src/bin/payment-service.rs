//! payment-service: see the crate documentation and `--help`.
fn main() -> std::process::ExitCode {
    // The service's own run function, not a dispatch on the service: each
    // binary then links only its own service's code.
    streamline::cli::program(
        streamline::config::Service::Payment,
        streamline::services::payment::run,
    )
}

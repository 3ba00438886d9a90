//! payment-service: see the crate documentation and `--help`.
fn main() -> std::process::ExitCode {
    streamline::cli::main(streamline::config::Service::Payment)
}

//! streamctl: the operator's view of the streams; see `streamctl --help`
//! and `streamline::admin`.
fn main() -> std::process::ExitCode {
    streamline::admin::main()
}

//! `cargo xtask demo` runs this (as root): see `kproxy_tests::harness::demo`.

fn main() -> std::process::ExitCode {
    match kproxy_tests::harness::demo::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kproxy demo failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

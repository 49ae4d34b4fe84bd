//! The auth service process; see the library for what it does.

fn main() -> std::process::ExitCode {
    auth::main(std::env::args_os())
}

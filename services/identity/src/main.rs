//! The identity service process; see the library for what it does.

fn main() -> std::process::ExitCode {
    identity::main(std::env::args_os())
}

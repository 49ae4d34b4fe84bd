//! The gateway process; see the library for what it does.

fn main() -> std::process::ExitCode {
    gateway::main(std::env::args_os())
}

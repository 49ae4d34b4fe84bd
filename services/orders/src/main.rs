//! The orders service process; see the library for what it does.

fn main() -> std::process::ExitCode {
    orders::main(std::env::args_os())
}

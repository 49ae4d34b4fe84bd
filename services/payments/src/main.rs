//! The payments service process; see the library for what it does.

fn main() -> std::process::ExitCode {
    payments::main(std::env::args_os())
}

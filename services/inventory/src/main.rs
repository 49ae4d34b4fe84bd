//! The inventory service process; see the library for what it does.

fn main() -> std::process::ExitCode {
    inventory::main(std::env::args_os())
}

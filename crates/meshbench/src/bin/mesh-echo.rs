//! The echo server process; see the `meshbench` library.

fn main() -> std::process::ExitCode {
    meshbench::main(std::env::args_os())
}

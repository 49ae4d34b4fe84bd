//! Skipping tests whose tools are missing, finding tools, and feeding them input.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

/// Skips the calling test (returns `None`) with a message, or panics when
/// CI requires every test to run.
pub fn skip_or_fail(what: &str) -> Option<std::convert::Infallible> {
    if std::env::var("MESH_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("MESH_TEST_REQUIRE_ALL=1 but {what}");
    }
    eprintln!("SKIPPED: {what} (set MESH_TEST_REQUIRE_ALL=1 to make this a failure)");
    None
}

/// Finds an executable on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|path| path.is_file())
    })
}

/// Runs `cmd` with `input` on its stdin and returns what it printed.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

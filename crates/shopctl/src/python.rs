//! The Python recommendations service under `shopctl up`: its virtual
//! environment under the state directory, made and filled from
//! `services/recommendations/requirements.txt` on first run (and again
//! when that file changes), and the command line that runs it.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context;

/// `services/recommendations` of the checkout shopctl was built from.
pub fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../services/recommendations")
}

/// The venv's interpreter, ready to run the service: made with `python`
/// (`--system-site-packages`, so packages already installed need no
/// download) and `pip install -r requirements.txt` when the venv is new
/// or the requirements changed since (a copy is kept beside it).
pub fn prepare(state_dir: &Path, python: &str) -> anyhow::Result<PathBuf> {
    let source = source_dir();
    let requirements = source.join("requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let venv = state_dir.join("recommendations-venv");
    let interpreter = venv.join("bin/python");
    let stamp = venv.join("installed-requirements.txt");
    if interpreter.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
        return Ok(interpreter);
    }
    eprintln!(
        "shopctl: preparing the recommendations service's Python environment in {} (first run only)",
        venv.display()
    );
    run(Command::new(python)
        .args(["-m", "venv", "--system-site-packages"])
        .arg(&venv))
    .with_context(|| format!("{python} -m venv (is python3-venv installed?)"))?;
    run(Command::new(&interpreter)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements))
    .context("pip install -r services/recommendations/requirements.txt")?;
    std::fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(interpreter)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let output = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{:?} failed ({}): {}",
        cmd,
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// The arguments after the interpreter: the module, then `common` (the
/// flags every service takes, the same names as the Rust services').
pub fn argv(listen: &str, admin: &str, common: &[OsString]) -> Vec<OsString> {
    let mut argv: Vec<OsString> = [
        "-m",
        "recommendations",
        "--listen",
        listen,
        "--admin-addr",
        admin,
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    argv.extend(common.iter().cloned());
    argv
}

//! Compiles the two contracts mesh-client's tests call, from the one
//! `proto/` tree of the workspace (no copies to drift), with protox (no
//! `protoc`), and writes their descriptor set, from which the mesh reads
//! each method's `idempotency_level`.

use std::{fs, path::PathBuf};

use protox::prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!(
        "cargo:rerun-if-changed={}",
        root.join("mesh/echo").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("grpc/testing").display()
    );
    let fds = protox::compile(
        ["mesh/echo/v1/echo.proto", "grpc/testing/test.proto"],
        [&root],
    )?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    fs::write(out_dir.join("fixture_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Unimplemented methods answer UNIMPLEMENTED, so an example
        // server implements only the method it shows.
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}

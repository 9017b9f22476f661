//! Compiles `protos/echo.proto` (the test bed's gRPC echo service) to Rust with prost/tonic.
//! No system `protoc`: `protox` parses the .proto file in-process.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=protos");
    let protos = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("protos");
    let mut compiler = protox::Compiler::new([&protos])?;
    compiler.include_imports(true);
    compiler.open_files(["echo.proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

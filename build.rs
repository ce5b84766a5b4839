//! Generates the wire types from `proto/spool.proto` with a pure-Rust
//! protobuf compiler (protox), so a fresh machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/spool.proto");
    let descriptors = protox::compile(["proto/spool.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}

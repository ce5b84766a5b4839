//! Generates the wire types and the gRPC service from `proto/spool.proto`
//! with a pure-Rust protobuf compiler (protox), so a fresh machine needs no
//! system `protoc`. The descriptors are compiled once: the same set feeds
//! code generation and, encoded as `spool_descriptor.bin` in `OUT_DIR`, the
//! gRPC server's reflection service.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/spool.proto");
    let descriptors = protox::compile(["proto/spool.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("spool_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // tonic-prost's codec, with undecodable requests as INVALID_ARGUMENT.
        .codec_path("crate::grpc::codec::SpoolCodec")
        .compile_fds_with_config(descriptors, config)?;
    Ok(())
}

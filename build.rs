//! Compiles proto/ with protox (pure Rust: no system protoc) and keeps the
//! descriptor set for gRPC server reflection.

use std::{env, fs, path::PathBuf};

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/ivschat/rooms/v1/rooms.proto"];
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("ivschat_rooms_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    // Requests that do not decode are INVALID_ARGUMENT, not INTERNAL (src/grpc/codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::grpc::codec::RoomCodec")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

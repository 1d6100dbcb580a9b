//! Compiles the Open Inference Protocol `.proto` files with the pure-Rust
//! `protox` compiler (no system `protoc` needed) and keeps the encoded
//! descriptor set for gRPC reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/inference.proto", "proto/model_config.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("inference_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure()
        // `bytes::Bytes` for `bytes` fields: raw tensor contents are sliced
        // out of the received buffer instead of copied.
        .bytes(".inference")
        // prost with a pre-scan that bounds a ModelInferRequest's decoding.
        .codec_path("crate::codec::BoundedCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

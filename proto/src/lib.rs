//! Generated types and services of the Open Inference Protocol (KServe v2)
//! with Triton's extensions: `package inference`, `GRPCInferenceService`.
//! Every service decodes through [`codec::BoundedCodec`], which refuses a
//! ModelInferRequest whose decoding would take too much memory (see `wire`).

#![allow(clippy::all, missing_docs)]

pub mod codec;
pub mod wire;

#[cfg(test)]
mod alloc_probe;

/// Messages and the `GRPCInferenceService` client and server.
pub mod inference {
    tonic::include_proto!("inference");
}

/// Encoded file descriptor set of `package inference`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("inference_descriptor");

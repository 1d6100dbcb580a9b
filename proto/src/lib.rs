//! Generated types and services of the Open Inference Protocol (KServe v2)
//! with Triton's extensions: `package inference`, `GRPCInferenceService`.

#![allow(clippy::all, missing_docs)]

/// Messages and the `GRPCInferenceService` client and server.
pub mod inference {
    tonic::include_proto!("inference");
}

/// Encoded file descriptor set of `package inference`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("inference_descriptor");

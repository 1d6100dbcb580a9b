//! ferrite-server: a model server for micro models. The Open Inference
//! Protocol over gRPC and HTTP, dynamic batching, ONNX Runtime underneath.
//!
//! The data path runs one way through these modules:
//! frontends (`grpc`, `http`) -> `state` -> `model` (validation)
//! -> `scheduler` (queue, batcher) -> `runtime` (ONNX Runtime).
//! LLMs take `llm` (tokenizer, chat template, generation engine with
//! continuous batching) where tensor models take `scheduler`.

pub mod admission;
pub mod backend;
pub mod batch;
pub mod config;
pub mod describe;
pub mod error;
pub mod grpc;
pub mod http;
pub mod inference;
pub mod llm;
pub mod metrics;
pub mod model;
pub mod repository;
pub mod runtime;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod stats;
pub mod tensor;
pub mod tensor_model;
pub mod untrusted;

/// The model served when no other is given: a small classifier
/// (`input` FP32 [-1, 4] -> `probabilities` FP32 [-1, 3]), made by
/// `scripts/make_demo_model.py`.
pub const DEMO_MODEL: &[u8] = include_bytes!("../assets/demo.onnx");

/// Name of the embedded demo model.
pub const DEMO_MODEL_NAME: &str = "demo";

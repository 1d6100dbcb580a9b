//! ferrite-server: a model server for micro models. The Open Inference
//! Protocol over gRPC and HTTP, dynamic batching, ONNX Runtime underneath.
//!
//! The data path runs one way through these modules (docs/architecture.md
//! draws it): frontends (`grpc`, `http`) -> `state` -> `model` (one
//! request record, one description) -> a `backend` (`tensor_model`:
//! validation, `admission`, `scheduler` and its batcher; `llm`:
//! tokenizer, chat template, `admission`, generation engine; or `encoder`:
//! tokenizer, batching by token count, pooling) -> `runtime`,
//! the only module that uses ONNX Runtime. Only what the binaries use is
//! public.

#![warn(missing_docs, unreachable_pub)]

pub(crate) mod admission;
pub(crate) mod auth;
pub(crate) mod backend;
pub(crate) mod batch;
pub(crate) mod budget;
pub mod cascade;
pub mod config;
pub(crate) mod describe;
pub(crate) mod encoder;
pub(crate) mod error;
pub(crate) mod grpc;
pub(crate) mod http;
pub(crate) mod inference;
pub(crate) mod keyed_lock;
pub(crate) mod llm;
pub(crate) mod metrics;
pub(crate) mod model;
pub mod model_cache;
pub mod policy;
pub mod repository;
pub mod runtime;
pub(crate) mod scheduler;
pub mod server;
pub(crate) mod state;
pub(crate) mod stats;
pub mod tensor;
pub(crate) mod tensor_model;
pub mod tls;
pub mod transport;
#[cfg(any(test, feature = "fuzzing"))]
pub mod untrusted;

/// The model served when no other is given: a small classifier
/// (`input` FP32 [-1, 4] -> `probabilities` FP32 [-1, 3]), made by
/// `scripts/make_demo_model.py`.
pub const DEMO_MODEL: &[u8] = include_bytes!("../assets/demo.onnx");

/// Name of the embedded demo model.
pub const DEMO_MODEL_NAME: &str = "demo";

/// Heap measurements in tests (the proto crate's counting allocator).
#[cfg(test)]
#[path = "../../proto/src/alloc_probe.rs"]
mod alloc_probe;

//! One description of the server and of each model, protocol-neutral:
//! metadata, Triton-style configuration and statistics. The gRPC frontend
//! renders it as messages (`grpc::describe`), the REST frontend as JSON
//! (`http::describe`), so the two cannot disagree.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::Model;
use crate::runtime::{ExecutionProvider, TensorSpec};
use crate::stats::StatsSnapshot;
use crate::tensor::DataType;

/// The server's name in its metadata.
pub(crate) const SERVER_NAME: &str = "ferrite";

/// The server's version.
pub(crate) const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Protocol extensions ferrite implements, as Triton names them.
pub(crate) const EXTENSIONS: &[&str] =
    &["classification_disabled", "model_repository", "statistics", "binary_tensor_data", "parameters", "health"];

/// The platform every model reports.
pub(crate) const PLATFORM: &str = "onnxruntime_onnx";

/// Priority levels of the dynamic batcher (high and normal); requests
/// without one get the lowest.
pub(crate) const PRIORITY_LEVELS: u64 = 2;

/// One input or output of a model.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorDescription {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Full shape (-1 for any size), as the metadata gives it.
    pub shape: Vec<i64>,
    /// Shape as Triton's configuration gives it: without the batch
    /// dimension when the model batches.
    pub config_dims: Vec<i64>,
    /// Whether a request may leave it out (inputs only).
    pub optional: bool,
}

/// Where a model's instances run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeviceKind {
    /// On the CPU.
    Cpu,
    /// On a GPU.
    Gpu,
}

/// How requests are joined into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DynamicBatching {
    /// Longest a request waits for others to join its batch.
    pub max_queue_delay_microseconds: u64,
}

/// Everything the metadata and configuration endpoints say about one
/// model version.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModelDescription {
    /// The model's name.
    pub name: String,
    /// Every loaded version.
    pub versions: Vec<String>,
    /// The platform (always [`PLATFORM`]).
    pub platform: &'static str,
    /// The backend's name (`onnxruntime`, `ferrite_llm`).
    pub backend: &'static str,
    /// Inputs, in the model's order.
    pub inputs: Vec<TensorDescription>,
    /// Outputs, in the model's order.
    pub outputs: Vec<TensorDescription>,
    /// Largest batch; 0 when the model does not batch.
    pub max_batch_size: usize,
    /// Instances of the model (sessions, each with a worker).
    pub instance_count: usize,
    /// Where they run.
    pub device: DeviceKind,
    /// The batcher's settings, when the model batches.
    pub dynamic_batching: Option<DynamicBatching>,
    /// Further settings (LLMs: the engine's limits).
    pub parameters: BTreeMap<String, String>,
}

impl ModelDescription {
    /// Describes `model`, one of the loaded `versions` of its name.
    pub(crate) fn of(model: &Model, versions: &[Arc<Model>]) -> ModelDescription {
        let info = model.info();
        let batching = info.max_batch_size.is_some();
        let tensor = |spec: &TensorSpec| TensorDescription {
            name: spec.name.clone(),
            datatype: spec.datatype,
            shape: spec.shape.clone(),
            config_dims: if batching { spec.shape[1..].to_vec() } else { spec.shape.clone() },
            optional: info.optional_inputs.contains(&spec.name),
        };
        ModelDescription {
            name: model.name.clone(),
            versions: versions.iter().map(|m| m.version.to_string()).collect(),
            platform: PLATFORM,
            backend: info.name,
            inputs: info.signature.inputs.iter().map(tensor).collect(),
            outputs: info.signature.outputs.iter().map(tensor).collect(),
            max_batch_size: info.max_batch_size.unwrap_or(0),
            instance_count: model.settings.instance_count,
            device: match info
                .parameters
                .get(crate::runtime::EXECUTION_PROVIDER_PARAMETER)
                .and_then(|name| name.parse().ok())
                .unwrap_or(model.settings.execution_provider)
            {
                ExecutionProvider::Cpu => DeviceKind::Cpu,
                ExecutionProvider::Cuda | ExecutionProvider::Tensorrt => DeviceKind::Gpu,
            },
            dynamic_batching: batching.then_some(DynamicBatching {
                max_queue_delay_microseconds: model.settings.max_queue_delay.as_micros() as u64,
            }),
            parameters: info.parameters.clone(),
        }
    }
}

/// One model version's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelStatistics {
    /// The model's name.
    pub name: String,
    /// The version.
    pub version: String,
    /// Its counters and times.
    pub stats: StatsSnapshot,
}

impl ModelStatistics {
    /// The statistics of `model` now.
    pub(crate) fn of(model: &Model) -> ModelStatistics {
        ModelStatistics { name: model.name.clone(), version: model.version.to_string(), stats: model.stats.snapshot() }
    }
}

//! Server and model descriptions as gRPC messages: metadata, Triton-style
//! model configuration and statistics.

use std::sync::Arc;

use ferrite_proto::inference::*;

use crate::model::Model;
use crate::runtime::{ExecutionProvider, TensorSpec};
use crate::stats::Duration64;

/// Protocol extensions ferrite implements, as Triton names them.
pub const EXTENSIONS: &[&str] =
    &["classification_disabled", "model_repository", "statistics", "binary_tensor_data", "parameters", "health"];

pub const PLATFORM: &str = "onnxruntime_onnx";

/// The backend name of LLMs in their configuration (tensor models:
/// `onnxruntime`).
pub const LLM_BACKEND: &str = "ferrite_llm";

pub fn server_metadata() -> ServerMetadataResponse {
    ServerMetadataResponse {
        name: "ferrite".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        extensions: EXTENSIONS.iter().map(|s| s.to_string()).collect(),
    }
}

pub fn model_metadata(model: &Model, versions: &[Arc<Model>]) -> ModelMetadataResponse {
    let tensor = |spec: &TensorSpec| model_metadata_response::TensorMetadata {
        name: spec.name.clone(),
        datatype: spec.datatype.as_str().to_string(),
        shape: spec.shape.clone(),
    };
    ModelMetadataResponse {
        name: model.name.clone(),
        versions: versions.iter().map(|m| m.version.to_string()).collect(),
        platform: PLATFORM.to_string(),
        inputs: model.signature.inputs.iter().map(tensor).collect(),
        outputs: model.signature.outputs.iter().map(tensor).collect(),
    }
}

/// Dimensions as Triton's configuration lists them: without the batch
/// dimension when the model batches.
pub fn config_dims(model: &Model, spec: &TensorSpec) -> Vec<i64> {
    match model.max_batch_size {
        Some(_) => spec.shape[1..].to_vec(),
        None => spec.shape.clone(),
    }
}

pub fn model_config(model: &Model) -> ModelConfig {
    let settings = &model.settings;
    let kind = match settings.execution_provider {
        ExecutionProvider::Cpu => model_instance_group::Kind::Cpu,
        ExecutionProvider::Cuda | ExecutionProvider::Tensorrt => model_instance_group::Kind::Gpu,
    };
    ModelConfig {
        name: model.name.clone(),
        platform: PLATFORM.to_string(),
        backend: if model.llm().is_some() { LLM_BACKEND } else { "onnxruntime" }.to_string(),
        runtime: String::new(),
        version_policy: Some(ModelVersionPolicy {
            policy_choice: Some(model_version_policy::PolicyChoice::All(model_version_policy::All {})),
        }),
        max_batch_size: model.max_batch_size.unwrap_or(0) as i32,
        input: model
            .signature
            .inputs
            .iter()
            .map(|spec| ModelInput {
                name: spec.name.clone(),
                data_type: spec.datatype.triton_config_type(),
                dims: config_dims(model, spec),
                optional: model.llm().is_some() && crate::llm::oip::is_optional_input(&spec.name),
            })
            .collect(),
        output: model
            .signature
            .outputs
            .iter()
            .map(|spec| ModelOutput {
                name: spec.name.clone(),
                data_type: spec.datatype.triton_config_type(),
                dims: config_dims(model, spec),
            })
            .collect(),
        instance_group: vec![ModelInstanceGroup {
            name: format!("{}_0", model.name),
            count: settings.instance_count as i32,
            gpus: Vec::new(),
            kind: kind as i32,
        }],
        scheduling_choice: model.max_batch_size.map(|_| {
            model_config::SchedulingChoice::DynamicBatching(ModelDynamicBatching {
                preferred_batch_size: Vec::new(),
                max_queue_delay_microseconds: settings.max_queue_delay.as_micros() as u64,
                preserve_ordering: false,
                priority_levels: 2,
                default_priority_level: 2,
            })
        }),
        parameters: llm_parameters(model),
    }
}

/// LLMs: the engine's limits, as configuration parameters.
fn llm_parameters(model: &Model) -> std::collections::HashMap<String, ModelParameter> {
    let Some(llm) = model.llm() else { return Default::default() };
    let parameter = |value: String| ModelParameter { string_value: value };
    [
        ("decoupled", "true".to_string()),
        ("context_length", llm.config.context_length.to_string()),
        ("max_running_sequences", model.settings.max_batch_size.to_string()),
        ("max_waiting_sequences", model.settings.max_queue_size.to_string()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), parameter(value)))
    .collect()
}

fn duration(d: Duration64) -> Option<StatisticDuration> {
    Some(StatisticDuration { count: d.count, ns: d.ns })
}

pub fn model_statistics(model: &Model) -> ModelStatistics {
    let stats = model.stats.snapshot();
    ModelStatistics {
        name: model.name.clone(),
        version: model.version.to_string(),
        last_inference: stats.last_inference_ms,
        inference_count: stats.inference_count,
        execution_count: stats.execution_count,
        inference_stats: Some(InferStatistics {
            success: duration(stats.success),
            fail: duration(stats.fail),
            queue: duration(stats.queue),
            compute_input: duration(stats.compute_input),
            compute_infer: duration(stats.compute_infer),
            compute_output: duration(stats.compute_output),
            cache_hit: duration(Duration64::default()),
            cache_miss: duration(Duration64::default()),
        }),
        batch_stats: stats
            .batches
            .iter()
            .map(|(&size, &[input, infer, output])| InferBatchStatistics {
                batch_size: size,
                compute_input: duration(input),
                compute_infer: duration(infer),
                compute_output: duration(output),
            })
            .collect(),
    }
}

//! The server's and models' descriptions (`crate::describe`) as gRPC
//! messages.

use ferrite_proto::inference::*;

use crate::describe::{
    DeviceKind, ModelDescription, ModelStatistics as Statistics, TensorDescription, EXTENSIONS, PRIORITY_LEVELS,
    SERVER_NAME, SERVER_VERSION,
};
use crate::stats::Duration64;

/// ServerMetadata.
pub(crate) fn server_metadata() -> ServerMetadataResponse {
    ServerMetadataResponse {
        name: SERVER_NAME.to_string(),
        version: SERVER_VERSION.to_string(),
        extensions: EXTENSIONS.iter().map(|s| s.to_string()).collect(),
    }
}

/// ModelMetadata.
pub(crate) fn model_metadata(model: ModelDescription) -> ModelMetadataResponse {
    let tensor = |t: TensorDescription| model_metadata_response::TensorMetadata {
        name: t.name,
        datatype: t.datatype.as_str().to_string(),
        shape: t.shape,
    };
    ModelMetadataResponse {
        name: model.name,
        versions: model.versions,
        platform: model.platform.to_string(),
        inputs: model.inputs.into_iter().map(tensor).collect(),
        outputs: model.outputs.into_iter().map(tensor).collect(),
    }
}

/// ModelConfig, Triton's configuration.
pub(crate) fn model_config(model: ModelDescription) -> ModelConfig {
    let kind = match model.device {
        DeviceKind::Cpu => model_instance_group::Kind::Cpu,
        DeviceKind::Gpu => model_instance_group::Kind::Gpu,
    };
    ModelConfig {
        name: model.name.clone(),
        platform: model.platform.to_string(),
        backend: model.backend.to_string(),
        runtime: String::new(),
        version_policy: Some(ModelVersionPolicy {
            policy_choice: Some(model_version_policy::PolicyChoice::All(model_version_policy::All {})),
        }),
        max_batch_size: model.max_batch_size as i32,
        input: model
            .inputs
            .into_iter()
            .map(|t| ModelInput {
                name: t.name,
                data_type: t.datatype.triton_config_type(),
                dims: t.config_dims,
                optional: t.optional,
            })
            .collect(),
        output: model
            .outputs
            .into_iter()
            .map(|t| ModelOutput { name: t.name, data_type: t.datatype.triton_config_type(), dims: t.config_dims })
            .collect(),
        instance_group: vec![ModelInstanceGroup {
            name: format!("{}_0", model.name),
            count: model.instance_count as i32,
            gpus: Vec::new(),
            kind: kind as i32,
        }],
        scheduling_choice: model.dynamic_batching.map(|batching| {
            model_config::SchedulingChoice::DynamicBatching(ModelDynamicBatching {
                preferred_batch_size: Vec::new(),
                max_queue_delay_microseconds: batching.max_queue_delay_microseconds,
                preserve_ordering: false,
                priority_levels: PRIORITY_LEVELS,
                default_priority_level: PRIORITY_LEVELS,
            })
        }),
        parameters: model
            .parameters
            .into_iter()
            .map(|(key, value)| (key, ModelParameter { string_value: value }))
            .collect(),
    }
}

fn duration(d: Duration64) -> Option<StatisticDuration> {
    Some(StatisticDuration { count: d.count, ns: d.ns })
}

/// One entry of ModelStatistics.
pub(crate) fn model_statistics(statistics: Statistics) -> ModelStatistics {
    let stats = statistics.stats;
    ModelStatistics {
        name: statistics.name,
        version: statistics.version,
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

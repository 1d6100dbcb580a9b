//! The server's and models' descriptions (`crate::describe`) as the KServe
//! v2 REST API's JSON, with Triton's field and enum names.

use serde_json::{json, Map, Value};

use crate::describe::{
    DeviceKind, ModelDescription, ModelStatistics, TensorDescription, EXTENSIONS, PRIORITY_LEVELS, SERVER_NAME,
    SERVER_VERSION,
};
use crate::stats::Duration64;
use crate::tensor::DataType;

/// `GET /v2`.
pub(crate) fn server_metadata() -> Value {
    json!({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})
}

/// `GET /v2/models/{model}`.
pub(crate) fn model_metadata(model: &ModelDescription) -> Value {
    let tensor = |t: &TensorDescription| json!({"name": t.name, "datatype": t.datatype.as_str(), "shape": t.shape});
    json!({
        "name": model.name,
        "versions": model.versions,
        "platform": model.platform,
        "inputs": model.inputs.iter().map(tensor).collect::<Vec<_>>(),
        "outputs": model.outputs.iter().map(tensor).collect::<Vec<_>>(),
    })
}

/// Triton's name of a datatype in a model configuration.
fn config_type(datatype: DataType) -> String {
    let name = if datatype == DataType::Bytes { "STRING" } else { datatype.as_str() };
    format!("TYPE_{name}")
}

/// `GET /v2/models/{model}/config`: the configuration as Triton prints it.
pub(crate) fn model_config(model: &ModelDescription) -> Value {
    let input = |t: &TensorDescription| json!({"name": t.name, "data_type": config_type(t.datatype), "dims": t.config_dims, "optional": t.optional});
    let output =
        |t: &TensorDescription| json!({"name": t.name, "data_type": config_type(t.datatype), "dims": t.config_dims});
    let kind = match model.device {
        DeviceKind::Cpu => "KIND_CPU",
        DeviceKind::Gpu => "KIND_GPU",
    };
    let parameters: Map<String, Value> =
        model.parameters.iter().map(|(key, value)| (key.clone(), json!({"string_value": value}))).collect();
    let mut config = json!({
        "name": model.name,
        "platform": model.platform,
        "backend": model.backend,
        "version_policy": {"all": {}},
        "max_batch_size": model.max_batch_size,
        "input": model.inputs.iter().map(input).collect::<Vec<_>>(),
        "output": model.outputs.iter().map(output).collect::<Vec<_>>(),
        "instance_group": [{"name": format!("{}_0", model.name), "count": model.instance_count, "kind": kind}],
        "parameters": parameters,
    });
    if let Some(batching) = model.dynamic_batching {
        config["dynamic_batching"] = json!({
            "max_queue_delay_microseconds": batching.max_queue_delay_microseconds,
            "priority_levels": PRIORITY_LEVELS,
            "default_priority_level": PRIORITY_LEVELS,
        });
    }
    config
}

/// `GET /v2/models/.../stats`.
pub(crate) fn statistics(models: Vec<ModelStatistics>) -> Value {
    let duration = |d: Duration64| json!({"count": d.count, "ns": d.ns});
    let none = Duration64::default();
    let stats: Vec<Value> = models
        .into_iter()
        .map(|ModelStatistics { name, version, stats: s }| {
            json!({
                "name": name,
                "version": version,
                "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": duration(s.success), "fail": duration(s.fail), "queue": duration(s.queue),
                    "compute_input": duration(s.compute_input), "compute_infer": duration(s.compute_infer),
                    "compute_output": duration(s.compute_output), "cache_hit": duration(none),
                    "cache_miss": duration(none),
                },
                "batch_stats": s.batches.iter().map(|(size, [input, infer, output])| json!({
                    "batch_size": size,
                    "compute_input": duration(*input),
                    "compute_infer": duration(*infer),
                    "compute_output": duration(*output),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"model_stats": stats})
}

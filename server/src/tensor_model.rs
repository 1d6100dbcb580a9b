//! Tensor models: an ONNX graph served as it is. Requests are validated
//! against the graph's signature, then queued and batched by the
//! [`Scheduler`], which runs them on ONNX Runtime.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::backend::{Backend, BackendInfo};
use crate::config::ModelSettings;
use crate::error::{InferError, InferResult};
use crate::inference::{InferRequest, Reply};
use crate::runtime::{ModelBytes, Runtime, SessionOptions, Signature, TensorSpec, EXECUTION_PROVIDER_PARAMETER};
use crate::scheduler::{Job, Scheduler};
use crate::stats::ModelStats;
use crate::tensor::{Tensor, TensorData};

/// The name of this backend in the model configuration.
pub(crate) const BACKEND_NAME: &str = "onnxruntime";

/// A loaded ONNX model: its signature and its scheduler.
pub(crate) struct TensorModel {
    info: BackendInfo,
    scheduler: Scheduler,
}

impl TensorModel {
    /// Loads `instance_count` sessions of the model and starts its scheduler.
    pub(crate) fn load(
        runtime: &Runtime,
        name: &str,
        source: &ModelBytes,
        settings: ModelSettings,
        stats: Arc<ModelStats>,
    ) -> anyhow::Result<TensorModel> {
        let options = SessionOptions {
            execution_provider: settings.execution_provider,
            intra_op_threads: settings.threads_per_instance(),
        };
        let sessions = (0..settings.instance_count)
            .map(|_| runtime.session(source, options))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let signature = sessions[0].signature()?;
        let provider = sessions[0].execution_provider();
        let max_batch_size = batchable(&signature).then_some(settings.max_batch_size).filter(|&n| n > 1);
        let scheduler = Scheduler::start(name, sessions, settings, max_batch_size.is_some(), stats);
        let info = BackendInfo {
            name: BACKEND_NAME,
            signature,
            optional_inputs: Vec::new(),
            max_batch_size,
            parameters: BTreeMap::from([(EXECUTION_PROVIDER_PARAMETER.to_string(), provider.to_string())]),
        };
        Ok(TensorModel { info, scheduler })
    }
}

impl Backend for TensorModel {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn infer(&self, request: InferRequest) -> BoxFuture<'_, InferResult<Reply>> {
        Box::pin(async move {
            let job = validate(&self.info.signature, self.info.max_batch_size, request)?;
            let outputs = self.scheduler.submit(job).await?;
            Ok(Reply { outputs, parameters: Default::default() })
        })
    }

    fn close(&self) {
        self.scheduler.close();
    }
}

/// A model can be batched when every input and output has a dynamic first
/// dimension.
fn batchable(signature: &Signature) -> bool {
    let dynamic_first = |spec: &TensorSpec| spec.shape.first() == Some(&-1);
    signature.inputs.iter().all(dynamic_first) && signature.outputs.iter().all(dynamic_first)
}

/// Checks a request against the model and turns it into a [`Job`]: every
/// input present once with the right datatype and shape, no unknown inputs
/// or outputs, and a batch no larger than the model allows.
pub(crate) fn validate(
    signature: &Signature,
    max_batch_size: Option<usize>,
    request: InferRequest,
) -> InferResult<Job> {
    let mut seen = HashSet::new();
    for tensor in &request.inputs {
        if !seen.insert(tensor.name.as_str()) {
            return Err(InferError::invalid(format!("input '{}' is given more than once", tensor.name)));
        }
        if !signature.inputs.iter().any(|spec| spec.name == tensor.name) {
            let expected: Vec<&str> = signature.inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(InferError::invalid(format!(
                "unexpected input '{}': the model's inputs are {expected:?}",
                tensor.name
            )));
        }
    }
    let mut by_name: std::collections::HashMap<String, Tensor> =
        request.inputs.into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut inputs = Vec::with_capacity(signature.inputs.len());
    let mut rows: Option<i64> = None;
    for spec in &signature.inputs {
        let tensor =
            by_name.remove(&spec.name).ok_or_else(|| InferError::invalid(format!("missing input '{}'", spec.name)))?;
        if tensor.datatype != spec.datatype {
            return Err(InferError::invalid(format!(
                "input '{}' has datatype {} but the model expects {}",
                spec.name, tensor.datatype, spec.datatype
            )));
        }
        if !shape_matches(&spec.shape, &tensor.shape) {
            return Err(InferError::invalid(format!(
                "input '{}' has shape {:?} but the model expects {:?} (-1 is any size)",
                spec.name, tensor.shape, spec.shape
            )));
        }
        // Checked here rather than in the runtime: a batch joins requests, and
        // one request's bad element must not fail its neighbours. Any other
        // bytes pass as they are (as in Triton), UTF-8 or not.
        if let TensorData::Strings(items) = &tensor.data {
            if let Some(i) = items.iter().position(|item| item.contains(&0)) {
                return Err(InferError::invalid(format!(
                    "input '{}': BYTES element {i} contains a NUL byte, which ONNX Runtime's string tensors cannot \
                     take (they are filled from C strings)",
                    spec.name
                )));
            }
        }
        if let Some(max) = max_batch_size {
            let batch = tensor.shape[0];
            if batch < 1 || batch as usize > max {
                return Err(InferError::invalid(format!(
                    "input '{}' has batch size {batch}; this model takes 1 to {max}",
                    spec.name
                )));
            }
            if rows.is_some_and(|r| r != batch) {
                return Err(InferError::invalid(format!(
                    "input '{}' has batch size {batch}, unlike the other inputs ({})",
                    spec.name,
                    rows.unwrap_or_default()
                )));
            }
            rows = Some(batch);
        }
        inputs.push(tensor);
    }
    let outputs = if request.outputs.is_empty() {
        signature.outputs.iter().map(|s| s.name.clone()).collect()
    } else {
        let mut seen = HashSet::new();
        for name in &request.outputs {
            if !signature.outputs.iter().any(|spec| &spec.name == name) {
                let expected: Vec<&str> = signature.outputs.iter().map(|s| s.name.as_str()).collect();
                return Err(InferError::invalid(format!(
                    "unknown output '{name}': the model's outputs are {expected:?}"
                )));
            }
            if !seen.insert(name) {
                return Err(InferError::invalid(format!("output '{name}' is requested more than once")));
            }
        }
        request.outputs
    };
    Ok(Job {
        inputs,
        rows: rows.unwrap_or(1) as usize,
        outputs,
        priority: request.priority,
        deadline: request.deadline,
    })
}

fn shape_matches(expected: &[i64], actual: &[i64]) -> bool {
    expected.len() == actual.len() && expected.iter().zip(actual).all(|(&e, &a)| e < 0 || e == a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::tensor::DataType;

    fn signature() -> Signature {
        let spec = |name: &str, shape: Vec<i64>| TensorSpec { name: name.into(), datatype: DataType::Fp32, shape };
        Signature {
            inputs: vec![spec("a", vec![-1, 2]), spec("b", vec![-1, 2])],
            outputs: vec![spec("sum", vec![-1, 2]), spec("diff", vec![-1, 2])],
        }
    }

    fn fp32(name: &str, shape: Vec<i64>) -> Tensor {
        let n: i64 = shape.iter().product();
        Tensor {
            name: name.into(),
            datatype: DataType::Fp32,
            shape,
            data: TensorData::Raw(vec![0u8; n as usize * 4].into()),
        }
    }

    fn request(inputs: Vec<Tensor>, outputs: &[&str]) -> InferRequest {
        InferRequest { inputs, outputs: outputs.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    fn error(result: InferResult<Job>) -> String {
        let err = result.unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
        err.message
    }

    #[test]
    fn good_request_is_ordered_by_the_model() {
        let job =
            validate(&signature(), Some(8), request(vec![fp32("b", vec![3, 2]), fp32("a", vec![3, 2])], &[])).unwrap();
        assert_eq!(job.inputs[0].name, "a");
        assert_eq!(job.rows, 3);
        assert_eq!(job.outputs, vec!["sum", "diff"]);
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let sig = signature();
        let a = || fp32("a", vec![1, 2]);
        let b = || fp32("b", vec![1, 2]);
        assert!(error(validate(&sig, Some(8), request(vec![a()], &[]))).contains("missing input 'b'"));
        assert!(error(validate(&sig, Some(8), request(vec![a(), b(), fp32("c", vec![1, 2])], &[])))
            .contains("unexpected input 'c'"));
        assert!(error(validate(&sig, Some(8), request(vec![a(), a(), b()], &[]))).contains("more than once"));
        assert!(error(validate(&sig, Some(8), request(vec![a(), fp32("b", vec![1, 3])], &[]))).contains("shape"));
        assert!(error(validate(&sig, Some(8), request(vec![a(), fp32("b", vec![2, 2])], &[])))
            .contains("unlike the other inputs"));
        assert!(error(validate(&sig, Some(2), request(vec![fp32("a", vec![3, 2]), fp32("b", vec![3, 2])], &[])))
            .contains("1 to 2"));
        assert!(error(validate(&sig, Some(8), request(vec![a(), b()], &["nope"]))).contains("unknown output 'nope'"));
        let mut wrong_type = b();
        wrong_type.datatype = DataType::Int32;
        assert!(error(validate(&sig, Some(8), request(vec![a(), wrong_type], &[]))).contains("datatype INT32"));
    }

    #[test]
    fn without_batching_shapes_pass_through() {
        let job = validate(&signature(), None, request(vec![fp32("a", vec![0, 2]), fp32("b", vec![0, 2])], &["diff"]))
            .unwrap();
        assert_eq!(job.rows, 1);
        assert_eq!(job.outputs, vec!["diff"]);
    }
}

//! A loaded model version: its signature, settings, statistics and
//! scheduler, and the validation that stands between a request and ONNX
//! Runtime.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::config::ModelSettings;
use crate::error::{ErrorKind, InferError, InferResult};
use crate::llm::Llm;
use crate::metrics::METRICS;
use crate::runtime::{self, ModelBytes, Runtime, SessionOptions, Signature, TensorSpec};
use crate::scheduler::{Job, Priority, Scheduler};
use crate::stats::ModelStats;
use crate::tensor::{Tensor, TensorData};

/// An inference request in protocol-neutral form.
#[derive(Debug, Default)]
pub struct InferRequest {
    pub id: String,
    pub inputs: Vec<Tensor>,
    /// Outputs to return, in order; empty means every output.
    pub outputs: Vec<String>,
    pub priority: Priority,
    /// Latest time the request may start running.
    pub deadline: Option<Instant>,
    /// Request parameters (the protocol's `parameters` map): read by LLMs
    /// (`max_tokens`, `temperature`, ...); tensor models use only
    /// `priority` and `timeout`, which arrive decoded above.
    pub parameters: Parameters,
}

/// A request or response parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

/// Named parameters of a request or response.
pub type Parameters = BTreeMap<String, ParamValue>;

/// The answer to an [`InferRequest`].
#[derive(Debug)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: String,
    pub outputs: Vec<Tensor>,
    /// Response parameters (LLMs: `finish_reason`, token counts, and
    /// `triton_final_response` when streaming).
    pub parameters: Parameters,
}

/// One loaded version of a model.
pub struct Model {
    pub name: String,
    pub version: u64,
    pub signature: Signature,
    pub settings: ModelSettings,
    /// Largest batch the dynamic batcher forms; `None` when the model is
    /// served without batching (shapes passed through as they are).
    pub max_batch_size: Option<usize>,
    pub stats: Arc<ModelStats>,
    backend: Backend,
}

/// What runs a model's requests.
enum Backend {
    /// Tensor models: the queue and dynamic batcher.
    Tensor(Scheduler),
    /// LLMs: the generation engine.
    Llm(Box<Llm>),
}

impl Model {
    /// Loads `instance_count` sessions of the model and starts its scheduler.
    pub fn load(
        runtime: &Runtime,
        name: &str,
        version: u64,
        source: &ModelBytes,
        settings: ModelSettings,
    ) -> anyhow::Result<Model> {
        let started = Instant::now();
        let options = SessionOptions {
            execution_provider: settings.execution_provider,
            intra_op_threads: settings.threads_per_instance(),
        };
        let sessions = (0..settings.instance_count)
            .map(|_| runtime.session(source, options))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let signature = runtime::signature(&sessions[0])?;
        let max_batch_size = batchable(&signature).then_some(settings.max_batch_size).filter(|&n| n > 1);
        let stats = Arc::new(ModelStats::default());
        let scheduler = Scheduler::start(name, sessions, settings, max_batch_size.is_some(), stats.clone());
        METRICS.model_load_duration.with_label_values(&[name]).observe(started.elapsed().as_secs_f64());
        tracing::info!(
            model = name,
            version,
            instances = settings.instance_count,
            threads = options.intra_op_threads,
            max_batch_size = max_batch_size.unwrap_or(0),
            seconds = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        Ok(Model {
            name: name.to_string(),
            version,
            signature,
            settings,
            max_batch_size,
            stats,
            backend: Backend::Tensor(scheduler),
        })
    }

    /// Loads an LLM model directory (docs/llm.md) and starts its engine.
    pub fn load_llm(
        runtime: &Runtime,
        name: &str,
        version: u64,
        dir: &Path,
        settings: ModelSettings,
    ) -> anyhow::Result<Model> {
        let started = Instant::now();
        let stats = Arc::new(ModelStats::default());
        let llm = Llm::load(runtime, name, dir, &settings, stats.clone())?;
        METRICS.model_load_duration.with_label_values(&[name]).observe(started.elapsed().as_secs_f64());
        tracing::info!(
            model = name,
            version,
            layers = llm.config.num_layers,
            context_length = llm.config.context_length,
            max_running = settings.max_batch_size,
            threads = settings.threads_per_instance(),
            seconds = started.elapsed().as_secs_f64(),
            "LLM loaded"
        );
        Ok(Model {
            name: name.to_string(),
            version,
            signature: crate::llm::oip::signature(),
            settings,
            max_batch_size: None,
            stats,
            backend: Backend::Llm(Box::new(llm)),
        })
    }

    /// The LLM behind this model, if it is one.
    pub fn llm(&self) -> Option<&Llm> {
        match &self.backend {
            Backend::Llm(llm) => Some(llm),
            Backend::Tensor(_) => None,
        }
    }

    /// Validates and runs a request.
    /// Every request is counted once in `ferrite_requests_total`: by its
    /// result, or as cancelled when the caller drops it (client gone).
    pub async fn infer(&self, request: InferRequest) -> InferResult<InferResponse> {
        let scheduler = match &self.backend {
            Backend::Tensor(scheduler) => scheduler,
            Backend::Llm(llm) => return crate::llm::oip::infer(self, llm, request).await,
        };
        let id = request.id.clone();
        let mut outcome = RecordOutcome { model: self, started: Instant::now(), ok: None };
        let result = async {
            let job = validate(&self.signature, self.max_batch_size, request)?;
            scheduler.submit(job).await
        }
        .await;
        outcome.ok = Some(result.as_ref().map(|_| ()).map_err(|e| e.kind));
        drop(outcome);
        Ok(InferResponse {
            model_name: self.name.clone(),
            model_version: self.version.to_string(),
            id,
            outputs: result?,
            parameters: Parameters::new(),
        })
    }

    /// Stops accepting requests; queued ones still finish.
    pub fn close(&self) {
        match &self.backend {
            Backend::Tensor(scheduler) => scheduler.close(),
            Backend::Llm(llm) => llm.close(),
        }
    }
}

/// Records a request's outcome in metrics and statistics when dropped:
/// its result if it finished, else `cancelled`.
struct RecordOutcome<'a> {
    model: &'a Model,
    started: Instant,
    ok: Option<Result<(), ErrorKind>>,
}

impl Drop for RecordOutcome<'_> {
    fn drop(&mut self) {
        record_request(&self.model.name, &self.model.stats, self.started, self.ok);
    }
}

/// Counts one request of `model` in metrics and statistics: by its result,
/// or as cancelled when it has none (the caller went away).
pub(crate) fn record_request(model: &str, stats: &ModelStats, started: Instant, result: Option<Result<(), ErrorKind>>) {
    let elapsed = started.elapsed();
    let (label, ok) = match result {
        Some(Ok(())) => ("success", true),
        Some(Err(kind)) => (kind.metric_label(), false),
        None => (ErrorKind::Cancelled.metric_label(), false),
    };
    METRICS.requests.with_label_values(&[model, label]).inc();
    METRICS.request_duration.with_label_values(&[model]).observe(elapsed.as_secs_f64());
    stats.record_request(ok, elapsed);
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
pub fn validate(signature: &Signature, max_batch_size: Option<usize>, request: InferRequest) -> InferResult<Job> {
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
        // one request's bad text must not fail its neighbours.
        if let TensorData::Strings(items) = &tensor.data {
            if let Some(i) = items.iter().position(|item| std::str::from_utf8(item).map_or(true, |s| s.contains('\0')))
            {
                return Err(InferError::invalid(format!(
                    "input '{}': BYTES element {i} must be UTF-8 without NUL bytes (ONNX string tensors hold text)",
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

/// Error for a model or version that is not loaded.
pub fn model_not_found(name: &str, version: &str) -> InferError {
    if version.is_empty() {
        InferError::new(ErrorKind::NotFound, format!("model '{name}' is not loaded"))
    } else {
        InferError::new(ErrorKind::NotFound, format!("model '{name}' version '{version}' is not loaded"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DataType, TensorData};

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

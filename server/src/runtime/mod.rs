//! ONNX Runtime behind a small interface, and the only place that uses it:
//! load a model into a [`Session`], read its signature from the graph, run
//! validated tensors; and the LLM's forward pass with its key/value cache
//! ([`decoder`], [`kv_cache`]). Never sees protocol types.

pub(crate) mod decoder;
pub(crate) mod kv_cache;
mod providers;
mod strings;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ort::memory::Allocator;
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};

use crate::error::{InferError, InferResult};
use crate::tensor::{DataType, Tensor, TensorData};

#[cfg(target_endian = "big")]
compile_error!("ferrite copies tensors as little-endian bytes; big-endian hosts are not supported");

/// Which ONNX Runtime execution provider runs a model: the contract's
/// (`--execution-provider` names them, the operator passes them).
pub use ferrite_contract::ExecutionProvider;
pub use providers::ProviderConfig;

/// The model configuration parameter (and the value of the metric label
/// `provider`) that names the execution provider a model actually runs on.
pub const EXECUTION_PROVIDER_PARAMETER: &str = "execution_provider";

/// Settings of one ONNX Runtime session.
#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    /// Where the session runs.
    pub execution_provider: ExecutionProvider,
    /// Threads inside one operator; at least 1.
    pub intra_op_threads: usize,
}

/// Where a model's ONNX bytes come from.
#[derive(Debug, Clone)]
pub enum ModelBytes {
    /// A file.
    File(std::path::PathBuf),
    /// Built into the binary (the demo model).
    Embedded(&'static [u8]),
}

/// The loaded ONNX Runtime library; one per process.
pub struct Runtime {
    environment: ort::environment::Environment,
    providers: ProviderConfig,
}

impl Runtime {
    /// Loads the ONNX Runtime shared library from `library` and creates the
    /// process-wide environment.
    pub fn load(library: &Path) -> anyhow::Result<Runtime> {
        let environment = ort::init_from(library)
            .map_err(|e| anyhow::anyhow!("cannot load ONNX Runtime from {}: {e}", library.display()))?
            .with_name("ferrite")
            .build()?;
        Ok(Runtime { environment, providers: ProviderConfig::default() })
    }

    /// These GPU provider settings for every session from now on.
    pub fn with_providers(mut self, providers: ProviderConfig) -> Runtime {
        self.providers = providers;
        self
    }

    /// The GPU provider settings.
    pub fn providers(&self) -> &ProviderConfig {
        &self.providers
    }

    /// Creates one session for a model.
    pub fn session(&self, model: &ModelBytes, options: SessionOptions) -> anyhow::Result<Session> {
        self.session_on_provider(model, options, true)
    }

    /// Creates one session whose intra-op threads sleep between operators
    /// instead of spinning. For LLM decoding: with spinning, the waiting
    /// thread burns the CPU the working one needs whenever the CPUs are
    /// shared or a cgroup quota throttles (measured on 2 shared cores: a
    /// decode step 30% faster without it).
    pub fn session_without_spinning(&self, model: &ModelBytes, options: SessionOptions) -> anyhow::Result<Session> {
        self.session_on_provider(model, options, false)
    }

    /// A session on the requested provider; when that provider cannot
    /// start, the load fails with [`providers::cannot_start`]'s message, or
    /// (fallback allowed) the session runs on the CPU and says so.
    fn session_on_provider(&self, model: &ModelBytes, options: SessionOptions, spin: bool) -> anyhow::Result<Session> {
        let requested = options.execution_provider;
        let error = match self.build_session(model, options, spin) {
            Ok(session) => {
                if requested.uses_gpu() && self.providers.cuda_graph {
                    static_shapes(&session)?;
                }
                return Ok(Session(session, requested));
            }
            Err(error) if requested.uses_gpu() => error,
            Err(error) => return Err(error.into_anyhow()),
        };
        if !self.providers.allow_cpu_fallback {
            anyhow::bail!(match error {
                BuildError::Provider(e) => providers::cannot_start(requested, e),
                BuildError::Load(e) => format!("cannot load the model on execution provider '{requested}': {e}"),
            });
        }
        let reason = match error {
            BuildError::Provider(e) => format!("execution provider '{requested}' cannot start: {e}"),
            BuildError::Load(e) => format!("cannot load the model on execution provider '{requested}': {e}"),
        };
        tracing::warn!(requested = %requested, provider = "cpu", %reason, "execution provider fallback: the model runs on the CPU");
        let cpu = SessionOptions { execution_provider: ExecutionProvider::Cpu, ..options };
        let session = self.build_session(model, cpu, spin).map_err(BuildError::into_anyhow)?;
        Ok(Session(session, ExecutionProvider::Cpu))
    }

    fn build_session(
        &self,
        model: &ModelBytes,
        options: SessionOptions,
        spin: bool,
    ) -> Result<ort::session::Session, BuildError> {
        let load = |e: anyhow::Error| BuildError::Load(e);
        let mut builder = self.builder(options, spin).map_err(load)?;
        let providers = self.providers.dispatch(options.execution_provider);
        if !providers.is_empty() {
            builder = builder.with_execution_providers(providers).map_err(|e| BuildError::Provider(e.to_string()))?;
        }
        let session = match model {
            ModelBytes::File(path) => builder
                .commit_from_file(path)
                .map_err(|e| anyhow::anyhow!("cannot load model {}: {e}", path.display()))
                .map_err(load)?,
            ModelBytes::Embedded(bytes) => builder.commit_from_memory(bytes).map_err(|e| load(e.into()))?,
        };
        Ok(session)
    }

    fn builder(&self, options: SessionOptions, spin: bool) -> anyhow::Result<ort::session::builder::SessionBuilder> {
        let mut builder = ort::session::Session::builder(&self.environment)?
            .with_intra_threads(options.intra_op_threads.max(1))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_inter_threads(1)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if !spin {
            builder = builder.with_intra_op_spinning(false).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(builder)
    }
}

/// Why a session could not be built: its provider would not start, or the
/// model would not load.
enum BuildError {
    Provider(String),
    Load(anyhow::Error),
}

impl BuildError {
    fn into_anyhow(self) -> anyhow::Error {
        match self {
            BuildError::Provider(e) => anyhow::anyhow!(e),
            BuildError::Load(e) => e,
        }
    }
}

/// CUDA graphs replay one captured launch sequence, so every input shape
/// must be fixed: refuses a model with a dynamic dimension.
fn static_shapes(session: &ort::session::Session) -> anyhow::Result<()> {
    for input in signature(session)?.inputs {
        if input.shape.contains(&-1) {
            anyhow::bail!(
                "CUDA graphs need static input shapes, and input '{}' has shape {:?}: turn --cuda-graph off \
                 or export the model with fixed shapes",
                input.name,
                input.shape
            );
        }
    }
    Ok(())
}

/// One loaded model in ONNX Runtime. Runs block: callers keep them on
/// threads of their own, off the async runtime.
pub struct Session(ort::session::Session, ExecutionProvider);

impl Session {
    /// The provider the session runs on: the one asked for, or the CPU
    /// after an allowed fallback.
    pub fn execution_provider(&self) -> ExecutionProvider {
        self.1
    }

    /// The model's inputs and outputs. Fails for inputs or outputs that are
    /// not tensors of a protocol datatype (maps, sequences, complex).
    pub fn signature(&self) -> anyhow::Result<Signature> {
        signature(&self.0)
    }

    /// Runs the session on validated inputs and returns the outputs named
    /// in `outputs`, in that order. Each input comes as its blocks of rows,
    /// one per request of the batch (one block when unbatched): they are
    /// joined straight into ONNX Runtime's buffer, the one copy on the way in.
    pub fn run(&mut self, inputs: &[Vec<Tensor>], outputs: &[String]) -> InferResult<RunOutput> {
        run(&mut self.0, inputs, outputs)
    }
}

/// Name, datatype and shape (-1 for a dynamic dimension) of a model tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions, -1 where any size goes.
    pub shape: Vec<i64>,
}

/// A model's inputs and outputs, read from its graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// Inputs, in the graph's order.
    pub inputs: Vec<TensorSpec>,
    /// Outputs, in the graph's order.
    pub outputs: Vec<TensorSpec>,
}

fn signature(session: &ort::session::Session) -> anyhow::Result<Signature> {
    let spec = |outlet: &ort::value::Outlet| -> anyhow::Result<TensorSpec> {
        let ValueType::Tensor { ty, shape, .. } = outlet.dtype() else {
            anyhow::bail!("'{}' is not a tensor; ferrite serves tensor models", outlet.name());
        };
        let datatype = datatype_of(*ty).ok_or_else(|| {
            anyhow::anyhow!("'{}' has element type {ty:?}, which the protocol cannot carry", outlet.name())
        })?;
        Ok(TensorSpec { name: outlet.name().to_string(), datatype, shape: shape.iter().map(|&d| d.max(-1)).collect() })
    };
    Ok(Signature {
        inputs: session.inputs().iter().map(spec).collect::<anyhow::Result<_>>()?,
        outputs: session.outputs().iter().map(spec).collect::<anyhow::Result<_>>()?,
    })
}

fn datatype_of(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Bfloat16 => DataType::Bf16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

/// What one run produced, and where its time went.
#[derive(Debug)]
pub struct RunOutput {
    /// The outputs asked for, in the order asked.
    pub outputs: Vec<Tensor>,
    /// Where the time went.
    pub timings: RunTimings,
}

/// Time spent copying inputs in, running the graph, copying outputs out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunTimings {
    /// Copying the inputs into ONNX Runtime.
    pub input: Duration,
    /// Running the graph.
    pub infer: Duration,
    /// Copying the outputs out.
    pub output: Duration,
}

fn run(session: &mut ort::session::Session, inputs: &[Vec<Tensor>], outputs: &[String]) -> InferResult<RunOutput> {
    let started = Instant::now();
    let values =
        inputs.iter().map(|blocks| Ok((blocks[0].name.as_str(), to_ort(blocks)?))).collect::<InferResult<Vec<_>>>()?;
    let copied_in = Instant::now();
    let mut results = session.run(values).map_err(|e| InferError::internal(format!("ONNX Runtime failed: {e}")))?;
    let ran = Instant::now();
    let outputs = outputs
        .iter()
        .map(|name| {
            let value = results
                .remove(name)
                .ok_or_else(|| InferError::internal(format!("ONNX Runtime returned no output '{name}'")))?;
            from_ort(name, value)
        })
        .collect::<InferResult<Vec<_>>>()?;
    let timings = RunTimings { input: copied_in - started, infer: ran - copied_in, output: ran.elapsed() };
    Ok(RunOutput { outputs, timings })
}

/// Dispatches on a datatype with `T` bound to its Rust element type.
macro_rules! with_element_type {
    ($datatype:expr, $T:ident => $body:expr, bytes => $bytes:expr) => {
        match $datatype {
            DataType::Bool => {
                type $T = bool;
                $body
            }
            DataType::Uint8 => {
                type $T = u8;
                $body
            }
            DataType::Uint16 => {
                type $T = u16;
                $body
            }
            DataType::Uint32 => {
                type $T = u32;
                $body
            }
            DataType::Uint64 => {
                type $T = u64;
                $body
            }
            DataType::Int8 => {
                type $T = i8;
                $body
            }
            DataType::Int16 => {
                type $T = i16;
                $body
            }
            DataType::Int32 => {
                type $T = i32;
                $body
            }
            DataType::Int64 => {
                type $T = i64;
                $body
            }
            DataType::Fp16 => {
                type $T = half::f16;
                $body
            }
            DataType::Bf16 => {
                type $T = half::bf16;
                $body
            }
            DataType::Fp32 => {
                type $T = f32;
                $body
            }
            DataType::Fp64 => {
                type $T = f64;
                $body
            }
            DataType::Bytes => $bytes,
        }
    };
}

/// Joins blocks of rows of one input (same name, datatype and dimensions after
/// the first, as validation and the batcher guarantee) into one tensor in
/// memory owned by ONNX Runtime.
fn to_ort(blocks: &[Tensor]) -> InferResult<DynValue> {
    let first = &blocks[0];
    let mut shape: Vec<i64> = first.shape.clone();
    if let Some(rows) = shape.first_mut() {
        *rows = blocks.iter().map(|b| b.shape[0]).sum();
    }
    let ort_error = |e: ort::Error| InferError::internal(format!("input '{}': {e}", first.name));
    match &first.data {
        TensorData::Raw(_) => with_element_type!(first.datatype, T => {
            let mut value = OrtTensor::<T>::new(&Allocator::default(), shape).map_err(ort_error)?;
            let (_, elements) = value.extract_tensor_mut();
            // SAFETY: every block was validated to hold exactly its shape's
            // elements of this type (BOOL bytes are 0 or 1), so together they
            // fill the joined shape; every element type here is plain data
            // without padding, stored little-endian like the wire.
            let mut out = unsafe { as_bytes_mut(elements) };
            for block in blocks {
                let TensorData::Raw(raw) = &block.data else {
                    return Err(InferError::internal("a batch mixes raw and BYTES blocks"));
                };
                let (head, rest) = std::mem::take(&mut out).split_at_mut(raw.len());
                head.copy_from_slice(raw);
                out = rest;
            }
            Ok(value.into_dyn())
        }, bytes => Err(InferError::internal("BYTES tensor without string elements"))),
        TensorData::Strings(_) => {
            let mut items = Vec::new();
            for block in blocks {
                let TensorData::Strings(block_items) = &block.data else {
                    return Err(InferError::internal("a batch mixes raw and BYTES blocks"));
                };
                items.extend(block_items.iter().cloned());
            }
            strings::to_string_tensor(&first.name, shape, items)
        }
    }
}

/// Turns an ONNX Runtime output into a tensor. Fixed-size elements are not
/// copied: the tensor's bytes point into the output's own memory, which lives
/// until the last piece of it (after the batch is split) has been sent.
fn from_ort(name: &str, value: DynValue) -> InferResult<Tensor> {
    let ValueType::Tensor { ty, shape, .. } = value.dtype() else {
        return Err(InferError::internal(format!("output '{name}' is not a tensor")));
    };
    let shape = shape.to_vec();
    let datatype =
        datatype_of(*ty).ok_or_else(|| InferError::internal(format!("output '{name}' has unsupported type {ty:?}")))?;
    let ort_error = |e: ort::Error| InferError::internal(format!("output '{name}': {e}"));
    let data = with_element_type!(datatype, T => {
        let (_, elements) = value.try_extract_tensor::<T>().map_err(ort_error)?;
        let bytes = as_bytes(elements);
        let (data, len) = (bytes.as_ptr(), bytes.len());
        if len == 0 {
            TensorData::Raw(Bytes::new())
        } else {
            TensorData::Raw(Bytes::from_owner(OutputMemory { _value: value, data, len }))
        }
    }, bytes => {
        let elements = crate::tensor::element_count(&shape).map_err(|e| InferError::internal(format!("output '{name}': {e}")))?;
        TensorData::Strings(strings::from_string_tensor(name, &value, elements)?)
    });
    Ok(Tensor { name: name.to_string(), datatype, shape, data })
}

/// The memory of an ONNX Runtime output tensor, kept alive by the value that
/// owns it, seen as bytes.
struct OutputMemory {
    _value: DynValue,
    data: *const u8,
    len: usize,
}

// SAFETY: `data` points into memory owned by `_value` (an ONNX Runtime value,
// itself Send), which is never written after the run and freed only when this
// struct is dropped.
unsafe impl Send for OutputMemory {}

impl AsRef<[u8]> for OutputMemory {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: see the Send impl; `len` bytes were readable when taken from
        // the extracted element slice and stay so while `_value` lives.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }
}

/// Views plain-data elements as bytes.
fn as_bytes<T: Copy>(elements: &[T]) -> &[u8] {
    // SAFETY: callers pass primitive numeric or bool elements, which have no
    // padding and no invalid byte patterns when read.
    unsafe { std::slice::from_raw_parts(elements.as_ptr().cast(), std::mem::size_of_val(elements)) }
}

/// Views plain-data elements as writable bytes.
///
/// # Safety
/// The caller must only write byte patterns that are valid for `T`.
unsafe fn as_bytes_mut<T: Copy>(elements: &mut [T]) -> &mut [u8] {
    unsafe { std::slice::from_raw_parts_mut(elements.as_mut_ptr().cast(), std::mem::size_of_val(elements)) }
}

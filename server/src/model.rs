//! A loaded model version: what every frontend calls. It owns the backend
//! that runs its requests (`backend::Backend`), counts every request once
//! (metrics and statistics), and says what the model is (`describe`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::stream::{self, BoxStream, StreamExt};

use crate::backend::{Backend, BackendInfo};
use crate::cascade::{Cascade, EscalationConfig, Route, TextRequest};
use crate::config::ModelSettings;
use crate::encoder::Encoder;
use crate::error::{ErrorKind, InferError, InferResult};
use crate::inference::{InferRequest, InferResponse, Reply};
use crate::llm::request::GenerateOptions;
use crate::llm::template::ChatMessage;
use crate::llm::{Generation, Llm};
use crate::metrics::METRICS;
use crate::runtime::{ModelBytes, Runtime};
use crate::stats::{ModelStats, RequestRecord};
use crate::tensor_model::TensorModel;

/// What one model version is loaded from.
#[derive(Debug, Clone)]
pub enum VersionSource {
    /// A tensor model.
    Onnx(ModelBytes),
    /// An LLM model directory (docs/llm.md).
    Llm(PathBuf),
    /// An encoder model directory (docs/encoders.md).
    Encoder(PathBuf),
}

/// One loaded version of a model.
pub struct Model {
    /// The model's name.
    pub name: String,
    /// This version.
    pub version: u64,
    /// The settings it was loaded with.
    pub settings: ModelSettings,
    /// Its cumulative statistics.
    pub stats: Arc<ModelStats>,
    /// The name as a metric label, shared by the requests' records.
    label: Arc<str>,
    backend: Arc<dyn Backend>,
    /// The same backend when it is an LLM, for the text frontends.
    llm: Option<Arc<Llm>>,
    /// The LLM's escalation to a bigger model, when its settings ask for one.
    cascade: Option<Arc<Cascade>>,
    /// The same backend when it is an encoder, for the text frontends.
    encoder: Option<Arc<Encoder>>,
}

/// The choices of a text request and, when the model has a cascade, how
/// they were answered.
pub struct Routed {
    /// One generation per choice, as the micro model's (the frontends read
    /// them all alike).
    pub generations: Vec<Generation>,
    /// `None` without escalation settings.
    pub route: Option<Route>,
}

impl Model {
    /// Loads a model version from `source` and starts its backend. An LLM
    /// with `escalation` settings (mode other than `off`) gets a cascade
    /// backend around its own; a tensor model ignores them (with a warning).
    pub fn load(
        runtime: &Runtime,
        name: &str,
        version: u64,
        source: &VersionSource,
        settings: ModelSettings,
        escalation: Option<&EscalationConfig>,
    ) -> anyhow::Result<Model> {
        let started = Instant::now();
        let stats = Arc::new(ModelStats::default());
        let (backend, llm, cascade, encoder): (Arc<dyn Backend>, _, _, _) = match source {
            VersionSource::Onnx(bytes) => {
                if escalation.is_some() {
                    tracing::warn!(model = name, "escalation settings apply to LLMs only: ignored");
                }
                (Arc::new(TensorModel::load(runtime, name, bytes, settings, stats.clone())?), None, None, None)
            }
            VersionSource::Encoder(dir) => {
                if escalation.is_some() {
                    tracing::warn!(model = name, "escalation settings apply to LLMs only: ignored");
                }
                let encoder = Arc::new(Encoder::load(runtime, name, dir, &settings, stats.clone())?);
                (encoder.clone() as Arc<dyn Backend>, None, None, Some(encoder))
            }
            VersionSource::Llm(dir) => {
                // Settings first: a bad one fails before the model is read.
                let escalation = escalation.cloned().map(EscalationConfig::resolve).transpose()?.flatten();
                let llm = Arc::new(Llm::load(runtime, name, dir, &settings, stats.clone())?);
                match escalation {
                    Some(escalation) => {
                        let cascade = Arc::new(Cascade::new(name, llm.clone(), escalation)?);
                        (cascade.clone() as Arc<dyn Backend>, Some(llm), Some(cascade), None)
                    }
                    None => (llm.clone() as Arc<dyn Backend>, Some(llm), None, None),
                }
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        METRICS.model_load_duration.with_label_values(&[name]).observe(seconds);
        let info = backend.info();
        let provider = info
            .parameters
            .get(crate::runtime::EXECUTION_PROVIDER_PARAMETER)
            .map_or(settings.execution_provider.as_str(), String::as_str);
        METRICS.model_info.with_label_values(&[name, &version.to_string(), provider]).set(1);
        tracing::info!(
            model = name,
            version,
            backend = info.name,
            execution_provider = provider,
            requested_provider = settings.execution_provider.as_str(),
            instances = settings.instance_count,
            threads = settings.threads_per_instance(),
            max_batch_size = info.max_batch_size.unwrap_or(settings.max_batch_size),
            seconds,
            "model loaded"
        );
        Ok(Model {
            name: name.to_string(),
            version,
            settings,
            stats,
            label: name.into(),
            backend,
            llm,
            cascade,
            encoder,
        })
    }

    /// What the backend tells about itself: signature, batching, parameters.
    pub fn info(&self) -> &BackendInfo {
        self.backend.info()
    }

    /// Whether the model generates text (an LLM): OpenAI's API serves
    /// only these. Prompts come from [`Model::chat_prompt`],
    /// [`Model::text_prompt`] or [`Model::token_prompt`], then go to
    /// [`Model::generate`].
    pub fn generates_text(&self) -> bool {
        self.llm.is_some()
    }

    /// The encoder, when the model is one (embeddings, rerank,
    /// classification from text); its requests go through
    /// [`Model::encode`] to be counted.
    pub(crate) fn encoder(&self) -> Option<&Arc<Encoder>> {
        self.encoder.as_ref()
    }

    /// Runs one encoder request (built on [`Model::encoder`]), counted as
    /// one request of this model.
    pub(crate) async fn encode<T>(&self, work: impl std::future::Future<Output = InferResult<T>>) -> InferResult<T> {
        let record = self.record();
        let result = work.await;
        record.finish(result.as_ref().map(|_| ()).map_err(|e| e.kind));
        result
    }

    /// Prompt tokens of a chat: the chat template applied, with the
    /// generation prompt added.
    /// Runs on a blocking thread (see `Llm::chat_prompt`).
    pub async fn chat_prompt(&self, messages: Vec<ChatMessage>) -> InferResult<Vec<u32>> {
        self.text_model()?.chat_prompt(messages).await
    }

    /// Prompt tokens of plain text, tokenized on a blocking thread.
    pub async fn text_prompt(&self, text: String) -> InferResult<Vec<u32>> {
        self.text_model()?.text_prompt(text).await
    }

    /// The longest prompt text an LLM takes, in bytes.
    pub(crate) fn max_prompt_bytes(&self) -> Option<usize> {
        Some(self.llm.as_deref()?.limits.max_prompt_bytes)
    }

    /// A prompt given as token ids, checked against the vocabulary.
    pub fn token_prompt(&self, tokens: Vec<u32>) -> InferResult<Vec<u32>> {
        self.text_model()?.token_prompt(tokens)
    }

    fn text_model(&self) -> InferResult<&Llm> {
        self.llm.as_deref().ok_or_else(|| InferError::invalid(format!("model '{}' is not an LLM", self.name)))
    }

    /// Runs a request to its whole answer.
    pub async fn infer(&self, request: InferRequest) -> InferResult<InferResponse> {
        let record = self.record();
        let head = self.head(&request);
        let result = self.backend.infer(request).await;
        record.finish(result.as_ref().map(|_| ()).map_err(|e| e.kind));
        Ok(head.respond(result?))
    }

    /// Runs a request, answering step by step (an LLM streams one response
    /// per generation step; a tensor model answers once). The stream ends
    /// after its first error.
    pub fn infer_stream(&self, request: InferRequest) -> InferResult<BoxStream<'static, InferResult<InferResponse>>> {
        let record = self.record();
        let head = self.head(&request);
        let replies = match self.backend.clone().infer_stream(request) {
            Ok(replies) => replies,
            Err(error) => {
                record.finish(Err(error.kind));
                return Err(error);
            }
        };
        Ok(stream::unfold((replies, Some(record)), move |(mut replies, record)| {
            let head = head.clone();
            async move {
                let record = record?;
                match replies.next().await {
                    Some(Ok(reply)) => Some((Ok(head.respond(reply)), (replies, Some(record)))),
                    Some(Err(error)) => {
                        record.finish(Err(error.kind));
                        Some((Err(error), (replies, None)))
                    }
                    None => {
                        record.finish(Ok(()));
                        None
                    }
                }
            }
        })
        .boxed())
    }

    /// Starts generating from prompt tokens (an LLM only), counted as one
    /// request until the generation ends or is dropped.
    pub async fn generate(&self, prompt: Vec<u32>, options: &GenerateOptions) -> InferResult<Generation> {
        let llm = self.text_model()?;
        let record = self.record();
        match llm.generate(prompt, options).await {
            Ok(generation) => Ok(generation.counted(record)),
            Err(error) => {
                record.finish(Err(error.kind));
                Err(error)
            }
        }
    }

    /// Answers a text request (an LLM only): its `n` choices, each counted
    /// as one request until it ends or is dropped. Without escalation
    /// settings, the micro model's generations as [`Model::generate`]
    /// starts them (choice `i` with `seed + i`) and no route; with them,
    /// through the cascade, which may hand the request to its target
    /// (`request.forward`) and says how in the route.
    pub async fn generate_text(&self, request: TextRequest) -> InferResult<Routed> {
        let llm = self.text_model()?;
        let Some(cascade) = &self.cascade else {
            let mut generations = Vec::with_capacity(request.n);
            for i in 0..request.n {
                let mut options = request.options.clone();
                options.seed = options.seed.map(|seed| seed.wrapping_add(i as u64));
                let record = self.record();
                match llm.generate(request.prompt.clone(), &options).await {
                    Ok(generation) => generations.push(generation.counted(record)),
                    Err(error) => {
                        record.finish(Err(error.kind));
                        return Err(error);
                    }
                }
            }
            return Ok(Routed { generations, route: None });
        };
        let record = self.record();
        match cascade.generate(request).await {
            Ok((generations, route)) => {
                let mut records = std::iter::once(record).chain(std::iter::repeat_with(|| self.record()));
                let generations =
                    generations.into_iter().map(|g| g.counted(records.next().expect("endless"))).collect();
                Ok(Routed { generations, route: Some(route) })
            }
            Err(error) => {
                record.finish(Err(error.kind));
                Err(error)
            }
        }
    }

    /// Stops accepting requests; queued ones still finish.
    pub fn close(&self) {
        self.backend.close();
        if let Some(provider) = self.info().parameters.get(crate::runtime::EXECUTION_PROVIDER_PARAMETER) {
            // Gone from /metrics with the version (absent if never set).
            let _ = METRICS.model_info.remove_label_values(&[&self.name, &self.version.to_string(), provider]);
        }
    }

    fn record(&self) -> RequestRecord {
        RequestRecord::start(self.label.clone(), self.stats.clone())
    }

    fn head(&self, request: &InferRequest) -> ResponseHead {
        ResponseHead { model_name: self.name.clone(), model_version: self.version.to_string(), id: request.id.clone() }
    }
}

/// What every response to one request carries besides its reply.
#[derive(Clone)]
struct ResponseHead {
    model_name: String,
    model_version: String,
    id: String,
}

impl ResponseHead {
    fn respond(&self, reply: Reply) -> InferResponse {
        InferResponse {
            model_name: self.model_name.clone(),
            model_version: self.model_version.clone(),
            id: self.id.clone(),
            outputs: reply.outputs,
            parameters: reply.parameters,
        }
    }
}

/// Error for a model or version that is not loaded.
pub(crate) fn model_not_found(name: &str, version: &str) -> InferError {
    if version.is_empty() {
        InferError::new(ErrorKind::NotFound, format!("model '{name}' is not loaded"))
    } else {
        InferError::new(ErrorKind::NotFound, format!("model '{name}' version '{version}' is not loaded"))
    }
}

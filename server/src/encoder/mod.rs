//! Encoders: BERT-family models served from text. A model directory with
//! `encoder.json` (docs/encoders.md) loads as an [`Encoder`]: its tokenizer
//! turns texts (or query/text pairs) into ids on a blocking thread, its
//! [`queue`] batches inputs by token count across requests, and its graph
//! answers one row per input: a pooled embedding, or classifier/reranker
//! logits turned into scores here. The frontends (`http::embeddings`,
//! `http::tei`, the Open Inference Protocol through [`oip`]) only build
//! requests and read rows.

pub(crate) mod batch;
pub(crate) mod config;
pub(crate) mod graph;
pub(crate) mod oip;
pub(crate) mod pooling;
pub(crate) mod queue;
pub(crate) mod tokenize;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;

use crate::backend::BackendInfo;
use crate::config::ModelSettings;
use crate::error::{InferError, InferResult};
use crate::inference::Priority;
use crate::runtime::{ModelBytes, Runtime, SessionOptions};
use crate::stats::ModelStats;
use config::{EncoderConfig, Task};
use graph::Graph;
use queue::{Limits, Queue, Rows, Runner};
use tokenize::{Input, TextEncoder, Truncation};

/// Most inputs one request may carry (OpenAI's bound for embeddings).
pub(crate) const MAX_INPUTS: usize = 2048;

/// A loaded encoder: configuration, tokenizer and queue.
pub(crate) struct Encoder {
    name: String,
    /// The model directory's `encoder.json`.
    pub config: EncoderConfig,
    info: BackendInfo,
    text: Arc<TextEncoder>,
    /// Requests being tokenized at once (each on a blocking thread): one
    /// per CPU, so a flood of long inputs queues instead of taking memory.
    tokenizing: Semaphore,
    queue: Queue,
    /// Values per row: the embedding size, or the number of logits.
    width: usize,
}

/// Inputs to run, and how.
#[derive(Debug, Clone)]
pub(crate) struct EncodeRequest {
    pub inputs: Vec<Input>,
    pub truncation: Truncation,
    pub priority: Priority,
    /// The latest time the request may still start running.
    pub deadline: Option<Instant>,
}

impl EncodeRequest {
    /// `inputs` with default handling: refused when too long, the model's
    /// truncation side, normal priority, no deadline.
    pub(crate) fn new(inputs: Vec<Input>, truncation: Truncation) -> EncodeRequest {
        EncodeRequest { inputs, truncation, priority: Priority::Normal, deadline: None }
    }
}

/// What a request got: one row per input, and the tokens it took.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Encoded {
    pub rows: Rows,
    /// Tokens of every input, special tokens included (OpenAI's usage).
    pub tokens: usize,
}

/// How an embedding is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct EmbedOptions {
    /// L2-normalize (`None`: as the model's `encoder.json` says).
    pub normalize: Option<bool>,
    /// Keep the first values only (Matryoshka); must be a size the model allows.
    pub dimensions: Option<usize>,
}

impl Encoder {
    /// Loads the model directory `dir`: tokenizer, one session per instance
    /// (each run once on a short input, which also reads the row width),
    /// and the queue's workers. Batches hold at most `max_batch_size`
    /// inputs and the config's `max_batch_tokens`; `max_queue_size`
    /// requests may wait.
    pub(crate) fn load(
        runtime: &Runtime,
        name: &str,
        dir: &Path,
        settings: &ModelSettings,
        stats: Arc<ModelStats>,
    ) -> anyhow::Result<Encoder> {
        let config = EncoderConfig::read(dir)?;
        let text = Arc::new(TextEncoder::load(&dir.join(config::TOKENIZER_FILE), config.max_length)?);
        let options = SessionOptions {
            execution_provider: settings.execution_provider,
            intra_op_threads: settings.threads_per_instance(),
        };
        let model = ModelBytes::File(dir.join(config::ENCODER_MODEL_FILE));
        // Not spinning between operators: the worker shares the CPUs with
        // tokenizing and the frontends, which a spinning thread would starve.
        let mut graphs = (0..settings.instance_count.max(1))
            .map(|_| Graph::new(runtime.session_without_spinning(&model, options)?, config.task, config.pooling()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let width = warm_up(&text, &mut graphs, &config)?;
        check_width(&config, width)?;
        let limits = Limits {
            max_batch_tokens: config.max_batch_tokens(graphs[0].execution_provider()),
            max_batch_inputs: settings.max_batch_size.max(1),
            max_queue: settings.max_queue_size.max(1),
        };
        let queue = Queue::start(name, graphs, limits, text.pad_id(), stats);
        let info = oip::backend_info(&config, width, &limits);
        tracing::info!(
            model = name,
            task = config.task.as_str(),
            width,
            max_length = config.max_length,
            max_batch_tokens = limits.max_batch_tokens,
            "encoder loaded"
        );
        let tokenizing = Semaphore::new(crate::config::available_cpus());
        Ok(Encoder { name: name.to_string(), config, info, text, tokenizing, queue, width })
    }

    /// What the model answers.
    pub(crate) fn task(&self) -> Task {
        self.config.task
    }

    /// The backend's description.
    pub(crate) fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// The full embedding size (or the number of logits).
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// Tokenizes the inputs (on a blocking thread) and runs them: one row
    /// per input.
    pub(crate) async fn run(&self, request: EncodeRequest) -> InferResult<Encoded> {
        let count = request.inputs.len();
        if count == 0 {
            return Err(InferError::invalid("the request has no inputs"));
        }
        if count > MAX_INPUTS {
            return Err(InferError::invalid(format!("at most {MAX_INPUTS} inputs per request, not {count}")));
        }
        let permit =
            self.tokenizing.acquire().await.map_err(|_| InferError::internal("the tokenizer pool is closed"))?;
        let (text, truncation, inputs) = (self.text.clone(), request.truncation, request.inputs);
        let tokens = tokio::task::spawn_blocking(move || {
            inputs
                .into_iter()
                .enumerate()
                .map(|(i, input)| text.encode(i, input, truncation))
                .collect::<InferResult<Vec<_>>>()
        })
        .await
        .unwrap_or_else(|_| Err(InferError::internal("tokenizing failed")))?;
        drop(permit);
        let total = tokens.iter().map(|t| t.len()).sum();
        let rows = self.queue.submit(tokens, request.priority, request.deadline).await?;
        Ok(Encoded { rows, tokens: total })
    }

    /// Embeddings of the inputs (an embedding model only).
    pub(crate) async fn embed(&self, request: EncodeRequest, options: EmbedOptions) -> InferResult<Encoded> {
        self.expect(Task::Embedding)?;
        let dimensions = self.check_dimensions(options.dimensions)?;
        let normalize = options.normalize.unwrap_or(self.config.normalize);
        let mut encoded = self.run(request).await?;
        for row in &mut encoded.rows {
            if normalize {
                pooling::normalize(row);
            }
            *row = pooling::shorten(std::mem::take(row), dimensions, normalize);
        }
        Ok(encoded)
    }

    /// Relevance of each text to the query, in the texts' order (a rerank
    /// model only): probabilities, or the raw logits.
    pub(crate) async fn rerank(
        &self,
        query: &str,
        texts: Vec<String>,
        truncation: Truncation,
        raw: bool,
    ) -> InferResult<(Vec<f32>, usize)> {
        self.expect(Task::Rerank)?;
        let inputs = texts.into_iter().map(|text| Input::Pair(query.to_string(), text)).collect();
        let encoded = self.run(EncodeRequest::new(inputs, truncation)).await?;
        let scores = encoded.rows.iter().map(|row| pooling::scores(row, raw).first().copied().unwrap_or(f32::NAN));
        Ok((scores.collect(), encoded.tokens))
    }

    /// Each label's score for each input (a classification model only):
    /// probabilities (softmax), or the raw logits.
    pub(crate) async fn classify(&self, request: EncodeRequest, raw: bool) -> InferResult<Encoded> {
        self.expect(Task::Classification)?;
        let mut encoded = self.run(request).await?;
        for row in &mut encoded.rows {
            *row = pooling::scores(row, raw);
        }
        Ok(encoded)
    }

    /// The label of each score column.
    pub(crate) fn labels(&self) -> &[String] {
        &self.config.labels
    }

    /// The truncation a request gets unless it says otherwise.
    pub(crate) fn default_truncation(&self, truncate: bool) -> Truncation {
        Truncation { truncate, side: self.config.truncation_side }
    }

    fn expect(&self, task: Task) -> InferResult<()> {
        if self.config.task != task {
            return Err(InferError::invalid(format!(
                "model '{}' is {} model, not {} model",
                self.name,
                self.config.task.with_article(),
                task.with_article()
            )));
        }
        Ok(())
    }

    /// `dimensions` if the model allows it (its full size, or one of the
    /// sizes `encoder.json` lists); `None` for the full size.
    fn check_dimensions(&self, dimensions: Option<usize>) -> InferResult<Option<usize>> {
        match dimensions {
            None => Ok(None),
            Some(d) if d == self.width => Ok(None),
            Some(d) if self.config.dimensions.contains(&d) && d < self.width => Ok(Some(d)),
            Some(d) => {
                let mut allowed: Vec<usize> =
                    self.config.dimensions.iter().copied().filter(|&a| a <= self.width).collect();
                allowed.push(self.width);
                allowed.sort_unstable();
                allowed.dedup();
                Err(InferError::invalid(format!(
                    "dimensions {d} is not supported by model '{}'; it gives {allowed:?}",
                    self.name
                )))
            }
        }
    }

    /// Stops taking requests.
    pub(crate) fn close(&self) {
        self.queue.close();
    }
}

/// Runs every graph once on a short input; returns the width of a row.
fn warm_up(text: &TextEncoder, graphs: &mut [Graph], config: &EncoderConfig) -> anyhow::Result<usize> {
    let input = match config.task {
        Task::Rerank => Input::Pair("warm".into(), "up".into()),
        Task::Embedding | Task::Classification => Input::Text("warm up".into()),
    };
    let tokens = text
        .encode(0, input, Truncation { truncate: true, side: config.truncation_side })
        .map_err(|e| anyhow::anyhow!("cannot tokenize the warm-up input: {e}"))?;
    let padded = batch::pad(&[&tokens], text.pad_id());
    let mut width = 0;
    for graph in graphs {
        let (rows, _) = graph.run(&padded, &[tokens.len()]).map_err(|e| anyhow::anyhow!("warm-up run failed: {e}"))?;
        width = rows.first().map(Vec::len).unwrap_or(0);
    }
    Ok(width)
}

/// The row width fits the task: labels for each logit, one logit for a
/// reranker, Matryoshka sizes within the embedding.
fn check_width(config: &EncoderConfig, width: usize) -> anyhow::Result<()> {
    match config.task {
        Task::Classification if width != config.labels.len() => {
            anyhow::bail!("the graph gives {width} logits but encoder.json names {} labels", config.labels.len())
        }
        Task::Rerank if width != 1 => anyhow::bail!("a rerank model gives one logit per pair; this one gives {width}"),
        Task::Embedding if width == 0 => anyhow::bail!("the graph gives empty embeddings"),
        Task::Embedding if config.dimensions.iter().any(|&d| d > width) => {
            anyhow::bail!("encoder.json's dimensions {:?} exceed the embedding size {width}", config.dimensions)
        }
        _ => Ok(()),
    }
}

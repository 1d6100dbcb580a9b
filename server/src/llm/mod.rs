//! Micro LLMs: a decoder-only model served with continuous batching.
//!
//! A model directory with `llm.json` (docs/llm.md) loads as an [`Llm`]:
//! its tokenizer and chat template turn requests into prompt tokens, and
//! its [`engine::Engine`] generates on a dedicated thread. The frontends
//! (OpenAI-compatible HTTP in `http::openai`, the Open Inference Protocol
//! through [`oip`]) only build [`request::GenerateOptions`] and read
//! [`request::Event`]s.

pub(crate) mod config;
pub(crate) mod engine;
pub(crate) mod limits;
pub(crate) mod logprobs;
pub(crate) mod oip;
pub(crate) mod prefix_cache;
pub(crate) mod prompt;
pub(crate) mod request;
pub(crate) mod sampling;
pub(crate) mod schedule;
pub(crate) mod stop;
pub(crate) mod structured;
pub(crate) mod template;
pub(crate) mod tokenizer;

use std::path::Path;
use std::sync::Arc;

use std::collections::VecDeque;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::Semaphore;

use crate::backend::BackendInfo;
use crate::config::ModelSettings;
use crate::error::{ErrorKind, InferError, InferResult};
use crate::runtime::decoder::Decoder;
use crate::runtime::kv_cache::CacheShape;
use crate::runtime::{ModelBytes, Runtime, SessionOptions};
use crate::stats::{ModelStats, RequestRecord};
use config::LlmConfig;
use engine::{Engine, EngineModel, EngineSettings};
use limits::{Limits, MAX_STOP_BYTES};
use logprobs::MAX_TOP_LOGPROBS;
use prompt::Prompter;
use request::{Answer, Event, GenerateOptions, GenerateRequest};
use sampling::SamplingParams;
use structured::{Grammar, Grammars, ResponseFormat};
use template::{ChatMessage, ChatTemplate};
use tokenizer::TextCodec;

/// How a context-length error message starts (OpenAI's wording).
const CONTEXT_LENGTH_ERROR: &str = "This model's maximum context length is";

/// Most stop strings a request may give.
pub(crate) const MAX_STOP_STRINGS: usize = 16;

/// A loaded LLM: configuration, limits, prompts (tokenizer and chat
/// template) and engine.
pub(crate) struct Llm {
    /// The model directory's `llm.json`.
    pub config: LlmConfig,
    /// What one request may ask.
    pub limits: Limits,
    info: BackendInfo,
    prompter: Arc<Prompter>,
    /// Prompts being tokenized at once (each on a blocking thread): one per
    /// CPU, so a flood of long prompts queues instead of taking the memory
    /// of hundreds of tokenizations.
    tokenizing: Semaphore,
    /// Structured output's grammar compiler, or why this model has none.
    grammars: Result<Arc<Grammars>, String>,
    engine: Engine,
}

impl Llm {
    /// Loads the model directory `dir` and starts its engine. Decode batch
    /// size and waiting queue come from the model settings
    /// (`max_batch_size`, `max_queue_size`).
    pub(crate) fn load(
        runtime: &Runtime,
        name: &str,
        dir: &Path,
        settings: &ModelSettings,
        stats: Arc<ModelStats>,
    ) -> anyhow::Result<Llm> {
        let config = LlmConfig::read(dir)?;
        let codec = Arc::new(TextCodec::load(&dir.join(config::TOKENIZER_FILE))?);
        let grammars = Grammars::load(&dir.join(config::TOKENIZER_FILE), config.vocab_size, &config.eos_token_ids)
            .map(Arc::new)
            .map_err(|e| {
                tracing::warn!(model = name, error = %e, "structured output is not available");
                format!("structured output (response_format) is not available for this model: {e}")
            });
        let template_path = dir.join(config::CHAT_TEMPLATE_FILE);
        let template = match std::fs::read_to_string(&template_path) {
            Ok(source) => Some(ChatTemplate::new(source)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => anyhow::bail!("cannot read {}: {e}", template_path.display()),
        };
        let token_text = |id: Option<u32>| id.and_then(|id| codec.token_text(id)).unwrap_or_default();
        let bos_text = token_text(config.bos_token_id);
        let eos_text = token_text(config.eos_token_ids.first().copied());
        let options = SessionOptions {
            execution_provider: settings.execution_provider,
            intra_op_threads: settings.threads_per_instance(),
        };
        let session = runtime.session_without_spinning(&ModelBytes::File(dir.join(config::LLM_MODEL_FILE)), options)?;
        let provider = session.execution_provider();
        let shape = CacheShape { layers: config.num_layers, heads: config.num_kv_heads, head_dim: config.head_dim };
        let decoder = Decoder::new(session, shape)?;
        let limits = Limits::resolve(&settings.llm, config.context_length, codec.longest_token_bytes(), shape);
        tracing::info!(
            model = name,
            max_prompt_bytes = limits.max_prompt_bytes,
            max_tokens = limits.max_tokens,
            allow_ignore_eos = limits.allow_ignore_eos,
            kv_budget_mib = limits.kv.budget >> 20,
            prefix_cache_mib = limits.prefix_cache_bytes >> 20,
            kv_tokens = limits.kv.max_sequence_tokens(),
            "LLM limits"
        );
        let engine_settings = EngineSettings {
            max_running: settings.max_batch_size.max(1),
            max_waiting: settings.max_queue_size.max(1),
            kv: limits.kv,
            prefix_cache_bytes: limits.prefix_cache_bytes,
            ..EngineSettings::default()
        };
        let model = EngineModel {
            name: name.to_string(),
            context_length: config.context_length,
            eos_token_ids: config.eos_token_ids.clone(),
            codec: codec.clone(),
            stats,
        };
        let engine = Engine::start(decoder, model, engine_settings)?;
        let mut info = oip::backend_info(&config, settings);
        info.parameters.insert(crate::runtime::EXECUTION_PROVIDER_PARAMETER.to_string(), provider.to_string());
        let prompter = Prompter {
            codec,
            template,
            bos_text,
            eos_text,
            bos: config.bos_token_id.filter(|_| config.add_bos_token),
            max_prompt_bytes: limits.max_prompt_bytes,
        };
        let tokenizing = Semaphore::new(crate::config::available_cpus());
        Ok(Llm { config, limits, info, prompter: Arc::new(prompter), tokenizing, grammars, engine })
    }

    /// Prompt tokens of a chat: the chat template applied, with the
    /// generation prompt added; what the messages say stays text.
    pub(crate) async fn chat_prompt(&self, messages: Vec<ChatMessage>) -> InferResult<Vec<u32>> {
        self.off_runtime(move |prompter| prompter.chat(&messages)).await
    }

    /// Prompt tokens of plain text.
    pub(crate) async fn text_prompt(&self, text: String) -> InferResult<Vec<u32>> {
        self.prompter.check_bytes(text.len())?;
        self.off_runtime(move |prompter| prompter.text(&text)).await
    }

    /// Runs `work` on a blocking thread (tokenizing a long prompt takes
    /// seconds of CPU), at most one per CPU at a time, so the async
    /// workers stay free for probes and other clients.
    async fn off_runtime<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Prompter) -> InferResult<T> + Send + 'static,
    ) -> InferResult<T> {
        let _permit =
            self.tokenizing.acquire().await.map_err(|_| InferError::internal("the tokenizer pool is closed"))?;
        let prompter = self.prompter.clone();
        tokio::task::spawn_blocking(move || work(&prompter))
            .await
            .unwrap_or_else(|_| Err(InferError::internal("tokenizing failed")))
    }

    /// A prompt given as token ids: non-empty, each in the vocabulary.
    pub(crate) fn token_prompt(&self, tokens: Vec<u32>) -> InferResult<Vec<u32>> {
        let vocab = self.config.vocab_size as u32;
        if tokens.is_empty() || tokens.iter().any(|&t| t >= vocab) {
            return Err(InferError::invalid(format!("prompt tokens must be non-empty and below {vocab}")));
        }
        Ok(tokens)
    }

    /// Checks options against the model and the server's limits: sampling
    /// ranges, stop strings, `ignore_eos`, `max_tokens`, the context length
    /// and the KV budget.
    pub(crate) fn prepare(&self, prompt: Vec<u32>, options: &GenerateOptions) -> InferResult<GenerateRequest> {
        let defaults = &self.config.defaults;
        let sampling = SamplingParams {
            temperature: options.temperature.unwrap_or(defaults.temperature),
            top_k: options.top_k.unwrap_or(defaults.top_k),
            top_p: options.top_p.unwrap_or(defaults.top_p),
            seed: options.seed,
            repetition_penalty: options.repetition_penalty.unwrap_or(1.0),
            presence_penalty: options.presence_penalty.unwrap_or(0.0),
            frequency_penalty: options.frequency_penalty.unwrap_or(0.0),
        };
        sampling.check().map_err(InferError::invalid)?;
        check_stop(&options.stop)?;
        if let Some(top) = options.logprobs.filter(|&top| top > MAX_TOP_LOGPROBS) {
            return Err(InferError::invalid(format!(
                "logprobs: at most {MAX_TOP_LOGPROBS} alternatives per token, not {top}"
            )));
        }
        if options.ignore_eos && options.response_format.is_some() {
            return Err(InferError::invalid("ignore_eos cannot be combined with response_format"));
        }
        if options.ignore_eos && !self.limits.allow_ignore_eos {
            return Err(InferError::invalid(
                "ignore_eos is not allowed on this server (start it with --llm-allow-ignore-eos)",
            ));
        }
        // Without max_tokens: the default, within the cap and what the KV
        // budget leaves a sequence.
        let cap = self.limits.max_tokens;
        let room = self.limits.kv.max_sequence_tokens().saturating_sub(prompt.len()).max(1);
        let default = defaults.max_tokens.min(cap).min(room);
        // The context first: its error is the one OpenAI clients know.
        let max_tokens = check_context(self.config.context_length, prompt.len(), options.max_tokens, default)?;
        if max_tokens > cap {
            return Err(InferError::invalid(format!(
                "max_tokens is too large: {max_tokens}. This server allows at most {cap} completion tokens \
                 (--llm-max-tokens), whereas you provided {max_tokens}."
            )));
        }
        self.limits.kv.check_alone(prompt.len(), max_tokens)?;
        Ok(GenerateRequest {
            prompt,
            max_tokens,
            sampling,
            stop: options.stop.clone(),
            ignore_eos: options.ignore_eos,
            logprobs: options.logprobs,
            grammar: None,
        })
    }

    /// The compiled grammar of a `response_format`: from the cache, or
    /// compiled on a blocking thread (one per CPU at a time, shared with
    /// tokenizing), so neither the async workers nor the engine wait.
    pub(crate) async fn grammar(&self, format: &ResponseFormat) -> InferResult<Grammar> {
        let grammars = self.grammars.as_ref().map_err(|why| InferError::invalid(why.clone()))?;
        let (key, hit) = grammars.cached(format)?;
        if let Some(grammar) = hit {
            return Ok(grammar);
        }
        let _permit =
            self.tokenizing.acquire().await.map_err(|_| InferError::internal("the tokenizer pool is closed"))?;
        let (grammars, format) = (grammars.clone(), format.clone());
        tokio::task::spawn_blocking(move || grammars.compile(key, &format))
            .await
            .unwrap_or_else(|_| Err(InferError::internal("compiling the response_format failed")))
    }

    /// Prepares and queues a request (compiling its `response_format`
    /// first). The caller counts it ([`Model`](crate::model::Model) does).
    pub(crate) async fn generate(&self, prompt: Vec<u32>, options: &GenerateOptions) -> InferResult<Generation> {
        let mut request = self.prepare(prompt, options)?;
        if let Some(format) = &options.response_format {
            request.grammar = Some(self.grammar(format).await?);
        }
        let prompt_tokens = request.prompt.len();
        let receiver = self.engine.submit(request)?;
        Ok(Generation::from_events(receiver, prompt_tokens))
    }

    /// Starts the `n` generations of a request, one per choice, on the same
    /// prompt. With a seed, choice `i` gets `seed + i`: each choice differs,
    /// and the request as a whole is reproducible. If one cannot start,
    /// those already started are dropped (cancelled). Not counted.
    pub(crate) async fn generate_choices(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        n: usize,
    ) -> InferResult<Vec<Generation>> {
        let mut generations = Vec::with_capacity(n);
        for i in 0..n {
            let mut options = options.clone();
            options.seed = options.seed.map(|seed| seed.wrapping_add(i as u64));
            generations.push(self.generate(prompt.to_vec(), &options).await?);
        }
        Ok(generations)
    }

    /// Stops taking requests.
    pub(crate) fn close(&self) {
        self.engine.close();
    }
}

/// Stop strings: at most [`MAX_STOP_STRINGS`], each at most
/// [`MAX_STOP_BYTES`] long.
pub(crate) fn check_stop(stop: &[String]) -> InferResult<()> {
    if stop.len() > MAX_STOP_STRINGS {
        return Err(InferError::invalid(format!("at most {MAX_STOP_STRINGS} stop strings are allowed")));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(InferError::invalid(format!(
            "stop strings may be at most {MAX_STOP_BYTES} bytes long (one is {} bytes)",
            long.len()
        )));
    }
    Ok(())
}

/// `max_tokens` for a prompt of `prompt` tokens: the requested one if it
/// fits the context, else a clear error; by default the model's default,
/// shortened to what the context leaves.
pub(crate) fn check_context(
    context: usize,
    prompt: usize,
    requested: Option<usize>,
    default: usize,
) -> InferResult<usize> {
    let too_long = |max_tokens: usize| {
        InferError::new(
            ErrorKind::ContextLengthExceeded,
            format!(
                "{CONTEXT_LENGTH_ERROR} {context} tokens. However, you requested {} tokens ({prompt} in the prompt, \
             {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                prompt.saturating_add(max_tokens)
            ),
        )
    };
    match requested {
        Some(0) => Err(InferError::invalid("max_tokens must be at least 1")),
        Some(max_tokens) if prompt.saturating_add(max_tokens) > context => Err(too_long(max_tokens)),
        Some(max_tokens) => Ok(max_tokens),
        None if prompt >= context => Err(too_long(1)),
        None => Ok(default.max(1).min(context - prompt)),
    }
}

/// Sees each event of a generation as it is read (before log-probabilities
/// are stripped): the cascade counts tokens and records shadow answers.
pub(crate) type Observer = Box<dyn FnMut(&Event) + Send>;

/// A running request: its events, and (when counted) its outcome
/// recorded once it ends. Dropping it cancels the request. The events come
/// from the engine, from an escalation target, or are replayed (a held
/// micro answer): the frontends read them all the same way.
pub struct Generation {
    receiver: UnboundedReceiver<Event>,
    /// Events read before the receiver's (a replayed, held answer).
    held: VecDeque<Event>,
    record: Option<RequestRecord>,
    finished: bool,
    /// Drop the log-probabilities from the events (computed for the
    /// cascade, not asked for by the client).
    strip_logprobs: bool,
    observer: Option<Observer>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
}

impl Generation {
    /// The generation whose events arrive on `receiver` (an engine's, or a
    /// task reading a remote answer); it ends at the first `Done` or
    /// `Error`, and with an error if the sender goes away before.
    pub fn from_events(receiver: UnboundedReceiver<Event>, prompt_tokens: usize) -> Generation {
        Generation {
            receiver,
            held: VecDeque::new(),
            record: None,
            finished: false,
            strip_logprobs: false,
            observer: None,
            prompt_tokens,
        }
    }

    /// A generation of known events only (a whole remote answer).
    pub fn replayed(events: Vec<Event>, prompt_tokens: usize) -> Generation {
        let (_, receiver) = tokio::sync::mpsc::unbounded_channel();
        Generation::from_events(receiver, prompt_tokens).replay(events)
    }

    /// This generation with `events` (read from it before) read again first.
    pub(crate) fn replay(mut self, events: Vec<Event>) -> Generation {
        self.held = events.into();
        self.finished = false;
        self
    }

    /// Events without their log-probabilities, when `strip`.
    pub(crate) fn stripped(mut self, strip: bool) -> Generation {
        self.strip_logprobs = strip;
        self
    }

    /// `observer` sees every event read from now on.
    pub(crate) fn observed(mut self, observer: Observer) -> Generation {
        self.observer = Some(observer);
        self
    }

    /// Records the outcome in `record` when the generation ends (as
    /// cancelled if it is dropped first).
    pub fn counted(mut self, record: RequestRecord) -> Generation {
        self.record = Some(record);
        self
    }

    /// The next event; `None` after the last (`Done` or `Error`).
    pub async fn next(&mut self) -> Option<Event> {
        if self.finished {
            return None;
        }
        let mut event = match self.held.pop_front() {
            Some(event) => event,
            None => self
                .receiver
                .recv()
                .await
                .unwrap_or_else(|| Event::Error(InferError::internal("the LLM engine stopped"))),
        };
        if let Some(observer) = &mut self.observer {
            observer(&event);
        }
        if self.strip_logprobs {
            if let Event::Text { logprobs, .. } | Event::Done { logprobs, .. } = &mut event {
                logprobs.clear();
            }
        }
        let result = match &event {
            Event::Done { .. } => Ok(()),
            Event::Error(error) => Err(error.kind),
            Event::Text { .. } => return Some(event),
        };
        self.finished = true;
        if let Some(record) = self.record.take() {
            record.finish(result);
        }
        Some(event)
    }

    /// Waits for the whole answer: its text, log-probabilities (if asked
    /// for), why it ended and the token counts.
    pub async fn collect(mut self) -> InferResult<Answer> {
        let mut text = String::new();
        let mut logprobs = Vec::new();
        while let Some(event) = self.next().await {
            match event {
                Event::Text { text: piece, logprobs: entries } => {
                    text.push_str(&piece);
                    logprobs.extend(entries);
                }
                Event::Done { text: last, logprobs: entries, finish_reason, usage } => {
                    text.push_str(&last);
                    logprobs.extend(entries);
                    return Ok(Answer { text, logprobs, finish_reason, usage });
                }
                Event::Error(error) => return Err(error),
            }
        }
        Err(InferError::internal("generation ended without a result"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_length_is_checked() {
        assert_eq!(check_context(100, 40, Some(60), 256), Ok(60));
        let err = check_context(100, 40, Some(61), 256).unwrap_err();
        assert_eq!(err.kind, ErrorKind::ContextLengthExceeded);
        assert!(err.message.starts_with(CONTEXT_LENGTH_ERROR), "{err}");
        assert!(err.message.contains("101 tokens (40 in the prompt, 61 for the completion)"), "{err}");
        // Without max_tokens: the default, cut to what is left.
        assert_eq!(check_context(100, 40, None, 256), Ok(60));
        assert_eq!(check_context(100, 40, None, 16), Ok(16));
        assert!(check_context(100, 100, None, 16).is_err());
        assert!(check_context(100, 1, Some(0), 16).is_err());
        assert!(check_context(100, 1, Some(usize::MAX), 16).is_err());
    }

    #[tokio::test]
    async fn held_events_replay_first_observed_and_stripped() {
        use request::{FinishReason, TokenLogprob, TokenText, Usage};
        let entry = TokenLogprob {
            token: TokenText { id: 1, bytes: b"a".to_vec(), text: "a".into() },
            logprob: -0.5,
            top: vec![],
        };
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let mut generation = Generation::from_events(receiver, 3);
        sender.send(Event::Text { text: "a".into(), logprobs: vec![entry.clone()] }).unwrap();
        let held = vec![generation.next().await.unwrap()];
        let done = Event::Done {
            text: String::new(),
            logprobs: vec![entry],
            finish_reason: FinishReason::Stop,
            usage: Usage { prompt_tokens: 3, completion_tokens: 2, cached_tokens: 0 },
        };
        sender.send(done).unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(0usize));
        let counter = seen.clone();
        let observer: Observer = Box::new(move |event: &Event| {
            if let Event::Text { logprobs, .. } | Event::Done { logprobs, .. } = event {
                *counter.lock().unwrap() += logprobs.len();
            }
        });
        let mut generation = generation.replay(held).stripped(true).observed(observer);
        assert!(
            matches!(generation.next().await, Some(Event::Text { text, logprobs }) if text == "a" && logprobs.is_empty())
        );
        assert!(matches!(generation.next().await, Some(Event::Done { logprobs, .. }) if logprobs.is_empty()));
        assert!(generation.next().await.is_none());
        assert_eq!(*seen.lock().unwrap(), 2, "the observer sees the log-probabilities before they are stripped");
        // A whole answer known in advance.
        let answer = Generation::replayed(vec![Event::Text { text: "x".into(), logprobs: vec![] }], 1).collect().await;
        assert!(answer.is_err(), "events that never end are an error, not a hang");
    }

    #[test]
    fn stop_strings_are_bounded() {
        assert!(check_stop(&["\n".repeat(MAX_STOP_BYTES)]).is_ok());
        let err = check_stop(&["x".repeat(MAX_STOP_BYTES + 1)]).unwrap_err();
        assert!(err.message.contains("at most 256 bytes"), "{err}");
        assert!(check_stop(&vec!["a".to_string(); MAX_STOP_STRINGS + 1]).is_err());
    }
}

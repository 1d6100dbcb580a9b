//! Generation requests and the events that answer them, in
//! protocol-neutral form: the frontends (OpenAI HTTP, Open Inference
//! Protocol) build the one and translate the other.

use crate::error::InferError;
use crate::llm::sampling::SamplingParams;
use crate::llm::structured::{Grammar, ResponseFormat};

/// A validated generation request: tokens in, limits and sampling set.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GenerateRequest {
    /// The prompt's tokens (BOS and chat template already applied).
    pub prompt: Vec<u32>,
    /// Most tokens to generate; prompt + max_tokens fits the context.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings (not sent).
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Structured output: the grammar every token must follow.
    pub grammar: Option<Grammar>,
}

impl GenerateRequest {
    /// Most positions the sequence may reach: its KV reservation.
    pub(crate) fn reach(&self) -> usize {
        self.prompt.len() + self.max_tokens
    }
}

/// What a request asks for, before it is checked against the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateOptions {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Structured output (`response_format`); `None` is free text.
    pub response_format: Option<ResponseFormat>,
}

/// Why generation ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn total_tokens(&self) -> usize {
        self.prompt_tokens + self.completion_tokens
    }
}

/// One step of a request's answer. A request gets any number of `Text`
/// events, then exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (the tokens of one engine step).
    Text(String),
    /// The end, with the last text held back (maybe empty).
    Done {
        text: String,
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(InferError),
}

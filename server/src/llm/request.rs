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
    /// Report log-probabilities with this many alternatives per token
    /// (`None`: not asked, nothing computed).
    pub logprobs: Option<usize>,
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
    /// Log-probabilities with this many alternatives per token (0 to
    /// [`MAX_TOP_LOGPROBS`](crate::llm::logprobs::MAX_TOP_LOGPROBS)).
    pub logprobs: Option<usize>,
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
    /// Prompt tokens whose KV came from the prefix cache (not prefilled).
    pub cached_tokens: usize,
}

impl Usage {
    pub fn total_tokens(&self) -> usize {
        self.prompt_tokens + self.completion_tokens
    }
}

/// A token as a client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenText {
    pub id: u32,
    /// Its bytes (a byte-level token may hold part of a UTF-8 character).
    pub bytes: Vec<u8>,
    /// Its bytes as text (an incomplete character becomes U+FFFD).
    pub text: String,
}

/// One alternative token and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: TokenText,
    pub logprob: f32,
}

/// The log-probability of one generated token and the most likely
/// alternatives at its step (most likely first), under the model's own
/// distribution (`llm::logprobs`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: TokenText,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

/// One step of a request's answer. A request gets any number of `Text`
/// events, then exactly one `Done` or `Error`. When log-probabilities are
/// asked for, every generated token (an end-of-sequence token excepted)
/// has one entry, sent with the text that its token completes (text held
/// back, by a stop string or an unfinished character, keeps its entries
/// back with it).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (the tokens of one engine step).
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// The end, with the last text held back (maybe empty).
    Done {
        text: String,
        logprobs: Vec<TokenLogprob>,
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(InferError),
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    /// Empty unless asked for.
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

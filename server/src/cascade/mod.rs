//! Micro -> macro escalation (docs/escalation.md): a backend wrapping an
//! LLM's own that hands a request on to a bigger, OpenAI-compatible model
//! when the small one should not answer it.
//!
//! The micro model answers first, with log-probabilities computed whatever
//! the client asked (they are stripped from what it sees unless it asked).
//! A whole answer is judged at its end; a streamed one after its first
//! `decideAfterTokens` tokens, held until then. The signals
//! ([`signals`]) say whether to escalate; the budget ([`budget`]) whether
//! it may; the target ([`target`]) answers in the same OpenAI shape. A
//! failed target falls back to the micro answer, marked as such. A client
//! never sees both answers. In shadow mode ([`shadow`]) the micro model
//! answers everything and both answers are recorded.

pub(crate) mod budget;
pub(crate) mod config;
pub(crate) mod oip;
pub(crate) mod shadow;
pub(crate) mod signals;
pub(crate) mod target;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use ferrite_contract::metrics::{OUTCOME_ESCALATED, OUTCOME_FALLBACK, OUTCOME_LOCAL};
use futures::future::join_all;

use crate::error::{ErrorKind, InferError, InferResult};
use crate::llm::request::{Event, GenerateOptions, Usage};
use crate::llm::{Generation, Llm, Observer};
use crate::metrics::CascadeMetrics;
use budget::Budget;
pub use config::{ConfidenceSpec, Escalation, EscalationConfig, Mode, Pricing, TargetSpec};
use shadow::{MicroAnswer, ShadowLog};
pub use signals::Reason;
use signals::{judge, Observed, Signals};
pub use target::FailureKind;
use target::{Failure, Remote, Target};

/// Request header (HTTP) and request parameter (OIP) forcing a side.
pub const ESCALATE: &str = "x-ferrite-escalate";
/// Response header and parameter: the model that answered.
pub const SERVED_BY: &str = "x-ferrite-served-by";
/// Response header and parameter: the micro answer's confidence.
pub const CONFIDENCE: &str = "x-ferrite-confidence";
/// Response header and parameter: why the request was escalated.
pub const ESCALATION: &str = "x-ferrite-escalation";
/// Response header and parameter: why the target's answer was replaced by
/// the micro one.
pub const FALLBACK: &str = "x-ferrite-fallback";

/// Quantile of the confidence reported when the confidence signal is off.
const DEFAULT_QUANTILE: f64 = 0.1;

/// Which API a text request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    /// OpenAI `/v1/chat/completions`.
    Chat,
    /// OpenAI `/v1/completions`.
    Completion,
    /// An Open Inference Protocol text request.
    Oip,
}

impl TextKind {
    /// The name in shadow records.
    pub fn as_str(self) -> &'static str {
        match self {
            TextKind::Chat => "chat",
            TextKind::Completion => "completion",
            TextKind::Oip => "oip",
        }
    }
}

/// The original request, for forwarding it to the target.
#[derive(Debug, Clone)]
pub enum Forward {
    /// An OpenAI request body, forwarded as it came (its `model` replaced
    /// by the target's).
    OpenAi {
        /// Chat or completion.
        kind: TextKind,
        /// The body's bytes.
        body: Bytes,
    },
    /// An OIP text request, forwarded as an OpenAI `/completions` request
    /// with the request's options.
    Oip {
        /// The prompt text.
        prompt: String,
    },
}

impl Forward {
    /// The API of the original request.
    pub fn kind(&self) -> TextKind {
        match self {
            Forward::OpenAi { kind, .. } => *kind,
            Forward::Oip { .. } => TextKind::Oip,
        }
    }
}

/// A side forced by the client (`x-ferrite-escalate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escalate {
    /// Go to the target (even past the budget).
    Always,
    /// Answer with the micro model (no decision, no holding).
    Never,
}

impl Escalate {
    /// Reads the header's or parameter's value (absent: `None`); anything
    /// but `always` or `never` is refused, naming the header.
    pub fn parse(value: Option<&str>) -> InferResult<Option<Escalate>> {
        match value.map(str::trim) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("always") => Ok(Some(Escalate::Always)),
            Some(v) if v.eq_ignore_ascii_case("never") => Ok(Some(Escalate::Never)),
            Some(v) => Err(InferError::invalid(format!("{ESCALATE} must be 'always' or 'never', not '{v}'"))),
        }
    }
}

/// A text generation request as the frontends give it to a model.
#[derive(Debug, Clone)]
pub struct TextRequest {
    /// The prompt's tokens.
    pub prompt: Vec<u32>,
    /// The options of each choice (choice `i` gets `seed + i`).
    pub options: GenerateOptions,
    /// Choices (`n`).
    pub n: usize,
    /// Whether the answer is streamed.
    pub stream: bool,
    /// The original request.
    pub forward: Forward,
    /// A side forced by the client.
    pub escalate: Option<Escalate>,
}

/// How a cascade answered a request: the response headers (HTTP) or
/// parameters (OIP).
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The micro model's name, or the target's `model`.
    pub served_by: String,
    /// The micro answer's confidence (micro answers that were judged).
    pub confidence: Option<f32>,
    /// Why it was escalated.
    pub escalation: Option<Reason>,
    /// Why the micro answer replaced the target's.
    pub fallback: Option<FailureKind>,
}

impl Route {
    /// The names and values to send (confidence with 4 decimals).
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![(SERVED_BY, self.served_by.clone())];
        if let Some(confidence) = self.confidence {
            fields.push((CONFIDENCE, format!("{:.4}", crate::llm::logprobs::finite(confidence))));
        }
        if let Some(reason) = self.escalation {
            fields.push((ESCALATION, reason.as_str().to_string()));
        }
        if let Some(kind) = self.fallback {
            fields.push((FALLBACK, kind.as_str().to_string()));
        }
        fields
    }
}

/// What to serve when the target fails.
enum Fallback {
    /// The micro answer, held.
    Held(Vec<Generation>),
    /// A micro answer, started now (the micro model had not run).
    Run(GenerateOptions),
    /// This error (the micro queue was full).
    Fail(InferError),
}

/// One choice of a micro answer, held until the decision.
struct Held {
    generation: Generation,
    events: Vec<Event>,
    observed: Observed,
    errored: bool,
}

/// Reads a generation's events until `limit` tokens (counted by their
/// log-probabilities, always computed for the cascade) or its end.
async fn hold(mut generation: Generation, limit: usize) -> Held {
    let (mut events, mut observed, mut text, mut errored) = (Vec::new(), Observed::default(), String::new(), false);
    while observed.logprobs.len() < limit {
        let Some(event) = generation.next().await else { break };
        match &event {
            Event::Text { text: piece, logprobs } => {
                text.push_str(piece);
                observed.logprobs.extend(logprobs.iter().map(|l| l.logprob));
            }
            Event::Done { text: piece, logprobs, finish_reason, .. } => {
                text.push_str(piece);
                observed.logprobs.extend(logprobs.iter().map(|l| l.logprob));
                observed.finish = Some(*finish_reason);
            }
            Event::Error(_) => errored = true,
        }
        let end = !matches!(event, Event::Text { .. });
        events.push(event);
        if end {
            break;
        }
    }
    if observed.finish.is_some() {
        observed.text = text;
    }
    Held { generation, events, observed, errored }
}

/// A model's cascade: its micro LLM, the target, the budget, the metrics.
pub(crate) struct Cascade {
    name: String,
    llm: Arc<Llm>,
    config: EscalationConfig,
    signals: Signals,
    /// Quantile of the reported confidence.
    quantile: f64,
    target: Arc<Target>,
    budget: Mutex<Budget>,
    epoch: Instant,
    shadow: Option<Arc<ShadowLog>>,
    metrics: Arc<CascadeMetrics>,
}

impl Cascade {
    /// The cascade of model `name` over `llm` (settings checked, key read).
    pub(crate) fn new(name: &str, llm: Arc<Llm>, escalation: Escalation) -> anyhow::Result<Cascade> {
        let config = escalation.config.clone();
        let target = Arc::new(Target::new(&escalation)?);
        let shadow = match (config.mode, &config.shadow_log) {
            (Mode::Shadow, Some(path)) => Some(Arc::new(ShadowLog::open(name, path)?)),
            _ => None,
        };
        let signals = Signals {
            confidence: config.confidence.map(|c| (c.quantile, c.threshold)),
            on_length_cutoff: config.on_length_cutoff,
            on_schema_failure: config.on_schema_failure,
        };
        tracing::info!(
            model = name,
            mode = config.mode.as_str(),
            target_model = target.model(),
            confidence = ?config.confidence,
            decide_after_tokens = config.decide_after_tokens,
            max_escalation_fraction = config.max_escalation_fraction,
            "escalation on"
        );
        Ok(Cascade {
            name: name.to_string(),
            llm,
            quantile: config.confidence.map_or(DEFAULT_QUANTILE, |c| c.quantile),
            budget: Mutex::new(Budget::new(config.max_escalation_fraction, config.window_seconds)),
            config,
            signals,
            target,
            epoch: Instant::now(),
            shadow,
            metrics: Arc::new(CascadeMetrics::new(name)),
        })
    }

    /// The micro LLM.
    pub(crate) fn llm(&self) -> &Arc<Llm> {
        &self.llm
    }

    fn admit(&self, wants: bool, forced: bool) -> bool {
        let second = self.epoch.elapsed().as_secs();
        self.budget.lock().expect("budget lock").admit(second, wants, forced)
    }

    fn micro_route(&self, confidence: Option<f32>) -> Route {
        Route { served_by: self.name.clone(), confidence, escalation: None, fallback: None }
    }

    /// Answers a text request: its choices and how they were answered.
    pub(crate) async fn generate(&self, request: TextRequest) -> InferResult<(Vec<Generation>, Route)> {
        let strip = request.options.logprobs.is_none();
        let mut micro_options = request.options.clone();
        micro_options.logprobs.get_or_insert(0);
        if self.config.mode == Mode::Shadow {
            return self.shadowed(request, micro_options, strip).await;
        }
        match request.escalate {
            Some(Escalate::Never) => {
                self.admit(false, false);
                let generations = self.llm.generate_choices(&request.prompt, &request.options, request.n).await?;
                self.metrics.decided(OUTCOME_LOCAL);
                return Ok((self.micro_served(generations, false, None), self.micro_route(None)));
            }
            Some(Escalate::Always) => {
                self.admit(true, true);
                return self.escalate(Reason::Forced, None, &request, Fallback::Run(micro_options), strip).await;
            }
            None => {}
        }
        let generations = match self.llm.generate_choices(&request.prompt, &micro_options, request.n).await {
            Ok(generations) => generations,
            Err(error) if error.kind == ErrorKind::QueueFull && self.config.on_queue_full => {
                if self.admit(true, false) {
                    return self.escalate(Reason::QueueFull, None, &request, Fallback::Fail(error), strip).await;
                }
                return Err(error);
            }
            Err(error) => return Err(error),
        };
        let limit = if request.stream { self.config.decide_after_tokens } else { usize::MAX };
        let held = join_all(generations.into_iter().map(|g| hold(g, limit))).await;
        let observed: Vec<Observed> = held.iter().map(|h| h.observed.clone()).collect();
        let verdict = judge(&observed, &self.signals, request.options.response_format.is_some(), self.quantile);
        if let Some(confidence) = verdict.confidence {
            self.metrics.confidence.observe(confidence as f64);
        }
        // An engine error is the client's answer, as without a cascade.
        let wants = verdict.reason.is_some() && !held.iter().any(|h| h.errored);
        let escalates = self.admit(wants, false);
        let replayed = held.into_iter().map(|h| h.generation.replay(h.events)).collect();
        match verdict.reason.filter(|_| escalates) {
            Some(reason) => self.escalate(reason, verdict.confidence, &request, Fallback::Held(replayed), strip).await,
            None => {
                self.metrics.decided(OUTCOME_LOCAL);
                Ok((self.micro_served(replayed, strip, None), self.micro_route(verdict.confidence)))
            }
        }
    }

    /// Hands the request to the target; on failure, serves `fallback`.
    async fn escalate(
        &self,
        reason: Reason,
        confidence: Option<f32>,
        request: &TextRequest,
        fallback: Fallback,
        strip: bool,
    ) -> InferResult<(Vec<Generation>, Route)> {
        tracing::debug!(model = %self.name, reason = reason.as_str(), confidence, "escalating");
        self.metrics.escalated(reason.as_str());
        let prompt_tokens = request.prompt.len();
        let on_end = self.on_target_end();
        let call =
            self.target.call(&request.forward, &request.options, request.n, request.stream, prompt_tokens, on_end);
        match call.await {
            Ok(remote) => {
                self.metrics.decided(OUTCOME_ESCALATED);
                let generations = match remote {
                    Remote::Whole(answers) => answers
                        .into_iter()
                        .map(|a| {
                            let done = Event::Done {
                                text: a.text,
                                logprobs: Vec::new(),
                                finish_reason: a.finish_reason,
                                usage: a.usage,
                            };
                            Generation::replayed(vec![done], prompt_tokens)
                        })
                        .collect(),
                    Remote::Stream(receivers) => {
                        receivers.into_iter().map(|r| Generation::from_events(r, prompt_tokens)).collect()
                    }
                };
                let route = Route {
                    served_by: self.target.model().to_string(),
                    confidence: None,
                    escalation: Some(reason),
                    fallback: None,
                };
                Ok((generations, route))
            }
            Err(failure) => {
                note_failure(&self.metrics, &failure);
                tracing::warn!(
                    model = %self.name,
                    kind = failure.kind.as_str(),
                    error = %failure.message,
                    "the escalation target failed: serving the micro answer"
                );
                self.metrics.decided(OUTCOME_FALLBACK);
                let (generations, strip) = match fallback {
                    Fallback::Held(generations) => (generations, strip),
                    Fallback::Run(options) => {
                        (self.llm.generate_choices(&request.prompt, &options, request.n).await?, strip)
                    }
                    Fallback::Fail(error) => return Err(error),
                };
                let route = Route {
                    served_by: self.name.clone(),
                    confidence,
                    escalation: Some(reason),
                    fallback: Some(failure.kind),
                };
                Ok((self.micro_served(generations, strip, None), route))
            }
        }
    }

    /// What a target call does to the metrics once its answer is read.
    fn on_target_end(&self) -> impl FnOnce(Result<usize, Failure>) + Send + 'static {
        let (metrics, started) = (self.metrics.clone(), Instant::now());
        move |result| match result {
            Ok(tokens) => {
                metrics.target_duration.observe(started.elapsed().as_secs_f64());
                metrics.macro_tokens.inc_by(tokens as u64);
                metrics.target_up(true);
            }
            Err(failure) => note_failure(&metrics, &failure),
        }
    }

    /// Micro choices as served: their tokens counted (and priced: spend
    /// avoided), log-probabilities stripped when the client did not ask;
    /// `extra` also sees the first choice's events.
    fn micro_served(&self, generations: Vec<Generation>, strip: bool, mut extra: Option<Observer>) -> Vec<Generation> {
        let pricing = self.config.pricing.unwrap_or_default();
        generations
            .into_iter()
            .enumerate()
            .map(|(index, generation)| {
                let metrics = self.metrics.clone();
                let mut extra = if index == 0 { extra.take() } else { None };
                let observer: Observer = Box::new(move |event: &Event| {
                    if let Event::Done { usage, .. } = event {
                        metrics.micro_tokens.inc_by(usage.completion_tokens as u64);
                        let prompt = if index == 0 { usage.prompt_tokens } else { 0 };
                        metrics.spend_avoided.inc_by(pricing.dollars(prompt, usage.completion_tokens));
                    }
                    if let Some(extra) = &mut extra {
                        extra(event);
                    }
                });
                generation.observed(observer).stripped(strip)
            })
            .collect()
    }

    /// Shadow mode: the micro answer, and the target asked in the
    /// background; both recorded.
    async fn shadowed(
        &self,
        request: TextRequest,
        micro_options: GenerateOptions,
        strip: bool,
    ) -> InferResult<(Vec<Generation>, Route)> {
        let generations = self.llm.generate_choices(&request.prompt, &micro_options, request.n).await?;
        self.metrics.decided(OUTCOME_LOCAL);
        let Some(shadow) = self.shadow.clone() else {
            return Ok((self.micro_served(generations, strip, None), self.micro_route(None)));
        };
        let Some(slot) = shadow.slot() else {
            self.metrics.shadow_dropped.inc();
            return Ok((self.micro_served(generations, strip, None), self.micro_route(None)));
        };
        let (micro_tx, micro_rx) = tokio::sync::oneshot::channel();
        let mut micro_tx = Some(micro_tx);
        let (mut text, mut logprobs) = (String::new(), Vec::new());
        let recorder: Observer = Box::new(move |event: &Event| match event {
            Event::Text { text: piece, logprobs: entries } => {
                text.push_str(piece);
                logprobs.extend(entries.iter().map(|e| e.logprob));
            }
            Event::Done { text: piece, logprobs: entries, finish_reason, usage } => {
                text.push_str(piece);
                logprobs.extend(entries.iter().map(|e| e.logprob));
                let Usage { prompt_tokens, completion_tokens, .. } = *usage;
                let answer = MicroAnswer {
                    text: std::mem::take(&mut text),
                    finish_reason: finish_reason.as_str(),
                    completion_tokens,
                    prompt_tokens,
                    logprobs: std::mem::take(&mut logprobs),
                };
                if let Some(tx) = micro_tx.take() {
                    let _ = tx.send(answer);
                }
            }
            Event::Error(_) => {}
        });
        let served = self.micro_served(generations, strip, Some(recorder));
        let (target, metrics, on_end) = (self.target.clone(), self.metrics.clone(), self.on_target_end());
        let (name, quantile, kind) = (self.name.clone(), self.quantile, request.forward.kind());
        tokio::spawn(async move {
            let started = Instant::now();
            let prompt_tokens = request.prompt.len();
            let call = target.call(&request.forward, &request.options, request.n, false, prompt_tokens, on_end);
            let answer = match call.await {
                Ok(Remote::Whole(mut answers)) if !answers.is_empty() => {
                    Ok((answers.swap_remove(0), started.elapsed().as_secs_f64()))
                }
                Ok(_) => Err("the target gave no answer".to_string()),
                Err(failure) => {
                    note_failure(&metrics, &failure);
                    Err(format!("{}: {}", failure.kind.as_str(), failure.message))
                }
            };
            // The micro answer ended (a cancelled or failed one is not recorded).
            if let Ok(micro) = micro_rx.await {
                let confidence = signals::quantile(&micro.logprobs, quantile);
                if let Some(confidence) = confidence {
                    metrics.confidence.observe(confidence as f64);
                }
                if !shadow.write(shadow::record(&name, kind.as_str(), &micro, confidence, &answer)) {
                    metrics.shadow_dropped.inc();
                }
            }
            drop(slot);
        });
        Ok((served, self.micro_route(None)))
    }
}

/// Counts a failed target call; a target that did not answer is down.
fn note_failure(metrics: &CascadeMetrics, failure: &Failure) {
    metrics.target_failed(failure.kind.as_str());
    if failure.down {
        metrics.target_up(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_escalate_header_is_checked() {
        assert_eq!(Escalate::parse(None), Ok(None));
        assert_eq!(Escalate::parse(Some("always")), Ok(Some(Escalate::Always)));
        assert_eq!(Escalate::parse(Some(" Never ")), Ok(Some(Escalate::Never)));
        let err = Escalate::parse(Some("sometimes")).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
        assert!(err.message.contains(ESCALATE) && err.message.contains("sometimes"), "{err}");
    }

    #[test]
    fn route_fields() {
        let route = Route {
            served_by: "micro".into(),
            confidence: Some(-0.123456),
            escalation: Some(Reason::Confidence),
            fallback: Some(FailureKind::Timeout),
        };
        assert_eq!(
            route.fields(),
            vec![
                (SERVED_BY, "micro".to_string()),
                (CONFIDENCE, "-0.1235".to_string()),
                (ESCALATION, "confidence".to_string()),
                (FALLBACK, "timeout".to_string()),
            ]
        );
        let plain = Route { served_by: "macro".into(), confidence: None, escalation: None, fallback: None };
        assert_eq!(plain.fields(), vec![(SERVED_BY, "macro".to_string())]);
    }
}

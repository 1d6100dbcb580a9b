//! `spec.escalation` and `status.escalation`: a micro model that hands the
//! requests it should not answer on to a bigger (macro) model, either
//! another ModelDeployment or a hosted OpenAI-compatible API.
//!
//! The field names are those of the server's `ferrite.json` key
//! `escalation` (the shared contract of issue 14); the operator resolves
//! what only it can (a ModelDeployment's address, a Secret's key as a file)
//! and hands the server the result ([`crate::resources::escalation`]).

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::SecretKeyRef;

/// Micro -> macro escalation, for LLM models only (a ferrite-server loads
/// the settings for every LLM it serves; other models ignore them, which the
/// operator cannot see before the model is downloaded). The micro model
/// answers; a request whose answer looks unreliable (a signal fires) is sent
/// to the target instead, and a client never sees both answers. A failed or
/// slow target falls back to the micro answer. Clients may force either
/// side with the request header `x-ferrite-escalate: always|never`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EscalationSpec {
    /// Where escalated requests go: another ModelDeployment of this
    /// namespace, or an OpenAI-compatible URL.
    pub target: EscalationTarget,
    /// `cascade` (the micro model answers, escalating when a signal fires),
    /// `shadow` (the micro model answers; the target is asked too and both
    /// answers are recorded, to calibrate the threshold), or `off`.
    #[serde(default)]
    pub mode: EscalationMode,
    /// Escalate when the answer's token log-probabilities are low. Absent:
    /// this signal is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<ConfidenceSignal>,
    /// Escalate when the request asks for JSON (`response_format`) and the
    /// answer does not parse as JSON.
    #[serde(default = "default_true")]
    pub on_schema_failure: bool,
    /// Escalate when the answer was cut off at the token limit
    /// (`finish_reason` length).
    #[serde(default)]
    pub on_length_cutoff: bool,
    /// Forward a request to the target instead of answering 429 when the
    /// micro model's queue is full.
    #[serde(default)]
    pub on_queue_full: bool,
    /// Streaming: the micro stream is held for this many tokens, then
    /// flushed or replaced by the target's answer. 1 to 4096.
    #[serde(default = "default_decide_after_tokens")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 4096").message("spec.escalation.decideAfterTokens must be between 1 and 4096"))]
    pub decide_after_tokens: i32,
    /// Budget: at most this fraction of requests is escalated over the
    /// sliding window of `windowSeconds`; beyond it, the micro model
    /// answers. 0 to 1.
    #[serde(default = "default_max_escalation_fraction")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("spec.escalation.maxEscalationFraction must be between 0 and 1"))]
    pub max_escalation_fraction: f64,
    /// The budget's sliding window, in seconds; also the window of
    /// `status.escalation.rate`. At least 1.
    #[serde(default = "default_window_seconds")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.escalation.windowSeconds must be at least 1"))]
    pub window_seconds: i32,
    /// Longest the whole call to the target may take, in seconds; more than
    /// 0 and at most 600.
    #[serde(default = "default_timeout_seconds")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 600.0").message("spec.escalation.timeoutSeconds must be more than 0 and at most 600"))]
    pub timeout_seconds: f64,
    /// The target's prices, for the spend-avoided figures
    /// (`ferrite_escalation_spend_avoided_dollars_total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
}

/// Where escalated requests go: exactly one of `modelDeployment` and `url`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.modelDeployment) != has(self.url)").message("spec.escalation.target needs exactly one of modelDeployment and url"))]
#[x_kube(validation = Rule::new("!has(self.url) || has(self.model)").message("spec.escalation.target.url needs spec.escalation.target.model"))]
#[x_kube(validation = Rule::new("has(self.url) || (!has(self.model) && !has(self.apiKeySecretRef))").message("spec.escalation.target.model and apiKeySecretRef go with url; a modelDeployment target is called by its own name"))]
pub struct EscalationTarget {
    /// Another ModelDeployment of this namespace (not this one), reached
    /// through its Service at `http://<name>.<namespace>.svc:8000/v1` under
    /// its own name as the model. It must serve plain HTTP without API keys
    /// (no `tls`, no `auth`); with a NetworkPolicy that names its clients,
    /// the operator lets this deployment's pods in on the HTTP port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self) <= 63").message("spec.escalation.target.modelDeployment must be the name of a ModelDeployment (a DNS label)"))]
    pub model_deployment: Option<String>,
    /// OpenAI-compatible base URL, ending in the API version (e.g.
    /// `https://api.example.com/v1`). No credentials in it: use
    /// `apiKeySecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#@]+(/.*)?$')").message("spec.escalation.target.url must start with http:// or https:// and carry no user:password@"))]
    pub url: Option<String>,
    /// The model name sent to `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("size(self) >= 1 && size(self) <= 256").message("spec.escalation.target.model must be 1 to 256 characters"))]
    pub model: Option<String>,
    /// A Secret key holding the API key for `url`, sent as
    /// `authorization: Bearer <key>`. Mounted into the server as a file,
    /// never an environment variable or an argument.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
}

/// How the micro and macro models share the traffic.
#[derive(schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EscalationMode {
    /// The micro model answers; escalate when a signal fires.
    #[default]
    Cascade,
    /// The micro model answers; the target is asked too and both answers
    /// are recorded (calibration).
    Shadow,
    /// No escalation.
    Off,
}

/// The confidence signal: escalate when the `quantile` of the answer's
/// sampled-token log-probabilities is below `threshold` (a quantile, not a
/// mean, which long answers bias). `ferrite-server calibrate` picks a
/// threshold from what `shadow` mode recorded.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfidenceSignal {
    /// Which quantile of the token log-probabilities: more than 0, at most 1
    /// (0.1: the 10th percentile).
    #[serde(default = "default_quantile")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("spec.escalation.confidence.quantile must be more than 0 and at most 1"))]
    pub quantile: f64,
    /// Escalate below this log-probability (0 or less; e.g. -2.0).
    #[x_kube(validation = Rule::new("self <= 0.0").message("spec.escalation.confidence.threshold must be 0 or less (a log-probability)"))]
    pub threshold: f64,
}

/// Prices of the target, in dollars per million tokens.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pricing {
    /// Dollars per million prompt tokens.
    #[x_kube(validation = Rule::new("self >= 0.0").message("spec.escalation.pricing.inputPerMillionTokens must not be negative"))]
    pub input_per_million_tokens: f64,
    /// Dollars per million completion tokens.
    #[x_kube(validation = Rule::new("self >= 0.0").message("spec.escalation.pricing.outputPerMillionTokens must not be negative"))]
    pub output_per_million_tokens: f64,
}

fn default_true() -> bool {
    true
}
fn default_decide_after_tokens() -> i32 {
    16
}
fn default_max_escalation_fraction() -> f64 {
    1.0
}
fn default_window_seconds() -> i32 {
    60
}
fn default_timeout_seconds() -> f64 {
    30.0
}
fn default_quantile() -> f64 {
    0.1
}

/// What the operator reads from the pods' metrics about escalation.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EscalationStatus {
    /// `escalated / total` over the last `spec.escalation.windowSeconds`
    /// (from the increase of `ferrite_cascade_decisions_total` between the
    /// operator's scrapes, about every 10 s, so the span is the window
    /// rounded up to a scrape); absent when no request was decided in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Requests answered by the target over the window.
    pub escalated: i64,
    /// Requests decided over the window: answered by the micro model,
    /// escalated, or meant for the target and answered by the micro model
    /// after the target failed (fallback).
    pub total: i64,
    /// Whether the last call of every pod to the target succeeded
    /// (`ferrite_escalation_target_up`); absent before any pod called it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_reachable: Option<bool>,
}

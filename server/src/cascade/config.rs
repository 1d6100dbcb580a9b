//! The escalation settings of one LLM (docs/escalation.md): the `escalation`
//! object of the model's `ferrite.json`, or of the file given with
//! `--escalation-file` (which wins, for every LLM). Field names are the
//! ModelDeployment's `spec.escalation` ones (camelCase); unknown fields are
//! refused, values are checked with errors that name the field.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// What the cascade does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The micro model answers; a request is handed to the target when a
    /// signal fires.
    #[default]
    Cascade,
    /// The micro model answers every request; the target is asked too, in
    /// the background, and both answers are recorded (calibration).
    Shadow,
    /// No cascade: the model serves as if there were no settings.
    Off,
}

impl Mode {
    /// The name in the settings.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Cascade => "cascade",
            Mode::Shadow => "shadow",
            Mode::Off => "off",
        }
    }
}

/// The escalation target, as the settings give it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetSpec {
    /// An OpenAI-compatible base URL, ending with `/v1`.
    pub url: Option<String>,
    /// The model name sent to the target.
    pub model: Option<String>,
    /// A file holding the Bearer token (read once, at load).
    pub api_key_file: Option<PathBuf>,
    /// Another ModelDeployment: only the operator resolves it (refused here).
    pub model_deployment: Option<String>,
}

/// The confidence signal: the answer's sampled-token log-probabilities at
/// `quantile` compared with `threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfidenceSpec {
    /// In (0, 1]; default 0.1.
    #[serde(default = "default_quantile")]
    pub quantile: f64,
    /// A log-probability, <= 0: below it the request escalates.
    pub threshold: f64,
}

fn default_quantile() -> f64 {
    0.1
}

/// The target's prices, for the spend-avoided figure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pricing {
    /// Dollars per million prompt tokens.
    #[serde(default)]
    pub input_per_million_tokens: f64,
    /// Dollars per million completion tokens.
    #[serde(default)]
    pub output_per_million_tokens: f64,
}

impl Pricing {
    /// What the target would charge for these tokens, in dollars.
    pub fn dollars(&self, prompt_tokens: usize, completion_tokens: usize) -> f64 {
        (prompt_tokens as f64 * self.input_per_million_tokens
            + completion_tokens as f64 * self.output_per_million_tokens)
            / 1e6
    }
}

/// The `escalation` object, as written (see [`EscalationConfig::check`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EscalationConfig {
    /// cascade (default), shadow or off.
    #[serde(default)]
    pub mode: Mode,
    /// Where escalated requests go.
    #[serde(default)]
    pub target: TargetSpec,
    /// Omitted: the confidence signal is off.
    pub confidence: Option<ConfidenceSpec>,
    /// Escalate when `response_format` is set and the answer is not JSON.
    #[serde(default = "yes")]
    pub on_schema_failure: bool,
    /// Escalate when the answer stopped at `max_tokens` (finish_reason length).
    #[serde(default)]
    pub on_length_cutoff: bool,
    /// Forward instead of answering 429 when the micro queue is full.
    #[serde(default)]
    pub on_queue_full: bool,
    /// Streaming: tokens held before deciding (1..=4096).
    #[serde(default = "default_decide_after")]
    pub decide_after_tokens: usize,
    /// Most of the requests over the window that may escalate, in [0, 1].
    #[serde(default = "one")]
    pub max_escalation_fraction: f64,
    /// The budget's sliding window (>= 1).
    #[serde(default = "default_window")]
    pub window_seconds: u64,
    /// The whole target call, in (0, 600].
    #[serde(default = "default_timeout")]
    pub timeout_seconds: f64,
    /// The target's prices (optional).
    pub pricing: Option<Pricing>,
    /// Shadow mode: the JSON-lines file records go to.
    pub shadow_log: Option<PathBuf>,
}

fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}
fn default_decide_after() -> usize {
    16
}
fn default_window() -> u64 {
    60
}
fn default_timeout() -> f64 {
    30.0
}

/// Largest `decideAfterTokens`.
pub(crate) const MAX_DECIDE_AFTER_TOKENS: usize = 4096;
/// Largest `timeoutSeconds`.
pub(crate) const MAX_TIMEOUT_SECONDS: f64 = 600.0;

/// The settings after checking: the target resolved, the key read.
#[derive(Clone)]
pub struct Escalation {
    /// The checked settings.
    pub config: EscalationConfig,
    /// The target's base URL, without a trailing `/`.
    pub url: String,
    /// The target's model name.
    pub target_model: String,
    /// The Bearer token, if any: never logged (Debug hides it).
    pub api_key: Option<String>,
}

impl fmt::Debug for Escalation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Escalation")
            .field("config", &self.config)
            .field("url", &self.url)
            .field("target_model", &self.target_model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl EscalationConfig {
    /// Parses an `escalation` object given alone (the `--escalation-file`).
    pub fn from_json(text: &[u8]) -> anyhow::Result<EscalationConfig> {
        serde_json::from_slice(text).map_err(|e| anyhow::anyhow!("invalid escalation settings: {e}"))
    }

    /// Reads the `--escalation-file` and checks it (without reading the key).
    pub fn read(path: &Path) -> anyhow::Result<EscalationConfig> {
        let text = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let config = EscalationConfig::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config.check().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// Checks every value; `Ok` with mode `off` whatever the rest says about
    /// the target. Messages name the field.
    pub fn check(&self) -> Result<(), String> {
        if let Some(c) = &self.confidence {
            if !(c.quantile > 0.0 && c.quantile <= 1.0) {
                return Err(format!("escalation.confidence.quantile must be in (0, 1], not {}", c.quantile));
            }
            if !(c.threshold <= 0.0) {
                return Err(format!(
                    "escalation.confidence.threshold must be <= 0 (a log-probability), not {}",
                    c.threshold
                ));
            }
        }
        if !(1..=MAX_DECIDE_AFTER_TOKENS).contains(&self.decide_after_tokens) {
            return Err(format!(
                "escalation.decideAfterTokens must be between 1 and {MAX_DECIDE_AFTER_TOKENS}, not {}",
                self.decide_after_tokens
            ));
        }
        if !(0.0..=1.0).contains(&self.max_escalation_fraction) {
            return Err(format!(
                "escalation.maxEscalationFraction must be in [0, 1], not {}",
                self.max_escalation_fraction
            ));
        }
        if self.window_seconds < 1 {
            return Err("escalation.windowSeconds must be at least 1".into());
        }
        if !(self.timeout_seconds > 0.0 && self.timeout_seconds <= MAX_TIMEOUT_SECONDS) {
            return Err(format!(
                "escalation.timeoutSeconds must be in (0, {MAX_TIMEOUT_SECONDS}], not {}",
                self.timeout_seconds
            ));
        }
        if let Some(p) = &self.pricing {
            if !(p.input_per_million_tokens >= 0.0 && p.output_per_million_tokens >= 0.0) {
                return Err("escalation.pricing: prices must be >= 0".into());
            }
        }
        if self.mode == Mode::Off {
            return Ok(());
        }
        if self.mode == Mode::Shadow && self.shadow_log.is_none() {
            return Err("escalation.shadowLog is required in mode shadow (where the records go)".into());
        }
        let target = &self.target;
        if target.model_deployment.is_some() {
            return Err("escalation.target.modelDeployment is resolved by the operator only; \
                        the server needs target.url and target.model"
                .into());
        }
        let url = target.url.as_deref().ok_or("escalation.target.url is required (an OpenAI-compatible base URL)")?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("escalation.target.url must start with http:// or https://, not '{url}'"));
        }
        reqwest::Url::parse(url).map_err(|e| format!("escalation.target.url '{url}' is not a URL: {e}"))?;
        match target.model.as_deref() {
            Some(model) if !model.is_empty() => Ok(()),
            _ => Err("escalation.target.model is required with target.url (the model name the target serves)".into()),
        }
    }

    /// The checked settings with the key read from `apiKeyFile`; `None` in mode `off`.
    pub fn resolve(self) -> anyhow::Result<Option<Escalation>> {
        self.check().map_err(|e| anyhow::anyhow!(e))?;
        if self.mode == Mode::Off {
            return Ok(None);
        }
        let api_key = match &self.target.api_key_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("escalation.target.apiKeyFile: cannot read {}: {e}", path.display())
                })?;
                let key = text.trim().to_string();
                if key.is_empty() {
                    anyhow::bail!("escalation.target.apiKeyFile {} is empty", path.display());
                }
                Some(key)
            }
        };
        let url = self.target.url.clone().unwrap_or_default().trim_end_matches('/').to_string();
        let target_model = self.target.model.clone().unwrap_or_default();
        Ok(Some(Escalation { config: self, url, target_model, api_key }))
    }

    /// The target call's time limit.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<EscalationConfig, String> {
        let config = EscalationConfig::from_json(json.as_bytes()).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    const TARGET: &str = r#""target": {"url": "http://macro:8000/v1", "model": "macro"}"#;

    #[test]
    fn defaults_and_full_settings() {
        let config = parse(&format!("{{{TARGET}}}")).unwrap();
        assert_eq!(config.mode, Mode::Cascade);
        assert!(config.on_schema_failure && !config.on_length_cutoff && !config.on_queue_full);
        assert_eq!((config.decide_after_tokens, config.window_seconds), (16, 60));
        assert_eq!((config.max_escalation_fraction, config.timeout_seconds), (1.0, 30.0));
        assert!(config.confidence.is_none());
        let config = parse(&format!(
            r#"{{"mode": "shadow", {TARGET}, "confidence": {{"threshold": -2}}, "onLengthCutoff": true,
                "onQueueFull": true, "decideAfterTokens": 4096, "maxEscalationFraction": 0.2, "windowSeconds": 1,
                "timeoutSeconds": 600, "pricing": {{"inputPerMillionTokens": 10, "outputPerMillionTokens": 30}},
                "shadowLog": "/tmp/s.jsonl"}}"#
        ))
        .unwrap();
        assert_eq!(config.confidence, Some(ConfidenceSpec { quantile: 0.1, threshold: -2.0 }));
        assert!((config.pricing.unwrap().dollars(1_000_000, 1_000_000) - 40.0).abs() < 1e-9);
    }

    #[test]
    fn bad_values_name_the_field() {
        let bad = |fields: &str| parse(&format!("{{{TARGET}, {fields}}}")).unwrap_err();
        assert!(bad(r#""confidence": {"quantile": 0, "threshold": -1}"#).contains("quantile"));
        assert!(bad(r#""confidence": {"quantile": 1.5, "threshold": -1}"#).contains("quantile"));
        assert!(bad(r#""confidence": {"threshold": 0.5}"#).contains("threshold"));
        assert!(bad(r#""decideAfterTokens": 0"#).contains("decideAfterTokens"));
        assert!(bad(r#""decideAfterTokens": 4097"#).contains("decideAfterTokens"));
        assert!(bad(r#""maxEscalationFraction": 1.5"#).contains("maxEscalationFraction"));
        assert!(bad(r#""windowSeconds": 0"#).contains("windowSeconds"));
        assert!(bad(r#""timeoutSeconds": 0"#).contains("timeoutSeconds"));
        assert!(bad(r#""timeoutSeconds": 601"#).contains("timeoutSeconds"));
        assert!(bad(r#""pricing": {"inputPerMillionTokens": -1}"#).contains("pricing"));
        assert!(bad(r#""mode": "shadow""#).contains("shadowLog"));
        assert!(bad(r#""onQueueful": true"#).contains("unknown field"));
        assert!(bad(r#""mode": "sometimes""#).contains("unknown variant"));
    }

    #[test]
    fn the_target_is_a_url_with_a_model() {
        let err = parse(r#"{"target": {"modelDeployment": "macro"}}"#).unwrap_err();
        assert!(err.contains("only") && err.contains("operator"), "{err}");
        assert!(parse(r#"{"target": {"model": "m"}}"#).unwrap_err().contains("target.url"));
        assert!(parse(r#"{"target": {"url": "http://x/v1"}}"#).unwrap_err().contains("target.model"));
        assert!(parse(r#"{"target": {"url": "ftp://x/v1", "model": "m"}}"#).unwrap_err().contains("http://"));
        // Mode off needs no target.
        assert!(parse(r#"{"mode": "off"}"#).is_ok());
        assert!(EscalationConfig::from_json(br#"{"mode": "off"}"#).unwrap().resolve().unwrap().is_none());
    }

    #[test]
    fn the_key_is_read_once_and_never_shown() {
        let dir = std::env::temp_dir().join(format!("ferrite-escalation-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("api-key");
        std::fs::write(&key, "sk-secret-value\n").unwrap();
        let json = format!(
            r#"{{"target": {{"url": "https://api.example/v1/", "model": "big", "apiKeyFile": "{}"}}}}"#,
            key.display()
        );
        let escalation = EscalationConfig::from_json(json.as_bytes()).unwrap().resolve().unwrap().unwrap();
        assert_eq!(escalation.api_key.as_deref(), Some("sk-secret-value"));
        assert_eq!(escalation.url, "https://api.example/v1");
        let shown = format!("{escalation:?}");
        assert!(!shown.contains("sk-secret") && shown.contains("<redacted>"), "{shown}");
        std::fs::write(&key, "\n").unwrap();
        let err = EscalationConfig::from_json(json.as_bytes()).unwrap().resolve().unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let missing = r#"{"target": {"url": "http://x/v1", "model": "m", "apiKeyFile": "/nonexistent/key"}}"#;
        let err = EscalationConfig::from_json(missing.as_bytes()).unwrap().resolve().unwrap_err().to_string();
        assert!(err.contains("apiKeyFile"), "{err}");
    }
}

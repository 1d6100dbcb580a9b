//! What a frontend gives the cascade (a text request, the original request
//! to forward, a forced side) and what it gets back besides the answer (the
//! route: the response headers of HTTP, the response parameters of OIP).

use bytes::Bytes;

use crate::cascade::{FailureKind, Reason};
use crate::error::{InferError, InferResult};
use crate::llm::request::GenerateOptions;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

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

//! The escalation signals and the decision, as pure functions of what the
//! micro model answered (unit-tested on synthetic log-probability sequences).
//!
//! Confidence is a low quantile of the answer's sampled-token
//! log-probabilities, not their mean: a mean is pulled up by the many easy
//! tokens of a long answer, a low quantile sees the few uncertain ones.

use crate::llm::request::FinishReason;

/// Why a request went to the target (metric label and header value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// `x-ferrite-escalate: always`.
    Forced,
    /// The micro queue was full (`onQueueFull`).
    QueueFull,
    /// The answer stopped at `max_tokens` (`onLengthCutoff`).
    Length,
    /// `response_format` was set and the answer is not JSON (`onSchemaFailure`).
    Schema,
    /// The confidence was below the threshold.
    Confidence,
}

impl Reason {
    /// Every reason, in the order the decision checks them.
    pub const ALL: [Reason; 5] =
        [Reason::Forced, Reason::QueueFull, Reason::Length, Reason::Schema, Reason::Confidence];

    /// The contract's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Forced => "forced",
            Reason::QueueFull => "queue_full",
            Reason::Length => "length",
            Reason::Schema => "schema",
            Reason::Confidence => "confidence",
        }
    }
}

/// The `q`-quantile of `logprobs` by the nearest-rank method, lower side:
/// the `ceil(q * n)`-th smallest value (1-based; the smallest when `q * n <
/// 1`), so that at least a fraction `q` of the tokens are at or below it.
/// No interpolation: the value is one of the tokens'. `None` without tokens.
/// NaN counts as the lowest log-probability.
pub(crate) fn quantile(logprobs: &[f32], q: f64) -> Option<f32> {
    if logprobs.is_empty() {
        return None;
    }
    let mut sorted: Vec<f32> = logprobs.iter().map(|&v| if v.is_nan() { f32::NEG_INFINITY } else { v }).collect();
    sorted.sort_by(f32::total_cmp);
    let n = sorted.len();
    let rank = (q.clamp(0.0, 1.0) * n as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// What the micro model answered for one choice, as far as it was held.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Observed {
    /// The sampled tokens' log-probabilities.
    pub(crate) logprobs: Vec<f32>,
    /// How it ended, if it ended inside the held window.
    pub(crate) finish: Option<FinishReason>,
    /// Its text, when it ended (for the schema check).
    pub(crate) text: String,
}

/// Which signals are on, and their settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Signals {
    /// `(quantile, threshold)` of the confidence signal, if on.
    pub(crate) confidence: Option<(f64, f64)>,
    pub(crate) on_length_cutoff: bool,
    pub(crate) on_schema_failure: bool,
}

/// What the signals say about an answer of one or more choices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Verdict {
    /// The least confident choice's confidence (`None`: no tokens, or the
    /// confidence signal is off and no quantile is set).
    pub(crate) confidence: Option<f32>,
    /// The first signal that fired (length > schema > confidence).
    pub(crate) reason: Option<Reason>,
}

/// Applies the signals to the choices. `json_expected`: the request set a
/// `response_format`. Length and schema judge only choices that ended (in
/// streaming, inside the held window); confidence judges the least
/// confident choice over the tokens seen. `quantile` is the one reported
/// when the confidence signal is off (shadow records, the header).
pub(crate) fn judge(choices: &[Observed], signals: &Signals, json_expected: bool, quantile_when_off: f64) -> Verdict {
    let q = signals.confidence.map_or(quantile_when_off, |(q, _)| q);
    let confidence = choices.iter().filter_map(|c| quantile(&c.logprobs, q)).reduce(f32::min);
    let length = signals.on_length_cutoff && choices.iter().any(|c| c.finish == Some(FinishReason::Length));
    let schema = signals.on_schema_failure
        && json_expected
        && choices
            .iter()
            .any(|c| c.finish.is_some() && serde_json::from_str::<serde::de::IgnoredAny>(&c.text).is_err());
    let unsure = match (signals.confidence, confidence) {
        (Some((_, threshold)), Some(value)) => (value as f64) < threshold,
        _ => false,
    };
    let reason = if length {
        Some(Reason::Length)
    } else if schema {
        Some(Reason::Schema)
    } else if unsure {
        Some(Reason::Confidence)
    } else {
        None
    };
    Verdict { confidence, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_is_nearest_rank_lower() {
        let lp = [-0.1, -3.0, -0.5, -0.01, -1.0];
        assert_eq!(quantile(&lp, 0.1), Some(-3.0), "ceil(0.5) = 1st smallest");
        assert_eq!(quantile(&lp, 0.2), Some(-3.0));
        assert_eq!(quantile(&lp, 0.21), Some(-1.0), "ceil(1.05) = 2nd smallest");
        assert_eq!(quantile(&lp, 0.5), Some(-0.5));
        assert_eq!(quantile(&lp, 1.0), Some(-0.01), "the largest");
        assert_eq!(quantile(&[], 0.1), None);
        assert_eq!(quantile(&[-2.0], 0.1), Some(-2.0));
        assert_eq!(quantile(&[-1.0, f32::NAN], 0.1), Some(f32::NEG_INFINITY));
        // Ten tokens at q = 0.1: the minimum, however long the answer is easy.
        let mut long = vec![-0.001; 99];
        long.push(-4.0);
        assert_eq!(quantile(&long, 0.01), Some(-4.0));
        assert_eq!(quantile(&long, 0.1), Some(-0.001));
    }

    fn answer(logprobs: &[f32], finish: Option<FinishReason>, text: &str) -> Observed {
        Observed { logprobs: logprobs.to_vec(), finish, text: text.into() }
    }

    const ALL_ON: Signals = Signals { confidence: Some((0.5, -1.0)), on_length_cutoff: true, on_schema_failure: true };

    #[test]
    fn the_first_signal_that_fires_is_the_reason() {
        let sure = answer(&[-0.1, -0.2], Some(FinishReason::Stop), "{}");
        let unsure = answer(&[-3.0, -2.0], Some(FinishReason::Stop), "{}");
        let cut = answer(&[-3.0, -0.2], Some(FinishReason::Length), "{\"a\":");
        assert_eq!(judge(&[sure.clone()], &ALL_ON, true, 0.1), Verdict { confidence: Some(-0.2), reason: None });
        assert_eq!(judge(&[unsure.clone()], &ALL_ON, true, 0.1).reason, Some(Reason::Confidence));
        assert_eq!(judge(&[cut.clone()], &ALL_ON, true, 0.1).reason, Some(Reason::Length));
        let no_length = Signals { on_length_cutoff: false, ..ALL_ON };
        assert_eq!(judge(&[cut.clone()], &no_length, true, 0.1).reason, Some(Reason::Schema));
        // Without response_format the text need not be JSON.
        assert_eq!(judge(&[cut.clone()], &no_length, false, 0.1).reason, Some(Reason::Confidence));
        let only_confidence = Signals { on_schema_failure: false, ..no_length };
        assert_eq!(judge(&[cut], &only_confidence, true, 0.1).reason, Some(Reason::Confidence));
        // Threshold 0 escalates any answer with a token; -100 none.
        let zero = Signals { confidence: Some((0.1, 0.0)), ..ALL_ON };
        assert_eq!(judge(&[sure.clone()], &zero, false, 0.1).reason, Some(Reason::Confidence));
        let never = Signals { confidence: Some((0.1, -100.0)), ..ALL_ON };
        assert_eq!(judge(&[unsure.clone()], &never, false, 0.1).reason, None);
        // n > 1: the least confident choice decides.
        assert_eq!(
            judge(&[sure, unsure], &ALL_ON, true, 0.1),
            Verdict { confidence: Some(-3.0), reason: Some(Reason::Confidence) }
        );
    }

    #[test]
    fn unfinished_answers_skip_length_and_schema() {
        // Streaming: the answer goes on past the held window.
        let held = answer(&[-0.1; 4], None, "");
        assert_eq!(judge(&[held], &ALL_ON, true, 0.1), Verdict { confidence: Some(-0.1), reason: None });
        // No tokens: no confidence, nothing fires.
        let empty = answer(&[], Some(FinishReason::Stop), "");
        assert_eq!(judge(&[empty], &ALL_ON, false, 0.1), Verdict { confidence: None, reason: None });
        // Confidence off: reported at the fallback quantile, never a reason.
        let off = Signals { confidence: None, ..ALL_ON };
        assert_eq!(
            judge(&[answer(&[-9.0, -0.1], None, "")], &off, false, 0.1),
            Verdict { confidence: Some(-9.0), reason: None }
        );
    }
}

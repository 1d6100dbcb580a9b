//! `ferrite-server calibrate`: the confidence threshold that escalates a
//! chosen fraction of traffic, from the records `shadow` mode wrote (one
//! JSON object per line, see docs/escalation). Pure: it reads text and
//! returns a report; the binary does the file and the printing.
//!
//! The threshold is picked as RouteLLM's `calibrate_threshold` does: a
//! quantile of the recorded scores, here the `target_fraction` quantile of
//! the confidences (linear interpolation, as pandas' `Series.quantile`),
//! since the cascade escalates the *low* ones (`confidence < threshold`).

use super::signals;
use serde::{Deserialize, Serialize};

/// Quantile of the token log-probabilities used when `--quantile` is not
/// given (the escalation settings' default).
pub const DEFAULT_QUANTILE: f64 = 0.1;

/// What `calibrate` prints (as JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Records read from the shadow log.
    pub records: usize,
    /// The quantile of each answer's log-probabilities taken as its confidence.
    pub quantile: f64,
    /// The fraction of requests asked to escalate.
    pub target_fraction: f64,
    /// Escalate when the confidence is below this (put it in
    /// `escalation.confidence.threshold`).
    pub threshold: f64,
    /// Records whose confidence is below `threshold`.
    pub escalated: usize,
    /// The other records (answered by the micro model).
    pub kept: usize,
    /// `escalated / records`: can differ from `target_fraction` where
    /// several records share a confidence.
    pub escalated_fraction: f64,
    /// Escalated records whose micro answer differs from the macro one
    /// (trimmed, lower-cased): escalations that change the answer.
    pub escalated_disagree: usize,
    /// Kept records whose micro answer differs from the macro one: what
    /// the threshold lets through.
    pub kept_disagree: usize,
    /// Records whose macro call failed (`macro.error`): not compared.
    pub macro_errors: usize,
}

/// A shadow log that cannot be calibrated from, or bad arguments.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CalibrateError {
    /// `--quantile` outside (0, 1].
    #[error("--quantile must be in (0, 1], got {0}")]
    Quantile(f64),
    /// `--target-fraction` outside [0, 1].
    #[error("--target-fraction must be in [0, 1], got {0}")]
    TargetFraction(f64),
    /// A line that is not a shadow record.
    #[error("shadow log line {line}: {message}")]
    Record {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// No record at all.
    #[error("the shadow log holds no records")]
    Empty,
}

/// One line of the shadow log: the fields calibration reads (others ignored).
#[derive(Debug, Deserialize)]
struct Record {
    logprobs: Vec<f64>,
    micro: Answer,
    #[serde(rename = "macro")]
    macro_: MacroSide,
}

#[derive(Debug, Deserialize)]
struct Answer {
    text: String,
}

/// The macro side: its answer, or the error of its call.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MacroSide {
    Answer(Answer),
    Error {
        #[allow(dead_code)] // present in the record; only its presence matters
        error: String,
    },
}

/// The confidence of an answer: the `q`-quantile of its sampled tokens'
/// log-probabilities, by the server's own definition
/// ([`signals::quantile_index`]: nearest rank, lower side), so a threshold picked
/// here fires on the same answers there; an answer without tokens has
/// confidence 0 (the server never escalates it on confidence).
pub fn confidence(logprobs: &[f64], q: f64) -> f64 {
    if logprobs.is_empty() {
        return 0.0;
    }
    let mut sorted = logprobs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[signals::quantile_index(sorted.len(), q)]
}

/// Linear-interpolation quantile of ascending `sorted` (pandas' default),
/// `p` in [0, 1]; `sorted` not empty.
fn interpolated_quantile(sorted: &[f64], p: f64) -> f64 {
    let position = p * (sorted.len() - 1) as f64;
    let low = position.floor() as usize;
    let high = position.ceil() as usize;
    sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
}

/// The normalized form answers are compared in.
fn normalize(text: &str) -> String {
    text.trim().to_lowercase()
}

/// Reads the shadow log `text` and picks the threshold that escalates
/// `target_fraction` of its records at quantile `q`. Blank lines are
/// skipped; any other line that is not a record is an error naming it.
pub fn calibrate(text: &str, target_fraction: f64, q: f64) -> Result<Report, CalibrateError> {
    if !(q > 0.0 && q <= 1.0) {
        return Err(CalibrateError::Quantile(q));
    }
    if !(0.0..=1.0).contains(&target_fraction) {
        return Err(CalibrateError::TargetFraction(target_fraction));
    }
    // (confidence, micro and macro disagree: Some(bool), or None on a macro error)
    let mut scored: Vec<(f64, Option<bool>)> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(line)
            .map_err(|e| CalibrateError::Record { line: index + 1, message: e.to_string() })?;
        let disagree = match &record.macro_ {
            MacroSide::Answer(answer) => Some(normalize(&answer.text) != normalize(&record.micro.text)),
            MacroSide::Error { .. } => None,
        };
        scored.push((confidence(&record.logprobs, q), disagree));
    }
    if scored.is_empty() {
        return Err(CalibrateError::Empty);
    }
    let mut sorted: Vec<f64> = scored.iter().map(|(c, _)| *c).collect();
    sorted.sort_by(f64::total_cmp);
    // Log-probabilities are <= 0 and so is every threshold the settings accept.
    let threshold = interpolated_quantile(&sorted, target_fraction).min(0.0);
    let mut report = Report {
        records: scored.len(),
        quantile: q,
        target_fraction,
        threshold,
        escalated: 0,
        kept: 0,
        escalated_fraction: 0.0,
        escalated_disagree: 0,
        kept_disagree: 0,
        macro_errors: 0,
    };
    for (confidence, disagree) in &scored {
        let escalated = *confidence < threshold;
        if escalated {
            report.escalated += 1;
        } else {
            report.kept += 1;
        }
        match disagree {
            None => report.macro_errors += 1,
            Some(true) if escalated => report.escalated_disagree += 1,
            Some(true) => report.kept_disagree += 1,
            Some(false) => {}
        }
    }
    report.escalated_fraction = report.escalated as f64 / report.records as f64;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shadow record as the server writes it.
    fn line(logprobs: &[f64], micro: &str, macro_: Option<&str>) -> String {
        let macro_side = match macro_ {
            Some(text) => {
                serde_json::json!({"text": text, "finish_reason": "stop", "completion_tokens": 1, "seconds": 0.1})
            }
            None => serde_json::json!({"error": "timeout"}),
        };
        serde_json::json!({
            "time": "2026-12-02T20:00:00Z", "model": "smollm2", "kind": "chat", "prompt_tokens": 12,
            "logprobs": logprobs, "confidence": confidence(logprobs, DEFAULT_QUANTILE),
            "micro": {"text": micro, "finish_reason": "stop", "completion_tokens": logprobs.len()},
            "macro": macro_side,
        })
        .to_string()
    }

    #[test]
    fn confidence_is_the_lower_nearest_rank_quantile() {
        let lp = [-0.5, -3.0, -0.1, -1.0, -2.0];
        // sorted: -3, -2, -1, -0.5, -0.1; the ceil(q * 5)-th smallest
        assert_eq!(confidence(&lp, 0.1), -3.0); // ceil(0.5) = 1
        assert_eq!(confidence(&lp, 0.25), -2.0); // ceil(1.25) = 2
        assert_eq!(confidence(&lp, 0.5), -1.0); // ceil(2.5) = 3
        assert_eq!(confidence(&lp, 0.7), -0.5); // ceil(3.5) = 4
        assert_eq!(confidence(&lp, 0.99), -0.1); // ceil(4.95) = 5
        assert_eq!(confidence(&lp, 1.0), -0.1);
        assert_eq!(confidence(&[-0.7], 0.1), -0.7);
        assert_eq!(confidence(&[], 0.1), 0.0);
    }

    /// A long confident answer with one doubtful token scores by that token
    /// at a low quantile, where the mean would hide it.
    #[test]
    fn a_low_quantile_sees_one_doubtful_token() {
        let mut lp = vec![-0.01; 19];
        lp.push(-4.0);
        assert_eq!(confidence(&lp, 0.01), -4.0);
        // one token in twenty lies below the 0.1 quantile's rank (ceil(2.0) = 2)
        assert_eq!(confidence(&lp, 0.1), -0.01);
        assert!(lp.iter().sum::<f64>() / lp.len() as f64 > -0.25);
    }

    #[test]
    fn threshold_escalates_the_target_fraction() {
        // Ten records with single-token answers: confidences -1.0 .. -0.1.
        let log: String =
            (1..=10).map(|i| line(&[-(i as f64) / 10.0], "a", Some(if i >= 8 { "b" } else { "a" })) + "\n").collect();
        let report = calibrate(&log, 0.2, 0.1).unwrap();
        assert_eq!(report.records, 10);
        // ascending: -1.0, -0.9, ...; the 0.2 quantile at position 1.8: -0.9 + 0.8 * 0.1
        assert!((report.threshold - -0.82).abs() < 1e-9, "{}", report.threshold);
        assert_eq!((report.escalated, report.kept), (2, 8));
        assert_eq!(report.escalated_fraction, 0.2);
        // the least confident three were wrong: two escalated, one kept
        assert_eq!((report.escalated_disagree, report.kept_disagree), (2, 1));
        assert_eq!(report.macro_errors, 0);

        let none = calibrate(&log, 0.0, 0.1).unwrap();
        assert_eq!((none.escalated, none.threshold), (0, -1.0));
        let half = calibrate(&log, 0.5, 0.1).unwrap();
        assert_eq!(half.escalated, 5);
    }

    #[test]
    fn answers_compare_trimmed_and_lower_cased_and_macro_errors_are_counted() {
        let log = [
            line(&[-3.0], " Paris\n", Some("paris")),
            line(&[-2.5], "Lyon", Some("Paris")),
            line(&[-0.1], "yes", None),
            String::new(),
            line(&[], "", Some("")),
        ]
        .join("\n");
        let report = calibrate(&log, 0.5, 0.1).unwrap();
        assert_eq!(report.records, 4);
        // confidences -3, -2.5, -0.1, 0: threshold -1.3 escalates the first two
        assert_eq!((report.escalated, report.kept), (2, 2));
        assert_eq!((report.escalated_disagree, report.kept_disagree), (1, 0));
        assert_eq!(report.macro_errors, 1);
    }

    #[test]
    fn the_quantile_changes_which_records_escalate() {
        // A: one bad token in many good ones; B: uniformly middling.
        let mut a = vec![-0.05; 10];
        a[0] = -5.0;
        let b = vec![-0.8; 10];
        let log = [line(&a, "x", Some("y")), line(&b, "x", Some("x"))].join("\n");
        let low = calibrate(&log, 0.5, 0.05).unwrap();
        assert_eq!((low.escalated, low.escalated_disagree), (1, 1));
        let high = calibrate(&log, 0.5, 0.5).unwrap();
        assert_eq!((high.escalated, high.escalated_disagree), (1, 0));
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let good = line(&[-1.0], "a", Some("a"));
        assert_eq!(calibrate(&good, 0.2, 0.0), Err(CalibrateError::Quantile(0.0)));
        assert_eq!(calibrate(&good, 0.2, 1.5), Err(CalibrateError::Quantile(1.5)));
        assert_eq!(calibrate(&good, 1.2, 0.1), Err(CalibrateError::TargetFraction(1.2)));
        assert!(matches!(calibrate(&good, f64::NAN, 0.1), Err(CalibrateError::TargetFraction(_))));
        assert!(matches!(calibrate(&good, 0.2, f64::NAN), Err(CalibrateError::Quantile(_))));
        assert_eq!(calibrate("\n  \n", 0.2, 0.1), Err(CalibrateError::Empty));
        let err = calibrate(&format!("{good}\nnot json\n"), 0.2, 0.1).unwrap_err();
        assert!(matches!(err, CalibrateError::Record { line: 2, .. }), "{err}");
        assert!(err.to_string().starts_with("shadow log line 2: "), "{err}");
        let missing = calibrate(r#"{"logprobs": [-1.0], "micro": {"text": "a"}}"#, 0.2, 0.1).unwrap_err();
        assert!(missing.to_string().contains("macro"), "{missing}");
    }
}

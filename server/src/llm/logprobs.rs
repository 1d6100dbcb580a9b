//! Log-probabilities of generated tokens, as OpenAI's `logprobs` reports
//! them: the sampled token's and those of the most likely tokens.
//!
//! They come from the model's own distribution, the log-softmax of the raw
//! logits (before penalties, temperature, top-k/top-p and any
//! structured-output mask), as vLLM reports them by default: a client (the
//! micro -> macro cascade) reads them as the model's confidence, which the
//! request's sampling settings must not change. Computed only for requests
//! that ask: two passes over the row (the maximum and the top entries, then
//! the sum of exponentials), no sort of the vocabulary.

use serde_json::{json, Value};

use crate::llm::request::{TokenLogprob, TokenText, TopLogprob};
use crate::llm::tokenizer::TextCodec;

/// Most alternatives a request may ask for per token (OpenAI's bound for
/// chat's `top_logprobs`).
pub(crate) const MAX_TOP_LOGPROBS: usize = 20;

/// What OpenAI reports for a log-probability of minus infinity (JSON has
/// no infinities).
pub(crate) const NEG_INFINITY_LOGPROB: f32 = -9999.0;

/// The log-probabilities of one step, as token ids.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepLogprobs {
    /// The sampled token and its log-probability.
    pub token: (u32, f32),
    /// The most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities of `token` and of the `top` most likely tokens of
/// `logits` under the softmax of `logits` (numerically stable: the maximum
/// is subtracted before exponentiating, the sum is kept in f64). NaN
/// logits count as impossible tokens.
pub(crate) fn step_logprobs(logits: &[f32], token: u32, top: usize) -> StepLogprobs {
    // Pass 1: the maximum and the `top` largest entries, kept sorted in a
    // small buffer (a logit enters only if it beats the buffer's last).
    let mut max = f32::NEG_INFINITY;
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(top + 1);
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if v > max {
            max = v;
        }
        if top > 0 && (best.len() < top || v > best[best.len() - 1].0) {
            // After the entries with a larger or equal logit: ties keep the lower id first.
            let at = best.partition_point(|&(b, _)| b >= v);
            best.insert(at, (v, i as u32));
            best.truncate(top);
        }
    }
    // Pass 2: log of the partition function.
    let log_z = if max == f32::NEG_INFINITY {
        f64::NEG_INFINITY
    } else {
        let sum: f64 = logits.iter().filter(|v| !v.is_nan()).map(|&v| ((v - max) as f64).exp()).sum();
        max as f64 + sum.ln()
    };
    let logprob = |v: f32| {
        let lp = if v.is_nan() || log_z == f64::NEG_INFINITY { f32::NEG_INFINITY } else { (v as f64 - log_z) as f32 };
        // Rounding may leave a certain token a hair above 0.
        lp.min(0.0)
    };
    let chosen = logits.get(token as usize).copied().unwrap_or(f32::NAN);
    StepLogprobs { token: (token, logprob(chosen)), top: best.into_iter().map(|(v, id)| (id, logprob(v))).collect() }
}

impl StepLogprobs {
    /// The entry a client sees: tokens as text and bytes.
    pub(crate) fn render(&self, codec: &TextCodec) -> TokenLogprob {
        TokenLogprob {
            token: codec.token_piece(self.token.0),
            logprob: self.token.1,
            top: self.top.iter().map(|&(id, logprob)| TopLogprob { token: codec.token_piece(id), logprob }).collect(),
        }
    }
}

/// A log-probability as JSON can carry it (OpenAI's -9999 for minus infinity).
pub(crate) fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        NEG_INFINITY_LOGPROB
    }
}

/// One token's entry in OpenAI's chat shape, `{token, logprob, bytes,
/// top_logprobs: [{token, logprob, bytes}]}` (also the OIP's `logprobs`).
pub(crate) fn chat_entry(entry: &TokenLogprob) -> Value {
    let one = |token: &TokenText, logprob: f32| json!({"token": token.text, "logprob": finite(logprob), "bytes": token.bytes});
    let mut value = one(&entry.token, entry.logprob);
    value["top_logprobs"] = entry.top.iter().map(|t| one(&t.token, t.logprob)).collect();
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: the textbook formula, in f64, with a full sort.
    fn reference(logits: &[f32]) -> Vec<(u32, f64)> {
        let z: f64 = logits.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        let mut all: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, &v)| (i as u32, v as f64 - z)).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all
    }

    #[test]
    fn matches_the_textbook_softmax() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.731).sin() * 8.0).collect();
        let expected = reference(&logits);
        let got = step_logprobs(&logits, 17, 5);
        assert_eq!(got.top.len(), 5);
        for ((id, lp), (want_id, want)) in got.top.iter().zip(&expected) {
            assert_eq!(id, want_id);
            assert!((*lp as f64 - want).abs() < 1e-5, "{lp} vs {want}");
        }
        let want17 = expected.iter().find(|e| e.0 == 17).unwrap().1;
        assert_eq!(got.token.0, 17);
        assert!((got.token.1 as f64 - want17).abs() < 1e-5);
        // Sorted, at most 0, and no more mass than there is.
        assert!(got.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(got.top.iter().all(|e| e.1 <= 0.0));
        let mass: f64 = got.top.iter().map(|e| (e.1 as f64).exp()).sum();
        assert!(mass <= 1.0 + 1e-6);
    }

    #[test]
    fn stable_for_huge_logits() {
        // A naive exp() would overflow to infinity here.
        let logits = [1000.0f32, 999.0, -1000.0];
        let got = step_logprobs(&logits, 1, 3);
        let expected = [-(1.0f64 + (-1.0f64).exp()).ln(), -1.0 - (1.0f64 + (-1.0f64).exp()).ln()];
        assert!((got.top[0].1 as f64 - expected[0]).abs() < 1e-6, "{got:?}");
        assert!((got.token.1 as f64 - expected[1]).abs() < 1e-6, "{got:?}");
        assert!(got.top[2].1 < -1000.0 && got.top[2].1.is_finite());
    }

    #[test]
    fn ties_keep_the_lower_id_first_and_the_sampled_token_is_always_reported() {
        let logits = [1.0f32, 3.0, 3.0, 0.0, 3.0];
        let got = step_logprobs(&logits, 3, 2);
        assert_eq!(got.top.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(got.token.0, 3);
        assert!(got.token.1 < got.top[1].1);
        // Zero alternatives: only the sampled token.
        assert!(step_logprobs(&logits, 1, 0).top.is_empty());
        // More asked than there are tokens: all of them.
        assert_eq!(step_logprobs(&logits, 1, 20).top.len(), 5);
    }

    #[test]
    fn certain_and_impossible_tokens() {
        let got = step_logprobs(&[0.0, f32::NEG_INFINITY, f32::NAN], 0, 3);
        assert_eq!(got.token.1, 0.0);
        assert_eq!(got.top.len(), 2, "NaN is not a candidate");
        assert_eq!(got.top[1], (1, f32::NEG_INFINITY));
        assert_eq!(step_logprobs(&[0.0, f32::NAN], 1, 0).token.1, f32::NEG_INFINITY);
        assert_eq!(step_logprobs(&[f32::NEG_INFINITY; 3], 0, 1).token.1, f32::NEG_INFINITY);
    }
}

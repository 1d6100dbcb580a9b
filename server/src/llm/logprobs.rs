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
/// logits count as impossible tokens. Passes over the row: its maximum,
/// the top entries (only if asked), the sum of exponentials.
pub(crate) fn step_logprobs(logits: &[f32], token: u32, top: usize) -> StepLogprobs {
    let max = row_max(logits);
    // The `top` largest entries, kept sorted in a small buffer (a logit
    // enters only if it beats the buffer's last: rarely, after the first few).
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &v) in logits.iter().enumerate() {
            if (best.len() < top && !v.is_nan()) || best.last().is_some_and(|&(last, _)| v > last) {
                // After the entries with a larger or equal logit: ties keep the lower id first.
                let at = best.partition_point(|&(b, _)| b >= v);
                best.insert(at, (v, i as u32));
                best.truncate(top);
            }
        }
    }
    // The log of the partition function.
    let log_z = if max == f32::NEG_INFINITY { f64::NEG_INFINITY } else { max as f64 + sum_exp(logits, max).ln() };
    let logprob = |v: f32| {
        let lp = if v.is_nan() || log_z == f64::NEG_INFINITY { f32::NEG_INFINITY } else { (v as f64 - log_z) as f32 };
        // Rounding may leave a certain token a hair above 0.
        lp.min(0.0)
    };
    let chosen = logits.get(token as usize).copied().unwrap_or(f32::NAN);
    StepLogprobs { token: (token, logprob(chosen)), top: best.into_iter().map(|(v, id)| (id, logprob(v))).collect() }
}

/// The largest value of a row, NaN ignored (`-inf` if there is none); in
/// lanes, so that it vectorizes.
fn row_max(logits: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// The sum of `exp(v - max)` over a row whose largest value is `max` (NaN
/// counts as impossible): 16 f32 lanes per block of 512, blocks summed in
/// f64, so the rounding error stays near f32's precision and the loop
/// vectorizes (a tenth of the time of calling `exp` per entry).
fn sum_exp(logits: &[f32], max: f32) -> f64 {
    const LANES: usize = 16;
    let mut total = 0.0f64;
    for block in logits.chunks(512) {
        let mut lanes = [0.0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += exp_nonpositive(v - max);
            }
        }
        let rest: f32 = chunks.remainder().iter().map(|&v| exp_nonpositive(v - max)).sum();
        total += lanes.iter().map(|&l| l as f64).sum::<f64>() + rest as f64;
    }
    total
}

/// `exp(x)` for `x <= 0`, within 3e-7 of it relative (below -87, and for
/// NaN, the smallest normal float: nothing next to the row's maximum's 1).
/// Plain arithmetic: `x = n ln 2 + r`, a degree-6 polynomial for `exp(r)`
/// on |r| <= ln 2 / 2, and `2^n` written into the exponent bits.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer, which lands in the low bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x >= -87.0 { x } else { -87.0 };
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let k = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    p * f32::from_bits(((k + 127) << 23) as u32)
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
    fn the_fast_exponential_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x > -87.0 {
            let want = (x as f64).exp();
            worst = worst.max((exp_nonpositive(x) as f64 - want).abs() / want);
            x -= 0.0007;
        }
        assert!(worst < 3e-7, "{worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37 && exp_nonpositive(f32::NAN) < 1e-37);
        let row: Vec<f32> = (0..49_152).map(|i| (i as f32 * 0.7311).sin() * 10.0).collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exact: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        assert!((sum_exp(&row, max) - exact).abs() / exact < 1e-6);
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

//! Choosing the next token from a row of logits: penalties (repetition,
//! presence, frequency), then greedy or temperature sampling with top-k and
//! top-p, drawn from a seeded generator so a seed reproduces a run. A
//! sequence with structured output also masks the tokens its grammar does
//! not allow (a separate step, before the choice).

use std::collections::{HashMap, HashSet};

use crate::llm::structured::{Constraint, Grammar};

/// How one sequence picks its tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SamplingParams {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Seed of the random generator; `None` draws one.
    pub seed: Option<u64>,
    /// CTRL-style penalty on tokens of the prompt and the output (1 is off).
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token already generated (OpenAI).
    pub presence_penalty: f32,
    /// Subtracted once per earlier occurrence in the output (OpenAI).
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges; the message names the parameter.
    pub(crate) fn check(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return Err(format!("temperature must be between 0 and 100, not {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], not {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!("repetition_penalty must be positive, not {}", self.repetition_penalty));
        }
        for (name, value) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if !(value.is_finite() && (-2.0..=2.0).contains(&value)) {
                return Err(format!("{name} must be between -2 and 2, not {value}"));
            }
        }
        Ok(())
    }

    fn penalizes(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// SplitMix64: small, fast and good enough to draw tokens; the same seed
/// gives the same stream on every platform.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A seed from the clock and a counter, for requests without one.
    pub(crate) fn fresh_seed() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The sampling state of one sequence: its parameters, generator, the
/// tokens the penalties look at, and scratch buffers reused every step.
#[derive(Debug)]
pub(crate) struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Occurrences of each generated token.
    counts: HashMap<u32, u32>,
    /// Prompt tokens, kept only for the repetition penalty.
    prompt: HashSet<u32>,
    scratch: Vec<f32>,
    candidates: Vec<(f32, u32)>,
    /// Structured output: the grammar's state, and the masked logits.
    constraint: Option<Constraint>,
    masked: Vec<f32>,
}

impl Sampler {
    pub(crate) fn new(params: SamplingParams, prompt: &[u32]) -> Sampler {
        let seed = params.seed.unwrap_or_else(Rng::fresh_seed);
        let prompt = if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { HashSet::new() };
        Sampler {
            params,
            rng: Rng::new(seed),
            counts: HashMap::new(),
            prompt,
            scratch: Vec::new(),
            candidates: Vec::new(),
            constraint: None,
            masked: Vec::new(),
        }
    }

    /// Restricts the sequence to what `grammar` allows (structured output).
    pub(crate) fn constrained(mut self, grammar: Option<&Grammar>) -> Sampler {
        self.constraint = grammar.map(Grammar::start);
        self
    }

    /// Records a generated token for the penalties.
    pub(crate) fn observe(&mut self, token: u32) {
        if self.params.penalizes() {
            *self.counts.entry(token).or_insert(0) += 1;
        }
        if let Some(constraint) = &mut self.constraint {
            constraint.advance(token);
        }
    }

    /// Picks the next token from one row of logits.
    pub(crate) fn sample(&mut self, logits: &[f32]) -> u32 {
        let logits = if self.params.penalizes() {
            self.scratch.clear();
            self.scratch.extend_from_slice(logits);
            apply_penalties(&mut self.scratch, &self.params, &self.prompt, &self.counts);
            &self.scratch[..]
        } else {
            logits
        };
        let logits = match &mut self.constraint {
            Some(constraint) => {
                constraint.mask(logits, &mut self.masked);
                &self.masked[..]
            }
            None => logits,
        };
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        sample_from(logits, &self.params, &mut self.rng, &mut self.candidates)
    }
}

/// Applies the repetition penalty to prompt and output tokens, and the
/// presence and frequency penalties to output tokens.
pub(crate) fn apply_penalties(
    logits: &mut [f32],
    params: &SamplingParams,
    prompt: &HashSet<u32>,
    counts: &HashMap<u32, u32>,
) {
    let repetition = params.repetition_penalty;
    if repetition != 1.0 {
        for &token in prompt.iter().chain(counts.keys().filter(|t| !prompt.contains(t))) {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit = if *logit > 0.0 { *logit / repetition } else { *logit * repetition };
            }
        }
    }
    for (&token, &count) in counts {
        if let Some(logit) = logits.get_mut(token as usize) {
            *logit -= params.presence_penalty + params.frequency_penalty * count as f32;
        }
    }
}

/// Index of the largest logit (the first on ties; NaN never wins).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

/// Temperature sampling restricted by top-k and top-p.
fn sample_from(logits: &[f32], params: &SamplingParams, rng: &mut Rng, candidates: &mut Vec<(f32, u32)>) -> u32 {
    candidates.clear();
    candidates.extend(logits.iter().enumerate().filter(|(_, v)| !v.is_nan()).map(|(i, &v)| (v, i as u32)));
    if candidates.is_empty() {
        return 0;
    }
    let descending = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if params.top_k > 0 && params.top_k < candidates.len() {
        candidates.select_nth_unstable_by(params.top_k - 1, descending);
        candidates.truncate(params.top_k);
    }
    // Sorted only when top-p needs the order.
    if params.top_p < 1.0 {
        candidates.sort_unstable_by(descending);
    }
    let max = candidates.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / params.temperature;
    let mut total = 0.0f64;
    for candidate in candidates.iter_mut() {
        candidate.0 = ((candidate.0 - max) * inv_t).exp();
        total += candidate.0 as f64;
    }
    if params.top_p < 1.0 {
        let keep_mass = params.top_p as f64 * total;
        let mut mass = 0.0f64;
        let mut keep = candidates.len();
        for (i, candidate) in candidates.iter().enumerate() {
            mass += candidate.0 as f64;
            if mass >= keep_mass {
                keep = i + 1;
                break;
            }
        }
        candidates.truncate(keep);
        total = mass.min(total);
    }
    let mut target = rng.next_f64() * total;
    for &(p, token) in candidates.iter() {
        target -= p as f64;
        if target < 0.0 {
            return token;
        }
    }
    candidates.last().map(|c| c.1).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: Some(7), ..SamplingParams::default() }
    }

    #[test]
    fn greedy_takes_the_largest_and_ignores_nan() {
        assert_eq!(argmax(&[0.1, f32::NAN, 3.0, 3.0, -1.0]), 2);
        let mut sampler = Sampler::new(params(0.0), &[]);
        assert_eq!(sampler.sample(&[1.0, 5.0, 2.0]), 1);
    }

    #[test]
    fn a_seed_reproduces_a_run() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut sampler = Sampler::new(SamplingParams { seed: Some(seed), ..params(1.0) }, &[]);
            (0..50).map(|_| sampler.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut sampler = Sampler::new(SamplingParams { top_k: 1, ..params(2.0) }, &[]);
        for _ in 0..20 {
            assert_eq!(sampler.sample(&[0.0, 1.0, 0.9, -3.0]), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps two tokens.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut sampler = Sampler::new(SamplingParams { top_p: 0.7, ..params(1.0) }, &[]);
        let seen: HashSet<u32> = (0..500).map(|_| sampler.sample(&logits)).collect();
        assert_eq!(seen, HashSet::from([0, 1]));
    }

    #[test]
    fn temperature_spreads_the_draws() {
        let logits = [1.0f32, 1.0, 1.0, 1.0];
        let mut sampler = Sampler::new(params(1.0), &[]);
        let mut hits = [0usize; 4];
        for _ in 0..4000 {
            hits[sampler.sample(&logits) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "{hits:?}");
    }

    #[test]
    fn penalties_change_the_winner() {
        let logits = [2.0f32, 1.9, -1.0];
        // Repetition: token 0 (in the prompt) is divided by 1.2 -> 1.67 < 1.9.
        let mut sampler = Sampler::new(SamplingParams { repetition_penalty: 1.2, ..params(0.0) }, &[0]);
        assert_eq!(sampler.sample(&logits), 1);
        // Negative logits are multiplied, so they fall further.
        let mut out = vec![-1.0f32];
        apply_penalties(
            &mut out,
            &SamplingParams { repetition_penalty: 2.0, ..params(0.0) },
            &HashSet::from([0]),
            &HashMap::new(),
        );
        assert_eq!(out, [-2.0]);
        // Presence: once generated, token 0 loses 0.5.
        let mut sampler = Sampler::new(SamplingParams { presence_penalty: 0.5, ..params(0.0) }, &[]);
        assert_eq!(sampler.sample(&logits), 0);
        sampler.observe(0);
        assert_eq!(sampler.sample(&logits), 1);
        // Frequency: grows with each occurrence.
        let mut sampler = Sampler::new(SamplingParams { frequency_penalty: 0.06, ..params(0.0) }, &[]);
        sampler.observe(0);
        assert_eq!(sampler.sample(&logits), 0);
        sampler.observe(0);
        assert_eq!(sampler.sample(&logits), 1);
    }

    #[test]
    fn ranges_are_checked() {
        assert!(SamplingParams { top_p: 0.0, ..params(1.0) }.check().unwrap_err().contains("top_p"));
        assert!(SamplingParams { temperature: -1.0, ..params(1.0) }.check().unwrap_err().contains("temperature"));
        assert!(SamplingParams { presence_penalty: 3.0, ..params(1.0) }.check().is_err());
        assert!(params(0.7).check().is_ok());
    }
}

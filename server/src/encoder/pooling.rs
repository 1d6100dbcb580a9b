//! From the graph's outputs to answers: pooling token vectors into one
//! vector, L2 normalization, Matryoshka truncation, and the softmax and
//! sigmoid of classifier and reranker logits. Pure functions.

use super::config::Pooling;

/// Pools one sequence's token vectors. `hidden` holds the sequence's rows
/// (`dim` floats each, padding included); the first `len` tokens are real
/// (inputs are padded on the right).
pub(crate) fn pool(hidden: &[f32], dim: usize, len: usize, pooling: Pooling) -> Vec<f32> {
    let len = len.max(1).min(hidden.len() / dim.max(1));
    let row = |i: usize| &hidden[i * dim..(i + 1) * dim];
    match pooling {
        Pooling::Cls => row(0).to_vec(),
        Pooling::Last => row(len - 1).to_vec(),
        Pooling::Mean => {
            // Summed in f64: long inputs keep the reference's precision.
            let mut sum = vec![0f64; dim];
            for i in 0..len {
                for (s, &x) in sum.iter_mut().zip(row(i)) {
                    *s += x as f64;
                }
            }
            sum.into_iter().map(|s| (s / len as f64) as f32).collect()
        }
    }
}

/// Scales `v` to unit length (a zero vector stays zero).
pub(crate) fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    if norm > 1e-12 {
        v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
    }
}

/// The embedding a client asked for: the first `dimensions` values
/// (Matryoshka models put the most information first), normalized again
/// when the model normalizes, so a shortened vector is a unit vector too.
pub(crate) fn shorten(mut v: Vec<f32>, dimensions: Option<usize>, normalized: bool) -> Vec<f32> {
    if let Some(d) = dimensions.filter(|&d| d < v.len()) {
        v.truncate(d);
        if normalized {
            normalize(&mut v);
        }
    }
    v
}

/// Probabilities of one row of logits.
pub(crate) fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits.iter().map(|&x| ((x - max) as f64).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| (e / sum) as f32).collect()
}

/// The probability of one logit.
pub(crate) fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-(x as f64)).exp())) as f32
}

/// Scores of one row of a classifier's or reranker's logits, as
/// text-embeddings-inference gives them: raw, or the sigmoid of a single
/// logit, or the softmax of several.
pub(crate) fn scores(logits: &[f32], raw: bool) -> Vec<f32> {
    match (raw, logits) {
        (true, _) => logits.to_vec(),
        (false, [one]) => vec![sigmoid(*one)],
        (false, _) => softmax(logits),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn pooling_reads_only_the_real_tokens() {
        // Three tokens of dim 2, the last one padding.
        let hidden = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        assert!(close(&pool(&hidden, 2, 2, Pooling::Mean), &[2.0, 3.0]));
        assert!(close(&pool(&hidden, 2, 2, Pooling::Cls), &[1.0, 2.0]));
        assert!(close(&pool(&hidden, 2, 2, Pooling::Last), &[3.0, 4.0]));
        assert!(close(&pool(&hidden, 2, 3, Pooling::Mean), &[104.0 / 3.0, 106.0 / 3.0]));
        // A length beyond the rows is clamped, not a panic.
        assert!(close(&pool(&hidden, 2, 9, Pooling::Last), &[100.0, 100.0]));
    }

    #[test]
    fn normalizing_and_shortening() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert!(close(&v, &[0.6, 0.8]));
        let mut zero = vec![0.0, 0.0];
        normalize(&mut zero);
        assert_eq!(zero, vec![0.0, 0.0]);
        let short = shorten(vec![0.6, 0.0, 0.8], Some(2), true);
        assert!(close(&short, &[1.0, 0.0]));
        assert!(close(&shorten(vec![3.0, 4.0, 5.0], Some(2), false), &[3.0, 4.0]));
        assert_eq!(shorten(vec![1.0, 2.0], None, true), vec![1.0, 2.0]);
        assert_eq!(shorten(vec![1.0, 2.0], Some(5), true), vec![1.0, 2.0]);
    }

    #[test]
    fn scores_as_tei_gives_them() {
        assert!(close(&softmax(&[0.0, 0.0]), &[0.5, 0.5]));
        let p = softmax(&[1000.0, 0.0]);
        assert!(p[0] > 0.999 && p.iter().all(|x| x.is_finite()), "no overflow: {p:?}");
        assert!(close(&scores(&[0.0], false), &[0.5]));
        assert!(close(&scores(&[2.0, -1.0], true), &[2.0, -1.0]));
        assert!((sigmoid(4.0) - 0.98201376).abs() < 1e-6);
    }
}

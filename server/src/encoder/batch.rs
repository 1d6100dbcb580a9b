//! Batches by token count, as text-embeddings-inference forms them: a
//! batch takes waiting inputs in order while its padded size (inputs times
//! the longest) stays within the token budget and its inputs within the
//! batch size; then every input is padded to the longest. Pure functions.

use super::tokenize::Tokens;

/// How much a batch may hold, and what it holds so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    max_tokens: usize,
    max_inputs: usize,
    inputs: usize,
    longest: usize,
}

impl Budget {
    /// An empty batch of at most `max_tokens` padded tokens and
    /// `max_inputs` inputs.
    pub(crate) fn new(max_tokens: usize, max_inputs: usize) -> Budget {
        Budget { max_tokens, max_inputs: max_inputs.max(1), inputs: 0, longest: 0 }
    }

    /// Adds an input of `len` tokens if it fits; the first always does.
    pub(crate) fn try_add(&mut self, len: usize) -> bool {
        let longest = self.longest.max(len);
        let fits = self.inputs == 0
            || (self.inputs < self.max_inputs && (self.inputs + 1).saturating_mul(longest) <= self.max_tokens);
        if fits {
            self.inputs += 1;
            self.longest = longest;
        }
        fits
    }

    /// Inputs taken.
    #[cfg(test)]
    pub(crate) fn inputs(&self) -> usize {
        self.inputs
    }

    /// Tokens of the padded batch.
    #[cfg(test)]
    pub(crate) fn padded_tokens(&self) -> usize {
        self.inputs * self.longest
    }
}

/// The inputs of a batch, padded on the right to the longest: ids, the
/// attention mask and token types, row-major `[rows, longest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Padded {
    pub rows: usize,
    pub longest: usize,
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub type_ids: Vec<i64>,
}

/// Pads `inputs` into one batch (`pad_id` in the padding).
pub(crate) fn pad(inputs: &[&Tokens], pad_id: i64) -> Padded {
    let longest = inputs.iter().map(|t| t.len()).max().unwrap_or(0);
    let size = inputs.len() * longest;
    let (mut ids, mut mask, mut type_ids) =
        (Vec::with_capacity(size), Vec::with_capacity(size), Vec::with_capacity(size));
    for tokens in inputs {
        let padding = longest - tokens.len();
        ids.extend_from_slice(&tokens.ids);
        ids.extend(std::iter::repeat_n(pad_id, padding));
        mask.extend(std::iter::repeat_n(1, tokens.len()));
        mask.extend(std::iter::repeat_n(0, padding));
        type_ids.extend_from_slice(&tokens.type_ids);
        type_ids.extend(std::iter::repeat_n(0, padding));
    }
    Padded { rows: inputs.len(), longest, ids, mask, type_ids }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Groups inputs of the given lengths into batches, in order.
    fn plan(lengths: &[usize], max_tokens: usize, max_inputs: usize) -> Vec<Vec<usize>> {
        let mut batches = Vec::new();
        let mut current = Vec::new();
        let mut budget = Budget::new(max_tokens, max_inputs);
        for &len in lengths {
            if !budget.try_add(len) {
                batches.push(std::mem::take(&mut current));
                budget = Budget::new(max_tokens, max_inputs);
                assert!(budget.try_add(len));
            }
            current.push(len);
        }
        batches.push(current);
        batches
    }

    #[test]
    fn batches_fill_to_the_padded_token_budget() {
        // 4 x 10 = 40 fits in 40; a fifth would pad to 50.
        assert_eq!(plan(&[10; 5], 40, 32), vec![vec![10; 4], vec![10]]);
        // One long input pads the others: 2 x 30 = 60 > 50.
        assert_eq!(plan(&[5, 5, 30, 5], 50, 32), vec![vec![5, 5], vec![30], vec![5]]);
        // The batch size caps the count whatever the tokens.
        assert_eq!(plan(&[1; 5], 1000, 2), vec![vec![1, 1], vec![1, 1], vec![1]]);
        // An input alone always runs, even over the budget.
        assert_eq!(plan(&[100], 10, 4), vec![vec![100]]);
        let mut budget = Budget::new(40, 8);
        assert!(budget.try_add(3) && budget.try_add(7));
        assert_eq!((budget.inputs(), budget.padded_tokens()), (2, 14));
    }

    #[test]
    fn padding_is_on_the_right_with_a_zero_mask() {
        let a = Tokens { ids: vec![101, 7, 102], type_ids: vec![0, 0, 0] };
        let b = Tokens { ids: vec![101, 102], type_ids: vec![0, 1] };
        let padded = pad(&[&a, &b], 0);
        assert_eq!((padded.rows, padded.longest), (2, 3));
        assert_eq!(padded.ids, vec![101, 7, 102, 101, 102, 0]);
        assert_eq!(padded.mask, vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(padded.type_ids, vec![0, 0, 0, 0, 1, 0]);
    }
}

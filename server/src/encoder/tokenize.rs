//! Text to the encoder's input ids with the model's `tokenizer.json`:
//! special tokens added, pairs (query, text) for rerankers, inputs longer
//! than `max_length` cut at the side asked for, or refused.

use std::path::Path;

use tokenizers::{EncodeInput, Encoding, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::config::Side;
use crate::error::{ErrorKind, InferError, InferResult};

/// One input of a request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Input {
    /// A text.
    Text(String),
    /// Two texts encoded together (a reranker's query and text, a
    /// classifier's sentence pair).
    Pair(String, String),
    /// Token ids, used as given (no special tokens added).
    Ids(Vec<u32>),
}

/// What to do with an input longer than the model takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Truncation {
    /// Cut it (`true`) or refuse the request.
    pub truncate: bool,
    /// Which end to cut.
    pub side: Side,
}

/// An encoded input: its ids and token types (the attention mask is ones
/// for every token; padding is added when a batch is built).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tokens {
    pub ids: Vec<i64>,
    pub type_ids: Vec<i64>,
}

impl Tokens {
    /// Tokens, special tokens included.
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }
}

/// The model's tokenizer, set up once for each truncation side.
pub(crate) struct TextEncoder {
    right: Tokenizer,
    left: Tokenizer,
    /// Without truncation: counts the tokens of a refused input.
    whole: Tokenizer,
    max_length: usize,
    vocab_size: usize,
    pad_id: i64,
}

impl TextEncoder {
    /// Loads `tokenizer.json`; inputs are cut at `max_length` tokens.
    pub(crate) fn load(path: &Path, max_length: usize) -> anyhow::Result<TextEncoder> {
        let mut whole =
            Tokenizer::from_file(path).map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        // Padding is masked out; its id is the tokenizer's own where it names one.
        let pad_id = whole.get_padding().map(|p| p.pad_id).or_else(|| whole.token_to_id("[PAD]")).unwrap_or(0) as i64;
        // Padding is the batcher's job; truncation is per request.
        whole.with_padding(None);
        whole.with_truncation(None).map_err(|e| anyhow::anyhow!("{e}"))?;
        let truncating = |direction| -> anyhow::Result<Tokenizer> {
            let mut tokenizer = whole.clone();
            tokenizer
                .with_truncation(Some(TruncationParams {
                    direction,
                    max_length,
                    strategy: TruncationStrategy::LongestFirst,
                    stride: 0,
                }))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(tokenizer)
        };
        let right = truncating(TruncationDirection::Right)?;
        let left = truncating(TruncationDirection::Left)?;
        let vocab_size = whole.get_vocab_size(true);
        Ok(TextEncoder { right, left, whole, max_length, vocab_size, pad_id })
    }

    /// Encodes input `index` of a request. An input longer than the model
    /// takes is cut, or refused (CONTEXT_LENGTH_EXCEEDED) when `truncation`
    /// says not to cut.
    pub(crate) fn encode(&self, index: usize, input: Input, truncation: Truncation) -> InferResult<Tokens> {
        let tokenizer = match truncation.side {
            Side::Right => &self.right,
            Side::Left => &self.left,
        };
        let encoded: EncodeInput = match input {
            Input::Text(text) => text.into(),
            Input::Pair(first, second) => (first, second).into(),
            Input::Ids(ids) => return self.ids(index, ids, truncation),
        };
        let encoding = tokenizer
            .encode_fast(encoded.clone(), true)
            .map_err(|e| InferError::invalid(format!("input {index} cannot be tokenized: {e}")))?;
        if !encoding.get_overflowing().is_empty() && !truncation.truncate {
            let count = self.whole.encode_fast(encoded, true).map(|e| e.len()).unwrap_or(encoding.len() + 1);
            return Err(self.too_long(index, count));
        }
        Ok(tokens_of(&encoding))
    }

    /// Token ids given by the client: each in the vocabulary, at most
    /// `max_length` of them (or cut).
    fn ids(&self, index: usize, mut ids: Vec<u32>, truncation: Truncation) -> InferResult<Tokens> {
        if ids.is_empty() {
            return Err(InferError::invalid(format!("input {index} has no tokens")));
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(InferError::invalid(format!(
                "input {index}: token id {bad} is not in the vocabulary (below {})",
                self.vocab_size
            )));
        }
        if ids.len() > self.max_length {
            if !truncation.truncate {
                return Err(self.too_long(index, ids.len()));
            }
            match truncation.side {
                Side::Right => ids.truncate(self.max_length),
                Side::Left => {
                    ids.drain(..ids.len() - self.max_length);
                }
            }
        }
        let type_ids = vec![0; ids.len()];
        Ok(Tokens { ids: ids.into_iter().map(i64::from).collect(), type_ids })
    }

    fn too_long(&self, index: usize, count: usize) -> InferError {
        InferError::new(
            ErrorKind::ContextLengthExceeded,
            format!(
                "input {index} has {count} tokens, more than the {} this model takes; shorten it or ask for \
                 truncation",
                self.max_length
            ),
        )
    }

    /// The id that pads a batch.
    pub(crate) fn pad_id(&self) -> i64 {
        self.pad_id
    }
}

fn tokens_of(encoding: &Encoding) -> Tokens {
    Tokens {
        ids: encoding.get_ids().iter().map(|&id| id as i64).collect(),
        type_ids: encoding.get_type_ids().iter().map(|&id| id as i64).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer with BERT's special tokens around each input.
    fn encoder(max_length: usize) -> TextEncoder {
        let json = r#"{
          "version": "1.0",
          "added_tokens": [
            {"id": 0, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
          ],
          "normalizer": null,
          "pre_tokenizer": {"type": "Whitespace"},
          "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [1], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [2], "tokens": ["[SEP]"]}}
          },
          "decoder": null,
          "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3, "b": 4, "c": 5, "d": 6},
                    "unk_token": "[UNK]"}
        }"#;
        let path = std::env::temp_dir().join(format!("ferrite-enc-tokenizer-{}-{max_length}.json", std::process::id()));
        std::fs::write(&path, json).unwrap();
        let encoder = TextEncoder::load(&path, max_length).unwrap();
        std::fs::remove_file(&path).unwrap();
        encoder
    }

    const CUT_RIGHT: Truncation = Truncation { truncate: true, side: Side::Right };
    const CUT_LEFT: Truncation = Truncation { truncate: true, side: Side::Left };
    const REFUSE: Truncation = Truncation { truncate: false, side: Side::Right };

    #[test]
    fn texts_and_pairs_get_special_tokens_and_types() {
        let e = encoder(16);
        let t = e.encode(0, Input::Text("a b".into()), REFUSE).unwrap();
        assert_eq!(t.ids, vec![1, 3, 4, 2]);
        assert_eq!(t.type_ids, vec![0; 4]);
        let p = e.encode(0, Input::Pair("a".into(), "c d".into()), REFUSE).unwrap();
        assert_eq!(p.ids, vec![1, 3, 2, 5, 6, 2]);
        assert_eq!(p.type_ids, vec![0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn long_inputs_are_cut_on_the_side_asked_or_refused() {
        let e = encoder(4);
        let text = || Input::Text("a b c d".into());
        assert_eq!(e.encode(0, text(), CUT_RIGHT).unwrap().ids, vec![1, 3, 4, 2]);
        assert_eq!(e.encode(0, text(), CUT_LEFT).unwrap().ids, vec![1, 5, 6, 2]);
        let err = e.encode(3, text(), REFUSE).unwrap_err();
        assert_eq!(err.kind, ErrorKind::ContextLengthExceeded);
        assert!(err.message.contains("input 3 has 6 tokens, more than the 4"), "{err}");
        // Exactly max_length fits.
        assert_eq!(e.encode(0, Input::Text("a b".into()), REFUSE).unwrap().len(), 4);
        let pair = e.encode(0, Input::Pair("a b c".into(), "d".into()), CUT_RIGHT).unwrap();
        assert_eq!(pair.len(), 4);
    }

    #[test]
    fn token_ids_are_checked() {
        let e = encoder(4);
        assert_eq!(e.encode(0, Input::Ids(vec![1, 3, 2]), REFUSE).unwrap().ids, vec![1, 3, 2]);
        assert!(e.encode(0, Input::Ids(vec![]), REFUSE).unwrap_err().message.contains("no tokens"));
        assert!(e.encode(0, Input::Ids(vec![7]), REFUSE).unwrap_err().message.contains("not in the vocabulary"));
        assert_eq!(e.encode(0, Input::Ids(vec![3; 5]), REFUSE).unwrap_err().kind, ErrorKind::ContextLengthExceeded);
        assert_eq!(e.encode(0, Input::Ids(vec![1, 3, 4, 5, 2]), CUT_LEFT).unwrap().ids, vec![3, 4, 5, 2]);
    }
}

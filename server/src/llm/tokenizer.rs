//! Text to tokens and back with the model's `tokenizer.json` (the
//! `tokenizers` crate), and the incremental decoder that turns a growing
//! token sequence into text deltas without splitting characters.

use std::path::Path;

use tokenizers::Tokenizer;

/// The model's tokenizer.
pub(crate) struct TextCodec {
    tokenizer: Tokenizer,
    /// The same tokenizer, reading special tokens' text as plain text.
    plain: Tokenizer,
    /// The text of every special token (`<|im_end|>`).
    special: Vec<String>,
    /// Bytes of the longest token's text (an upper bound: byte-level
    /// vocabularies spell some bytes with two).
    longest_token_bytes: usize,
}

impl TextCodec {
    /// Loads `tokenizer.json`.
    pub(crate) fn load(path: &Path) -> anyhow::Result<TextCodec> {
        let tokenizer =
            Tokenizer::from_file(path).map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        Ok(TextCodec::new(tokenizer))
    }

    /// Wraps a tokenizer.
    pub(crate) fn new(tokenizer: Tokenizer) -> TextCodec {
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        let special =
            tokenizer.get_added_tokens_decoder().into_values().filter(|t| t.special).map(|t| t.content).collect();
        let longest_token_bytes = tokenizer.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1);
        TextCodec { tokenizer, plain, special, longest_token_bytes }
    }

    /// Tokens of `text`. Special tokens written in the text (`<|im_start|>`)
    /// become their ids; no BOS is added here (the engine decides).
    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        Self::ids(&self.tokenizer, text)
    }

    /// Tokens of `text` with special tokens' text read as plain text: what a
    /// user typed can never become a control token.
    pub(crate) fn encode_plain(&self, text: &str) -> Result<Vec<u32>, String> {
        Self::ids(&self.plain, text)
    }

    fn ids(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, String> {
        tokenizer.encode_fast(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| format!("cannot tokenize: {e}"))
    }

    /// The first special token whose text appears in `text`.
    pub(crate) fn special_in<'a>(&'a self, text: &str) -> Option<&'a str> {
        self.special.iter().find(|s| text.contains(s.as_str())).map(String::as_str)
    }

    /// Bytes of the longest token: a text of more than `n` times this many
    /// bytes has more than `n` tokens.
    pub(crate) fn longest_token_bytes(&self) -> usize {
        self.longest_token_bytes
    }

    /// Text of `ids`, without special tokens.
    pub(crate) fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// The text of one token as the vocabulary spells it (`<|im_end|>`).
    pub(crate) fn token_text(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }
}

/// Turns tokens, one at a time, into text deltas. Byte-level tokens may end
/// inside a UTF-8 character: such text is held until the character is
/// complete. Decoding a short window (not the whole output) keeps each step
/// cheap, and decoding the window with its left context keeps spaces that
/// some tokenizers only produce between tokens.
#[derive(Debug, Default, Clone)]
pub(crate) struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// Tokens before this index have been emitted as text.
    read: usize,
}

impl IncrementalDecoder {
    /// Adds a token; returns the new text it completes (maybe empty).
    pub(crate) fn push(&mut self, decode: impl Fn(&[u32]) -> String, id: u32) -> String {
        self.ids.push(id);
        let before = decode(&self.ids[self.prefix..self.read]);
        let now = decode(&self.ids[self.prefix..]);
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return String::new();
        }
        let Some(delta) = now.get(before.len()..) else {
            return String::new();
        };
        let delta = delta.to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level stand-in: each token is one byte of UTF-8.
    fn bytes_decode(ids: &[u32]) -> String {
        String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<u8>>()).into_owned()
    }

    #[test]
    fn split_characters_wait_for_their_last_byte() {
        let mut decoder = IncrementalDecoder::default();
        let mut out = Vec::new();
        for b in "aé€!".bytes() {
            out.push(decoder.push(bytes_decode, b as u32));
        }
        assert_eq!(out, vec!["a", "", "é", "", "", "€", "!"]);
    }
}

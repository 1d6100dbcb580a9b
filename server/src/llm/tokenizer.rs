//! Text to tokens and back with the model's `tokenizer.json` (the
//! `tokenizers` crate), and the incremental decoder that turns a growing
//! token sequence into text deltas without splitting characters.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use tokenizers::{DecoderWrapper, Tokenizer};

use crate::llm::request::TokenText;

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
    /// For a byte-level vocabulary (GPT-2 style), the byte each of its 256
    /// characters stands for; empty otherwise.
    byte_of: HashMap<char, u8>,
    /// Added tokens (`<|im_end|>`): their text is literal, not byte-level.
    added: HashSet<u32>,
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
        let byte_of = match tokenizer.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => byte_level_chars(),
            _ => HashMap::new(),
        };
        let added = tokenizer.get_added_tokens_decoder().into_keys().collect();
        TextCodec { tokenizer, plain, special, longest_token_bytes, byte_of, added }
    }

    /// One token's bytes and text, as a log-probability entry shows it.
    pub(crate) fn token_piece(&self, id: u32) -> TokenText {
        let piece = self.tokenizer.id_to_token(id).unwrap_or_default();
        let bytes = if !self.byte_of.is_empty() && !self.added.contains(&id) {
            piece.chars().map(|c| self.byte_of.get(&c).copied()).collect::<Option<Vec<u8>>>()
        } else if self.added.contains(&id) {
            None
        } else {
            // Other vocabularies (SentencePiece's "▁", byte fallback): the decoder knows.
            Some(self.tokenizer.decode(&[id], false).unwrap_or_default().into_bytes())
        };
        let bytes = bytes.unwrap_or_else(|| piece.into_bytes());
        let text = String::from_utf8_lossy(&bytes).into_owned();
        TokenText { id, bytes, text }
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

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the
/// others for the characters from U+0100 on, in byte order.
fn byte_level_chars() -> HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut next = 0u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(255 + next).expect("below U+0200")
            };
            (c, b)
        })
        .collect()
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
    fn byte_level_alphabet() {
        let table = byte_level_chars();
        assert_eq!(table.len(), 256);
        assert_eq!(table[&'Ġ'], b' ');
        assert_eq!(table[&'Ċ'], b'\n');
        assert_eq!(table[&'a'], b'a');
        assert_eq!(table[&'é'], 0xE9);
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

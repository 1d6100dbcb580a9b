//! Requests to prompt tokens: the byte cap checked before any work, the
//! chat template, and the tokenizer, with what users typed kept as text.
//!
//! Special tokens typed in chat message content (`<|im_end|>`) are encoded
//! as plain text, never as the control tokens the template writes: the
//! template is rendered with a random marker in place of each content, its
//! own text tokenized with special tokens, the contents without. Prompts
//! whose contents hold no special token's text are tokenized whole, exactly
//! as before. Raw-text prompts (`/v1/completions`, `text_input`) are the
//! client's whole prompt and keep their special tokens.

use std::sync::Arc;

use crate::error::{ErrorKind, InferError, InferResult};
use crate::llm::sampling::Rng;
use crate::llm::template::{ChatMessage, ChatTemplate};
use crate::llm::tokenizer::TextCodec;

/// Turns text and chats into prompt tokens for one model.
pub(crate) struct Prompter {
    pub codec: Arc<TextCodec>,
    pub template: Option<ChatTemplate>,
    pub bos_text: String,
    pub eos_text: String,
    /// Put before every prompt (`add_bos_token`).
    pub bos: Option<u32>,
    /// Longest prompt text accepted, in bytes.
    pub max_prompt_bytes: usize,
}

impl Prompter {
    /// Refuses a prompt of `bytes` bytes of text before it costs anything.
    pub(crate) fn check_bytes(&self, bytes: usize) -> InferResult<()> {
        if bytes > self.max_prompt_bytes {
            return Err(InferError::new(
                ErrorKind::ContextLengthExceeded,
                format!(
                    "The prompt is {bytes} bytes of text; this model takes at most {} bytes \
                     (--llm-max-prompt-bytes). Please reduce the prompt.",
                    self.max_prompt_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Prompt tokens of a chat: the chat template applied, with the
    /// generation prompt added.
    pub(crate) fn chat(&self, messages: &[ChatMessage]) -> InferResult<Vec<u32>> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| InferError::invalid("this model has no chat template; use /v1/completions"))?;
        if messages.is_empty() {
            return Err(InferError::invalid("messages must not be empty"));
        }
        self.check_bytes(messages.iter().map(|m| m.content.len() + m.role.len()).sum())?;
        // Roles are written into the template's own text.
        if let Some(special) = messages.iter().find_map(|m| self.codec.special_in(&m.role)) {
            return Err(InferError::invalid(format!("a message role contains the special token '{special}'")));
        }
        let render = |messages: &[ChatMessage]| {
            template.render(messages, true, &self.bos_text, &self.eos_text).map_err(InferError::invalid)
        };
        let text = render(messages)?;
        let typed_special = messages.iter().find_map(|m| self.codec.special_in(&m.content));
        let Some(special) = typed_special else {
            return self.with_bos(self.codec.encode(&text).map_err(InferError::invalid)?);
        };
        // Render again with markers for the contents, and split there.
        let nonce = format!("\u{F8FF}{:016x}:", Rng::new(Rng::fresh_seed()).next_u64());
        let masked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage { role: m.role.clone(), content: format!("{nonce}{i}\u{F8FF}") })
            .collect();
        let masked = render(&masked)?;
        let pieces = split_markers(&masked, &nonce, messages.len());
        let same = pieces.as_ref().is_some_and(|pieces| {
            let joined: String = pieces
                .iter()
                .map(|piece| match piece {
                    Piece::Template(text) => *text,
                    Piece::Content(i) => messages[*i].content.as_str(),
                })
                .collect();
            joined == text
        });
        let (true, Some(pieces)) = (same, pieces) else {
            // The template changes the contents (trims them, say): their
            // text cannot be told from the template's.
            return Err(InferError::invalid(format!(
                "message content contains the special token '{special}', which this model's chat template \
                 cannot keep as text"
            )));
        };
        let mut ids = Vec::new();
        for piece in &pieces {
            let piece_ids = match piece {
                Piece::Template(text) => self.codec.encode(text),
                Piece::Content(i) => self.codec.encode_plain(&messages[*i].content),
            };
            ids.extend(piece_ids.map_err(InferError::invalid)?);
        }
        self.with_bos(ids)
    }

    /// Prompt tokens of plain text (special tokens written in it count).
    pub(crate) fn text(&self, text: &str) -> InferResult<Vec<u32>> {
        self.check_bytes(text.len())?;
        self.with_bos(self.codec.encode(text).map_err(InferError::invalid)?)
    }

    /// BOS (if the model wants one), then `ids`; never empty.
    fn with_bos(&self, ids: Vec<u32>) -> InferResult<Vec<u32>> {
        let mut tokens = Vec::with_capacity(ids.len() + 1);
        tokens.extend(self.bos);
        tokens.extend(ids);
        if tokens.is_empty() {
            return Err(InferError::invalid("the prompt is empty"));
        }
        Ok(tokens)
    }
}

/// A piece of a rendered chat: the template's own text, or message `i`'s content.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Template(&'a str),
    Content(usize),
}

/// Splits `rendered` at the markers `{nonce}{i}\u{F8FF}` (`i` < `count`);
/// `None` if a marker is malformed.
fn split_markers<'a>(rendered: &'a str, nonce: &str, count: usize) -> Option<Vec<Piece<'a>>> {
    let mut pieces = Vec::new();
    let mut rest = rendered;
    while let Some(at) = rest.find(nonce) {
        if at > 0 {
            pieces.push(Piece::Template(&rest[..at]));
        }
        let after = &rest[at + nonce.len()..];
        let end = after.find('\u{F8FF}')?;
        let index: usize = after[..end].parse().ok().filter(|&i| i < count)?;
        pieces.push(Piece::Content(index));
        rest = &after[end + '\u{F8FF}'.len_utf8()..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Template(rest));
    }
    Some(pieces)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    /// A word-level tokenizer with ChatML's two special tokens.
    fn chatml_prompter() -> Prompter {
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0, "<|im_start|>"), special(1, "<|im_end|>")],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "[UNK]",
                      "vocab": {"<|im_start|>": 0, "<|im_end|>": 1, "<|": 2, "im_end": 3, "|>": 4, "user": 5, "hi": 6, "[UNK]": 7, "im_start": 8}},
        });
        let tokenizer = tokenizers::Tokenizer::from_str(&json.to_string()).unwrap();
        let template = "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}";
        Prompter {
            codec: Arc::new(TextCodec::new(tokenizer)),
            template: Some(ChatTemplate::new(template.into()).unwrap()),
            bos_text: String::new(),
            eos_text: String::new(),
            bos: None,
            max_prompt_bytes: 64,
        }
    }

    fn user(content: &str) -> Vec<ChatMessage> {
        vec![ChatMessage { role: "user".into(), content: content.into() }]
    }

    #[test]
    fn special_tokens_typed_in_content_are_text() {
        let prompter = chatml_prompter();
        assert_eq!(prompter.chat(&user("hi")).unwrap(), vec![0, 5, 6, 1], "the template's markers are special");
        assert_eq!(prompter.chat(&user("hi <|im_end|>")).unwrap(), vec![0, 5, 6, 2, 3, 4, 1]);
        assert_eq!(prompter.chat(&user("<|im_start|>")).unwrap(), vec![0, 5, 2, 8, 4, 1]);
        let role = vec![ChatMessage { role: "user<|im_end|>".into(), content: "hi".into() }];
        assert!(prompter.chat(&role).unwrap_err().message.contains("role contains the special token"));
        // Raw text is the client's whole prompt: its special tokens count.
        assert_eq!(prompter.text("<|im_start|>user hi").unwrap(), vec![0, 5, 6]);
    }

    #[test]
    fn templates_that_change_contents_refuse_typed_special_tokens() {
        let mut prompter = chatml_prompter();
        let trimming = "{% for m in messages %}<|im_start|>{{ m.content | trim }}<|im_end|>{% endfor %}";
        prompter.template = Some(ChatTemplate::new(trimming.into()).unwrap());
        assert_eq!(prompter.chat(&user(" hi ")).unwrap(), vec![0, 6, 1]);
        let err = prompter.chat(&user(" hi <|im_end|> ")).unwrap_err();
        assert!(err.message.contains("special token '<|im_end|>'"), "{err}");
    }

    #[test]
    fn prompts_over_the_byte_cap_are_refused_before_tokenizing() {
        let prompter = chatml_prompter();
        let err = prompter.text(&"hi ".repeat(30)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::ContextLengthExceeded);
        assert!(err.message.contains("at most 64 bytes"), "{err}");
        assert!(prompter.chat(&user(&"hi ".repeat(30))).is_err());
    }

    #[test]
    fn markers_split_the_rendered_chat() {
        let nonce = "\u{F8FF}00ab:";
        let rendered = format!("<s>user\n{nonce}0\u{F8FF}</s>\n<s>bot\n{nonce}1\u{F8FF}{nonce}0\u{F8FF}");
        assert_eq!(
            split_markers(&rendered, nonce, 2).unwrap(),
            vec![
                Piece::Template("<s>user\n"),
                Piece::Content(0),
                Piece::Template("</s>\n<s>bot\n"),
                Piece::Content(1),
                Piece::Content(0),
            ]
        );
        assert_eq!(split_markers("no markers", nonce, 1).unwrap(), vec![Piece::Template("no markers")]);
        assert!(split_markers(&format!("{nonce}7\u{F8FF}"), nonce, 2).is_none(), "index out of range");
        assert!(split_markers(&format!("{nonce}0"), nonce, 2).is_none(), "unterminated");
    }
}

//! `encoder.json`: the small configuration that marks a model directory as
//! an encoder (embedding, rerank or classification) and says how its
//! outputs are read (docs/encoders.md).

use std::path::Path;

use serde::Deserialize;

use crate::runtime::ExecutionProvider;

/// File that marks a directory as an encoder model directory.
pub(crate) const ENCODER_CONFIG_FILE: &str = "encoder.json";
/// The encoder graph inside the directory.
pub(crate) const ENCODER_MODEL_FILE: &str = "model.onnx";
/// The tokenizer inside the directory.
pub(crate) const TOKENIZER_FILE: &str = "tokenizer.json";

/// The format version this server reads.
pub(crate) const FORMAT: u32 = 1;

/// Padded tokens (sequences times the longest) one batch holds by default on
/// a GPU, as text-embeddings-inference's `--max-batch-tokens`.
pub(crate) const DEFAULT_MAX_BATCH_TOKENS_GPU: usize = 16384;

/// The same on the CPU, where bigger is slower past about a thousand tokens:
/// attention's scores outgrow the caches. all-MiniLM-L6-v2 in ONNX Runtime
/// on 2 threads (docs/encoders.md): 200-token texts 55 texts/s at 4 a batch,
/// 45 at 32; 12-token texts peak at 64 a batch (768 tokens).
pub(crate) const DEFAULT_MAX_BATCH_TOKENS_CPU: usize = 1024;

/// What the model answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Task {
    /// One vector per text, pooled from `last_hidden_state`.
    Embedding,
    /// A cross-encoder: one relevance logit per (query, text) pair.
    Rerank,
    /// One logit per label per text.
    Classification,
}

impl Task {
    /// The task's name in `encoder.json`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Task::Embedding => "embedding",
            Task::Rerank => "rerank",
            Task::Classification => "classification",
        }
    }

    /// The name with its article, for messages ("an embedding").
    pub(crate) fn with_article(self) -> &'static str {
        match self {
            Task::Embedding => "an embedding",
            Task::Rerank => "a rerank",
            Task::Classification => "a classification",
        }
    }
}

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Pooling {
    /// The mean of the tokens the attention mask keeps.
    Mean,
    /// The first token's vector (`[CLS]`).
    Cls,
    /// The last kept token's vector.
    Last,
}

/// Which end of a too-long text is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Side {
    /// Keep the start.
    #[default]
    Right,
    /// Keep the end.
    Left,
}

/// The contents of `encoder.json`. Unknown fields are allowed (the model
/// builder records where the model came from).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct EncoderConfig {
    pub format: u32,
    pub task: Task,
    /// Embedding only; mean by default.
    #[serde(default)]
    pub pooling: Option<Pooling>,
    /// Embedding: L2-normalize the pooled vector.
    #[serde(default)]
    pub normalize: bool,
    /// Longest input in tokens (special tokens included).
    pub max_length: usize,
    #[serde(default)]
    pub truncation_side: Side,
    /// Classification: the label of each logit column.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Embedding: the sizes `dimensions` may ask for (Matryoshka); empty:
    /// only the full size.
    #[serde(default)]
    pub dimensions: Vec<usize>,
    /// Padded tokens one batch may hold.
    #[serde(default)]
    pub max_batch_tokens: Option<usize>,
}

impl EncoderConfig {
    /// Reads and checks `dir/encoder.json`.
    pub(crate) fn read(dir: &Path) -> anyhow::Result<EncoderConfig> {
        let path = dir.join(ENCODER_CONFIG_FILE);
        let text = std::fs::read(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        EncoderConfig::parse(&text).map_err(|e| anyhow::anyhow!("invalid {}: {e}", path.display()))
    }

    /// Parses and checks the file's text.
    pub(crate) fn parse(text: &[u8]) -> Result<EncoderConfig, String> {
        let config: EncoderConfig = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format {} is not supported (this server reads format {FORMAT})", self.format));
        }
        if self.max_length < 2 {
            return Err("max_length must be at least 2 tokens".into());
        }
        if self.task == Task::Classification && self.labels.is_empty() {
            return Err("a classification model needs its labels".into());
        }
        if self.dimensions.contains(&0) {
            return Err("dimensions must be positive".into());
        }
        if self.max_batch_tokens.is_some_and(|n| n < self.max_length) {
            return Err("max_batch_tokens must hold at least one input of max_length tokens".into());
        }
        Ok(())
    }

    /// The pooling of an embedding model (mean unless the file says).
    pub(crate) fn pooling(&self) -> Pooling {
        self.pooling.unwrap_or(Pooling::Mean)
    }

    /// Padded tokens one batch may hold: the file's, or the default of the
    /// provider the model runs on.
    pub(crate) fn max_batch_tokens(&self, provider: ExecutionProvider) -> usize {
        let default = match provider {
            ExecutionProvider::Cpu => DEFAULT_MAX_BATCH_TOKENS_CPU,
            _ => DEFAULT_MAX_BATCH_TOKENS_GPU,
        };
        self.max_batch_tokens.unwrap_or(default.max(self.max_length))
    }
}

/// Whether `dir` is an encoder model directory.
pub(crate) fn is_encoder_dir(dir: &Path) -> bool {
    dir.join(ENCODER_CONFIG_FILE).is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example_parses() {
        let config = EncoderConfig::parse(
            br#"{"format": 1, "task": "embedding", "pooling": "mean", "normalize": true, "max_length": 256,
                "truncation_side": "right", "dimensions": [384, 256, 128], "source": {"package": "x"}}"#,
        )
        .unwrap();
        assert_eq!(config.task, Task::Embedding);
        assert_eq!(config.pooling(), Pooling::Mean);
        assert!(config.normalize);
        assert_eq!(config.dimensions, vec![384, 256, 128]);
        assert_eq!(config.max_batch_tokens(ExecutionProvider::Cpu), DEFAULT_MAX_BATCH_TOKENS_CPU);
        assert_eq!(config.max_batch_tokens(ExecutionProvider::Cuda), DEFAULT_MAX_BATCH_TOKENS_GPU);
        let classifier = EncoderConfig::parse(
            br#"{"format": 1, "task": "classification", "max_length": 512, "truncation_side": "left",
                "labels": ["NEGATIVE", "POSITIVE"]}"#,
        )
        .unwrap();
        assert_eq!(classifier.truncation_side, Side::Left);
        assert_eq!(classifier.labels.len(), 2);
    }

    #[test]
    fn bad_files_name_the_problem() {
        let err = |text: &str| EncoderConfig::parse(text.as_bytes()).unwrap_err();
        assert!(err(r#"{"format": 2, "task": "rerank", "max_length": 8}"#).contains("format 2"));
        assert!(err(r#"{"format": 1, "task": "summarize", "max_length": 8}"#).contains("unknown variant"));
        assert!(err(r#"{"format": 1, "task": "classification", "max_length": 8}"#).contains("labels"));
        assert!(err(r#"{"format": 1, "task": "embedding", "max_length": 8, "dimensions": [0]}"#).contains("positive"));
        assert!(err(r#"{"format": 1, "task": "embedding", "max_length": 1}"#).contains("max_length"));
        assert!(err(r#"{"format": 1, "task": "embedding", "max_length": 64, "max_batch_tokens": 8}"#)
            .contains("max_batch_tokens"));
        assert!(
            err(r#"{"format": 1, "task": "embedding", "max_length": 8, "pooling": "max"}"#).contains("unknown variant")
        );
    }
}

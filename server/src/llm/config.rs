//! `llm.json`: the small configuration an LLM model directory carries next
//! to its decoder graph (docs/llm.md).

use std::path::Path;

use serde::Deserialize;

/// File that marks a directory as an LLM model directory.
pub(crate) const LLM_CONFIG_FILE: &str = "llm.json";
/// The decoder graph inside an LLM model directory.
pub(crate) const LLM_MODEL_FILE: &str = "model.onnx";
/// The tokenizer inside an LLM model directory.
pub(crate) const TOKENIZER_FILE: &str = "tokenizer.json";
/// The chat template inside an LLM model directory (optional).
pub(crate) const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// The format version this server reads.
pub(crate) const FORMAT: u32 = 1;

/// The contents of `llm.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct LlmConfig {
    pub format: u32,
    #[serde(default)]
    pub architecture: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub add_bos_token: bool,
    #[serde(default)]
    pub quantization: Option<String>,
    #[serde(default)]
    pub defaults: Defaults,
}

/// Generation settings used when a request does not give them.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct Defaults {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults { max_tokens: 256, temperature: 0.0, top_p: 1.0, top_k: 0 }
    }
}

impl LlmConfig {
    /// Reads and checks `dir/llm.json`.
    pub(crate) fn read(dir: &Path) -> anyhow::Result<LlmConfig> {
        let path = dir.join(LLM_CONFIG_FILE);
        let text = std::fs::read(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let config: LlmConfig =
            serde_json::from_slice(&text).map_err(|e| anyhow::anyhow!("invalid {}: {e}", path.display()))?;
        config.check().map_err(|e| anyhow::anyhow!("invalid {}: {e}", path.display()))?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format {} is not supported (this server reads format {FORMAT})", self.format));
        }
        for (name, value) in [
            ("num_layers", self.num_layers),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
        ] {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if self.eos_token_ids.is_empty() {
            return Err("eos_token_ids must name at least one token".into());
        }
        Ok(())
    }
}

/// Whether `dir` is an LLM model directory.
pub(crate) fn is_llm_dir(dir: &Path) -> bool {
    dir.join(LLM_CONFIG_FILE).is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example_parses() {
        let config: LlmConfig = serde_json::from_str(
            r#"{"format": 1, "architecture": "llama", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64,
                "vocab_size": 49152, "context_length": 8192, "bos_token_id": 1, "eos_token_ids": [2, 0],
                "pad_token_id": 2, "add_bos_token": false, "quantization": "int4",
                "source": {"gguf": "x.gguf", "sha256": "00"}, "defaults": {"max_tokens": 256, "temperature": 0.0}}"#,
        )
        .unwrap();
        assert!(config.check().is_ok());
        assert_eq!(config.defaults.max_tokens, 256);
        assert_eq!(config.defaults.top_p, 1.0);
        let bad = LlmConfig { format: 2, ..config.clone() };
        assert!(bad.check().unwrap_err().contains("format 2"));
        let bad = LlmConfig { eos_token_ids: vec![], ..config };
        assert!(bad.check().is_err());
    }
}

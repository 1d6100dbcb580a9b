//! Structured output: `response_format` (`json_object`, `json_schema`)
//! enforced while sampling. A JSON schema is compiled by `llguidance` into
//! a grammar over the model's tokens; every step of a constrained sequence
//! masks the tokens the grammar does not allow, so the answer always
//! parses and validates (unless `max_tokens` cuts it).
//!
//! Compiling happens before a request is queued, off the engine thread
//! and off the async workers, and is bounded (schema size, llguidance's
//! fuel and grammar-size limits). A schema keyword llguidance cannot
//! enforce is refused with its message, never ignored.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory, TokenParser};
use serde_json::Value;

use crate::error::{InferError, InferResult};

/// Longest schema accepted, in bytes of compact JSON.
pub(crate) const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// Compiled grammars kept for reuse, by schema text.
const CACHE_ENTRIES: usize = 64;

/// What a request asks the answer to be (`text` is no constraint, so it
/// has no value here).
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON that validates against `schema`.
    JsonSchema { name: String, schema: Value },
}

impl ResponseFormat {
    /// Reads OpenAI's `response_format` object: `{"type": "text"}` (no
    /// constraint: `None`), `{"type": "json_object"}`, or `{"type":
    /// "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    pub fn from_json(value: &Value) -> InferResult<Option<ResponseFormat>> {
        let bad = |why: &str| InferError::invalid(format!("response_format: {why}"));
        let object = value.as_object().ok_or_else(|| bad("must be an object with a 'type'"))?;
        match object.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
            Some("json_schema") => {
                let spec = object
                    .get("json_schema")
                    .and_then(Value::as_object)
                    .ok_or_else(|| bad("'json_schema' must be an object with 'name' and 'schema'"))?;
                let name = spec
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("'json_schema.name' must be a string"))?
                    .to_string();
                let schema = spec.get("schema").ok_or_else(|| bad("'json_schema.schema' is required"))?;
                if !schema.is_object() {
                    return Err(bad("'json_schema.schema' must be a JSON schema object"));
                }
                if spec.get("strict").is_some_and(|s| !s.is_boolean()) {
                    return Err(bad("'json_schema.strict' must be a boolean"));
                }
                Ok(Some(ResponseFormat::JsonSchema { name, schema: schema.clone() }))
            }
            Some(other) => Err(bad(&format!("unknown type '{other}' (text, json_object or json_schema)"))),
            None => Err(bad("'type' must be a string (text, json_object or json_schema)")),
        }
    }

    /// Reads the same object from its JSON text (the OIP parameter, the
    /// OpenAI body's field as it came), at most twice [`MAX_SCHEMA_BYTES`].
    pub fn from_text(text: &str) -> InferResult<Option<ResponseFormat>> {
        if text.len() > MAX_SCHEMA_BYTES * 2 {
            return Err(InferError::invalid(format!("response_format is longer than {} bytes", MAX_SCHEMA_BYTES * 2)));
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|e| InferError::invalid(format!("response_format must be a JSON object: {e}")))?;
        ResponseFormat::from_json(&value)
    }

    /// The JSON schema the answer must validate against.
    fn schema(&self) -> Value {
        match self {
            ResponseFormat::JsonObject => serde_json::json!({"type": "object"}),
            ResponseFormat::JsonSchema { schema, .. } => schema.clone(),
        }
    }
}

/// The grammar compiler of one model (its vocabulary), with a small cache
/// of compiled grammars.
pub(crate) struct Grammars {
    factory: ParserFactory,
    /// Allowed when nothing else is (the answer ends).
    eos: u32,
    cache: Mutex<HashMap<Arc<str>, Grammar>>,
}

impl Grammars {
    /// Builds the token trie from the model's `tokenizer.json`: the bytes
    /// of every token, `vocab_size` rows (the logits' width), and the
    /// end-of-sequence tokens the grammar allows once it is complete.
    pub(crate) fn load(tokenizer_json: &Path, vocab_size: usize, eos_token_ids: &[u32]) -> anyhow::Result<Grammars> {
        let text = std::fs::read_to_string(tokenizer_json)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", tokenizer_json.display()))?;
        let json: Value = serde_json::from_str(&text)?;
        // llguidance asserts on odd vocabularies: a panic here is a load error.
        let mut words = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
            .map_err(|_| anyhow::anyhow!("cannot read the token bytes of {}", tokenizer_json.display()))??;
        let rows = vocab_size.max(words.len());
        // Rows without a token (the logits may be wider than the vocabulary)
        // become special tokens no grammar allows.
        for (id, word) in words.iter_mut().enumerate() {
            if word.is_empty() {
                *word = special_placeholder(id);
            }
        }
        while words.len() < rows {
            words.push(special_placeholder(words.len()));
        }
        let eos = *eos_token_ids.first().ok_or_else(|| anyhow::anyhow!("the model has no end-of-sequence token"))?;
        anyhow::ensure!(eos_token_ids.iter().all(|&t| (t as usize) < rows), "an end-of-sequence token is out of range");
        let info = TokRxInfo::new(rows as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos_token_ids);
        let env = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&(env as llguidance::toktrie::TokEnv))?;
        factory.quiet();
        *factory.limits_mut() = limits();
        Ok(Grammars { factory, eos, cache: Mutex::new(HashMap::new()) })
    }

    /// The cached grammar of `format`, if it was compiled before.
    pub(crate) fn cached(&self, format: &ResponseFormat) -> InferResult<(Arc<str>, Option<Grammar>)> {
        let key = cache_key(format)?;
        let hit = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        Ok((key, hit))
    }

    /// Compiles `format` (seconds at worst: call it off the async workers),
    /// or says which part of the schema cannot be enforced.
    pub(crate) fn compile(&self, key: Arc<str>, format: &ResponseFormat) -> InferResult<Grammar> {
        let started = Instant::now();
        let mut schema = format.schema();
        if schema.get("x-guidance").is_some() {
            return Err(InferError::invalid("response_format: the schema keyword 'x-guidance' is not accepted"));
        }
        compile_options().apply_to(&mut schema);
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| InferError::invalid(format!("response_format: the schema cannot be enforced: {e}")))?;
        let grammar = Grammar { key: key.clone(), parser: Arc::new(parser), eos: self.eos };
        tracing::debug!(compile_ms = started.elapsed().as_secs_f64() * 1e3, bytes = key.len(), "grammar compiled");
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            // Rarely full (schemas repeat): start over rather than track use.
            cache.clear();
        }
        cache.insert(key, grammar.clone());
        Ok(grammar)
    }
}

/// Bounds on compiling and on each step: a hostile schema gets an error,
/// not minutes of CPU or gigabytes.
fn limits() -> ParserLimits {
    ParserLimits {
        // llguidance's defaults are 1M fuel (~20 ms) and 500k symbols.
        initial_lexer_fuel: 1_000_000,
        max_grammar_size: 200_000,
        max_lexer_states: 100_000,
        ..ParserLimits::default()
    }
}

/// How the JSON is written: compact with a space after `,` and `:` (as
/// Python's `json.dumps`), no free whitespace, which a small model could
/// otherwise spend its tokens on; a schema may not loosen this.
fn compile_options() -> JsonCompileOptions {
    JsonCompileOptions {
        item_separator: ", ".to_string(),
        key_separator: ": ".to_string(),
        whitespace_flexible: false,
        lenient: false,
        ..JsonCompileOptions::default()
    }
}

/// The compact JSON of the schema: equal schemas share a grammar.
fn cache_key(format: &ResponseFormat) -> InferResult<Arc<str>> {
    let text = serde_json::to_string(&format.schema()).map_err(|e| InferError::invalid(e.to_string()))?;
    if text.len() > MAX_SCHEMA_BYTES {
        return Err(InferError::invalid(format!(
            "response_format: the schema has {} bytes, at most {MAX_SCHEMA_BYTES} are allowed",
            text.len()
        )));
    }
    Ok(text.into())
}

fn special_placeholder(id: usize) -> Vec<u8> {
    let mut word = format!(".<[{id}]>").into_bytes();
    word[0] = TokTrie::SPECIAL_TOKEN_MARKER;
    word
}

/// A compiled grammar, shared by the requests that ask for it.
#[derive(Clone)]
pub(crate) struct Grammar {
    key: Arc<str>,
    parser: Arc<TokenParser>,
    eos: u32,
}

impl Grammar {
    /// A fresh matcher for one sequence.
    pub(crate) fn start(&self) -> Constraint {
        Constraint {
            matcher: Matcher::new(Ok((*self.parser).clone())),
            eos: self.eos,
            mask_time: Duration::ZERO,
            slowest: Duration::ZERO,
            steps: 0,
        }
    }
}

impl fmt::Debug for Grammar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grammar").field("schema", &self.key).finish()
    }
}

impl PartialEq for Grammar {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

/// The grammar state of one sequence: which tokens may come next.
pub(crate) struct Constraint {
    matcher: Matcher,
    eos: u32,
    mask_time: Duration,
    slowest: Duration,
    steps: u32,
}

impl Constraint {
    /// Copies `logits` into `out` with every token the grammar does not
    /// allow now set to -inf. Once the grammar is complete only the
    /// end-of-sequence tokens remain. Should the matcher fail (a bug),
    /// only end-of-sequence is allowed too, so the answer ends.
    pub(crate) fn mask(&mut self, logits: &[f32], out: &mut Vec<f32>) {
        let eos = self.eos as usize;
        let started = Instant::now();
        out.clear();
        out.resize(logits.len(), f32::NEG_INFINITY);
        match self.matcher.compute_mask_or_eos() {
            Ok(mask) => {
                let mut any = false;
                mask.iter_set_entries(|token| {
                    if let Some(&logit) = logits.get(token) {
                        out[token] = logit;
                        any = true;
                    }
                });
                if !any {
                    tracing::error!("structured output: the grammar allows no token; ending the answer");
                    if let Some(slot) = out.get_mut(eos) {
                        *slot = 0.0;
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "structured output: the grammar failed; ending the answer");
                if let Some(slot) = out.get_mut(eos) {
                    *slot = 0.0;
                }
            }
        }
        let spent = started.elapsed();
        self.mask_time += spent;
        self.slowest = self.slowest.max(spent);
        self.steps += 1;
    }

    /// Advances the grammar past a sampled token.
    pub(crate) fn advance(&mut self, token: u32) {
        if let Err(e) = self.matcher.consume_token(token) {
            tracing::error!(error = %e, token, "structured output: the grammar refused a sampled token");
        }
    }
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint").field("steps", &self.steps).finish()
    }
}

impl Drop for Constraint {
    fn drop(&mut self) {
        if self.steps > 0 {
            tracing::debug!(
                steps = self.steps,
                mask_us_mean = self.mask_time.as_secs_f64() * 1e6 / self.steps as f64,
                mask_us_max = self.slowest.as_secs_f64() * 1e6,
                "structured output: mask time"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A byte-level `tokenizer.json` whose vocabulary is the printable
    /// ASCII characters, a few longer words, and `<eos>` (id 0).
    fn tiny_grammars(dir: &Path) -> Grammars {
        let mut vocab = serde_json::Map::new();
        let mut id = 1;
        for c in ' '..='~' {
            // ByteLevel spells a space as 'Ġ'.
            let spelled = if c == ' ' { "Ġ".to_string() } else { c.to_string() };
            vocab.insert(spelled, json!(id));
            id += 1;
        }
        for word in ["{\"", "\":", "Ġ\"", "positive", "negative", "label"] {
            vocab.insert(word.to_string(), json!(id));
            id += 1;
        }
        vocab.insert("<eos>".to_string(), json!(0));
        let tokenizer = json!({
            "added_tokens": [{"id": 0, "content": "<eos>", "special": true}],
            "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": vocab, "merges": []},
        });
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, tokenizer.to_string()).unwrap();
        // Wider logits than the vocabulary, as real models have.
        Grammars::load(&path, id + 5, &[0]).unwrap()
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ferrite-structured-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Greedy decoding where the model prefers tokens by `preference`
    /// (higher wins): what the mask lets through decides the text.
    fn generate(grammars: &Grammars, format: &ResponseFormat, preference: impl Fn(usize) -> f32) -> (String, bool) {
        let (key, _) = grammars.cached(format).unwrap();
        let grammar = grammars.compile(key, format).unwrap();
        let mut constraint = grammar.start();
        let trie = grammars.factory.tok_env().tok_trie().clone();
        let logits: Vec<f32> = (0..trie.vocab_size()).map(&preference).collect();
        let mut masked = Vec::new();
        let mut text = Vec::new();
        for _ in 0..200 {
            constraint.mask(&logits, &mut masked);
            let token = crate::llm::sampling::argmax(&masked);
            if token == 0 {
                return (String::from_utf8(text).unwrap(), true);
            }
            text.extend_from_slice(trie.token(token));
            constraint.advance(token);
        }
        (String::from_utf8(text).unwrap(), false)
    }

    #[test]
    fn the_mask_forces_the_schema_and_ends_with_eos() {
        let dir = temp_dir("mask");
        let grammars = tiny_grammars(&dir);
        let schema = json!({
            "type": "object",
            "properties": {"label": {"enum": ["positive", "negative"]}, "score": {"type": "integer", "minimum": 3, "maximum": 7}},
            "required": ["label", "score"],
            "additionalProperties": false
        });
        let format = ResponseFormat::JsonSchema { name: "x".into(), schema };
        // A model that prefers 'z', then EOS, then high ids: none of that
        // fits, so only the mask makes the answer valid.
        let (text, ended) = generate(&grammars, &format, |id| match id {
            0 => 5.0,
            id if id == ('z' as usize - ' ' as usize + 1) => 10.0,
            id => id as f32 / 100.0,
        });
        assert!(ended, "{text}");
        let value: Value = serde_json::from_str(&text).unwrap();
        assert!(value["label"] == "positive" || value["label"] == "negative", "{text}");
        assert!((3..=7).contains(&value["score"].as_i64().unwrap()), "{text}");
        // Compact with a space after ':' and ','.
        assert!(text.starts_with("{\"label\": \""), "{text}");
        // json_object: any object; here the model likes '}' best.
        let close = '}' as usize - ' ' as usize + 1;
        let (text, ended) = generate(&grammars, &ResponseFormat::JsonObject, |id| if id == close { 10.0 } else { 0.0 });
        assert!(ended, "{text}");
        assert_eq!(text, "{}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn unsupported_keywords_are_named_and_grammars_are_cached() {
        let dir = temp_dir("errors");
        let grammars = tiny_grammars(&dir);
        let compile = |schema: Value| {
            let format = ResponseFormat::JsonSchema { name: "x".into(), schema };
            let (key, _) = grammars.cached(&format)?;
            grammars.compile(key, &format)
        };
        let err = compile(json!({"type": "array", "uniqueItems": true})).unwrap_err();
        assert_eq!(err.kind, crate::error::ErrorKind::InvalidArgument);
        assert!(err.message.contains("uniqueItems"), "{err}");
        assert!(compile(json!({"type": "string", "format": "nope"})).unwrap_err().message.contains("nope"));
        assert!(compile(json!({"type": "object", "x-guidance": {"lenient": true}}))
            .unwrap_err()
            .message
            .contains("x-guidance"));
        let big = json!({"enum": vec!["a".repeat(100); 1000]});
        assert!(compile(big).unwrap_err().message.contains("at most 65536"));
        // Compiled once, then served from the cache (keys ignore formatting).
        let format = ResponseFormat::from_text(
            r#"{"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}"#,
        )
        .unwrap()
        .unwrap();
        assert!(grammars.cached(&format).unwrap().1.is_none());
        let (key, _) = grammars.cached(&format).unwrap();
        let compiled = grammars.compile(key, &format).unwrap();
        assert_eq!(grammars.cached(&format).unwrap().1, Some(compiled));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn response_format_is_read_and_checked() {
        assert_eq!(ResponseFormat::from_json(&json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            ResponseFormat::from_json(&json!({"type": "json_object"})).unwrap(),
            Some(ResponseFormat::JsonObject)
        );
        let schema = json!({"type": "object"});
        let parsed = ResponseFormat::from_json(
            &json!({"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": true}}),
        )
        .unwrap();
        assert_eq!(parsed, Some(ResponseFormat::JsonSchema { name: "a".into(), schema: schema.clone() }));
        for (bad, says) in [
            (json!("json"), "must be an object"),
            (json!({"type": "yaml"}), "unknown type 'yaml'"),
            (json!({}), "'type'"),
            (json!({"type": "json_schema"}), "'json_schema'"),
            (json!({"type": "json_schema", "json_schema": {"schema": schema}}), "json_schema.name"),
            (json!({"type": "json_schema", "json_schema": {"name": "a"}}), "json_schema.schema"),
            (json!({"type": "json_schema", "json_schema": {"name": "a", "schema": []}}), "json_schema.schema"),
            (json!({"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": 1}}), "strict"),
        ] {
            let err = ResponseFormat::from_json(&bad).unwrap_err();
            assert!(err.message.contains(says) && err.message.starts_with("response_format"), "{bad}: {err}");
        }
        assert!(ResponseFormat::from_text("{oops").unwrap_err().message.contains("response_format"));
    }
}

//! The forward pass of a decoder-only LLM graph (the names docs/llm.md
//! fixes): token ids, attention mask and positions in, logits and the
//! grown key/value cache out. The LLM engine schedules; this runs.

use std::borrow::Cow;

use ort::session::SessionInputValue;
use ort::value::DynValue;

use super::kv_cache::{i64_tensor, BatchCache, CacheShape};
use super::Session;
use crate::error::{InferError, InferResult};

/// Input and output names of the decoder graph.
struct Names {
    past: Vec<String>,
    present: Vec<String>,
}

impl Names {
    /// The names docs/llm.md fixes, checked against the session.
    fn check(session: &ort::session::Session, layers: usize) -> anyhow::Result<Names> {
        let kv = |prefix: &str| {
            (0..layers).flat_map(|i| [format!("{prefix}.{i}.key"), format!("{prefix}.{i}.value")]).collect::<Vec<_>>()
        };
        let names = Names { past: kv("past_key_values"), present: kv("present") };
        let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        for name in
            ["input_ids", "attention_mask", "position_ids"].iter().copied().chain(names.past.iter().map(String::as_str))
        {
            anyhow::ensure!(inputs.contains(&name), "the decoder graph has no input '{name}' (see docs/llm.md)");
        }
        for name in std::iter::once("logits").chain(names.present.iter().map(String::as_str)) {
            anyhow::ensure!(outputs.contains(&name), "the decoder graph has no output '{name}' (see docs/llm.md)");
        }
        Ok(names)
    }
}

/// A decoder graph ready to run.
pub(crate) struct Decoder {
    session: ort::session::Session,
    names: Names,
    shape: CacheShape,
}

/// The logits of one forward pass: `[rows, positions, vocab]` floats.
pub(crate) struct Logits(DynValue);

impl Logits {
    /// The logits, row after row.
    pub(crate) fn data(&self) -> InferResult<&[f32]> {
        let (_, data) =
            self.0.try_extract_tensor::<f32>().map_err(|e| InferError::internal(format!("reading logits: {e}")))?;
        Ok(data)
    }
}

impl Decoder {
    /// Checks `session` against the names docs/llm.md fixes for a cache of
    /// `shape`.
    pub(crate) fn new(session: Session, shape: CacheShape) -> anyhow::Result<Decoder> {
        let names = Names::check(&session.0, shape.layers)?;
        Ok(Decoder { session: session.0, names, shape })
    }

    /// The geometry of this model's cache.
    pub(crate) fn shape(&self) -> CacheShape {
        self.shape
    }

    /// Runs the graph on one batch of `cache.rows` rows, each feeding the
    /// same number of new tokens; returns the logits and the grown cache.
    pub(crate) fn forward(
        &mut self,
        input_ids: Vec<i64>,
        attention_mask: Vec<i64>,
        position_ids: Vec<i64>,
        cache: BatchCache,
    ) -> InferResult<(Logits, BatchCache)> {
        let rows = cache.rows;
        let seq = input_ids.len() / rows.max(1);
        let past = cache.past;
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(3 + cache.tensors.len());
        inputs.push(("input_ids".into(), i64_tensor(vec![rows, seq], input_ids)?.into()));
        inputs.push(("attention_mask".into(), i64_tensor(vec![rows, past + seq], attention_mask)?.into()));
        inputs.push(("position_ids".into(), i64_tensor(vec![rows, seq], position_ids)?.into()));
        for (name, value) in self.names.past.iter().zip(cache.tensors) {
            inputs.push((name.as_str().into(), value.into()));
        }
        let mut outputs =
            self.session.run(inputs).map_err(|e| InferError::internal(format!("ONNX Runtime failed: {e}")))?;
        let missing = |name: &str| InferError::internal(format!("ONNX Runtime returned no output '{name}'"));
        let logits = outputs.remove("logits").ok_or_else(|| missing("logits"))?;
        let tensors = self
            .names
            .present
            .iter()
            .map(|name| outputs.remove(name).ok_or_else(|| missing(name)))
            .collect::<InferResult<Vec<_>>>()?;
        Ok((Logits(logits), BatchCache { tensors, rows, past: past + seq }))
    }
}

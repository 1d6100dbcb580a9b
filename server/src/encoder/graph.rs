//! One ONNX Runtime session of an encoder graph (through `runtime`): checks
//! its inputs and outputs once, then runs padded batches and reads one row
//! per input: the pooled vector of `last_hidden_state`, or the `logits`.

use bytes::Bytes;

use super::batch::Padded;
use super::config::{Pooling, Task};
use super::pooling::pool;
use super::queue::Runner;
use crate::error::{InferError, InferResult};
use crate::runtime::{ExecutionProvider, RunTimings, Session, Signature};
use crate::tensor::{DataType, Tensor, TensorData};

/// Graph input: token ids.
pub(crate) const INPUT_IDS: &str = "input_ids";
/// Graph input: 1 for real tokens, 0 for padding.
pub(crate) const ATTENTION_MASK: &str = "attention_mask";
/// Graph input (BERT): which text of a pair each token belongs to.
pub(crate) const TOKEN_TYPE_IDS: &str = "token_type_ids";
/// Graph output of an embedding model: `[batch, seq, hidden]`.
pub(crate) const LAST_HIDDEN_STATE: &str = "last_hidden_state";
/// Graph output of a classifier or reranker: `[batch, labels]`.
pub(crate) const LOGITS: &str = "logits";

/// An encoder session and how to read it.
pub(crate) struct Graph {
    session: Session,
    type_ids: bool,
    output: &'static str,
    pooling: Option<Pooling>,
}

impl Graph {
    /// Wraps a session of a graph with the inputs and output its task
    /// needs (`pooling` for embedding models).
    pub(crate) fn new(session: Session, task: Task, pooling: Pooling) -> anyhow::Result<Graph> {
        let signature = session.signature()?;
        let type_ids = check_inputs(&signature)?;
        let (output, pooling) = match task {
            Task::Embedding => (LAST_HIDDEN_STATE, Some(pooling)),
            Task::Rerank | Task::Classification => (LOGITS, None),
        };
        let spec = signature.outputs.iter().find(|o| o.name == output).ok_or_else(|| {
            let names: Vec<&str> = signature.outputs.iter().map(|o| o.name.as_str()).collect();
            anyhow::anyhow!("a {} model's graph must have the output '{output}'; this one has {names:?}", task.as_str())
        })?;
        if spec.datatype != DataType::Fp32 {
            anyhow::bail!("output '{output}' is {}, not FP32", spec.datatype);
        }
        Ok(Graph { session, type_ids, output, pooling })
    }

    /// The provider the session runs on (after an allowed fallback, the CPU).
    pub(crate) fn execution_provider(&self) -> ExecutionProvider {
        self.session.execution_provider()
    }
}

impl Runner for Graph {
    /// Runs a batch: one row per input (the pooled vector, or the logits)
    /// and where the time went. `lengths` are the inputs' real tokens.
    fn run(&mut self, batch: &Padded, lengths: &[usize]) -> InferResult<(Vec<Vec<f32>>, RunTimings)> {
        let shape = vec![batch.rows as i64, batch.longest as i64];
        let tensor = |name: &str, values: &[i64]| {
            let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            vec![Tensor {
                name: name.to_string(),
                datatype: DataType::Int64,
                shape: shape.clone(),
                data: TensorData::Raw(Bytes::from(raw)),
            }]
        };
        let mut inputs = vec![tensor(INPUT_IDS, &batch.ids), tensor(ATTENTION_MASK, &batch.mask)];
        if self.type_ids {
            inputs.push(tensor(TOKEN_TYPE_IDS, &batch.type_ids));
        }
        let run = self.session.run(&inputs, &[self.output.to_string()])?;
        let output = run.outputs.into_iter().next().ok_or_else(|| InferError::internal("the graph gave no output"))?;
        let values = floats(&output)?;
        let rows = batch.rows.max(1);
        let per_row = values.len() / rows;
        if per_row == 0 || values.len() != per_row * rows || output.shape.first() != Some(&(batch.rows as i64)) {
            return Err(InferError::internal(format!(
                "output '{}' has shape {:?}, not one row per input of the batch of {}",
                self.output, output.shape, batch.rows
            )));
        }
        let rows = values
            .chunks_exact(per_row)
            .zip(lengths)
            .map(|(row, &len)| match self.pooling {
                Some(pooling) => {
                    let dim = output.shape.last().copied().unwrap_or(1).max(1) as usize;
                    pool(row, dim, len, pooling)
                }
                None => row.to_vec(),
            })
            .collect();
        Ok((rows, run.timings))
    }
}

/// The graph takes `input_ids` and `attention_mask` (INT64) and maybe
/// `token_type_ids`, nothing else. Returns whether it takes token types.
fn check_inputs(signature: &Signature) -> anyhow::Result<bool> {
    let mut type_ids = false;
    for input in &signature.inputs {
        match input.name.as_str() {
            INPUT_IDS | ATTENTION_MASK => {}
            TOKEN_TYPE_IDS => type_ids = true,
            other => anyhow::bail!(
                "the graph has an input '{other}'; an encoder takes only '{INPUT_IDS}', '{ATTENTION_MASK}' and \
                 '{TOKEN_TYPE_IDS}'"
            ),
        }
        if input.datatype != DataType::Int64 {
            anyhow::bail!("input '{}' is {}, not INT64", input.name, input.datatype);
        }
    }
    for needed in [INPUT_IDS, ATTENTION_MASK] {
        if !signature.inputs.iter().any(|i| i.name == needed) {
            anyhow::bail!("the graph has no input '{needed}'");
        }
    }
    Ok(type_ids)
}

/// The elements of an FP32 output.
fn floats(tensor: &Tensor) -> InferResult<Vec<f32>> {
    match &tensor.data {
        TensorData::Raw(raw) if tensor.datatype == DataType::Fp32 => {
            Ok(raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
        }
        _ => Err(InferError::internal(format!("output '{}' is not FP32", tensor.name))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::TensorSpec;

    fn signature(inputs: &[(&str, DataType)]) -> Signature {
        let spec = |(name, datatype): &(&str, DataType)| TensorSpec {
            name: name.to_string(),
            datatype: *datatype,
            shape: vec![-1, -1],
        };
        Signature { inputs: inputs.iter().map(spec).collect(), outputs: vec![] }
    }

    #[test]
    fn inputs_are_checked() {
        use DataType::*;
        assert!(!check_inputs(&signature(&[(INPUT_IDS, Int64), (ATTENTION_MASK, Int64)])).unwrap());
        assert!(
            check_inputs(&signature(&[(INPUT_IDS, Int64), (ATTENTION_MASK, Int64), (TOKEN_TYPE_IDS, Int64)])).unwrap()
        );
        let err = |s: Signature| check_inputs(&s).unwrap_err().to_string();
        assert!(err(signature(&[(INPUT_IDS, Int64)])).contains("no input 'attention_mask'"));
        assert!(err(signature(&[(INPUT_IDS, Int32), (ATTENTION_MASK, Int64)])).contains("not INT64"));
        assert!(err(signature(&[(INPUT_IDS, Int64), (ATTENTION_MASK, Int64), ("pixels", Int64)]))
            .contains("input 'pixels'"));
    }
}

//! The key/value cache of the decode batch.
//!
//! Layout: per layer a key and a value tensor `[batch, kv_heads, T, head_dim]`
//! in ONNX Runtime's memory. Rows are left-padded: row `b` holds its `len_b`
//! cached positions at `T - len_b .. T`, zeros before them, and the
//! attention mask hides the zeros. While the batch keeps its members, each
//! step's `present.*` outputs are fed back unchanged as the next step's
//! `past_key_values.*` (no copy here; ONNX Runtime appends the new position).
//! Only when a sequence joins or leaves is the cache rebuilt, row by row,
//! with `T` shrunk to the longest member.

use ort::value::{DynValue, Tensor};

use crate::error::{InferError, InferResult};

/// Geometry of the cache of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheShape {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// A batch's cache: `2 * layers` tensors (key then value for each layer),
/// each `[rows, heads, past, head_dim]`.
pub(crate) struct BatchCache {
    pub(super) tensors: Vec<DynValue>,
    pub rows: usize,
    pub past: usize,
}

/// Where a row of a rebuilt cache comes from: row `row` of source cache
/// `source`, whose last `len` positions are the row's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowSource {
    pub source: usize,
    pub row: usize,
    pub len: usize,
}

impl BatchCache {
    /// An empty cache (`past` = 0) for `rows` rows: the input of a prefill.
    pub(crate) fn empty(shape: CacheShape, rows: usize) -> InferResult<BatchCache> {
        let tensors = (0..2 * shape.layers)
            .map(|_| f32_tensor(vec![rows, shape.heads, 0, shape.head_dim], Vec::new()))
            .collect::<InferResult<Vec<_>>>()?;
        Ok(BatchCache { tensors, rows, past: 0 })
    }

    /// Builds a cache from rows of other caches, left-padded to the longest.
    pub(crate) fn gather(shape: CacheShape, sources: &[&BatchCache], rows: &[RowSource]) -> InferResult<BatchCache> {
        let past = rows.iter().map(|r| r.len).max().unwrap_or(0);
        let per_tensor = rows.len() * shape.heads * past * shape.head_dim;
        let mut tensors = Vec::with_capacity(2 * shape.layers);
        for index in 0..2 * shape.layers {
            let views = sources
                .iter()
                .map(|cache| {
                    let (_, data) = cache.tensors[index]
                        .try_extract_tensor::<f32>()
                        .map_err(|e| InferError::internal(format!("reading the KV cache: {e}")))?;
                    Ok(SourceView { data, past: cache.past })
                })
                .collect::<InferResult<Vec<_>>>()?;
            // calloc'd zeros: the padding costs no writes.
            let mut data = vec![0.0f32; per_tensor];
            copy_rows(&mut data, past, &views, rows, shape);
            tensors.push(f32_tensor(vec![rows.len(), shape.heads, past, shape.head_dim], data)?);
        }
        Ok(BatchCache { tensors, rows: rows.len(), past })
    }
}

/// One source tensor's elements and its `past` length.
struct SourceView<'a> {
    data: &'a [f32],
    past: usize,
}

/// Copies each row's last `len` positions, for every head, to the right end
/// of row `b` of `dst` (`[rows, heads, dst_past, head_dim]`, zeroed).
fn copy_rows(dst: &mut [f32], dst_past: usize, sources: &[SourceView<'_>], rows: &[RowSource], shape: CacheShape) {
    let d = shape.head_dim;
    for (b, row) in rows.iter().enumerate() {
        let source = &sources[row.source];
        let count = row.len * d;
        for h in 0..shape.heads {
            let from = ((row.row * shape.heads + h) * source.past + (source.past - row.len)) * d;
            let to = ((b * shape.heads + h) * dst_past + (dst_past - row.len)) * d;
            dst[to..to + count].copy_from_slice(&source.data[from..from + count]);
        }
    }
}

/// The attention mask of a decode step over a left-padded cache of length
/// `past`: row `b` has `past - len_b` zeros, then ones for its cached
/// positions and the new token.
pub(crate) fn decode_mask(lens: impl ExactSizeIterator<Item = usize>, past: usize, out: &mut Vec<i64>) {
    out.clear();
    out.reserve(lens.len() * (past + 1));
    for len in lens {
        out.extend(std::iter::repeat_n(0, past - len));
        out.extend(std::iter::repeat_n(1, len + 1));
    }
}

/// An ONNX Runtime float tensor that takes ownership of `data`.
fn f32_tensor(shape: Vec<usize>, data: Vec<f32>) -> InferResult<DynValue> {
    Tensor::from_array((shape, data))
        .map(|t| t.into_dyn())
        .map_err(|e| InferError::internal(format!("creating a tensor: {e}")))
}

/// An ONNX Runtime int64 tensor that takes ownership of `data`.
pub(super) fn i64_tensor(shape: Vec<usize>, data: Vec<i64>) -> InferResult<DynValue> {
    Tensor::from_array((shape, data))
        .map(|t| t.into_dyn())
        .map_err(|e| InferError::internal(format!("creating a tensor: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: CacheShape = CacheShape { layers: 1, heads: 2, head_dim: 2 };

    /// A `[rows, 2, past, 2]` tensor whose real positions hold
    /// `100*row_id + 10*head + position` (position counted from the row's start).
    fn source(ids_and_lens: &[(usize, usize)], past: usize) -> Vec<f32> {
        let mut data = vec![0.0; ids_and_lens.len() * 2 * past * 2];
        for (b, &(id, len)) in ids_and_lens.iter().enumerate() {
            for h in 0..2 {
                for p in 0..len {
                    let t = past - len + p;
                    for k in 0..2 {
                        data[((b * 2 + h) * past + t) * 2 + k] = (100 * id + 10 * h + p) as f32;
                    }
                }
            }
        }
        data
    }

    #[test]
    fn rows_are_left_padded_to_the_longest() {
        // Batch of two (ids 1 len 2, id 2 len 3, past 3) and a joiner (id 3, len 4).
        let batch = source(&[(1, 2), (2, 3)], 3);
        let joiner = source(&[(3, 4)], 4);
        let views = [SourceView { data: &batch, past: 3 }, SourceView { data: &joiner, past: 4 }];
        // Row 0 of the batch leaves; row 1 stays; the joiner comes in.
        let rows = [RowSource { source: 0, row: 1, len: 3 }, RowSource { source: 1, row: 0, len: 4 }];
        let mut out = vec![0.0; 2 * 2 * 4 * 2];
        copy_rows(&mut out, 4, &views, &rows, SHAPE);
        assert_eq!(out, source(&[(2, 3), (3, 4)], 4));
    }

    #[test]
    fn shrinking_drops_padding_columns() {
        let batch = source(&[(1, 1), (2, 5)], 5);
        let views = [SourceView { data: &batch, past: 5 }];
        let rows = [RowSource { source: 0, row: 0, len: 1 }];
        let mut out = vec![0.0; 2 * 2];
        copy_rows(&mut out, 1, &views, &rows, SHAPE);
        assert_eq!(out, source(&[(1, 1)], 1));
    }

    #[test]
    fn decode_mask_hides_padding() {
        let mut mask = Vec::new();
        decode_mask([1usize, 3].into_iter(), 3, &mut mask);
        assert_eq!(mask, vec![0, 0, 1, 1, /* row 1 */ 1, 1, 1, 1]);
    }
}

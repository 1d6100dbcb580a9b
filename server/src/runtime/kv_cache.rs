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

    /// A one-row cache holding `blocks` one after the other (the prefix
    /// cache's, each `block` positions: per layer key then value,
    /// `[heads, block, head_dim]`); the input of a prefill that continues
    /// after them.
    pub(crate) fn from_blocks(shape: CacheShape, blocks: &[&[f32]], block: usize) -> InferResult<BatchCache> {
        let past = blocks.len() * block;
        let per_tensor = shape.heads * block * shape.head_dim;
        if let Some(bad) = blocks.iter().find(|b| b.len() != 2 * shape.layers * per_tensor) {
            return Err(InferError::internal(format!(
                "a cached KV block has {} floats, expected {}",
                bad.len(),
                2 * shape.layers * per_tensor
            )));
        }
        let mut tensors = Vec::with_capacity(2 * shape.layers);
        for index in 0..2 * shape.layers {
            let mut data = vec![0.0f32; per_tensor * blocks.len()];
            for (j, data_block) in blocks.iter().enumerate() {
                let tensor = &data_block[index * per_tensor..(index + 1) * per_tensor];
                copy_block_in(&mut data, past, tensor, j * block, block, shape);
            }
            tensors.push(f32_tensor(vec![1, shape.heads, past, shape.head_dim], data)?);
        }
        Ok(BatchCache { tensors, rows: 1, past })
    }

    /// Copies `count` blocks of `block` positions out of row `row`, which
    /// holds its `len` positions at the right end, starting at the row's
    /// position `first * block`: each in [`BatchCache::from_blocks`]'s layout.
    pub(crate) fn row_blocks(
        &self,
        shape: CacheShape,
        row: usize,
        len: usize,
        first: usize,
        count: usize,
        block: usize,
    ) -> InferResult<Vec<Vec<f32>>> {
        if row >= self.rows || len > self.past || (first + count) * block > len {
            return Err(InferError::internal("KV blocks outside the cached row"));
        }
        let per_block = 2 * shape.layers * shape.heads * block * shape.head_dim;
        let mut out: Vec<Vec<f32>> = (0..count).map(|_| Vec::with_capacity(per_block)).collect();
        for tensor in &self.tensors {
            let (_, data) = tensor
                .try_extract_tensor::<f32>()
                .map_err(|e| InferError::internal(format!("reading the KV cache: {e}")))?;
            let start = self.past - len;
            for (j, dst) in out.iter_mut().enumerate() {
                copy_block_out(dst, data, self.past, row, start + (first + j) * block, block, shape);
            }
        }
        Ok(out)
    }
}

/// Copies one tensor's block (`[heads, block, head_dim]`) into a one-row
/// tensor `[1, heads, past, head_dim]` at position `at`.
fn copy_block_in(dst: &mut [f32], past: usize, src: &[f32], at: usize, block: usize, shape: CacheShape) {
    let d = shape.head_dim;
    for h in 0..shape.heads {
        let from = h * block * d;
        let to = (h * past + at) * d;
        dst[to..to + block * d].copy_from_slice(&src[from..from + block * d]);
    }
}

/// Appends positions `at .. at + block` of row `row` of a tensor
/// `[rows, heads, past, head_dim]` to `dst`, head after head.
fn copy_block_out(
    dst: &mut Vec<f32>,
    src: &[f32],
    past: usize,
    row: usize,
    at: usize,
    block: usize,
    shape: CacheShape,
) {
    let d = shape.head_dim;
    for h in 0..shape.heads {
        let from = ((row * shape.heads + h) * past + at) * d;
        dst.extend_from_slice(&src[from..from + block * d]);
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
    fn blocks_round_trip_through_a_left_padded_row() {
        // Row 1 of a batch (id 2, len 4, past 5), blocks of 2 positions.
        let batch = source(&[(1, 1), (2, 4)], 5);
        let mut blocks = [Vec::new(), Vec::new()];
        for (j, block) in blocks.iter_mut().enumerate() {
            copy_block_out(block, &batch, 5, 1, 1 + 2 * j, 2, SHAPE);
        }
        // Block 1 of head 1 holds positions 2 and 3 of id 2.
        assert_eq!(&blocks[1][4..], &[212.0, 212.0, 213.0, 213.0]);
        let mut row = vec![0.0; 2 * 4 * 2];
        for (j, block) in blocks.iter().enumerate() {
            copy_block_in(&mut row, 4, block, 2 * j, 2, SHAPE);
        }
        assert_eq!(row, source(&[(2, 4)], 4));
    }

    #[test]
    fn decode_mask_hides_padding() {
        let mut mask = Vec::new();
        decode_mask([1usize, 3].into_iter(), 3, &mut mask);
        assert_eq!(mask, vec![0, 0, 1, 1, /* row 1 */ 1, 1, 1, 1]);
    }
}

//! Joining requests into one batch along the first dimension and splitting
//! the batch's outputs back. Pure functions; the scheduler decides which
//! requests go together.

use bytes::BytesMut;

use crate::tensor::{Tensor, TensorData};

/// Concatenates same-named tensors along dimension 0. The caller guarantees
/// equal datatypes and equal dimensions after the first.
pub fn concat_rows(parts: Vec<Tensor>) -> Tensor {
    let mut parts = parts.into_iter();
    let mut joined = parts.next().expect("at least one tensor");
    let rest: Vec<Tensor> = parts.collect();
    if rest.is_empty() {
        return joined;
    }
    joined.shape[0] += rest.iter().map(|t| t.shape[0]).sum::<i64>();
    joined.data = match joined.data {
        TensorData::Raw(first) => {
            let total = first.len() + rest.iter().map(|t| raw_len(&t.data)).sum::<usize>();
            let mut out = BytesMut::with_capacity(total);
            out.extend_from_slice(&first);
            for tensor in &rest {
                if let TensorData::Raw(raw) = &tensor.data {
                    out.extend_from_slice(raw);
                }
            }
            TensorData::Raw(out.freeze())
        }
        TensorData::Strings(mut items) => {
            for tensor in rest {
                if let TensorData::Strings(more) = tensor.data {
                    items.extend(more);
                }
            }
            TensorData::Strings(items)
        }
    };
    joined
}

fn raw_len(data: &TensorData) -> usize {
    match data {
        TensorData::Raw(raw) => raw.len(),
        TensorData::Strings(_) => 0,
    }
}

/// Splits a batched output into pieces of `rows` rows each, without copying
/// element bytes. Fails when the output's first dimension is not the batch.
pub fn split_rows(tensor: &Tensor, rows: &[usize]) -> Result<Vec<Tensor>, String> {
    let total: usize = rows.iter().sum();
    if tensor.shape.first().copied() != Some(total as i64) {
        return Err(format!(
            "output '{}' has shape {:?}, whose first dimension is not the batch of {total}",
            tensor.name, tensor.shape
        ));
    }
    let per_row = tensor.element_count().checked_div(total).unwrap_or(0);
    let mut pieces = Vec::with_capacity(rows.len());
    let mut start_row = 0usize;
    for &count in rows {
        let mut shape = tensor.shape.clone();
        shape[0] = count as i64;
        let (from, to) = (start_row * per_row, (start_row + count) * per_row);
        let data = match &tensor.data {
            TensorData::Raw(raw) => {
                let size = if tensor.element_count() == 0 { 0 } else { raw.len() / tensor.element_count() };
                TensorData::Raw(raw.slice(from * size..to * size))
            }
            TensorData::Strings(items) => TensorData::Strings(items[from..to].to_vec()),
        };
        pieces.push(Tensor { name: tensor.name.clone(), datatype: tensor.datatype, shape, data });
        start_row += count;
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DataType;
    use bytes::Bytes;

    fn fp32(rows: i64, values: &[f32]) -> Tensor {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor { name: "x".into(), datatype: DataType::Fp32, shape: vec![rows, 2], data: TensorData::Raw(raw.into()) }
    }

    #[test]
    fn concat_then_split_gives_back_the_parts() {
        let a = fp32(1, &[1.0, 2.0]);
        let b = fp32(2, &[3.0, 4.0, 5.0, 6.0]);
        let joined = concat_rows(vec![a.clone(), b.clone()]);
        assert_eq!(joined.shape, vec![3, 2]);
        assert_eq!(split_rows(&joined, &[1, 2]).unwrap(), vec![a, b]);
    }

    #[test]
    fn strings_split_by_rows() {
        let items: Vec<Bytes> = ["a", "b", "c"].into_iter().map(Bytes::from).collect();
        let t =
            Tensor { name: "s".into(), datatype: DataType::Bytes, shape: vec![3], data: TensorData::Strings(items) };
        let pieces = split_rows(&t, &[2, 1]).unwrap();
        assert_eq!(pieces[1].data, TensorData::Strings(vec![Bytes::from("c")]));
        assert_eq!(pieces[0].shape, vec![2]);
    }

    #[test]
    fn unbatched_output_is_an_error() {
        let t = fp32(1, &[1.0, 2.0]);
        assert!(split_rows(&t, &[1, 1]).unwrap_err().contains("not the batch"));
    }
}

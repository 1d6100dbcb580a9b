//! Splitting a batch's outputs back into each request's rows (the runtime
//! joins the inputs as it copies them in). Pure functions; the scheduler
//! decides which requests go together.

use crate::tensor::{Tensor, TensorData};

/// Splits a batched output into pieces of `rows` rows each, without copying
/// element bytes. Fails when the output's first dimension is not the batch.
pub(crate) fn split_rows(tensor: &Tensor, rows: &[usize]) -> Result<Vec<Tensor>, String> {
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
    fn split_gives_each_request_its_rows() {
        let joined = fp32(3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(split_rows(&joined, &[1, 2]).unwrap(), vec![fp32(1, &[1.0, 2.0]), fp32(2, &[3.0, 4.0, 5.0, 6.0])]);
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

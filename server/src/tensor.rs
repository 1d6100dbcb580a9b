//! Tensors as they travel between the frontends and the runtime: a datatype,
//! a shape and little-endian element bytes (or, for BYTES, one buffer per
//! element). Also the wire codecs that every protocol shares: shape
//! arithmetic and BYTES length prefixes. No protocol types live here.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{InferError, InferResult};

/// The Open Inference Protocol datatypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// Booleans, one byte each.
    Bool,
    /// Unsigned 8-bit integers.
    Uint8,
    /// Unsigned 16-bit integers.
    Uint16,
    /// Unsigned 32-bit integers.
    Uint32,
    /// Unsigned 64-bit integers.
    Uint64,
    /// Signed 8-bit integers.
    Int8,
    /// Signed 16-bit integers.
    Int16,
    /// Signed 32-bit integers.
    Int32,
    /// Signed 64-bit integers.
    Int64,
    /// IEEE half-precision floats.
    Fp16,
    /// bfloat16 floats.
    Bf16,
    /// Single-precision floats.
    Fp32,
    /// Double-precision floats.
    Fp64,
    /// Byte strings (ONNX string tensors).
    Bytes,
}

impl DataType {
    /// Every datatype, in the protocol's order.
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The protocol's name for this datatype (`"FP32"`, `"BYTES"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses a protocol datatype name.
    pub fn parse(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Bytes per element, or `None` for variable-length BYTES.
    pub fn element_size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => Some(2),
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
        }
    }

    /// Triton's `DataType` enum value in model configurations.
    pub fn triton_config_type(self) -> i32 {
        match self {
            DataType::Bool => 1,
            DataType::Uint8 => 2,
            DataType::Uint16 => 3,
            DataType::Uint32 => 4,
            DataType::Uint64 => 5,
            DataType::Int8 => 6,
            DataType::Int16 => 7,
            DataType::Int32 => 8,
            DataType::Int64 => 9,
            DataType::Fp16 => 10,
            DataType::Fp32 => 11,
            DataType::Fp64 => 12,
            DataType::Bytes => 13,
            DataType::Bf16 => 14,
        }
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The elements of a tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// Fixed-size elements, little-endian, row-major.
    Raw(Bytes),
    /// One buffer per BYTES element, row-major.
    Strings(Vec<Bytes>),
}

/// A named tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions.
    pub shape: Vec<i64>,
    /// The elements.
    pub data: TensorData,
}

impl Tensor {
    /// Builds a tensor from raw contents as the protocol sends them: packed
    /// little-endian elements, or length-prefixed elements for BYTES. The
    /// byte length must match the shape exactly.
    pub fn from_raw(name: &str, datatype: DataType, shape: Vec<i64>, raw: Bytes) -> InferResult<Tensor> {
        let count = element_count(&shape).map_err(|e| InferError::invalid(format!("input '{name}': {e}")))?;
        let data = match datatype.element_size() {
            Some(size) => {
                let expected = count
                    .checked_mul(size)
                    .ok_or_else(|| InferError::invalid(format!("input '{name}': shape {shape:?} is too large")))?;
                if raw.len() != expected {
                    return Err(InferError::invalid(format!(
                        "input '{name}': raw contents hold {} bytes but shape {shape:?} of {datatype} needs {expected}",
                        raw.len()
                    )));
                }
                if datatype == DataType::Bool {
                    check_bools(name, &raw)?;
                }
                TensorData::Raw(raw)
            }
            None => TensorData::Strings(
                split_length_prefixed(&raw, count).map_err(|e| InferError::invalid(format!("input '{name}': {e}")))?,
            ),
        };
        Ok(Tensor { name: name.to_string(), datatype, shape, data })
    }

    /// Number of elements, from the shape.
    pub fn element_count(&self) -> usize {
        element_count(&self.shape).unwrap_or(0)
    }

    /// The raw contents as the protocol sends them (length-prefixed for BYTES).
    pub fn to_raw(&self) -> Bytes {
        match &self.data {
            TensorData::Raw(bytes) => bytes.clone(),
            TensorData::Strings(items) => join_length_prefixed(items),
        }
    }
}

/// BOOL elements are single bytes that must be 0 or 1.
fn check_bools(name: &str, raw: &[u8]) -> InferResult<()> {
    match raw.iter().position(|&b| b > 1) {
        Some(at) => Err(InferError::invalid(format!("input '{name}': BOOL element {at} is {}, not 0 or 1", raw[at]))),
        None => Ok(()),
    }
}

/// The number of elements of a shape; every dimension must be non-negative
/// and the product must fit in memory terms.
pub fn element_count(shape: &[i64]) -> Result<usize, String> {
    shape.iter().try_fold(1usize, |acc, &dim| {
        let dim = usize::try_from(dim).map_err(|_| format!("shape {shape:?} has a negative dimension"))?;
        acc.checked_mul(dim).ok_or_else(|| format!("shape {shape:?} is too large"))
    })
}

/// Splits BYTES raw contents (each element a 4-byte little-endian length
/// followed by that many bytes) into exactly `expected` elements, without
/// copying them.
pub fn split_length_prefixed(raw: &Bytes, expected: usize) -> Result<Vec<Bytes>, String> {
    // Each element needs at least its 4-byte prefix: bounds the allocation.
    if expected > raw.len() / 4 + 1 {
        return Err(format!(
            "BYTES contents of {} bytes cannot hold the {expected} elements the shape needs",
            raw.len()
        ));
    }
    let mut items = Vec::with_capacity(expected);
    let mut at = 0usize;
    while at < raw.len() {
        let Some(prefix) = raw.get(at..at + 4) else {
            return Err(format!("BYTES element {} has a truncated 4-byte length prefix", items.len()));
        };
        let len = u32::from_le_bytes(prefix.try_into().expect("4 bytes")) as usize;
        let start = at + 4;
        let end = start.checked_add(len).filter(|&end| end <= raw.len()).ok_or_else(|| {
            format!("BYTES element {} declares {len} bytes but only {} remain", items.len(), raw.len() - start)
        })?;
        items.push(raw.slice(start..end));
        at = end;
    }
    if items.len() != expected {
        return Err(format!("BYTES contents hold {} elements but the shape needs {expected}", items.len()));
    }
    Ok(items)
}

/// Joins BYTES elements into raw contents, each with its 4-byte prefix.
pub fn join_length_prefixed(items: &[Bytes]) -> Bytes {
    let total: usize = items.iter().map(|item| item.len() + 4).sum();
    let mut out = BytesMut::with_capacity(total);
    for item in items {
        out.put_u32_le(item.len() as u32);
        out.put_slice(item);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for datatype in DataType::ALL {
            assert_eq!(DataType::parse(datatype.as_str()), Some(datatype));
        }
        assert_eq!(DataType::parse("FLOAT"), None);
    }

    #[test]
    fn element_count_rejects_negative_and_overflow() {
        assert_eq!(element_count(&[2, 3]), Ok(6));
        assert_eq!(element_count(&[]), Ok(1));
        assert!(element_count(&[-1, 3]).is_err());
        assert!(element_count(&[i64::MAX, i64::MAX]).is_err());
    }

    #[test]
    fn length_prefixed_round_trip() {
        let items = vec![Bytes::from_static(b"abc"), Bytes::new(), Bytes::from("héllo")];
        let raw = join_length_prefixed(&items);
        assert_eq!(split_length_prefixed(&raw, 3).unwrap(), items);
    }

    #[test]
    fn length_prefixed_errors_name_the_problem() {
        let raw = join_length_prefixed(&[Bytes::from_static(b"abc")]);
        assert!(split_length_prefixed(&raw, 2).unwrap_err().contains("needs 2"));
        let truncated = raw.slice(..raw.len() - 1);
        assert!(split_length_prefixed(&truncated, 1).unwrap_err().contains("declares 3 bytes"));
        let short_prefix = Bytes::from_static(&[1, 0]);
        assert!(split_length_prefixed(&short_prefix, 1).unwrap_err().contains("truncated"));
        // A huge element count with a tiny buffer fails before allocating.
        assert!(split_length_prefixed(&Bytes::new(), usize::MAX).is_err());
    }

    #[test]
    fn raw_length_must_match_shape() {
        let err = Tensor::from_raw("x", DataType::Fp32, vec![2, 2], Bytes::from(vec![0u8; 12])).unwrap_err();
        assert!(err.message.contains("'x'") && err.message.contains("needs 16"), "{err}");
        assert!(Tensor::from_raw("x", DataType::Fp32, vec![2, 2], Bytes::from(vec![0u8; 16])).is_ok());
    }

    #[test]
    fn bools_must_be_zero_or_one() {
        assert!(Tensor::from_raw("b", DataType::Bool, vec![2], Bytes::from_static(&[0, 1])).is_ok());
        assert!(Tensor::from_raw("b", DataType::Bool, vec![2], Bytes::from_static(&[0, 2])).is_err());
    }
}

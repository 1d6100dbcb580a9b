//! KServe v2 JSON tensors and Triton's binary-data extension: decoding a
//! request body into protocol-neutral tensors and encoding outputs back.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::{InferError, InferResult};
use crate::tensor::{element_count, DataType, Tensor, TensorData};

/// Header that gives the length of the JSON part of a binary request or
/// response (Triton's binary-data extension).
pub(crate) const HEADER_LENGTH: &str = "inference-header-content-length";

#[derive(Debug, Deserialize)]
pub(crate) struct RequestHeader {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    pub inputs: Vec<InputHeader>,
    #[serde(default)]
    pub outputs: Option<Vec<OutputHeader>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct InputHeader {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    #[serde(default)]
    pub data: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct OutputHeader {
    pub name: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// Splits a body into its JSON header and the binary part that follows.
pub(crate) fn split_body(body: &Bytes, header_length: Option<usize>) -> InferResult<(RequestHeader, Bytes)> {
    let json_len = header_length.unwrap_or(body.len());
    if json_len > body.len() {
        return Err(InferError::invalid(format!(
            "{HEADER_LENGTH} is {json_len} but the body has only {} bytes",
            body.len()
        )));
    }
    let header: RequestHeader = serde_json::from_slice(&body[..json_len])
        .map_err(|e| InferError::invalid(format!("invalid inference request JSON: {e}")))?;
    Ok((header, body.slice(json_len..)))
}

/// Decodes every input: binary ones are sliced, in order, out of `binary`.
pub(crate) fn decode_inputs(inputs: Vec<InputHeader>, mut binary: Bytes) -> InferResult<Vec<Tensor>> {
    let mut tensors = Vec::with_capacity(inputs.len());
    for input in inputs {
        let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
            InferError::invalid(format!("input '{}' has unknown datatype '{}'", input.name, input.datatype))
        })?;
        let binary_size = input.parameters.get("binary_data_size").map(|v| v.as_u64());
        let tensor = match (binary_size, input.data) {
            (Some(Some(size)), None) => {
                let size = size as usize;
                if size > binary.len() {
                    return Err(InferError::invalid(format!(
                        "input '{}' declares {size} binary bytes but only {} remain in the body",
                        input.name,
                        binary.len()
                    )));
                }
                let raw = binary.split_to(size);
                Tensor::from_raw(&input.name, datatype, input.shape, raw)?
            }
            (Some(Some(_)), Some(_)) => {
                return Err(InferError::invalid(format!(
                    "input '{}' has both binary_data_size and JSON data; use one or the other",
                    input.name
                )))
            }
            (Some(None), _) => {
                return Err(InferError::invalid(format!("input '{}': binary_data_size must be an integer", input.name)))
            }
            (None, Some(data)) => decode_json_tensor(&input.name, datatype, input.shape, &data)?,
            (None, None) => return Err(InferError::invalid(format!("input '{}' has no data", input.name))),
        };
        tensors.push(tensor);
    }
    if !binary.is_empty() {
        return Err(InferError::invalid(format!("{} bytes of binary data follow the inputs unused", binary.len())));
    }
    Ok(tensors)
}

/// Flattens (possibly nested) JSON arrays in row-major order.
fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        other => out.push(other),
    }
}

fn decode_json_tensor(name: &str, datatype: DataType, shape: Vec<i64>, data: &Value) -> InferResult<Tensor> {
    let count = element_count(&shape).map_err(|e| InferError::invalid(format!("input '{name}': {e}")))?;
    let mut values = Vec::new();
    flatten(data, &mut values);
    if values.len() != count {
        return Err(InferError::invalid(format!(
            "input '{name}' has {} values but shape {shape:?} needs {count}",
            values.len()
        )));
    }
    let bad = |i: usize| InferError::invalid(format!("input '{name}': value {i} is not a valid {datatype}"));
    let data = if datatype == DataType::Bytes {
        let items = values
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_str().map(|s| Bytes::copy_from_slice(s.as_bytes())).ok_or_else(|| bad(i)))
            .collect::<InferResult<Vec<_>>>()?;
        TensorData::Strings(items)
    } else {
        let size = datatype.element_size().expect("fixed size");
        let mut out = BytesMut::with_capacity(count * size);
        for (i, value) in values.iter().enumerate() {
            put_json_number(&mut out, datatype, value).ok_or_else(|| bad(i))?;
        }
        TensorData::Raw(out.freeze())
    };
    Ok(Tensor { name: name.to_string(), datatype, shape, data })
}

/// Appends one JSON value as a little-endian element; `None` if it does not
/// fit the datatype.
fn put_json_number(out: &mut BytesMut, datatype: DataType, value: &Value) -> Option<()> {
    macro_rules! int {
        ($t:ty) => {{
            let v = value
                .as_i64()
                .and_then(|v| <$t>::try_from(v).ok())
                .or_else(|| value.as_u64().and_then(|v| <$t>::try_from(v).ok()))?;
            out.put_slice(&v.to_le_bytes());
        }};
    }
    match datatype {
        DataType::Bool => out.put_u8(value.as_bool()? as u8),
        DataType::Uint8 => int!(u8),
        DataType::Uint16 => int!(u16),
        DataType::Uint32 => int!(u32),
        DataType::Uint64 => int!(u64),
        DataType::Int8 => int!(i8),
        DataType::Int16 => int!(i16),
        DataType::Int32 => int!(i32),
        DataType::Int64 => int!(i64),
        DataType::Fp16 => out.put_slice(&half::f16::from_f64(value.as_f64()?).to_le_bytes()),
        DataType::Bf16 => out.put_slice(&half::bf16::from_f64(value.as_f64()?).to_le_bytes()),
        DataType::Fp32 => out.put_f32_le(value.as_f64()? as f32),
        DataType::Fp64 => out.put_f64_le(value.as_f64()?),
        DataType::Bytes => return None,
    }
    Some(())
}

/// A tensor's elements as a flat JSON array.
pub(crate) fn tensor_to_json(tensor: &Tensor) -> Value {
    let raw = match &tensor.data {
        TensorData::Strings(items) => {
            return Value::Array(items.iter().map(|b| Value::String(String::from_utf8_lossy(b).into_owned())).collect())
        }
        TensorData::Raw(raw) => raw,
    };
    macro_rules! numbers {
        ($t:ty, $n:expr, $conv:expr) => {
            Value::Array(
                raw.chunks_exact($n)
                    .map(|c| {
                        let v = <$t>::from_le_bytes(c.try_into().expect("chunk size"));
                        json!($conv(v))
                    })
                    .collect(),
            )
        };
    }
    match tensor.datatype {
        DataType::Bool => Value::Array(raw.iter().map(|&b| Value::Bool(b != 0)).collect()),
        DataType::Uint8 => numbers!(u8, 1, |v| v),
        DataType::Uint16 => numbers!(u16, 2, |v| v),
        DataType::Uint32 => numbers!(u32, 4, |v| v),
        DataType::Uint64 => numbers!(u64, 8, |v| v),
        DataType::Int8 => numbers!(i8, 1, |v| v),
        DataType::Int16 => numbers!(i16, 2, |v| v),
        DataType::Int32 => numbers!(i32, 4, |v| v),
        DataType::Int64 => numbers!(i64, 8, |v| v),
        DataType::Fp16 => numbers!(half::f16, 2, |v: half::f16| v.to_f32()),
        DataType::Bf16 => numbers!(half::bf16, 2, |v: half::bf16| v.to_f32()),
        DataType::Fp32 => numbers!(f32, 4, |v| v),
        DataType::Fp64 => numbers!(f64, 8, |v| v),
        DataType::Bytes => Value::Null,
    }
}

/// Encodes a response: each output as JSON data, or as binary data after
/// the JSON when `binary(name)` says so. Returns the body and, when any
/// output is binary, the JSON length for the header.
pub(crate) fn encode_response(
    model_name: &str,
    model_version: &str,
    id: &str,
    outputs: &[Tensor],
    binary: impl Fn(&str) -> bool,
) -> (Bytes, Option<usize>) {
    let mut chunks = Vec::new();
    let outputs_json: Vec<Value> = outputs
        .iter()
        .map(|tensor| {
            let mut out = json!({"name": tensor.name, "datatype": tensor.datatype.as_str(), "shape": tensor.shape});
            if binary(&tensor.name) {
                let raw = tensor.to_raw();
                out["parameters"] = json!({"binary_data_size": raw.len()});
                chunks.push(raw);
            } else {
                out["data"] = tensor_to_json(tensor);
            }
            out
        })
        .collect();
    let mut header = json!({"model_name": model_name, "model_version": model_version, "outputs": outputs_json});
    if !id.is_empty() {
        header["id"] = json!(id);
    }
    let header = serde_json::to_vec(&header).expect("JSON encoding");
    if chunks.is_empty() {
        return (header.into(), None);
    }
    let json_len = header.len();
    let mut body = BytesMut::with_capacity(json_len + chunks.iter().map(Bytes::len).sum::<usize>());
    body.put_slice(&header);
    chunks.iter().for_each(|c| body.put_slice(c));
    (body.freeze(), Some(json_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_json_data_decodes_row_major() {
        let t = decode_json_tensor("x", DataType::Int16, vec![2, 2], &json!([[1, 2], [3, -4]])).unwrap();
        assert_eq!(tensor_to_json(&t), json!([1, 2, 3, -4]));
    }

    #[test]
    fn json_values_are_checked() {
        let err = decode_json_tensor("x", DataType::Uint8, vec![2], &json!([1, 300])).unwrap_err();
        assert!(err.message.contains("value 1"), "{err}");
        let err = decode_json_tensor("x", DataType::Fp32, vec![3], &json!([1.0, 2.0])).unwrap_err();
        assert!(err.message.contains("needs 3"), "{err}");
    }

    #[test]
    fn binary_inputs_are_sliced_in_order() {
        let header = r#"{"inputs":[{"name":"a","shape":[1],"datatype":"INT32","parameters":{"binary_data_size":4}},
                      {"name":"b","shape":[1],"datatype":"BYTES","data":["hi"]}]}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend_from_slice(&7i32.to_le_bytes());
        let (parsed, binary) = split_body(&Bytes::from(body), Some(header.len())).unwrap();
        let tensors = decode_inputs(parsed.inputs, binary).unwrap();
        assert_eq!(tensor_to_json(&tensors[0]), json!([7]));
        assert_eq!(tensor_to_json(&tensors[1]), json!(["hi"]));
    }

    #[test]
    fn binary_response_carries_header_length() {
        let t = decode_json_tensor("y", DataType::Fp32, vec![1], &json!([0.5])).unwrap();
        let (body, len) = encode_response("m", "1", "", &[t], |_| true);
        let len = len.unwrap();
        assert_eq!(&body[len..], &0.5f32.to_le_bytes());
        let header: Value = serde_json::from_slice(&body[..len]).unwrap();
        assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], json!(4));
    }
}

//! KServe v2 JSON tensors and Triton's binary-data extension: decoding a
//! request body into protocol-neutral tensors and encoding outputs back.

use std::collections::BTreeMap;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::error::{InferError, InferResult};
use crate::inference::{ParamValue, Parameters};
use crate::tensor::{element_count, DataType, Tensor, TensorData};

/// Header that gives the length of the JSON part of a binary request or
/// response (Triton's binary-data extension).
pub(crate) const HEADER_LENGTH: &str = "inference-header-content-length";

/// The JSON header of an inference request. Decoding is typed all the way
/// down, so that memory stays within a small multiple of the body: tensor
/// `data` is kept as the raw JSON text until its datatype is known, then
/// decoded straight into the tensor's bytes; parameters keep only scalars.
#[derive(Debug, Deserialize)]
pub(crate) struct RequestHeader<'a> {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: JsonParameters,
    #[serde(borrow)]
    pub inputs: Vec<InputHeader<'a>>,
    #[serde(default)]
    pub outputs: Option<Vec<OutputHeader>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct InputHeader<'a> {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: JsonParameters,
    /// The tensor's elements, still JSON text (a slice of the body).
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct OutputHeader {
    pub name: String,
    #[serde(default)]
    pub parameters: JsonParameters,
}

/// KServe parameters: a JSON object of scalars.
pub(crate) type JsonParameters = BTreeMap<String, Scalar>;

/// A parameter value. Arrays and objects are skipped without being built
/// (as `Null`): no parameter uses them, and a `Value` would take ~16x
/// their text. Its own type rather than a `Value`: with serde_json's
/// `preserve_order` (which llguidance turns on) a `Value` is 80 bytes, this
/// is 32, and a body of many parameters must stay within its memory bound.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scalar {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
}

impl Scalar {
    pub(crate) fn as_bool(&self) -> Option<bool> {
        match self {
            Scalar::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub(crate) fn as_i64(&self) -> Option<i64> {
        match self {
            Scalar::Number(n) => n.as_i64(),
            _ => None,
        }
    }

    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Scalar::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::String(s) => Some(s),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Number(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Number(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(serde_json::Number::from_f64(v).map_or(Scalar::Null, Scalar::Number))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::String(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::String(v))
            }
            fn visit_unit<E>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Null)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Null)
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// Splits a body into its JSON header and the binary part that follows.
pub(crate) fn split_body(body: &Bytes, header_length: Option<usize>) -> InferResult<(RequestHeader<'_>, Bytes)> {
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
pub(crate) fn decode_inputs(inputs: Vec<InputHeader<'_>>, mut binary: Bytes) -> InferResult<Vec<Tensor>> {
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
            (None, Some(data)) => decode_json_tensor(&input.name, datatype, input.shape, data.get())?,
            (None, None) => return Err(InferError::invalid(format!("input '{}' has no data", input.name))),
        };
        tensors.push(tensor);
    }
    if !binary.is_empty() {
        return Err(InferError::invalid(format!("{} bytes of binary data follow the inputs unused", binary.len())));
    }
    Ok(tensors)
}

/// Decodes a tensor's JSON `data` (possibly nested arrays, read in
/// row-major order) straight into its little-endian bytes (or its strings).
fn decode_json_tensor(name: &str, datatype: DataType, shape: Vec<i64>, data: &str) -> InferResult<Tensor> {
    let count = element_count(&shape).map_err(|e| InferError::invalid(format!("input '{name}': {e}")))?;
    let mut elements = Elements::new(datatype, count, data.len());
    Nested(&mut elements)
        .deserialize(&mut serde_json::Deserializer::from_str(data))
        .map_err(|e| InferError::invalid(format!("invalid inference request JSON: input '{name}': {e}")))?;
    if elements.seen != count {
        return Err(InferError::invalid(format!(
            "input '{name}' has {} values but shape {shape:?} needs {count}",
            elements.seen
        )));
    }
    if let Some(i) = elements.first_bad {
        return Err(InferError::invalid(format!("input '{name}': value {i} is not a valid {datatype}")));
    }
    Ok(Tensor { name: name.to_string(), datatype, shape, data: elements.finish() })
}

/// One JSON scalar of tensor data.
enum Element<'a> {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(&'a str),
    /// `null` or an object: never a valid element.
    Other,
}

/// Where a tensor's elements go while its JSON is read: counted, checked
/// against the datatype, and packed (only the first `count` of them, and
/// none after the first bad one, whose index is kept for the error).
struct Elements {
    datatype: DataType,
    count: usize,
    seen: usize,
    first_bad: Option<usize>,
    /// Fixed-size elements, or the bytes of every string back to back.
    bytes: BytesMut,
    /// BYTES: where each string ends in `bytes`.
    ends: Vec<usize>,
}

impl Elements {
    fn new(datatype: DataType, count: usize, text_len: usize) -> Elements {
        // Each element takes at least 2 bytes of text ("0,"): the shape
        // alone cannot make us reserve more than the text can fill.
        let likely = count.min(text_len / 2 + 1);
        let (bytes, ends) = match datatype.element_size() {
            Some(size) => (BytesMut::with_capacity(likely * size), Vec::new()),
            None => (BytesMut::new(), Vec::with_capacity(likely)),
        };
        Elements { datatype, count, seen: 0, first_bad: None, bytes, ends }
    }

    fn push(&mut self, element: Element<'_>) {
        let index = self.seen;
        self.seen += 1;
        if index >= self.count || self.first_bad.is_some() {
            return;
        }
        if !self.put(element) {
            self.first_bad = Some(index);
        }
    }

    /// Appends one element; false if it does not fit the datatype.
    fn put(&mut self, element: Element<'_>) -> bool {
        let out = &mut self.bytes;
        macro_rules! int {
            ($t:ty) => {{
                let v = match element {
                    Element::Int(v) => <$t>::try_from(v).ok(),
                    Element::Uint(v) => <$t>::try_from(v).ok(),
                    _ => None,
                };
                match v {
                    Some(v) => out.put_slice(&v.to_le_bytes()),
                    None => return false,
                }
            }};
        }
        let float = match element {
            Element::Int(v) => Some(v as f64),
            Element::Uint(v) => Some(v as f64),
            Element::Float(v) => Some(v),
            _ => None,
        };
        match (self.datatype, float) {
            (DataType::Bool, _) => match element {
                Element::Bool(b) => out.put_u8(b as u8),
                _ => return false,
            },
            (DataType::Uint8, _) => int!(u8),
            (DataType::Uint16, _) => int!(u16),
            (DataType::Uint32, _) => int!(u32),
            (DataType::Uint64, _) => int!(u64),
            (DataType::Int8, _) => int!(i8),
            (DataType::Int16, _) => int!(i16),
            (DataType::Int32, _) => int!(i32),
            (DataType::Int64, _) => int!(i64),
            (DataType::Fp16, Some(v)) => out.put_slice(&half::f16::from_f64(v).to_le_bytes()),
            (DataType::Bf16, Some(v)) => out.put_slice(&half::bf16::from_f64(v).to_le_bytes()),
            (DataType::Fp32, Some(v)) => out.put_f32_le(v as f32),
            (DataType::Fp64, Some(v)) => out.put_f64_le(v),
            (DataType::Bytes, _) => match element {
                Element::Str(s) => {
                    out.put_slice(s.as_bytes());
                    self.ends.push(out.len());
                }
                _ => return false,
            },
            (DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64, None) => return false,
        }
        true
    }

    fn finish(self) -> TensorData {
        let bytes = self.bytes.freeze();
        if self.datatype != DataType::Bytes {
            return TensorData::Raw(bytes);
        }
        let mut start = 0;
        TensorData::Strings(
            self.ends
                .into_iter()
                .map(|end| {
                    let item = bytes.slice(start..end);
                    start = end;
                    item
                })
                .collect(),
        )
    }
}

/// Reads one JSON value of tensor data into [`Elements`]: arrays are
/// walked (at any depth), scalars pushed.
struct Nested<'e>(&'e mut Elements);

impl<'de> DeserializeSeed<'de> for Nested<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Nested<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("tensor data")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Nested(&mut *self.0))?.is_some() {}
        Ok(())
    }
    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.0.push(Element::Bool(v));
        Ok(())
    }
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.0.push(Element::Int(v));
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.0.push(Element::Uint(v));
        Ok(())
    }
    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.0.push(Element::Float(v));
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.0.push(Element::Str(v));
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.push(Element::Other);
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        self.0.push(Element::Other);
        Ok(())
    }
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
/// the JSON when `binary(name)` says so, and the response parameters (an
/// LLM's `finish_reason`, token counts, `logprobs`). Returns the body and,
/// when any output is binary, the JSON length for the header.
pub(crate) fn encode_response(
    model_name: &str,
    model_version: &str,
    id: &str,
    outputs: &[Tensor],
    parameters: &Parameters,
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
    if !parameters.is_empty() {
        let scalar = |value: &ParamValue| match value {
            ParamValue::Bool(b) => json!(b),
            ParamValue::Int(i) => json!(i),
            ParamValue::Float(f) => json!(f),
            ParamValue::Str(s) => json!(s),
        };
        header["parameters"] = parameters.iter().map(|(key, value)| (key.clone(), scalar(value))).collect();
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
        let t = decode_json_tensor("x", DataType::Int16, vec![2, 2], r#"[[1, 2], [3, -4]]"#).unwrap();
        assert_eq!(tensor_to_json(&t), json!([1, 2, 3, -4]));
    }

    #[test]
    fn json_values_are_checked() {
        let err = decode_json_tensor("x", DataType::Uint8, vec![2], "[1, 300]").unwrap_err();
        assert!(err.message.contains("value 1"), "{err}");
        let err = decode_json_tensor("x", DataType::Fp32, vec![3], "[1.0, 2.0]").unwrap_err();
        assert!(err.message.contains("needs 3"), "{err}");
    }

    #[test]
    fn values_keep_their_old_meaning() {
        // Integers fit floats; floats do not fit integers; a scalar or an
        // object counts as one value; errors name the first bad value, but
        // a wrong count wins.
        let t = decode_json_tensor("x", DataType::Fp64, vec![3], "[1, -2, 0.5]").unwrap();
        assert_eq!(tensor_to_json(&t), json!([1.0, -2.0, 0.5]));
        let err = decode_json_tensor("x", DataType::Int32, vec![2], "[1, 2.0]").unwrap_err();
        assert!(err.message.contains("value 1 is not a valid INT32"), "{err}");
        let err = decode_json_tensor("x", DataType::Bool, vec![3], r#"[true, {"a": [1]}, null]"#).unwrap_err();
        assert!(err.message.contains("value 1 is not a valid BOOL"), "{err}");
        let err = decode_json_tensor("x", DataType::Int8, vec![1], "[1000, 2]").unwrap_err();
        assert!(err.message.contains("has 2 values"), "{err}");
        let t = decode_json_tensor("x", DataType::Uint64, vec![1], "18446744073709551615").unwrap();
        assert_eq!(tensor_to_json(&t), json!([u64::MAX]));
        let t = decode_json_tensor("s", DataType::Bytes, vec![3], r#"[["a\"b", ""], ["\u00e9"]]"#).unwrap();
        assert_eq!(tensor_to_json(&t), json!(["a\"b", "", "\u{e9}"]));
        let err = decode_json_tensor("s", DataType::Bytes, vec![2], r#"["a", 1]"#).unwrap_err();
        assert!(err.message.contains("value 1 is not a valid BYTES"), "{err}");
        // Deep nesting is refused (serde_json's recursion limit), not a stack overflow.
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let body = Bytes::from(format!(
            r#"{{"inputs": [{{"name": "x", "shape": [1], "datatype": "INT8", "data": {deep}}}]}}"#
        ));
        let (header, binary) = split_body(&body, None).unwrap();
        let err = decode_inputs(header.inputs, binary).unwrap_err();
        assert!(err.message.contains("recursion limit"), "{err}");
    }

    #[test]
    fn parameters_keep_scalars_only() {
        let body = Bytes::from_static(
            br#"{"parameters": {"priority": 1, "big": [1, 2, [3]], "o": {"k": 1}, "s": "x"},
                 "inputs": [{"name": "a", "shape": [1], "datatype": "INT32", "data": [1],
                             "parameters": {"binary_data_size": [4]}}]}"#,
        );
        let (header, binary) = split_body(&body, None).unwrap();
        assert_eq!(header.parameters["priority"].as_i64(), Some(1));
        assert_eq!(header.parameters["big"], Scalar::Null);
        assert_eq!(header.parameters["o"], Scalar::Null);
        assert_eq!(header.parameters["s"].as_str(), Some("x"));
        let err = decode_inputs(header.inputs, binary).unwrap_err();
        assert!(err.message.contains("binary_data_size must be an integer"), "{err}");
    }

    /// Decoding a body takes at most 16 x its size + 64 KiB of heap, for
    /// the shapes of JSON that cost the most per byte.
    #[test]
    fn decoding_memory_stays_within_16x_the_body() {
        let n = 200_000;
        let tensor = |datatype: &str, element: &str| {
            let data = vec![element; n].join(",");
            format!(r#"{{"inputs": [{{"name": "x", "shape": [{n}], "datatype": "{datatype}", "data": [{data}]}}]}}"#)
        };
        let params = (0..n).map(|i| format!(r#""{i}":0"#)).collect::<Vec<_>>().join(",");
        let inputs = vec![r#"{"name":"","shape":[],"datatype":"","data":0}"#; n / 10].join(",");
        let bodies = [
            tensor("INT64", "1"),
            tensor("FP64", "1"),
            tensor("BYTES", r#""""#),
            tensor("BYTES", r#""a""#),
            tensor("BOOL", "[[[[{}]]]]"),
            format!(r#"{{"parameters": {{{params}}}, "inputs": []}}"#),
            format!(r#"{{"inputs": [{inputs}]}}"#),
            format!(r#"{{"inputs": [], "outputs": [{}]}}"#, vec![r#"{"name":""}"#; n / 5].join(",")),
        ];
        for body in bodies {
            let body = Bytes::from(body);
            let (_, peak) = crate::alloc_probe::peak_during(|| {
                let (header, binary) = split_body(&body, None).unwrap();
                let _ = decode_inputs(header.inputs, binary);
            });
            let bound = 16 * body.len() + 64 * 1024;
            assert!(
                peak <= bound,
                "{}...: {peak} bytes for a body of {}",
                &body[..60.min(body.len())].escape_ascii(),
                body.len()
            );
        }
    }

    #[test]
    fn binary_inputs_are_sliced_in_order() {
        let header = r#"{"inputs":[{"name":"a","shape":[1],"datatype":"INT32","parameters":{"binary_data_size":4}},
                      {"name":"b","shape":[1],"datatype":"BYTES","data":["hi"]}]}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend_from_slice(&7i32.to_le_bytes());
        let body = Bytes::from(body);
        let (parsed, binary) = split_body(&body, Some(header.len())).unwrap();
        let tensors = decode_inputs(parsed.inputs, binary).unwrap();
        assert_eq!(tensor_to_json(&tensors[0]), json!([7]));
        assert_eq!(tensor_to_json(&tensors[1]), json!(["hi"]));
    }

    #[test]
    fn binary_response_carries_header_length() {
        let t = decode_json_tensor("y", DataType::Fp32, vec![1], "[0.5]").unwrap();
        let (body, len) = encode_response("m", "1", "", &[t], &Parameters::new(), |_| true);
        let len = len.unwrap();
        assert_eq!(&body[len..], &0.5f32.to_le_bytes());
        let header: Value = serde_json::from_slice(&body[..len]).unwrap();
        assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], json!(4));
    }
}

//! Conversions between Open Inference Protocol messages and ferrite's
//! protocol-neutral requests and tensors. Every check on the shape of a
//! message happens here; checks against the model happen in `model`.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use ferrite_proto::inference::{
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor, model_infer_response::InferOutputTensor,
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
};

use crate::error::{InferError, InferResult};
use crate::inference::{InferRequest, InferResponse, ParamValue, Parameters, Priority};
use crate::tensor::{element_count, DataType, Tensor, TensorData};

/// A decoded ModelInfer request: which model, and the request itself.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub model_name: String,
    pub model_version: String,
    pub request: InferRequest,
}

/// Decodes a ModelInferRequest. `deadline` is the gRPC deadline, if any;
/// the request's own `timeout` parameter (microseconds) may shorten it.
pub(crate) fn decode_request(message: ModelInferRequest, deadline: Option<Instant>) -> InferResult<Decoded> {
    let priority = match int_parameter(&message.parameters, "priority")? {
        Some(1) => Priority::High,
        _ => Priority::Normal,
    };
    let timeout = int_parameter(&message.parameters, "timeout")?
        .filter(|&us| us > 0)
        .map(|us| Instant::now() + Duration::from_micros(us as u64));
    let deadline = match (deadline, timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };

    let raw = message.raw_input_contents;
    let uses_raw = !raw.is_empty();
    if uses_raw && raw.len() != message.inputs.len() {
        return Err(InferError::invalid(format!(
            "raw_input_contents has {} entries but the request has {} inputs",
            raw.len(),
            message.inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let inputs = message
        .inputs
        .into_iter()
        .map(|input| {
            let datatype = parse_datatype(&input.name, &input.datatype)?;
            if uses_raw {
                if has_typed_contents(&input) {
                    return Err(InferError::invalid(format!(
                        "input '{}' has typed contents while the request uses raw_input_contents; use one or the other",
                        input.name
                    )));
                }
                let bytes = raw.next().expect("one raw entry per input");
                Tensor::from_raw(&input.name, datatype, input.shape, bytes)
            } else {
                decode_typed(input, datatype)
            }
        })
        .collect::<InferResult<Vec<_>>>()?;
    let outputs = message.outputs.into_iter().map(|o| o.name).collect();
    let parameters = message
        .parameters
        .into_iter()
        .filter_map(|(key, value)| {
            let value = match value.parameter_choice? {
                ParameterChoice::BoolParam(b) => ParamValue::Bool(b),
                ParameterChoice::Int64Param(i) => ParamValue::Int(i),
                ParameterChoice::Uint64Param(u) => ParamValue::Int(i64::try_from(u).unwrap_or(i64::MAX)),
                ParameterChoice::DoubleParam(f) => ParamValue::Float(f),
                ParameterChoice::StringParam(s) => ParamValue::Str(s),
            };
            Some((key, value))
        })
        .collect();
    Ok(Decoded {
        model_name: message.model_name,
        model_version: message.model_version,
        request: InferRequest { id: message.id, inputs, outputs, priority, deadline, parameters },
    })
}

/// Reads an integer request parameter; other types are an error.
fn int_parameter(
    parameters: &std::collections::HashMap<String, InferParameter>,
    key: &str,
) -> InferResult<Option<i64>> {
    match parameters.get(key).and_then(|p| p.parameter_choice.as_ref()) {
        None => Ok(None),
        Some(ParameterChoice::Int64Param(v)) => Ok(Some(*v)),
        Some(ParameterChoice::Uint64Param(v)) => Ok(Some(i64::try_from(*v).unwrap_or(i64::MAX))),
        Some(_) => Err(InferError::invalid(format!("parameter '{key}' must be an integer"))),
    }
}

pub(crate) fn parse_datatype(name: &str, datatype: &str) -> InferResult<DataType> {
    DataType::parse(datatype)
        .ok_or_else(|| InferError::invalid(format!("input '{name}' has unknown datatype '{datatype}'")))
}

fn has_typed_contents(input: &InferInputTensor) -> bool {
    input.contents.as_ref().is_some_and(|c| {
        !(c.bool_contents.is_empty()
            && c.int_contents.is_empty()
            && c.int64_contents.is_empty()
            && c.uint_contents.is_empty()
            && c.uint64_contents.is_empty()
            && c.fp32_contents.is_empty()
            && c.fp64_contents.is_empty()
            && c.bytes_contents.is_empty())
    })
}

/// Builds a tensor from typed contents: the field that belongs to the
/// datatype must hold exactly one value per element, and no other field
/// may be used.
fn decode_typed(input: InferInputTensor, datatype: DataType) -> InferResult<Tensor> {
    let name = input.name;
    let count = element_count(&input.shape).map_err(|e| InferError::invalid(format!("input '{name}': {e}")))?;
    let contents = input.contents.unwrap_or_default();
    let field = typed_field(datatype);
    let used = used_fields(&contents);
    if let Some(other) = used.iter().find(|f| Some(**f) != field) {
        return Err(InferError::invalid(format!("input '{name}' of datatype {datatype} cannot use {other}",)));
    }
    let Some(field) = field else {
        return Err(InferError::invalid(format!(
            "input '{name}' of datatype {datatype} has no typed contents field; send it in raw_input_contents"
        )));
    };
    let wrong_count = |found: usize| {
        InferError::invalid(format!(
            "input '{name}' has {found} values in {field} but shape {:?} needs {count}",
            input.shape
        ))
    };
    let out_of_range = |index: usize| {
        InferError::invalid(format!("input '{name}': value {index} in {field} is out of range for {datatype}"))
    };
    macro_rules! pack {
        ($values:expr, $target:ty) => {{
            let values = &$values;
            if values.len() != count {
                return Err(wrong_count(values.len()));
            }
            let mut out = BytesMut::with_capacity(count * std::mem::size_of::<$target>());
            for (i, &v) in values.iter().enumerate() {
                let v: $target = <$target>::try_from(v).map_err(|_| out_of_range(i))?;
                out.put_slice(&v.to_le_bytes());
            }
            TensorData::Raw(out.freeze())
        }};
    }
    let data = match datatype {
        DataType::Bool => {
            if contents.bool_contents.len() != count {
                return Err(wrong_count(contents.bool_contents.len()));
            }
            TensorData::Raw(contents.bool_contents.iter().map(|&b| b as u8).collect::<Vec<u8>>().into())
        }
        DataType::Uint8 => pack!(contents.uint_contents, u8),
        DataType::Uint16 => pack!(contents.uint_contents, u16),
        DataType::Uint32 => pack!(contents.uint_contents, u32),
        DataType::Uint64 => pack!(contents.uint64_contents, u64),
        DataType::Int8 => pack!(contents.int_contents, i8),
        DataType::Int16 => pack!(contents.int_contents, i16),
        DataType::Int32 => pack!(contents.int_contents, i32),
        DataType::Int64 => pack!(contents.int64_contents, i64),
        DataType::Fp32 => pack!(contents.fp32_contents, f32),
        DataType::Fp64 => pack!(contents.fp64_contents, f64),
        DataType::Bytes => {
            if contents.bytes_contents.len() != count {
                return Err(wrong_count(contents.bytes_contents.len()));
            }
            TensorData::Strings(contents.bytes_contents)
        }
        DataType::Fp16 | DataType::Bf16 => unreachable!("no typed field"),
    };
    Ok(Tensor { name, datatype, shape: input.shape, data })
}

/// The typed contents field a datatype travels in, if any.
fn typed_field(datatype: DataType) -> Option<&'static str> {
    Some(match datatype {
        DataType::Bool => "bool_contents",
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => "uint_contents",
        DataType::Uint64 => "uint64_contents",
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "int_contents",
        DataType::Int64 => "int64_contents",
        DataType::Fp32 => "fp32_contents",
        DataType::Fp64 => "fp64_contents",
        DataType::Bytes => "bytes_contents",
        DataType::Fp16 | DataType::Bf16 => return None,
    })
}

fn used_fields(c: &InferTensorContents) -> Vec<&'static str> {
    [
        ("bool_contents", c.bool_contents.is_empty()),
        ("int_contents", c.int_contents.is_empty()),
        ("int64_contents", c.int64_contents.is_empty()),
        ("uint_contents", c.uint_contents.is_empty()),
        ("uint64_contents", c.uint64_contents.is_empty()),
        ("fp32_contents", c.fp32_contents.is_empty()),
        ("fp64_contents", c.fp64_contents.is_empty()),
        ("bytes_contents", c.bytes_contents.is_empty()),
    ]
    .into_iter()
    .filter(|(_, empty)| !empty)
    .map(|(name, _)| name)
    .collect()
}

/// Encodes a response the way Triton does: every output in
/// `raw_output_contents`.
pub(crate) fn encode_response(response: InferResponse) -> ModelInferResponse {
    let mut outputs = Vec::with_capacity(response.outputs.len());
    let mut raw: Vec<Bytes> = Vec::with_capacity(response.outputs.len());
    for tensor in response.outputs {
        raw.push(tensor.to_raw());
        outputs.push(InferOutputTensor {
            name: tensor.name,
            datatype: tensor.datatype.as_str().to_string(),
            shape: tensor.shape,
            parameters: Default::default(),
            contents: None,
        });
    }
    ModelInferResponse {
        model_name: response.model_name,
        model_version: response.model_version,
        id: response.id,
        parameters: encode_parameters(response.parameters),
        outputs,
        raw_output_contents: raw,
    }
}

/// Response parameters as protocol messages.
pub(crate) fn encode_parameters(parameters: Parameters) -> std::collections::HashMap<String, InferParameter> {
    parameters
        .into_iter()
        .map(|(key, value)| {
            let choice = match value {
                ParamValue::Bool(b) => ParameterChoice::BoolParam(b),
                ParamValue::Int(i) => ParameterChoice::Int64Param(i),
                ParamValue::Float(f) => ParameterChoice::DoubleParam(f),
                ParamValue::Str(s) => ParameterChoice::StringParam(s),
            };
            (key, InferParameter { parameter_choice: Some(choice) })
        })
        .collect()
}

/// Parses a `grpc-timeout` header value ("100m", "5S", ...).
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok().filter(|_| digits.len() <= 8)?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn input(name: &str, datatype: &str, shape: Vec<i64>, contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: Default::default(),
            contents,
        }
    }

    fn decode(inputs: Vec<InferInputTensor>, raw: Vec<Bytes>) -> InferResult<Decoded> {
        decode_request(
            ModelInferRequest { model_name: "m".into(), inputs, raw_input_contents: raw, ..Default::default() },
            None,
        )
    }

    fn message(result: InferResult<Decoded>) -> String {
        let err = result.unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
        err.message
    }

    #[test]
    fn typed_int8_is_range_checked_and_packed() {
        let contents = InferTensorContents { int_contents: vec![-1, 127], ..Default::default() };
        let decoded = decode(vec![input("x", "INT8", vec![2], Some(contents))], vec![]).unwrap();
        assert_eq!(decoded.request.inputs[0].data, TensorData::Raw(Bytes::from_static(&[0xff, 0x7f])));
        let too_big = InferTensorContents { int_contents: vec![128, 0], ..Default::default() };
        assert!(message(decode(vec![input("x", "INT8", vec![2], Some(too_big))], vec![])).contains("out of range"));
    }

    #[test]
    fn typed_errors_name_the_problem() {
        let fp32 = InferTensorContents { fp32_contents: vec![1.0], ..Default::default() };
        assert!(message(decode(vec![input("x", "FP32", vec![2], Some(fp32.clone()))], vec![])).contains("needs 2"));
        assert!(message(decode(vec![input("x", "INT32", vec![1], Some(fp32.clone()))], vec![]))
            .contains("cannot use fp32_contents"));
        assert!(message(decode(vec![input("x", "FP16", vec![1], None)], vec![])).contains("raw_input_contents"));
        assert!(message(decode(vec![input("x", "FLOAT", vec![1], None)], vec![])).contains("unknown datatype"));
    }

    #[test]
    fn mixing_raw_and_typed_is_refused() {
        let fp32 = InferTensorContents { fp32_contents: vec![1.0], ..Default::default() };
        let raw = vec![Bytes::from(vec![0u8; 4])];
        assert!(message(decode(vec![input("x", "FP32", vec![1], Some(fp32))], raw)).contains("one or the other"));
        let two_raw = vec![Bytes::new(), Bytes::new()];
        assert!(message(decode(vec![input("x", "FP32", vec![0], None)], two_raw)).contains("2 entries"));
    }

    #[test]
    fn timeout_parameter_sets_a_deadline_and_priority_one_is_high() {
        let mut request = ModelInferRequest::default();
        let int = |v| InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(v)) };
        request.parameters.insert("timeout".into(), int(1000));
        request.parameters.insert("priority".into(), int(1));
        let decoded = decode_request(request, None).unwrap();
        assert!(decoded.request.deadline.is_some());
        assert_eq!(decoded.request.priority, Priority::High);
    }

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("123456789m"), None);
    }
}

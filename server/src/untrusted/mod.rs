//! Entry points that feed untrusted bytes through request decoding and
//! validation, exactly as the frontends do, for the fuzz target
//! (`fuzz/`) and the randomized tests. They must never panic.

use std::time::Instant;

use bytes::Bytes;
use prost::Message;

use crate::inference::InferRequest;
use crate::runtime::{Signature, TensorSpec};
use crate::tensor::DataType;
use crate::tensor_model::validate;

/// A model signature with one input of every kind of datatype handling:
/// fixed-size, BOOL, half floats and BYTES, batched and not.
pub fn sample_signature() -> Signature {
    let spec = |name: &str, datatype, shape: &[i64]| TensorSpec { name: name.into(), datatype, shape: shape.to_vec() };
    Signature {
        inputs: vec![
            spec("INPUT0", DataType::Fp32, &[-1, 4]),
            spec("FLAGS", DataType::Bool, &[-1, 2]),
            spec("HALF", DataType::Fp16, &[-1, 2]),
            spec("TEXT", DataType::Bytes, &[-1, 1]),
        ],
        outputs: vec![spec("OUTPUT0", DataType::Fp32, &[-1, 4])],
    }
}

/// Decodes `data` as a gRPC ModelInferRequest and validates it against
/// [`sample_signature`]; true if it was accepted.
pub fn grpc_request(data: &[u8]) -> bool {
    // The codec's pre-scan runs first, as on the gRPC port.
    if ferrite_proto::wire::check_model_infer_request(data).is_err() {
        return false;
    }
    let Ok(message) = ferrite_proto::inference::ModelInferRequest::decode(data) else { return false };
    match crate::grpc::codec::decode_request(message, Some(Instant::now())) {
        Ok(decoded) => check(decoded.request),
        Err(_) => false,
    }
}

/// Decodes `data` as a KServe v2 HTTP body; the first two bytes give the
/// JSON header length (Triton's binary extension) when non-zero.
/// True if it was accepted.
pub fn http_request(data: &[u8]) -> bool {
    let Some((length, body)) = data.split_first_chunk::<2>() else { return false };
    let length = u16::from_le_bytes(*length) as usize;
    let body = Bytes::copy_from_slice(body);
    let header_length = (length > 0).then_some(length);
    let Ok((header, binary)) = crate::http::json::split_body(&body, header_length) else { return false };
    match crate::http::json::decode_inputs(header.inputs, binary) {
        Ok(inputs) => check(InferRequest { inputs, ..Default::default() }),
        Err(_) => false,
    }
}

/// Validates a decoded request; an accepted one must carry exactly the
/// bytes its shapes need.
fn check(request: InferRequest) -> bool {
    let Ok(job) = validate(&sample_signature(), Some(8), request) else { return false };
    for tensor in &job.inputs {
        if let Some(size) = tensor.datatype.element_size() {
            assert_eq!(tensor.to_raw().len(), tensor.element_count() * size, "input '{}'", tensor.name);
        }
    }
    true
}

#[cfg(test)]
mod tests;

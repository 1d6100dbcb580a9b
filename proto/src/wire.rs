//! A pre-scan of a ModelInferRequest's protobuf wire format that bounds what
//! decoding it takes, before prost allocates anything.
//!
//! Protobuf lets a few wire bytes stand for a large decoded value: an empty
//! `inputs` entry is 2 bytes on the wire and a ~300-byte struct once
//! decoded, so a 64 MiB message could take ~10 GiB. [`decode_cost`] walks
//! the wire bytes once (no allocation), adds up an upper bound of the heap
//! prost will take for every field it finds (repeated entries, map entries,
//! packed elements, strings), and [`check_model_infer_request`] refuses a
//! message whose bound exceeds [`AMPLIFICATION`] x its wire size +
//! [`ALLOWANCE`]. Ordinary requests (raw tensors, typed tensors, a few
//! parameters) stay far below it; only degenerate encodings (huge counts of
//! empty entries) reach it. The largest legitimate ratio is a typed INT64
//! tensor of small values: 1 wire byte per element, 8 bytes decoded, 24
//! while its `Vec` grows; hence 24.

use std::mem::size_of;

use bytes::Bytes;

use crate::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::inference::InferParameter;

/// Decoding a message of `w` wire bytes may take at most
/// `AMPLIFICATION * w + ALLOWANCE` bytes of heap; larger is refused.
pub const AMPLIFICATION: usize = 24;

/// The part of the bound that does not grow with the message: room for the
/// fixed overhead of a few tensors and parameters in a small message.
pub const ALLOWANCE: usize = 64 * 1024;

/// `Vec`s grow by doubling and the old buffer lives until the new one is
/// filled: while it grows, a repeated field holds up to 3x its elements.
const GROWTH: usize = 3;

/// Every string that is not empty is a heap allocation with malloc's
/// overhead (glibc's smallest chunk is 32 bytes).
const ALLOCATION: usize = 32;

/// One entry of a `map<string, InferParameter>`: the key and value in a
/// hash table with 1 control byte, at most 8/7 empty slots per full one
/// and the old table alive while it grows (hence 4x).
const MAP_ENTRY: usize = 4 * (size_of::<(String, InferParameter)>() + 1);

/// What the bound is made of, so that a refusal can name the culprit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeCost {
    /// `inputs` entries.
    pub inputs: usize,
    /// `outputs` entries.
    pub outputs: usize,
    /// Parameter map entries (request, inputs and outputs together).
    pub parameters: usize,
    /// `raw_input_contents` entries.
    pub raw_entries: usize,
    /// `shape` dimensions.
    pub shape_dims: usize,
    /// Elements of typed `contents` (every field, `bytes_contents` included).
    pub content_elements: usize,
    /// Upper bound of the heap the decoded message takes, in bytes.
    pub bytes: usize,
}

impl DecodeCost {
    /// The field that accounts for the most entries, as "N `field` entries".
    fn culprit(&self) -> String {
        let counts = [
            (self.inputs, "`inputs` entries"),
            (self.outputs, "`outputs` entries"),
            (self.parameters, "parameter map entries"),
            (self.raw_entries, "`raw_input_contents` entries"),
            (self.shape_dims, "`shape` dimensions"),
            (self.content_elements, "typed `contents` elements"),
        ];
        let (count, what) = counts.into_iter().max_by_key(|(count, _)| *count).unwrap_or_default();
        format!("{count} {what}")
    }
}

/// Why the wire bytes could not be walked (prost would refuse them too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedWire(pub &'static str);

/// Refuses (INVALID_ARGUMENT) a ModelInferRequest whose decoding would take
/// more than `AMPLIFICATION * wire + ALLOWANCE` bytes, or whose wire format
/// is malformed.
pub fn check_model_infer_request(wire: &[u8]) -> Result<DecodeCost, tonic::Status> {
    let cost = decode_cost(wire)
        .map_err(|e| tonic::Status::invalid_argument(format!("malformed ModelInferRequest: {}", e.0)))?;
    let limit = AMPLIFICATION.saturating_mul(wire.len()).saturating_add(ALLOWANCE);
    if cost.bytes > limit {
        return Err(tonic::Status::invalid_argument(format!(
            "ModelInferRequest refused: its {} wire bytes would take up to {} bytes to decode, more than the \
             server allows ({AMPLIFICATION} x the wire size + {ALLOWANCE}); it holds {}, a degenerate encoding",
            wire.len(),
            cost.bytes,
            cost.culprit()
        )));
    }
    Ok(cost)
}

/// Walks `wire` as a ModelInferRequest and bounds the heap of its decoding.
pub fn decode_cost(wire: &[u8]) -> Result<DecodeCost, MalformedWire> {
    let mut cost = DecodeCost { bytes: size_of::<crate::inference::ModelInferRequest>(), ..Default::default() };
    for field in Fields(wire) {
        let field = field?;
        match (field.number, field.value) {
            (1..=3, Value::Delimited(s)) => cost.bytes += string(s),
            (4, Value::Delimited(entry)) => parameter(entry, &mut cost)?,
            (5, Value::Delimited(input)) => {
                cost.inputs += 1;
                cost.bytes += GROWTH * size_of::<InferInputTensor>();
                input_tensor(input, &mut cost)?;
            }
            (6, Value::Delimited(output)) => {
                cost.outputs += 1;
                cost.bytes += GROWTH * size_of::<InferRequestedOutputTensor>();
                for field in Fields(output) {
                    match field? {
                        Field { number: 1, value: Value::Delimited(s) } => cost.bytes += string(s),
                        Field { number: 2, value: Value::Delimited(entry) } => parameter(entry, &mut cost)?,
                        _ => {}
                    }
                }
            }
            // The contents are sliced out of the received buffer (`Bytes`):
            // only the handle is new.
            (7, Value::Delimited(_)) => {
                cost.raw_entries += 1;
                cost.bytes += GROWTH * size_of::<Bytes>();
            }
            // Unknown fields and wrong wire types: prost skips or refuses
            // them without allocating.
            _ => {}
        }
    }
    Ok(cost)
}

fn string(s: &[u8]) -> usize {
    if s.is_empty() {
        0
    } else {
        s.len() + ALLOCATION
    }
}

/// A `map<string, InferParameter>` entry: key 1, value 2 (string_param 3).
fn parameter(entry: &[u8], cost: &mut DecodeCost) -> Result<(), MalformedWire> {
    cost.parameters += 1;
    cost.bytes += MAP_ENTRY;
    for field in Fields(entry) {
        match field? {
            Field { number: 1, value: Value::Delimited(key) } => cost.bytes += string(key),
            Field { number: 2, value: Value::Delimited(value) } => {
                for field in Fields(value) {
                    if let Field { number: 3, value: Value::Delimited(s) } = field? {
                        cost.bytes += string(s);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn input_tensor(input: &[u8], cost: &mut DecodeCost) -> Result<(), MalformedWire> {
    for field in Fields(input) {
        let field = field?;
        match (field.number, field.value) {
            (1 | 2, Value::Delimited(s)) => cost.bytes += string(s),
            (3, value) => {
                let dims = elements(value, Packing::Varint);
                cost.shape_dims += dims;
                cost.bytes += GROWTH * size_of::<i64>() * dims;
            }
            (4, Value::Delimited(entry)) => parameter(entry, cost)?,
            (5, Value::Delimited(contents)) => tensor_contents(contents, cost)?,
            _ => {}
        }
    }
    Ok(())
}

/// InferTensorContents: one repeated field per element type.
fn tensor_contents(contents: &[u8], cost: &mut DecodeCost) -> Result<(), MalformedWire> {
    for field in Fields(contents) {
        let field = field?;
        let (packing, element_size) = match field.number {
            1 => (Packing::Varint, size_of::<bool>()),
            2 | 4 => (Packing::Varint, size_of::<u32>()),
            3 | 5 => (Packing::Varint, size_of::<u64>()),
            6 => (Packing::Fixed(4), size_of::<f32>()),
            7 => (Packing::Fixed(8), size_of::<f64>()),
            8 => (Packing::None, size_of::<Bytes>()),
            _ => continue,
        };
        let count = elements(field.value, packing);
        cost.content_elements += count;
        cost.bytes += GROWTH * element_size * count;
    }
    Ok(())
}

/// How a repeated scalar field may be packed into one delimited value.
#[derive(Clone, Copy)]
enum Packing {
    Varint,
    Fixed(usize),
    /// Not packable (`bytes`): each delimited value is one element.
    None,
}

/// Elements that one occurrence of a repeated field holds.
fn elements(value: Value<'_>, packing: Packing) -> usize {
    match (value, packing) {
        // One varint ends at each byte without its continuation bit.
        (Value::Delimited(packed), Packing::Varint) => packed.iter().filter(|&&b| b < 0x80).count(),
        (Value::Delimited(packed), Packing::Fixed(size)) => packed.len() / size,
        _ => 1,
    }
}

/// One field of a message on the wire.
struct Field<'a> {
    number: u64,
    value: Value<'a>,
}

#[derive(Clone, Copy)]
enum Value<'a> {
    Scalar,
    Delimited(&'a [u8]),
}

/// The fields of one message, in wire order.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, MalformedWire>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let field = self.field();
        if field.is_err() {
            self.0 = &[];
        }
        Some(field)
    }
}

impl<'a> Fields<'a> {
    fn field(&mut self) -> Result<Field<'a>, MalformedWire> {
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 {
            return Err(MalformedWire("field number 0"));
        }
        let value = match key & 7 {
            0 => {
                self.varint()?;
                Value::Scalar
            }
            1 => {
                self.take(8)?;
                Value::Scalar
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| MalformedWire("length too large"))?;
                Value::Delimited(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Scalar
            }
            // proto3 has no groups (3, 4); 6 and 7 do not exist.
            _ => return Err(MalformedWire("unsupported wire type")),
        };
        Ok(Field { number, value })
    }

    fn varint(&mut self) -> Result<u64, MalformedWire> {
        let mut value = 0u64;
        for (i, &byte) in self.0.iter().take(10).enumerate() {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err(MalformedWire("truncated or overlong varint"))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], MalformedWire> {
        if len > self.0.len() {
            return Err(MalformedWire("a length runs past the end of the message"));
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(taken)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::inference::{infer_parameter::ParameterChoice, InferTensorContents, ModelInferRequest};

    fn tensor(name: &str, shape: Vec<i64>, contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor { name: name.into(), datatype: "FP32".into(), shape, contents, ..Default::default() }
    }

    /// A request as tritonclient sends it: raw contents, a few parameters.
    fn ordinary() -> ModelInferRequest {
        let mut request = ModelInferRequest {
            model_name: "add_sub".into(),
            inputs: vec![tensor("INPUT0", vec![1, 16], None), tensor("INPUT1", vec![1, 16], None)],
            raw_input_contents: vec![Bytes::from(vec![0u8; 64]), Bytes::from(vec![0u8; 64])],
            outputs: vec![InferRequestedOutputTensor { name: "OUTPUT0".into(), ..Default::default() }],
            ..Default::default()
        };
        let int = |v| InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(v)) };
        request.parameters.insert("timeout".into(), int(1000));
        request
    }

    #[test]
    fn ordinary_requests_pass_and_are_counted() {
        let wire = ordinary().encode_to_vec();
        let cost = check_model_infer_request(&wire).unwrap();
        assert_eq!((cost.inputs, cost.outputs, cost.parameters, cost.raw_entries, cost.shape_dims), (2, 1, 1, 2, 4));
    }

    #[test]
    fn typed_contents_of_small_values_pass() {
        // The worst legitimate case: INT64 zeros, 1 wire byte each.
        let contents = InferTensorContents { int64_contents: vec![0; 1 << 20], ..Default::default() };
        let request =
            ModelInferRequest { inputs: vec![tensor("x", vec![1 << 20], Some(contents))], ..Default::default() };
        let wire = request.encode_to_vec();
        let cost = check_model_infer_request(&wire).unwrap();
        assert_eq!(cost.content_elements, 1 << 20);
        assert!(cost.bytes <= AMPLIFICATION * wire.len() + ALLOWANCE);
    }

    /// The measured attack: 2 million empty `inputs` entries, 2 bytes each.
    #[test]
    fn millions_of_empty_inputs_are_refused() {
        let wire = [0x2a, 0x00].repeat(2_000_000);
        let error = check_model_infer_request(&wire).unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert!(error.message().contains("2000000 `inputs` entries"), "{}", error.message());
    }

    #[test]
    fn degenerate_entries_of_every_kind_are_refused() {
        let empty_param = [0x22, 0x00]; // parameters {}
        let empty_output = [0x32, 0x00]; // outputs {}
        let empty_raw = [0x3a, 0x00]; // raw_input_contents ""
        for (entry, what) in [
            (&empty_param, "parameter map entries"),
            (&empty_output, "`outputs` entries"),
            (&empty_raw, "`raw_input_contents` entries"),
        ] {
            let wire = entry.repeat(200_000);
            let error = check_model_infer_request(&wire).unwrap_err();
            assert!(error.message().contains(what), "{what}: {}", error.message());
        }
        // One input whose bytes_contents are 500k empty strings.
        let contents = InferTensorContents { bytes_contents: vec![Bytes::new(); 500_000], ..Default::default() };
        let wire = ModelInferRequest { inputs: vec![tensor("x", vec![500_000], Some(contents))], ..Default::default() }
            .encode_to_vec();
        let error = check_model_infer_request(&wire).unwrap_err();
        assert!(error.message().contains("typed `contents` elements"), "{}", error.message());
    }

    /// The bound holds against prost itself: the heap that decoding takes,
    /// measured by a counting allocator, is never above the estimate.
    #[test]
    fn the_estimate_bounds_what_prost_allocates() {
        let contents = InferTensorContents {
            int_contents: vec![1; 1000],
            bytes_contents: vec![Bytes::from_static(b"ab"); 1000],
            ..Default::default()
        };
        let mut many = ordinary();
        many.inputs.extend((0..500).map(|i| tensor(&format!("t{i}"), vec![1, 2, 3], Some(contents.clone()))));
        many.outputs
            .extend((0..300).map(|i| InferRequestedOutputTensor { name: format!("o{i}"), ..Default::default() }));
        for i in 0..300 {
            many.parameters.insert(format!("p{i}"), InferParameter::default());
        }
        let empties = [0x2a, 0x00].repeat(10_000);
        for wire in [ordinary().encode_to_vec(), many.encode_to_vec(), empties] {
            let estimate = decode_cost(&wire).unwrap().bytes;
            let wire = Bytes::from(wire);
            let (decoded, peak) = crate::alloc_probe::peak_during(|| ModelInferRequest::decode(wire.clone()).unwrap());
            drop(decoded);
            assert!(peak <= estimate, "prost took {peak} bytes, the estimate was {estimate}");
        }
    }

    #[test]
    fn malformed_wire_is_invalid_argument() {
        for wire in [&[0x2a, 0x05, 0x00][..], &[0x80], &[0x2b], &[0x00, 0x00]] {
            let error = check_model_infer_request(wire).unwrap_err();
            assert_eq!(error.code(), tonic::Code::InvalidArgument, "{wire:?}");
            assert!(error.message().starts_with("malformed"), "{}", error.message());
        }
    }
}

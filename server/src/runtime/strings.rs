//! BYTES tensors to and from ONNX Runtime as bytes, not text. ONNX string
//! tensors hold `std::string`s, which carry any bytes, and Triton passes
//! BYTES elements that are not UTF-8 through unchanged; so do we. Only a
//! NUL cannot cross: ONNX Runtime fills string tensors from C strings
//! (validation refuses NUL before a request gets here).

use bytes::Bytes;
use ort::value::{DynValue, Tensor as OrtTensor, Utf8Data};
use ort::AsPointer;

use crate::error::{InferError, InferResult};

/// One element on its way in. `ort` names the trait after UTF-8, but uses
/// it only to make a C string of the bytes.
#[derive(Clone)]
struct Element(Bytes);

impl Utf8Data for Element {
    fn as_utf8_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A string tensor of `shape` holding `items` as they are.
pub(super) fn to_string_tensor(name: &str, shape: Vec<i64>, items: Vec<Bytes>) -> InferResult<DynValue> {
    let elements: Vec<Element> = items.into_iter().map(Element).collect();
    OrtTensor::from_string_array((shape, elements.as_slice()))
        .map(OrtTensor::into_dyn)
        .map_err(|e| InferError::internal(format!("input '{name}': {e}")))
}

/// The elements of a string tensor, as bytes (`ort`'s own extraction
/// refuses elements that are not UTF-8).
pub(super) fn from_string_tensor(name: &str, value: &DynValue, elements: usize) -> InferResult<Vec<Bytes>> {
    let ort_error = |e: ort::Error| InferError::internal(format!("output '{name}': {e}"));
    let api = ort::api();
    let mut total = 0usize;
    // SAFETY: `value` is a live string tensor (the caller checked its type);
    // the call only writes `total`.
    unsafe { ort::Error::result_from_status((api.GetStringTensorDataLength)(value.ptr(), &mut total)) }
        .map_err(ort_error)?;
    let mut content = vec![0u8; total];
    let mut offsets = vec![0usize; elements + 1];
    // SAFETY: `content` has the `total` bytes ONNX Runtime reported and
    // `offsets` room for `elements` start offsets (the tensor's element
    // count), as GetStringTensorContent requires.
    unsafe {
        ort::Error::result_from_status((api.GetStringTensorContent)(
            value.ptr(),
            content.as_mut_ptr().cast(),
            total,
            offsets.as_mut_ptr(),
            elements,
        ))
    }
    .map_err(ort_error)?;
    offsets[elements] = total;
    let content = Bytes::from(content);
    offsets
        .windows(2)
        .map(|w| {
            (w[0] <= w[1] && w[1] <= total)
                .then(|| content.slice(w[0]..w[1]))
                .ok_or_else(|| InferError::internal(format!("output '{name}': bad string offsets from ONNX Runtime")))
        })
        .collect()
}

//! The gRPC codec of the generated services: prost, with a pre-scan that
//! bounds the memory of decoding a ModelInferRequest (see [`crate::wire`]).

use std::any::TypeId;
use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::inference::ModelInferRequest;

/// `tonic_prost::ProstCodec`, whose decoder first checks a ModelInferRequest
/// with [`crate::wire::check_model_infer_request`]. Malformed messages are
/// INVALID_ARGUMENT (bad client input), not prost's INTERNAL.
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        BoundedCodec(PhantomData)
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(PhantomData)
    }
}

/// The decoder of [`BoundedCodec`].
#[derive(Debug, Clone)]
pub struct BoundedDecoder<U>(PhantomData<U>);

impl<U: Message + Default + 'static> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // Only ModelInferRequest carries tensors and repeated entries; the
        // other requests are a few strings.
        if TypeId::of::<U>() == TypeId::of::<ModelInferRequest>() {
            // The whole message, without a copy (tonic buffers it in a
            // `BytesMut`, which splits off shared).
            let wire = buf.copy_to_bytes(buf.remaining());
            crate::wire::check_model_infer_request(&wire)?;
            return decode(wire);
        }
        decode(buf)
    }
}

fn decode<U: Message + Default>(buf: impl Buf) -> Result<Option<U>, Status> {
    U::decode(buf).map(Some).map_err(|e| Status::invalid_argument(format!("malformed protobuf message: {e}")))
}

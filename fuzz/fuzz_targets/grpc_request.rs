//! Fuzzes gRPC ModelInferRequest decoding and validation.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferrite_server::untrusted::grpc_request(data);
});

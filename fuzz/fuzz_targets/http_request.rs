//! Fuzzes KServe v2 HTTP body decoding (JSON and binary) and validation.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferrite_server::untrusted::http_request(data);
});

//! Randomized requests through decoding and validation: valid messages with
//! random bytes flipped, cut or appended must be refused cleanly, never
//! panic. The coverage-guided version of this is `make fuzz`.

use bytes::Bytes;
use ferrite_proto::inference::{model_infer_request::InferInputTensor, ModelInferRequest};
use prost::Message;

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn valid_grpc_request() -> Vec<u8> {
    let input = |name: &str, datatype: &str, shape: Vec<i64>| InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        ..Default::default()
    };
    let text = {
        let mut raw = 5u32.to_le_bytes().to_vec();
        raw.extend_from_slice(b"hello");
        raw
    };
    ModelInferRequest {
        model_name: "m".into(),
        inputs: vec![
            input("INPUT0", "FP32", vec![1, 4]),
            input("FLAGS", "BOOL", vec![1, 2]),
            input("HALF", "FP16", vec![1, 2]),
            input("TEXT", "BYTES", vec![1, 1]),
        ],
        raw_input_contents: vec![
            Bytes::from(vec![0u8; 16]),
            Bytes::from_static(&[0, 1]),
            Bytes::from(vec![0u8; 4]),
            Bytes::from(text),
        ],
        ..Default::default()
    }
    .encode_to_vec()
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(4) {
            0 if !data.is_empty() => {
                let at = rng.below(data.len());
                data[at] = rng.next() as u8;
            }
            1 if !data.is_empty() => data.truncate(rng.below(data.len())),
            2 => data.extend((0..rng.below(16)).map(|_| rng.next() as u8)),
            _ if !data.is_empty() => {
                let at = rng.below(data.len());
                data[at] ^= 1 << rng.below(8);
            }
            _ => {}
        }
    }
    data
}

#[test]
fn mutated_grpc_requests_never_panic() {
    let seed = valid_grpc_request();
    assert!(super::grpc_request(&seed), "the unmutated request must be valid");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let accepted = (0..50_000).filter(|_| super::grpc_request(&mutate(&mut rng, &seed))).count();
    // Mutations must reach both outcomes, or the test explores nothing.
    assert!(accepted > 0 && accepted < 50_000, "{accepted} of 50000 accepted");
}

#[test]
fn mutated_http_requests_never_panic() {
    let json = br#"{"inputs":[{"name":"INPUT0","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]},
        {"name":"FLAGS","shape":[1,2],"datatype":"BOOL","data":[true,false]},
        {"name":"HALF","shape":[1,2],"datatype":"FP16","parameters":{"binary_data_size":4}},
        {"name":"TEXT","shape":[1,1],"datatype":"BYTES","data":["hi"]}]}"#;
    let mut seed = (json.len() as u16).to_le_bytes().to_vec();
    seed.extend_from_slice(json);
    seed.extend_from_slice(&[0, 60, 0, 60]);
    assert!(super::http_request(&seed), "the unmutated request must be valid");
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let accepted = (0..20_000).filter(|_| super::http_request(&mutate(&mut rng, &seed))).count();
    assert!(accepted > 0 && accepted < 20_000, "{accepted} of 20000 accepted");
}

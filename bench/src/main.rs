//! `ferrite-loadgen`: drives an Open Inference Protocol gRPC server (ferrite
//! or Triton) with ModelInfer requests carrying raw contents, and prints
//! one JSON line: throughput and latency percentiles from an HDR histogram.
//!
//! Closed loop (`--concurrency N`): N workers each send the next request
//! when the previous answers. Open loop (`--rate R`): requests start on a
//! fixed schedule whatever the answers do, so queueing shows in latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use ferrite_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use ferrite_proto::inference::model_infer_request::InferInputTensor;
use ferrite_proto::inference::{ModelInferRequest, ModelMetadataRequest};
use hdrhistogram::Histogram;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(name = "ferrite-loadgen", version)]
struct Args {
    /// gRPC endpoint, e.g. http://127.0.0.1:8001.
    #[arg(long)]
    url: String,
    /// Model to call.
    #[arg(long)]
    model: String,
    /// Concurrent requests (closed loop).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Requests per second (open loop); overrides the closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of warm-up, not measured.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Value for dynamic dimensions of the inputs (the batch of each request).
    #[arg(long, default_value_t = 1)]
    dynamic_dim: i64,
    /// gRPC connections shared by the workers.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// A label copied into the output line.
    #[arg(long, default_value = "")]
    label: String,
}

/// Shared counters of the measured window.
struct Tally {
    histogram: std::sync::Mutex<Histogram<u64>>,
    ok: AtomicU64,
    failed: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        let channel = Channel::from_shared(args.url.clone())?.connect().await?;
        channels.push(GrpcInferenceServiceClient::new(channel).max_decoding_message_size(usize::MAX));
    }
    let request = build_request(&mut channels[0].clone(), &args.model, args.dynamic_dim).await?;
    let tally = Arc::new(Tally {
        histogram: std::sync::Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);

    let mut tasks = Vec::new();
    match args.rate {
        None => {
            for worker in 0..args.concurrency.max(1) {
                let client = channels[worker % channels.len()].clone();
                let (request, tally) = (request.clone(), tally.clone());
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < end {
                        call(client.clone(), request.clone(), &tally, measure_from).await;
                    }
                }));
            }
        }
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate);
            let mut next = start;
            let mut sent = 0usize;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                let client = channels[sent % channels.len()].clone();
                let (request, tally) = (request.clone(), tally.clone());
                tasks.push(tokio::spawn(async move { call(client, request, &tally, measure_from).await }));
                sent += 1;
                next += interval;
            }
        }
    }
    for task in tasks {
        task.await?;
    }
    let histogram = tally.histogram.lock().expect("histogram lock");
    let ok = tally.ok.load(Ordering::Relaxed);
    let us = |q: f64| histogram.value_at_quantile(q) as f64;
    println!(
        "{}",
        serde_json::json!({
            "label": args.label,
            "model": args.model,
            "concurrency": args.concurrency,
            "rate": args.rate,
            "seconds": args.duration,
            "requests": ok,
            "failed": tally.failed.load(Ordering::Relaxed),
            "throughput_rps": ok as f64 / args.duration,
            "p50_us": us(0.5), "p90_us": us(0.9), "p99_us": us(0.99), "max_us": histogram.max() as f64,
            "mean_us": histogram.mean(),
        })
    );
    Ok(())
}

/// One request; its latency counts if it started inside the window.
async fn call(
    mut client: GrpcInferenceServiceClient<Channel>,
    request: ModelInferRequest,
    tally: &Tally,
    from: Instant,
) {
    let started = Instant::now();
    let result = client.model_infer(request).await;
    if started < from {
        return;
    }
    match result {
        Ok(_) => {
            tally.ok.fetch_add(1, Ordering::Relaxed);
            let micros = started.elapsed().as_micros().max(1) as u64;
            tally.histogram.lock().expect("histogram lock").saturating_record(micros);
        }
        Err(_) => {
            tally.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A request with deterministic pseudo-random raw contents for every input,
/// shaped from the model's metadata.
async fn build_request(
    client: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
    dynamic_dim: i64,
) -> anyhow::Result<ModelInferRequest> {
    let metadata = client
        .model_metadata(ModelMetadataRequest { name: model.to_string(), version: String::new() })
        .await?
        .into_inner();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut inputs = Vec::new();
    let mut raw = Vec::new();
    for input in metadata.inputs {
        let shape: Vec<i64> = input.shape.iter().map(|&d| if d < 0 { dynamic_dim } else { d }).collect();
        let count: i64 = shape.iter().product();
        let bytes = match input.datatype.as_str() {
            "BYTES" => (0..count)
                .flat_map(|i| {
                    let text = format!("request text {i}");
                    let mut item = (text.len() as u32).to_le_bytes().to_vec();
                    item.extend_from_slice(text.as_bytes());
                    item
                })
                .collect(),
            "FP32" => (0..count)
                .flat_map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    ((seed >> 40) as f32 / (1u64 << 24) as f32).to_le_bytes()
                })
                .collect(),
            "BOOL" | "UINT8" | "INT8" => vec![0u8; count as usize],
            "FP16" | "BF16" | "INT16" | "UINT16" => vec![0u8; count as usize * 2],
            "INT32" | "UINT32" => vec![0u8; count as usize * 4],
            _ => vec![0u8; count as usize * 8],
        };
        raw.push(Bytes::from(bytes));
        inputs.push(InferInputTensor { name: input.name, datatype: input.datatype, shape, ..Default::default() });
    }
    Ok(ModelInferRequest { model_name: model.to_string(), inputs, raw_input_contents: raw, ..Default::default() })
}

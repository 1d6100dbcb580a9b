//! `ferrite-loadgen`: drives an Open Inference Protocol gRPC server (ferrite
//! or Triton) with ModelInfer requests carrying raw contents, or - with
//! `--onnx` - runs the model in this process through ferrite-server's own
//! runtime module (ONNX Runtime, the same session settings as the server),
//! the limit that a server can approach. Prints one JSON line: throughput and
//! latency percentiles from an HDR histogram.
//!
//! Closed loop (`--concurrency N`): N workers each send the next request
//! when the previous answers. Open loop (`--rate R`, gRPC only): requests
//! start on a fixed schedule whatever the answers do, so queueing shows in
//! latency.
//!
//! A request counts when it completes inside the measured window (after
//! `--warmup`, for `--duration` seconds); its latency is recorded then. No
//! request starts after the window; those in flight are awaited, so the
//! server is idle when the program exits.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    /// gRPC endpoint, e.g. http://127.0.0.1:8001 (required unless --onnx).
    #[arg(long, required_unless_present = "onnx")]
    url: Option<String>,
    /// Model to call (over gRPC); with --onnx only a name for the output.
    #[arg(long, default_value = "")]
    model: String,
    /// Run this ONNX file in process through ferrite-server's runtime module
    /// (one session, intra-op threads as ferrite-server chooses them for one
    /// instance) instead of calling a server.
    #[arg(long, conflicts_with_all = ["url", "rate"])]
    onnx: Option<PathBuf>,
    /// With --onnx: intra-op threads of the session (0: the CPUs this process
    /// may use, as ferrite-server's default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// With --onnx: each call runs this many rows and answers as many of the
    /// `--concurrency` clients (the ideal batching server with this maximum
    /// batch size); at most --concurrency. 1: no batching.
    #[arg(long, default_value_t = 1, requires = "onnx")]
    batch_rows: usize,
    /// With --onnx: the execution provider of the session (cpu, cuda,
    /// tensorrt); a GPU provider that cannot start fails the run.
    #[arg(long, default_value = "cpu", requires = "onnx")]
    execution_provider: ferrite_server::runtime::ExecutionProvider,
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
    histogram: Mutex<Histogram<u64>>,
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    from: Instant,
    end: Instant,
}

impl Tally {
    fn new(args: &Args) -> anyhow::Result<Tally> {
        let from = Instant::now() + Duration::from_secs_f64(args.warmup);
        Ok(Tally {
            histogram: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3)?),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_error: Mutex::new(None),
            from,
            end: from + Duration::from_secs_f64(args.duration),
        })
    }

    /// Records `count` requests that started at `started` and have just
    /// finished, if they finished inside the window.
    fn record(&self, started: Instant, count: u64, result: Result<(), String>) {
        let now = Instant::now();
        if now < self.from || now > self.end {
            return;
        }
        match result {
            Ok(()) => {
                self.ok.fetch_add(count, Ordering::Relaxed);
                let micros = now.duration_since(started).as_micros().max(1) as u64;
                self.histogram.lock().expect("histogram lock").saturating_record_n(micros, count);
            }
            Err(error) => {
                self.failed.fetch_add(count, Ordering::Relaxed);
                self.first_error.lock().expect("error lock").get_or_insert(error);
            }
        }
    }

    fn running(&self) -> bool {
        Instant::now() < self.end
    }
}

/// One input as the load generator sends it: name, datatype, shape and raw
/// contents (length-prefixed elements for BYTES).
struct Input {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    raw: Bytes,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mode = match &args.onnx {
        Some(_) if args.batch_rows > 1 => "onnx-batched",
        Some(_) => "onnx",
        None => "grpc",
    };
    let tally = if let Some(path) = &args.onnx {
        run_in_process(&args, path)?
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run_grpc(&args))?
    };
    let histogram = tally.histogram.lock().expect("histogram lock");
    let ok = tally.ok.load(Ordering::Relaxed);
    let us = |q: f64| histogram.value_at_quantile(q) as f64;
    println!(
        "{}",
        serde_json::json!({
            "label": args.label,
            "mode": mode,
            "model": args.model,
            "concurrency": args.concurrency,
            "rate": args.rate,
            "seconds": args.duration,
            "requests": ok,
            "failed": tally.failed.load(Ordering::Relaxed),
            "first_error": *tally.first_error.lock().expect("error lock"),
            "throughput_rps": ok as f64 / args.duration,
            "p50_us": us(0.5), "p90_us": us(0.9), "p99_us": us(0.99), "max_us": histogram.max() as f64,
            "mean_us": histogram.mean(),
        })
    );
    Ok(())
}

async fn run_grpc(args: &Args) -> anyhow::Result<Arc<Tally>> {
    let url = args.url.clone().expect("clap requires --url without --onnx");
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        let channel = Channel::from_shared(url.clone())?.connect().await?;
        channels.push(GrpcInferenceServiceClient::new(channel).max_decoding_message_size(usize::MAX));
    }
    let request = build_request(&mut channels[0].clone(), &args.model, args.dynamic_dim).await?;
    let tally = Arc::new(Tally::new(args)?);
    let mut tasks = Vec::new();
    match args.rate {
        None => {
            for worker in 0..args.concurrency.max(1) {
                let client = channels[worker % channels.len()].clone();
                let (request, tally) = (request.clone(), tally.clone());
                tasks.push(tokio::spawn(async move {
                    while tally.running() {
                        call(client.clone(), request.clone(), &tally).await;
                    }
                }));
            }
        }
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate);
            let mut next = Instant::now();
            let mut sent = 0usize;
            while next < tally.end {
                tokio::time::sleep_until(next.into()).await;
                let client = channels[sent % channels.len()].clone();
                let (request, tally) = (request.clone(), tally.clone());
                tasks.push(tokio::spawn(async move { call(client, request, &tally).await }));
                sent += 1;
                next += interval;
            }
        }
    }
    for task in tasks {
        task.await?;
    }
    Ok(tally)
}

async fn call(mut client: GrpcInferenceServiceClient<Channel>, request: ModelInferRequest, tally: &Tally) {
    let started = Instant::now();
    let result = client.model_infer(request).await;
    tally.record(started, 1, result.map(|_| ()).map_err(|status| format!("{status}")));
}

/// Raw ONNX Runtime in this process: one session, called back to back; the
/// ideal that a server with one instance can approach at `--concurrency`.
fn run_in_process(args: &Args, path: &std::path::Path) -> anyhow::Result<Arc<Tally>> {
    use ferrite_server::runtime::{ModelBytes, Runtime, SessionOptions};
    use ferrite_server::tensor::{DataType, Tensor};

    let library = std::env::var_os("ORT_DYLIB_PATH")
        .ok_or_else(|| anyhow::anyhow!("set ORT_DYLIB_PATH to the ONNX Runtime library"))?;
    let ort = Runtime::load(std::path::Path::new(&library))?;
    let threads = if args.threads > 0 { args.threads } else { ferrite_server::config::available_cpus() };
    let options = SessionOptions { execution_provider: args.execution_provider, intra_op_threads: threads };
    let session = ort.session(&ModelBytes::File(path.to_path_buf()), options)?;
    let signature = session.signature()?;
    let clients = args.concurrency.max(1);
    let batch = args.batch_rows.clamp(1, clients);
    let rows = if batch > 1 { batch as i64 } else { args.dynamic_dim };
    let metadata: Vec<(String, String, Vec<i64>)> =
        signature.inputs.iter().map(|s| (s.name.clone(), s.datatype.as_str().to_string(), s.shape.clone())).collect();
    let inputs = make_inputs(&metadata, rows)
        .into_iter()
        .map(|input| {
            let datatype = DataType::parse(&input.datatype).expect("a datatype the runtime named");
            // One block of rows per input, as an unbatched request gives the runtime.
            Tensor::from_raw(&input.name, datatype, input.shape, input.raw)
                .map(|tensor| vec![tensor])
                .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let outputs: Vec<String> = signature.outputs.iter().map(|s| s.name.clone()).collect();
    let mut session = session;
    let tally = Tally::new(args)?;
    // One thread runs the session back to back, as one instance of a server
    // would with no handoff cost. The `--concurrency` clients of a closed
    // loop take turns: each call answers the `batch` clients that have waited
    // longest, each one's latency running from its previous answer.
    let mut issued = vec![Instant::now(); clients];
    let mut turn = 0usize;
    while tally.running() {
        let result = session.run(&inputs, &outputs).map(|_| ()).map_err(|e| e.to_string());
        for _ in 0..batch {
            tally.record(issued[turn], 1, result.clone());
            issued[turn] = Instant::now();
            turn = (turn + 1) % clients;
        }
    }
    Ok(Arc::new(tally))
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
    let metadata: Vec<(String, String, Vec<i64>)> =
        metadata.inputs.into_iter().map(|i| (i.name, i.datatype, i.shape)).collect();
    let mut inputs = Vec::new();
    let mut raw = Vec::new();
    for input in make_inputs(&metadata, dynamic_dim) {
        raw.push(input.raw);
        inputs.push(InferInputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            ..Default::default()
        });
    }
    Ok(ModelInferRequest { model_name: model.to_string(), inputs, raw_input_contents: raw, ..Default::default() })
}

/// Inputs for (name, datatype, shape) triples: dynamic dimensions (-1) become
/// `dynamic_dim`; FP32 elements are pseudo-random in [0, 1), BYTES elements
/// short texts, everything else zeros.
fn make_inputs(metadata: &[(String, String, Vec<i64>)], dynamic_dim: i64) -> Vec<Input> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    metadata
        .iter()
        .map(|(name, datatype, shape)| {
            let shape: Vec<i64> = shape.iter().map(|&d| if d < 0 { dynamic_dim } else { d }).collect();
            let count: i64 = shape.iter().product();
            let bytes: Vec<u8> = match datatype.as_str() {
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
            Input { name: name.clone(), datatype: datatype.clone(), shape, raw: Bytes::from(bytes) }
        })
        .collect()
}

//! `ferrite-floor`: the protocol floor of `make bench`.
//!
//! It speaks the Open Inference Protocol as ferrite-server does, on the same
//! transport, and answers every `ModelInfer` (gRPC) and every
//! `POST /v2/models/{m}/infer` (HTTP) with one fixed, precomputed response:
//! no queue, no batcher, no model. What a client measures against it is the
//! cost of the gRPC / HTTP stack itself (tonic, hyper, HTTP/2, protobuf or
//! JSON, loopback TCP) on the same machine; what ferrite-server measures
//! above it is ours.
//!
//! The transport is ferrite-server's (`server/src/server.rs`): tonic's
//! `Server::builder()` with its default HTTP/2 settings, TCP_NODELAY on every
//! accepted connection (`TcpIncoming::with_nodelay` for gRPC, `tap_io` for
//! HTTP), the same decoding limit for requests (64 MiB) and none for
//! responses, axum with the same body limit, and tokio's default
//! multi-threaded runtime.
//!
//! Left out on purpose: ferrite's two tower layers around its gRPC services
//! (the interceptor that stamps each request's arrival for deadlines, and the
//! layer that rewrites an oversized message's status) and its health and
//! reflection services. They are ferrite's own code, not something the
//! protocol makes a server pay; a successful call looks the same on the wire
//! without them. Their cost per request is part of what the comparison is
//! meant to show as ours.
//!
//! The response is shaped like ferrite's answer for the benchmark's model
//! (`--model`, `--input`, `--output`; by default the tiny MLP of
//! `scripts/make_test_models.py`): the same names, datatypes and shapes, with
//! a batch dimension of 1, and raw contents (or JSON data) of the same size.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use bytes::Bytes;
use clap::Parser;
use ferrite_proto::inference::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use ferrite_proto::inference::model_infer_response::InferOutputTensor;
use ferrite_proto::inference::model_metadata_response::TensorMetadata;
use ferrite_proto::inference::*;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// Command line: where to listen, and the model whose answer to imitate.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: IpAddr,
    /// Port of the KServe v2 REST API.
    #[arg(long, default_value_t = 8000)]
    http_port: u16,
    /// Port of the gRPC API.
    #[arg(long, default_value_t = 8001)]
    grpc_port: u16,
    /// Largest request message, in bytes, on gRPC and HTTP (ferrite-server's default).
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    max_message_bytes: usize,
    /// Model name in the answers (any name is accepted in requests).
    #[arg(long, default_value = "mlp")]
    model: String,
    /// An input of the model, as NAME:DATATYPE:DIMS (-1 for a dynamic
    /// dimension), for ModelMetadata; repeat for more.
    #[arg(long = "input", value_parser = TensorSpec::parse, default_value = "INPUT0:FP32:-1,16")]
    inputs: Vec<TensorSpec>,
    /// An output of the model, as NAME:DATATYPE:DIMS; every answer carries
    /// it with dynamic dimensions set to 1. Repeat for more.
    #[arg(long = "output", value_parser = TensorSpec::parse, default_value = "OUTPUT0:FP32:-1,8")]
    outputs: Vec<TensorSpec>,
}

/// One tensor of the model's signature.
#[derive(Debug, Clone)]
struct TensorSpec {
    name: String,
    datatype: String,
    shape: Vec<i64>,
}

impl TensorSpec {
    /// Parses NAME:DATATYPE:DIMS, e.g. `OUTPUT0:FP32:-1,8`.
    fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.splitn(3, ':');
        let (Some(name), Some(datatype), Some(dims)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("expected NAME:DATATYPE:DIMS".into());
        };
        let shape = dims
            .split(',')
            .map(|d| d.trim().parse::<i64>().map_err(|e| format!("dimension {d:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        element_bytes(datatype).ok_or_else(|| format!("{datatype}: a fixed-size datatype is needed"))?;
        Ok(TensorSpec { name: name.into(), datatype: datatype.into(), shape })
    }

    /// The shape of one answer: dynamic dimensions become 1.
    fn answer_shape(&self) -> Vec<i64> {
        self.shape.iter().map(|&d| if d < 0 { 1 } else { d }).collect()
    }

    /// As ModelMetadata lists it.
    fn metadata(&self) -> TensorMetadata {
        TensorMetadata { name: self.name.clone(), datatype: self.datatype.clone(), shape: self.shape.clone() }
    }
}

/// Bytes per element of a fixed-size Open Inference Protocol datatype.
fn element_bytes(datatype: &str) -> Option<usize> {
    match datatype {
        "BOOL" | "UINT8" | "INT8" => Some(1),
        "FP16" | "BF16" | "UINT16" | "INT16" => Some(2),
        "FP32" | "UINT32" | "INT32" => Some(4),
        "FP64" | "UINT64" | "INT64" => Some(8),
        _ => None,
    }
}

/// Element `i` of every output: FP32 values with as many digits as a model's
/// (so that the JSON answer is as long as ferrite's), zero otherwise.
fn value(datatype: &str, i: usize) -> f32 {
    if datatype == "FP32" {
        (i as f32 + 1.0) * 1.234_567_9 - 4.321_099
    } else {
        0.0
    }
}

/// The answers, computed once at start-up.
#[derive(Debug)]
struct Answers {
    /// The gRPC ModelInfer response (cloned per call: tonic takes ownership).
    infer: ModelInferResponse,
    /// The HTTP infer response body.
    infer_json: Bytes,
    /// The gRPC ModelMetadata response.
    metadata: ModelMetadataResponse,
}

impl Answers {
    fn new(args: &Args) -> Self {
        let mut outputs = Vec::new();
        let mut raw = Vec::new();
        let mut json_outputs = Vec::new();
        for spec in &args.outputs {
            let shape = spec.answer_shape();
            let count = shape.iter().product::<i64>().max(0) as usize;
            let size = element_bytes(&spec.datatype).expect("checked when parsed");
            let bytes: Vec<u8> = match spec.datatype.as_str() {
                "FP32" => (0..count).flat_map(|i| value("FP32", i).to_le_bytes()).collect(),
                _ => vec![0; count * size],
            };
            raw.push(Bytes::from(bytes));
            let data: Vec<serde_json::Value> = (0..count)
                .map(|i| match spec.datatype.as_str() {
                    "BOOL" => false.into(),
                    "FP32" | "FP16" | "BF16" | "FP64" => f64::from(value(&spec.datatype, i)).into(),
                    _ => 0.into(),
                })
                .collect();
            json_outputs.push(serde_json::json!({
                "name": spec.name, "datatype": spec.datatype, "shape": shape, "data": data,
            }));
            outputs.push(InferOutputTensor {
                name: spec.name.clone(),
                datatype: spec.datatype.clone(),
                shape,
                ..Default::default()
            });
        }
        let infer = ModelInferResponse {
            model_name: args.model.clone(),
            model_version: "1".into(),
            outputs,
            raw_output_contents: raw,
            ..Default::default()
        };
        let infer_json = serde_json::json!({"model_name": args.model, "model_version": "1", "outputs": json_outputs});
        let metadata = ModelMetadataResponse {
            name: args.model.clone(),
            versions: vec!["1".into()],
            platform: "onnxruntime_onnx".into(),
            inputs: args.inputs.iter().map(TensorSpec::metadata).collect(),
            outputs: args.outputs.iter().map(TensorSpec::metadata).collect(),
        };
        Answers { infer, infer_json: Bytes::from(infer_json.to_string()), metadata }
    }
}

/// The gRPC service: fixed answers, UNIMPLEMENTED beyond what the benchmark calls.
#[derive(Debug, Clone)]
struct Floor(Arc<Answers>);

/// The answer to every method that the benchmark does not call.
fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("ferrite-floor answers ModelInfer, ModelMetadata and readiness only"))
}

#[tonic::async_trait]
impl GrpcInferenceService for Floor {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }

    async fn model_ready(&self, _: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        Ok(Response::new(ModelReadyResponse { ready: true }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        unimplemented()
    }

    /// ferrite-loadgen shapes its requests from this answer.
    async fn model_metadata(
        &self,
        _: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        Ok(Response::new(self.0.metadata.clone()))
    }

    /// The request has been decoded by tonic (as any server's must be) and
    /// is dropped; the answer is the precomputed one.
    async fn model_infer(&self, _: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        Ok(Response::new(self.0.infer.clone()))
    }

    type ModelStreamInferStream = tonic::codegen::BoxStream<ModelStreamInferResponse>;

    async fn model_stream_infer(
        &self,
        _: Request<tonic::Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        unimplemented()
    }

    async fn model_config(&self, _: Request<ModelConfigRequest>) -> Result<Response<ModelConfigResponse>, Status> {
        unimplemented()
    }

    async fn model_statistics(
        &self,
        _: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        unimplemented()
    }

    async fn repository_index(
        &self,
        _: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        unimplemented()
    }

    async fn repository_model_load(
        &self,
        _: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        unimplemented()
    }

    async fn repository_model_unload(
        &self,
        _: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        unimplemented()
    }
}

/// The HTTP routes: readiness, server metadata and infer. The infer body is
/// read whole and checked to be JSON (`IgnoredAny`: every token scanned,
/// nothing built), the least any server must do with it.
fn router(answers: Arc<Answers>, limit: usize) -> Router {
    let ok = || async { StatusCode::OK };
    Router::new()
        .route("/v2/health/live", get(ok))
        .route("/v2/health/ready", get(ok))
        .route("/v2/models/{model}/ready", get(ok))
        .route(
            "/v2",
            get(|| async {
                axum::Json(serde_json::json!({"name": "ferrite-floor", "version": env!("CARGO_PKG_VERSION")}))
            }),
        )
        .route(
            "/v2/models/{model}/infer",
            post(move |body: Bytes| async move {
                match serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
                    Ok(_) => ([(header::CONTENT_TYPE, "application/json")], answers.infer_json.clone()).into_response(),
                    Err(error) => (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
                }
            }),
        )
        .layer(DefaultBodyLimit::max(limit))
}

/// Accepted HTTP connections send without Nagle's delay, as ferrite-server's do.
fn set_nodelay(connection: &mut tokio::net::TcpStream) {
    let _ = connection.set_nodelay(true);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let answers = Arc::new(Answers::new(&args));
    let grpc_addr = SocketAddr::new(args.host, args.grpc_port);
    let http_addr = SocketAddr::new(args.host, args.http_port);
    let grpc_listener = TcpListener::bind(grpc_addr).await?;
    let http_listener = TcpListener::bind(http_addr).await?;
    eprintln!("ferrite-floor: gRPC on {grpc_addr}, HTTP on {http_addr}, answering as model {:?}", args.model);

    let inference = GrpcInferenceServiceServer::new(Floor(answers.clone()))
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(usize::MAX);
    let grpc = tonic::transport::Server::builder()
        .add_service(inference)
        .serve_with_incoming(TcpIncoming::from(grpc_listener).with_nodelay(Some(true)));
    let http = axum::serve(http_listener.tap_io(set_nodelay), router(answers, args.max_message_bytes));
    let grpc = tokio::spawn(grpc);
    let http = tokio::spawn(async move { http.await });
    let (grpc, http) = tokio::join!(grpc, http);
    grpc??;
    http??;
    Ok(())
}

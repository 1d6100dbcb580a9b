//! The gRPC frontend: `inference.GRPCInferenceService` (KServe v2 with
//! Triton's extensions). Converts messages with `codec` and hands requests
//! to the models; it never touches ONNX Runtime.

pub(crate) mod codec;
pub(crate) mod describe;
pub(crate) mod limit;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrite_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use ferrite_proto::inference::*;
use futures::stream::{self, BoxStream};
use futures::{future, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::describe::{ModelDescription, ModelStatistics};
use crate::error::{ErrorKind, InferError};
use crate::repository::IndexState;
use crate::state::ServerState;

/// How many requests of one ModelStreamInfer stream run at once; responses
/// keep the order of the requests.
const STREAM_CONCURRENCY: usize = 64;

/// The service implementation.
pub(crate) struct InferenceService {
    state: Arc<ServerState>,
}

impl InferenceService {
    pub(crate) fn new(state: Arc<ServerState>) -> Self {
        InferenceService { state }
    }
}

/// The gRPC status code of each kind of error.
pub(crate) fn status_code(kind: ErrorKind) -> tonic::Code {
    match kind {
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::InvalidArgument | ErrorKind::ContextLengthExceeded => tonic::Code::InvalidArgument,
        ErrorKind::QueueFull => tonic::Code::ResourceExhausted,
        ErrorKind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::Cancelled => tonic::Code::Cancelled,
        ErrorKind::Internal => tonic::Code::Internal,
        // Not PERMISSION_DENIED: no caller or key may do it, the server's
        // configuration must change (and UNAVAILABLE would invite retries).
        ErrorKind::Disabled => tonic::Code::FailedPrecondition,
    }
}

impl From<InferError> for Status {
    fn from(error: InferError) -> Self {
        Status::new(status_code(error.kind), error.message)
    }
}

/// Decodes, runs and encodes one ModelInfer request.
async fn infer(
    state: &ServerState,
    message: ModelInferRequest,
    deadline: Option<Instant>,
) -> Result<ModelInferResponse, InferError> {
    let decoded = codec::decode_request(message, deadline)?;
    let response = state.infer(&decoded.model_name, &decoded.model_version, decoded.request).await?;
    Ok(codec::encode_response(response))
}

/// When a request entered the service stack, stamped by [`stamp_arrival`]
/// (a tonic interceptor) before tonic starts its own `grpc-timeout` timer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrival(Instant);

/// Interceptor for every gRPC request: records its [`Arrival`].
pub(crate) fn stamp_arrival(mut request: Request<()>) -> Result<Request<()>, Status> {
    request.extensions_mut().insert(Arrival(Instant::now()));
    Ok(request)
}

/// The request's gRPC deadline, a little early: tonic's own timer for the
/// same `grpc-timeout` answers CANCELLED when it fires, so ours must fire
/// first to answer DEADLINE_EXCEEDED. Counted from the request's arrival,
/// not from when its handler first runs: on a busy machine the message may
/// take longer to arrive and decode than the margin.
fn grpc_deadline<T>(request: &Request<T>) -> Option<Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let timeout = codec::parse_grpc_timeout(value)?;
    let margin = (timeout / 10).clamp(Duration::from_millis(1), Duration::from_millis(50));
    let arrived = request.extensions().get::<Arrival>().map_or_else(Instant::now, |arrival| arrival.0);
    Some(arrived + timeout.saturating_sub(margin))
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

/// The responses to one request of a ModelStreamInfer stream: one for a
/// tensor model, one per generation step for an LLM (returned as soon as
/// the request is admitted). The request's bytes are held on the in-flight
/// budget until its last response.
fn stream_infer(
    state: &ServerState,
    message: ModelInferRequest,
) -> BoxStream<'static, Result<ModelInferResponse, InferError>> {
    let hold = state.budget.hold();
    if !hold.take(prost::Message::encoded_len(&message)) {
        return stream::once(future::ready(Err(hold.refusal()))).boxed();
    }
    let started = codec::decode_request(message, None)
        .and_then(|decoded| state.infer_stream(&decoded.model_name, &decoded.model_version, decoded.request));
    match started {
        Ok(responses) => responses
            .map(move |r| {
                // The stream owns the hold: released with its last response.
                let _held = &hold;
                r.map(codec::encode_response)
            })
            .boxed(),
        Err(error) => stream::once(future::ready(Err(error))).boxed(),
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.state.ready() }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let ready = self.state.model_ready(&request.name, &request.version)?;
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(describe::server_metadata()))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let model = self.state.repository.get(&request.name, &request.version)?;
        let versions = self.state.repository.loaded(Some(&request.name));
        Ok(Response::new(describe::model_metadata(ModelDescription::of(&model, &versions))))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let deadline = grpc_deadline(&request);
        Ok(Response::new(infer(&self.state, request.into_inner(), deadline).await?))
    }

    type ModelStreamInferStream = ResponseStream;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let state = self.state.clone();
        let responses = request
            .into_inner()
            .map(move |message| {
                let state = state.clone();
                async move {
                    match message {
                        Ok(message) => {
                            // The first response is awaited here, where up to
                            // STREAM_CONCURRENCY requests run at once (a tensor
                            // model's only one, an LLM's first step).
                            let mut responses = stream_infer(&state, message);
                            let first = responses.next().await;
                            stream::iter(first).chain(responses).boxed()
                        }
                        // A malformed or oversized message: say so on the stream.
                        Err(status) => stream::once(future::ready(Err(InferError::invalid(status.message())))).boxed(),
                    }
                }
            })
            // Requests run concurrently; each one's responses come out whole
            // and in request order.
            .buffered(STREAM_CONCURRENCY)
            .flatten()
            .map(|reply| {
                Ok(match reply {
                    Ok(response) => {
                        ModelStreamInferResponse { error_message: String::new(), infer_response: Some(response) }
                    }
                    Err(error) => ModelStreamInferResponse { error_message: error.message, infer_response: None },
                })
            });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let request = request.into_inner();
        let model = self.state.repository.get(&request.name, &request.version)?;
        let config = describe::model_config(ModelDescription::of(&model, &[]));
        Ok(Response::new(ModelConfigResponse { config: Some(config) }))
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        let models = if request.name.is_empty() {
            self.state.repository.loaded(None)
        } else {
            vec![self.state.repository.get(&request.name, &request.version)?]
        };
        let model_stats = models.iter().map(|m| describe::model_statistics(ModelStatistics::of(m))).collect();
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let ready_only = request.into_inner().ready;
        let models = self
            .state
            .repository
            .index()
            .into_iter()
            .filter(|entry| !ready_only || entry.state == IndexState::Ready)
            .map(|entry| repository_index_response::ModelIndex {
                name: entry.name,
                version: entry.version,
                state: entry.state.as_str().to_string(),
                reason: entry.reason,
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.state.load(&request.into_inner().model_name).await?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.state.unload(&request.into_inner().model_name).await?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}

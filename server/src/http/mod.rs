//! The HTTP frontend: the KServe v2 REST API with Triton's extensions
//! (binary tensor data, model configuration, statistics, repository), and
//! the Prometheus endpoint served on the metrics port.

pub(crate) mod describe;
pub(crate) mod embeddings;
pub(crate) mod json;
pub(crate) mod limits;
pub(crate) mod openai;
pub(crate) mod tei;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use self::limits::ReadBody;
use crate::describe::{ModelDescription, ModelStatistics};
use crate::error::{ErrorKind, InferError};
use crate::inference::{InferRequest, ParamValue, Priority};
use crate::metrics::METRICS;
use crate::model::Model;
use crate::repository::IndexState;
use crate::state::ServerState;

type AppState = Arc<ServerState>;

/// An error as the KServe REST API reports it.
struct HttpError(InferError);

impl From<InferError> for HttpError {
    fn from(error: InferError) -> Self {
        HttpError(error)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        error_response(self.0)
    }
}

/// An error as a response: its status and `{"error": message}`.
pub(crate) fn error_response(error: InferError) -> Response {
    (status(error.kind), Json(json!({"error": error.message}))).into_response()
}

/// The HTTP status of each kind of error.
pub(crate) fn status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::InvalidArgument | ErrorKind::ContextLengthExceeded => StatusCode::BAD_REQUEST,
        ErrorKind::QueueFull => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        // nginx's "client closed request": nobody is left to read it.
        ErrorKind::Cancelled => StatusCode::from_u16(499).expect("valid status"),
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        // Understood and refused whoever asks (not 401: no key helps).
        ErrorKind::Disabled => StatusCode::FORBIDDEN,
    }
}

type HttpResult<T> = Result<T, HttpError>;

/// Routes of the inference API. Every request is counted against the
/// in-flight bytes budget, and its body must arrive within `body_timeout`.
pub(crate) fn router(state: AppState, body_timeout: std::time::Duration) -> Router {
    let limit = state.max_message_bytes;
    let budget = state.budget.clone();
    Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2", get(|| async { Json(describe::server_metadata()) }))
        .route("/v2/models/stats", get(all_statistics))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata_version))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/versions/{version}/ready", get(model_ready_version))
        .route("/v2/models/{model}/config", get(model_config))
        .route("/v2/models/{model}/versions/{version}/config", get(model_config_version))
        .route("/v2/models/{model}/stats", get(model_statistics))
        .route("/v2/models/{model}/versions/{version}/stats", get(model_statistics_version))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_version))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(load))
        .route("/v2/repository/models/{model}/unload", post(unload))
        .merge(openai::routes())
        .merge(embeddings::routes())
        .merge(tei::routes())
        // Bodies over the limit are refused while being read (see `infer`).
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state((budget, body_timeout), limits::middleware))
        .with_state(state)
}

/// Routes of the metrics port: `/metrics`, and liveness and each model's
/// readiness for probes that cannot use the API ports (TLS on). Plain
/// HTTP, no key: nothing here carries model data.
pub(crate) fn metrics_router(state: AppState) -> Router {
    use ferrite_contract::health;
    Router::new()
        .route(
            ferrite_contract::metrics::PATH,
            get(|| async { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], METRICS.render()) }),
        )
        .route(health::LIVE_PATH, get(|| async { StatusCode::OK }))
        .route(&health::model_ready_path("{model}"), get(model_ready))
        .with_state(state)
}

async fn server_ready(State(state): State<AppState>) -> StatusCode {
    if state.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn model_metadata(state: State<AppState>, Path(model): Path<String>) -> HttpResult<Json<Value>> {
    model_metadata_version(state, Path((model, String::new()))).await
}

async fn model_metadata_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> HttpResult<Json<Value>> {
    let model = state.repository.get(&name, &version)?;
    let versions = state.repository.loaded(Some(&name));
    Ok(Json(describe::model_metadata(&ModelDescription::of(&model, &versions))))
}

async fn model_ready(state: State<AppState>, Path(model): Path<String>) -> HttpResult<StatusCode> {
    model_ready_version(state, Path((model, String::new()))).await
}

/// 200 when the model serves, 503 when it is known but does not (yet), 404
/// for a model this server does not know (the KServe v2 REST API says 4xx).
async fn model_ready_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> HttpResult<StatusCode> {
    Ok(if state.model_ready(&name, &version)? { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE })
}

async fn model_config(state: State<AppState>, Path(model): Path<String>) -> HttpResult<Json<Value>> {
    model_config_version(state, Path((model, String::new()))).await
}

async fn model_config_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> HttpResult<Json<Value>> {
    let model = state.repository.get(&name, &version)?;
    Ok(Json(describe::model_config(&ModelDescription::of(&model, &[]))))
}

fn statistics_json(models: &[Arc<Model>]) -> Value {
    describe::statistics(models.iter().map(|m| ModelStatistics::of(m)).collect())
}

async fn all_statistics(State(state): State<AppState>) -> Json<Value> {
    Json(statistics_json(&state.repository.loaded(None)))
}

async fn model_statistics(state: State<AppState>, Path(model): Path<String>) -> HttpResult<Json<Value>> {
    model_statistics_version(state, Path((model, String::new()))).await
}

async fn model_statistics_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> HttpResult<Json<Value>> {
    let model = state.repository.get(&name, &version)?;
    Ok(Json(statistics_json(&[model])))
}

async fn repository_index(State(state): State<AppState>, body: Bytes) -> Json<Value> {
    /// The body, typed: other fields are skipped without being built.
    #[derive(serde::Deserialize)]
    struct IndexRequest {
        ready: Option<json::Scalar>,
    }
    let ready_only = serde_json::from_slice::<IndexRequest>(&body)
        .ok()
        .and_then(|r| r.ready)
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let entries: Vec<Value> = state
        .repository
        .index()
        .into_iter()
        .filter(|e| !ready_only || e.state == IndexState::Ready)
        .map(|e| {
            let mut entry = json!({"name": e.name, "state": e.state.as_str()});
            if !e.version.is_empty() {
                entry["version"] = json!(e.version);
            }
            if !e.reason.is_empty() {
                entry["reason"] = json!(e.reason);
            }
            entry
        })
        .collect();
    Json(Value::Array(entries))
}

async fn load(State(state): State<AppState>, Path(model): Path<String>) -> HttpResult<StatusCode> {
    state.load(&model).await?;
    Ok(StatusCode::OK)
}

async fn unload(State(state): State<AppState>, Path(model): Path<String>) -> HttpResult<StatusCode> {
    state.unload(&model).await?;
    Ok(StatusCode::OK)
}

async fn infer(
    state: State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: ReadBody,
) -> HttpResult<Response> {
    infer_version(state, Path((model, String::new())), headers, body).await
}

async fn infer_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> HttpResult<Response> {
    let header_length = match headers.get(json::HEADER_LENGTH) {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| InferError::invalid(format!("{} must be a byte count", json::HEADER_LENGTH)))?,
        ),
        None => None,
    };
    let (request, binary) = json::split_body(&body, header_length)?;
    let priority = match request.parameters.get("priority").and_then(|v| v.as_i64()) {
        Some(1) => Priority::High,
        _ => Priority::Normal,
    };
    let deadline = request
        .parameters
        .get("timeout")
        .and_then(|v| v.as_u64())
        .filter(|&us| us > 0)
        .map(|us| Instant::now() + std::time::Duration::from_micros(us));
    let binary_default = request.parameters.get("binary_data_output").and_then(|v| v.as_bool()).unwrap_or(false);
    let outputs = request.outputs.unwrap_or_default();
    let binary_outputs: Vec<(String, bool)> = outputs
        .iter()
        .map(|o| {
            let binary = o.parameters.get("binary_data").and_then(|v| v.as_bool()).unwrap_or(binary_default);
            (o.name.clone(), binary)
        })
        .collect();
    // Structured output must never be dropped silently: an object (skipped
    // while parsing) would leave the answer unconstrained.
    if request.parameters.get("response_format").is_some_and(|v| v.as_str().is_none()) {
        return Err(InferError::invalid(
            "parameter 'response_format' must be a string holding the response_format JSON",
        )
        .into());
    }
    let parameters = request
        .parameters
        .iter()
        .filter_map(|(key, value)| {
            let value = match value {
                json::Scalar::Bool(b) => ParamValue::Bool(*b),
                json::Scalar::Number(n) => match n.as_i64() {
                    Some(i) => ParamValue::Int(i),
                    None => ParamValue::Float(n.as_f64()?),
                },
                json::Scalar::String(s) => ParamValue::Str(s.clone()),
                json::Scalar::Null => return None,
            };
            Some((key.clone(), value))
        })
        .collect();
    let inputs = json::decode_inputs(request.inputs, binary)?;
    let id = request.id.unwrap_or_default();
    let response = state
        .infer(
            &name,
            &version,
            InferRequest {
                id: id.clone(),
                inputs,
                outputs: outputs.into_iter().map(|o| o.name).collect(),
                priority,
                deadline,
                parameters,
            },
        )
        .await?;
    let is_binary = |output: &str| {
        binary_outputs.iter().find(|(name, _)| name == output).map(|(_, b)| *b).unwrap_or(binary_default)
    };
    let (body, json_len) = json::encode_response(
        &response.model_name,
        &response.model_version,
        &id,
        &response.outputs,
        &response.parameters,
        is_binary,
    );
    Ok(match json_len {
        Some(len) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (header::HeaderName::from_static(json::HEADER_LENGTH), len.to_string()),
            ],
            body,
        )
            .into_response(),
        None => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
    })
}

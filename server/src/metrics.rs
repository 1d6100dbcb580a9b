//! Prometheus metrics of the data path. Names start with `ferrite_`; the
//! autoscaler reads `ferrite_queue_depth` and `ferrite_inflight_requests`
//! (their names and the `model` label are `ferrite_contract::metrics`).

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, Counter, CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use ferrite_contract::metrics as contract;

/// The label naming the model, on every family (the autoscaler's filter).
const MODEL: &str = ferrite_contract::metrics::MODEL_LABEL;

/// Every metric family the server exports.
pub(crate) struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub inflight: IntGaugeVec,
    pub queue_duration: HistogramVec,
    pub compute_duration: HistogramVec,
    pub request_duration: HistogramVec,
    pub batch_size: HistogramVec,
    /// Encoders: padded tokens per executed batch.
    pub batch_tokens: HistogramVec,
    pub model_load_duration: HistogramVec,
    /// 1 for each loaded model version, labelled with the execution
    /// provider it actually runs on (after any allowed CPU fallback).
    pub model_info: IntGaugeVec,
    /// LLMs: time from admission to the first generated token.
    pub llm_time_to_first_token: HistogramVec,
    /// LLMs: time between successive tokens of one sequence.
    pub llm_inter_token_latency: HistogramVec,
    pub llm_prompt_tokens: IntCounterVec,
    pub llm_generated_tokens: IntCounterVec,
    /// LLMs: sequences admitted but not yet prefilled (also in `queue_depth`).
    pub llm_waiting: IntGaugeVec,
    /// LLMs: sequences in the decode batch (also in `inflight`).
    pub llm_running: IntGaugeVec,
    /// LLMs: prompt tokens whose KV came from the prefix cache.
    pub llm_prefix_hit_tokens: IntCounterVec,
    /// LLMs: prompt tokens the prefix cache did not hold (prefilled).
    pub llm_prefix_miss_tokens: IntCounterVec,
    /// LLMs: prefix cache blocks evicted to make room.
    pub llm_prefix_evictions: IntCounterVec,
    /// LLMs: bytes of KV data in the prefix cache.
    pub llm_prefix_bytes: IntGaugeVec,
    /// Wire bytes of requests in flight, server-wide (`budget`).
    pub inflight_bytes: IntGauge,
    /// The budget of `inflight_bytes`.
    pub inflight_bytes_limit: IntGauge,
    /// Requests refused because the budget was spent.
    pub inflight_bytes_refused: IntCounter,
    /// Open connections, by port (`grpc`, `http`).
    pub connections: IntGaugeVec,
    /// Connections closed at once because the port had its maximum.
    pub connections_refused: IntCounterVec,
    /// Cascade: requests escalated, by reason.
    pub escalations: IntCounterVec,
    /// Cascade: how each request was answered (local, escalated, fallback).
    pub cascade_decisions: IntCounterVec,
    /// Cascade: the confidence of micro answers.
    pub escalation_confidence: HistogramVec,
    /// Cascade: completion tokens served, by side (micro, macro).
    pub cascade_tokens: IntCounterVec,
    /// Cascade: time of target calls.
    pub escalation_target_duration: HistogramVec,
    /// Cascade: failed target calls, by kind (timeout, unreachable, error).
    pub escalation_target_errors: IntCounterVec,
    /// Cascade: what the micro-served tokens would have cost at the target.
    pub escalation_spend_avoided: CounterVec,
    /// Cascade: 1 after a successful target call, 0 after a failed one.
    pub escalation_target_up: IntGaugeVec,
    /// Shadow mode: requests not recorded (too many target calls, or the
    /// writer behind).
    pub escalation_shadow_dropped: IntCounterVec,
}

/// The process-wide metrics.
pub(crate) static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        // 50 us .. ~100 s: micro models answer in microseconds, big ones in seconds.
        let latency = exponential_buckets(50e-6, 2.0, 22).expect("valid buckets");
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let metric =
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &[MODEL]).expect("valid histogram");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGaugeVec::new(Opts::new(name, help), &[MODEL]).expect("valid gauge");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let requests = IntCounterVec::new(
            Opts::new(contract::REQUESTS_TOTAL, "Inference requests by model and outcome (success or failure reason)"),
            &[MODEL, "outcome"],
        )
        .expect("valid counter");
        registry.register(Box::new(requests.clone())).expect("unique metric");
        let counter = |name: &str, help: &str| {
            let metric = IntCounterVec::new(Opts::new(name, help), &[MODEL]).expect("valid counter");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let register = |metric: Box<dyn prometheus::core::Collector>| registry.register(metric).expect("unique metric");
        let inflight_bytes =
            IntGauge::new("ferrite_inflight_request_bytes", "Wire bytes of requests received, queued or executing")
                .expect("valid gauge");
        register(Box::new(inflight_bytes.clone()));
        let inflight_bytes_limit = IntGauge::new(
            "ferrite_inflight_request_bytes_limit",
            "Budget of ferrite_inflight_request_bytes (--max-inflight-bytes)",
        )
        .expect("valid gauge");
        register(Box::new(inflight_bytes_limit.clone()));
        let inflight_bytes_refused = IntCounter::new(
            "ferrite_inflight_request_bytes_refused_total",
            "Requests refused because the in-flight bytes budget was spent",
        )
        .expect("valid counter");
        register(Box::new(inflight_bytes_refused.clone()));
        let connections = IntGaugeVec::new(Opts::new("ferrite_connections", "Open connections by port"), &["port"])
            .expect("valid gauge");
        register(Box::new(connections.clone()));
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "ferrite_connections_refused_total",
                "Connections closed at once: the port had --max-connections",
            ),
            &["port"],
        )
        .expect("valid counter");
        register(Box::new(connections_refused.clone()));
        let labelled = |name: &str, help: &str, label: &str| {
            let metric = IntCounterVec::new(Opts::new(name, help), &[MODEL, label]).expect("valid counter");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        };
        let escalations =
            labelled("ferrite_escalations_total", "Requests handed to the escalation target, by reason", "reason");
        let cascade_decisions = labelled(
            contract::CASCADE_DECISIONS,
            "Requests of a cascade by how they were answered: local, escalated, or fallback (target failed)",
            contract::OUTCOME_LABEL,
        );
        let cascade_tokens = labelled(
            "ferrite_cascade_tokens_total",
            "Completion tokens served by a cascade, by side (micro, macro)",
            "side",
        );
        let escalation_target_errors = labelled(
            "ferrite_escalation_target_errors_total",
            "Failed calls to the escalation target, by kind (timeout, unreachable, error)",
            "kind",
        );
        let escalation_spend_avoided = CounterVec::new(
            Opts::new(
                "ferrite_escalation_spend_avoided_dollars_total",
                "Micro-served prompt and completion tokens priced at the target's pricing",
            ),
            &[MODEL],
        )
        .expect("valid counter");
        register(Box::new(escalation_spend_avoided.clone()));
        // 1 ms .. ~65 s.
        let token_latency = exponential_buckets(1e-3, 2.0, 17).expect("valid buckets");
        Metrics {
            llm_time_to_first_token: histogram(
                "ferrite_llm_time_to_first_token_seconds",
                "Time from admission to the first generated token",
                token_latency.clone(),
            ),
            llm_inter_token_latency: histogram(
                "ferrite_llm_inter_token_latency_seconds",
                "Time between successive tokens of a sequence",
                token_latency,
            ),
            llm_prompt_tokens: counter(
                "ferrite_llm_prompt_tokens_total",
                "Prompt tokens of admitted requests (prefilled or from the prefix cache)",
            ),
            llm_generated_tokens: counter("ferrite_llm_generated_tokens_total", "Tokens generated"),
            llm_waiting: gauge(
                "ferrite_llm_waiting_sequences",
                "Sequences waiting to join the decode batch (counted in ferrite_queue_depth too)",
            ),
            llm_running: gauge(
                "ferrite_llm_running_sequences",
                "Sequences in the decode batch (counted in ferrite_inflight_requests too)",
            ),
            llm_prefix_hit_tokens: counter(
                "ferrite_llm_prefix_cache_hit_tokens_total",
                "Prompt tokens whose KV came from the prefix cache (not prefilled)",
            ),
            llm_prefix_miss_tokens: counter(
                "ferrite_llm_prefix_cache_miss_tokens_total",
                "Prompt tokens not in the prefix cache (prefilled)",
            ),
            llm_prefix_evictions: counter(
                "ferrite_llm_prefix_cache_evictions_total",
                "Prefix cache blocks evicted (least recently used) to make room",
            ),
            llm_prefix_bytes: gauge("ferrite_llm_prefix_cache_bytes", "Bytes of KV data held in the prefix cache"),
            escalations,
            cascade_decisions,
            escalation_confidence: histogram(
                "ferrite_escalation_confidence",
                "Confidence of micro answers: the sampled-token log-probability at the configured quantile",
                vec![-10.0, -8.0, -6.0, -5.0, -4.0, -3.0, -2.5, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, -0.1, -0.01, 0.0],
            ),
            cascade_tokens,
            escalation_target_duration: histogram(
                "ferrite_escalation_target_duration_seconds",
                "Time of calls to the escalation target (streams: to their end)",
                exponential_buckets(1e-3, 2.0, 20).expect("valid buckets"),
            ),
            escalation_target_errors,
            escalation_spend_avoided,
            escalation_target_up: gauge(
                contract::ESCALATION_TARGET_UP,
                "1 when the last call to the escalation target succeeded, 0 when it failed",
            ),
            escalation_shadow_dropped: counter(
                "ferrite_escalation_shadow_dropped_total",
                "Shadow mode: requests not recorded (too many target calls at once, or the log writer behind)",
            ),
            inflight_bytes,
            inflight_bytes_limit,
            inflight_bytes_refused,
            connections,
            connections_refused,
            requests,
            queue_depth: gauge(
                ferrite_contract::metrics::QUEUE_DEPTH,
                "Requests waiting in the model's queue (LLMs: sequences waiting)",
            ),
            inflight: gauge(
                ferrite_contract::metrics::INFLIGHT_REQUESTS,
                "Requests executing on the model's sessions (LLMs: sequences in the decode batch)",
            ),
            queue_duration: histogram(
                "ferrite_queue_duration_seconds",
                "Time a request waited in the queue",
                latency.clone(),
            ),
            compute_duration: histogram(
                "ferrite_compute_duration_seconds",
                "Time ONNX Runtime spent on the request's batch",
                latency.clone(),
            ),
            request_duration: histogram(
                "ferrite_request_duration_seconds",
                "Time from admission to response",
                latency.clone(),
            ),
            batch_size: histogram(
                "ferrite_batch_size",
                "Requests per executed batch",
                exponential_buckets(1.0, 2.0, 11).expect("valid buckets"),
            ),
            batch_tokens: histogram(
                "ferrite_batch_tokens",
                "Encoders: padded tokens (inputs times the longest) per executed batch",
                exponential_buckets(8.0, 2.0, 14).expect("valid buckets"),
            ),
            model_load_duration: histogram(
                "ferrite_model_load_duration_seconds",
                "Time to load a model version",
                exponential_buckets(0.01, 2.0, 16).expect("valid buckets"),
            ),
            model_info: {
                let metric = IntGaugeVec::new(
                    Opts::new(
                        contract::MODEL_INFO,
                        "1 for each loaded model version, by the execution provider it runs on",
                    ),
                    &[MODEL, "version", contract::PROVIDER_LABEL],
                )
                .expect("valid gauge");
                registry.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("text format is UTF-8")
    }
}

/// One model's handles on the cascade's metrics, resolved once.
pub(crate) struct CascadeMetrics {
    model: String,
    pub confidence: Histogram,
    pub micro_tokens: IntCounter,
    pub macro_tokens: IntCounter,
    pub target_duration: Histogram,
    pub spend_avoided: Counter,
    pub shadow_dropped: IntCounter,
}

impl CascadeMetrics {
    /// The handles labelled with `model`.
    pub(crate) fn new(model: &str) -> CascadeMetrics {
        let m = &*METRICS;
        CascadeMetrics {
            model: model.to_string(),
            confidence: m.escalation_confidence.with_label_values(&[model]),
            micro_tokens: m.cascade_tokens.with_label_values(&[model, "micro"]),
            macro_tokens: m.cascade_tokens.with_label_values(&[model, "macro"]),
            target_duration: m.escalation_target_duration.with_label_values(&[model]),
            spend_avoided: m.escalation_spend_avoided.with_label_values(&[model]),
            shadow_dropped: m.escalation_shadow_dropped.with_label_values(&[model]),
        }
    }

    /// Counts an escalation by its reason.
    pub(crate) fn escalated(&self, reason: &str) {
        METRICS.escalations.with_label_values(&[&self.model, reason]).inc();
    }

    /// Counts how a request was answered (a contract outcome).
    pub(crate) fn decided(&self, outcome: &str) {
        METRICS.cascade_decisions.with_label_values(&[&self.model, outcome]).inc();
    }

    /// Sets the target-up gauge (absent until the first call, so resolved here).
    pub(crate) fn target_up(&self, up: bool) {
        METRICS.escalation_target_up.with_label_values(&[&self.model]).set(up as i64);
    }

    /// Counts a failed target call by its kind.
    pub(crate) fn target_failed(&self, kind: &str) {
        METRICS.escalation_target_errors.with_label_values(&[&self.model, kind]).inc();
    }
}

/// One model's handles on the metrics every backend keeps (the queue depth
/// is `admission`'s), resolved once.
pub(crate) struct ModelMetrics {
    /// Requests running now.
    pub inflight: IntGauge,
    /// Time from admission to the start of a run.
    pub queue_duration: Histogram,
    /// Time of one run (a batch, or an LLM step).
    pub compute_duration: Histogram,
    /// Requests in one run.
    pub batch_size: Histogram,
}

impl ModelMetrics {
    /// The handles labelled with `model`.
    pub(crate) fn new(model: &str) -> ModelMetrics {
        let m = &*METRICS;
        ModelMetrics {
            inflight: m.inflight.with_label_values(&[model]),
            queue_duration: m.queue_duration.with_label_values(&[model]),
            compute_duration: m.compute_duration.with_label_values(&[model]),
            batch_size: m.batch_size.with_label_values(&[model]),
        }
    }
}

//! Cumulative per-model statistics in the shape of Triton's ModelStatistics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::ErrorKind;
use crate::metrics::METRICS;
use crate::runtime::RunTimings;

/// A count and the total time it took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Duration64 {
    pub count: u64,
    pub ns: u64,
}

impl Duration64 {
    fn add(&mut self, count: u64, time: Duration) {
        self.count += count;
        self.ns += time.as_nanos() as u64;
    }
}

/// A snapshot of one model version's statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Milliseconds since the epoch of the last inference; 0 if none.
    pub last_inference_ms: u64,
    /// Requests executed (each request of a batch counts).
    pub inference_count: u64,
    /// Batches executed.
    pub execution_count: u64,
    pub success: Duration64,
    pub fail: Duration64,
    pub queue: Duration64,
    /// Copying inputs into the runtime.
    pub compute_input: Duration64,
    /// Running the graph.
    pub compute_infer: Duration64,
    /// Copying outputs out of the runtime.
    pub compute_output: Duration64,
    /// Per batch size: executions and their input, infer and output time.
    pub batches: BTreeMap<u64, [Duration64; 3]>,
}

/// Thread-safe statistics of one model version.
#[derive(Debug, Default)]
pub struct ModelStats(Mutex<StatsSnapshot>);

impl ModelStats {
    /// Records a request that finished, successfully or not, after `total`.
    pub fn record_request(&self, ok: bool, total: Duration) {
        let mut stats = self.0.lock().expect("stats lock");
        if ok {
            stats.success.add(1, total)
        } else {
            stats.fail.add(1, total)
        }
    }

    /// Records one executed batch of `requests` requests.
    pub fn record_batch(&self, requests: usize, queue_times: Duration, timings: RunTimings) {
        let mut stats = self.0.lock().expect("stats lock");
        let requests = requests as u64;
        stats.last_inference_ms =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        stats.inference_count += requests;
        stats.execution_count += 1;
        stats.queue.add(requests, queue_times);
        stats.compute_input.add(requests, timings.input);
        stats.compute_infer.add(requests, timings.infer);
        stats.compute_output.add(requests, timings.output);
        let batch = stats.batches.entry(requests).or_default();
        batch[0].add(1, timings.input);
        batch[1].add(1, timings.infer);
        batch[2].add(1, timings.output);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        self.0.lock().expect("stats lock").clone()
    }
}

/// One request, counted once in `ferrite_requests_total`, the request
/// duration histogram and the model statistics: by its result when
/// [`finish`](RequestRecord::finish)ed, or as cancelled when dropped
/// unfinished (the caller went away).
pub struct RequestRecord {
    model: Arc<str>,
    stats: Arc<ModelStats>,
    started: Instant,
    result: Option<Result<(), ErrorKind>>,
}

impl RequestRecord {
    /// Starts timing a request of `model`.
    pub fn start(model: Arc<str>, stats: Arc<ModelStats>) -> RequestRecord {
        RequestRecord { model, stats, started: Instant::now(), result: None }
    }

    /// Records the request's result.
    pub fn finish(mut self, result: Result<(), ErrorKind>) {
        self.result = Some(result);
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let result = self.result.unwrap_or(Err(ErrorKind::Cancelled));
        let label = result.map_or_else(ErrorKind::metric_label, |()| "success");
        METRICS.requests.with_label_values(&[&*self.model, label]).inc();
        METRICS.request_duration.with_label_values(&[&*self.model]).observe(elapsed.as_secs_f64());
        self.stats.record_request(result.is_ok(), elapsed);
    }
}

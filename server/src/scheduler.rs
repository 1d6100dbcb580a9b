//! One scheduler per model version: a bounded two-level priority queue, a
//! dynamic batcher and one worker thread per ONNX Runtime session.
//!
//! Requests are admitted by `submit` (async, from the frontends). Each worker
//! takes the oldest live request of the highest priority, gathers compatible
//! requests behind it into a batch (up to `max_batch_size` rows, waiting at
//! most `max_queue_delay` after the oldest arrived), runs it and replies.
//! A request whose deadline passes in the queue, or whose client goes away,
//! leaves the queue at once and never runs.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::admission::Admission;
use crate::batch::split_rows;
use crate::config::ModelSettings;
use crate::error::{ErrorKind, InferError, InferResult};
use crate::inference::Priority;
use crate::metrics::{ModelMetrics, METRICS};
use crate::runtime::Session;
use crate::stats::ModelStats;
use crate::tensor::Tensor;

/// A validated request, ready to run.
#[derive(Debug)]
pub(crate) struct Job {
    /// Inputs in the model's input order.
    pub inputs: Vec<Tensor>,
    /// Rows along the batch dimension (1 when the model does not batch).
    pub rows: usize,
    /// Names of the outputs to return, in the order to return them.
    pub outputs: Vec<String>,
    pub priority: Priority,
    /// The latest time the request may still start running.
    pub deadline: Option<Instant>,
}

struct Entry {
    id: u64,
    job: Job,
    enqueued: Instant,
    reply: oneshot::Sender<InferResult<Vec<Tensor>>>,
}

struct Queue {
    waiting: Admission<Entry>,
    next_id: u64,
    /// Workers blocked on `changed`: a request wakes them only when there
    /// are any (a condvar notification is a syscall even with no waiter,
    /// and most requests arrive while the worker is busy).
    waiting_workers: usize,
}

struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
    settings: ModelSettings,
    /// Whether requests may be joined along the first dimension.
    batching: bool,
    metrics: ModelMetrics,
    stats: Arc<ModelStats>,
}

/// The queue, batcher and workers of one model version.
pub(crate) struct Scheduler {
    shared: Arc<Shared>,
}

impl Scheduler {
    /// Starts one worker thread per session.
    pub(crate) fn start(
        model: &str,
        sessions: Vec<Session>,
        settings: ModelSettings,
        batching: bool,
        stats: Arc<ModelStats>,
    ) -> Scheduler {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                waiting: Admission::new(settings.max_queue_size, METRICS.queue_depth.with_label_values(&[model])),
                next_id: 0,
                waiting_workers: 0,
            }),
            changed: Condvar::new(),
            settings,
            batching,
            metrics: ModelMetrics::new(model),
            stats,
        });
        for (i, session) in sessions.into_iter().enumerate() {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("ferrite-{model}-{i}"))
                .spawn(move || worker(shared, session))
                .expect("spawn worker thread");
        }
        Scheduler { shared }
    }

    /// Queues a job and waits for its outputs. Dropping the returned future
    /// (the client went away) takes the job out of the queue.
    pub(crate) async fn submit(&self, job: Job) -> InferResult<Vec<Tensor>> {
        let deadline = job.deadline;
        let (reply, mut result) = oneshot::channel();
        let (id, wake) = {
            let mut queue = self.shared.lock();
            let id = queue.next_id;
            let priority = job.priority;
            queue.waiting.admit(priority, Entry { id, job, enqueued: Instant::now(), reply })?;
            queue.next_id += 1;
            (id, queue.waiting_workers > 0)
        };
        if wake {
            self.shared.changed.notify_all();
        }
        let mut guard = LeaveQueueOnDrop { shared: &self.shared, id: Some(id) };

        let outcome = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), &mut result).await {
                Ok(outcome) => outcome,
                // Still queued: it expired there. Already running: wait for it.
                Err(_) if self.shared.leave_queue(id) => {
                    guard.id = None;
                    return Err(deadline_exceeded());
                }
                Err(_) => result.await,
            },
            None => result.await,
        };
        guard.id = None;
        outcome.unwrap_or_else(|_| Err(InferError::internal("the model's worker stopped")))
    }

    /// Stops taking requests; queued ones still run, then the workers exit.
    pub(crate) fn close(&self) {
        self.shared.lock().waiting.close();
        self.shared.changed.notify_all();
    }
}

impl Drop for Scheduler {
    /// Workers finish what is queued and exit on their own; joining them
    /// here would block whichever async task dropped the last handle.
    fn drop(&mut self) {
        self.close();
    }
}

fn deadline_exceeded() -> InferError {
    InferError::new(ErrorKind::DeadlineExceeded, "the request's deadline passed while it waited in the queue")
}

/// Takes a waiting job out of the queue when its submitter is dropped (the
/// caller counts the request as cancelled).
struct LeaveQueueOnDrop<'a> {
    shared: &'a Shared,
    id: Option<u64>,
}

impl Drop for LeaveQueueOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.shared.leave_queue(id);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic never happens while the lock is held; recover regardless.
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Removes a waiting job; false if a worker already took it.
    fn leave_queue(&self, id: u64) -> bool {
        self.lock().waiting.remove_first(|entry| entry.id == id).is_some()
    }

    /// Blocks until a batch is ready; `None` once closed and drained.
    fn next_batch(&self) -> Option<Vec<Entry>> {
        let mut queue = self.lock();
        let first = loop {
            if let Some(entry) = self.pop_live(&mut queue) {
                break entry;
            }
            if queue.waiting.is_closed() {
                return None;
            }
            queue.waiting_workers += 1;
            queue = self.changed.wait(queue).unwrap_or_else(|p| p.into_inner());
            queue.waiting_workers -= 1;
        };
        let mut batch = vec![first];
        if self.batching {
            let max_rows = self.settings.max_batch_size;
            let mut rows = batch[0].job.rows;
            let hold_until = batch[0].enqueued + self.settings.max_queue_delay;
            loop {
                rows = self.gather_compatible(&mut queue, &mut batch, rows, max_rows);
                let now = Instant::now();
                if rows >= max_rows || now >= hold_until || queue.waiting.is_closed() {
                    break;
                }
                queue.waiting_workers += 1;
                queue = self.changed.wait_timeout(queue, hold_until - now).unwrap_or_else(|p| p.into_inner()).0;
                queue.waiting_workers -= 1;
            }
        }
        Some(batch)
    }

    /// Pops the next request that still wants an answer, replying to those
    /// whose deadline passed.
    fn pop_live(&self, queue: &mut Queue) -> Option<Entry> {
        loop {
            let entry = queue.waiting.pop_front()?;
            if entry.reply.is_closed() {
                continue;
            }
            if entry.job.deadline.is_some_and(|d| d <= Instant::now()) {
                let _ = entry.reply.send(Err(deadline_exceeded()));
                continue;
            }
            return Some(entry);
        }
    }

    /// Moves queued requests that can share the batch into it, in priority
    /// then arrival order, while the rows fit. Returns the batch's rows.
    fn gather_compatible(&self, queue: &mut Queue, batch: &mut Vec<Entry>, mut rows: usize, max_rows: usize) -> usize {
        let now = Instant::now();
        let first = &batch[0].job;
        let mut joining = Vec::new();
        queue.waiting.drain_where(
            |candidate| {
                if rows >= max_rows {
                    return None;
                }
                let expired = candidate.job.deadline.is_some_and(|d| d <= now);
                let fits = !candidate.reply.is_closed()
                    && !expired
                    && rows + candidate.job.rows <= max_rows
                    && same_row_shape(first, &candidate.job);
                rows += if fits { candidate.job.rows } else { 0 };
                Some(fits)
            },
            |entry| joining.push(entry),
        );
        batch.extend(joining);
        rows
    }

    /// Runs a batch on `session` and replies to every request in it.
    fn execute(&self, session: &mut Session, batch: Vec<Entry>) {
        let started = Instant::now();
        let count = batch.len();
        self.metrics.inflight.add(count as i64);
        self.metrics.batch_size.observe(count as f64);
        let mut queue_total = Duration::ZERO;
        for entry in &batch {
            let waited = started - entry.enqueued;
            queue_total += waited;
            self.metrics.queue_duration.observe(waited.as_secs_f64());
        }

        // Outputs any request asked for, in model order of first request.
        let mut outputs: Vec<String> = Vec::new();
        for entry in &batch {
            for name in &entry.job.outputs {
                if !outputs.contains(name) {
                    outputs.push(name.clone());
                }
            }
        }
        let rows: Vec<usize> = batch.iter().map(|e| e.job.rows).collect();
        let (jobs, replies): (Vec<Job>, Vec<_>) = batch.into_iter().map(|e| (e.job, e.reply)).unzip();
        let requested: Vec<Vec<String>> = jobs.iter().map(|j| j.outputs.clone()).collect();
        let inputs = input_columns(jobs);

        let result = catch_unwind(AssertUnwindSafe(|| session.run(&inputs, &outputs)))
            .unwrap_or_else(|_| Err(InferError::internal("the runtime panicked while running the model")));
        let compute = started.elapsed();
        self.metrics.compute_duration.observe(compute.as_secs_f64());
        let timings = result.as_ref().map(|r| r.timings).unwrap_or_default();
        self.stats.record_batch(count, queue_total, timings);

        let per_request: InferResult<Vec<Vec<Tensor>>> = result.and_then(|run| {
            let tensors = run.outputs;
            if count == 1 {
                return Ok(vec![tensors]);
            }
            let mut per_request = vec![Vec::with_capacity(tensors.len()); count];
            for tensor in &tensors {
                let pieces = split_rows(tensor, &rows).map_err(InferError::internal)?;
                for (slot, piece) in per_request.iter_mut().zip(pieces) {
                    slot.push(piece);
                }
            }
            Ok(per_request)
        });
        self.metrics.inflight.sub(count as i64);

        match per_request {
            Ok(per_request) => {
                for ((reply, tensors), wanted) in replies.into_iter().zip(per_request).zip(requested) {
                    let mine = tensors.into_iter().filter(|t| wanted.contains(&t.name)).collect::<Vec<_>>();
                    let ordered =
                        wanted.iter().filter_map(|name| mine.iter().find(|t| &t.name == name).cloned()).collect();
                    let _ = reply.send(Ok(ordered));
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Whether two jobs agree on every input's dimensions after the first.
fn same_row_shape(a: &Job, b: &Job) -> bool {
    a.inputs.len() == b.inputs.len()
        && a.inputs.iter().zip(&b.inputs).all(|(x, y)| x.name == y.name && x.shape.get(1..) == y.shape.get(1..))
}

/// The inputs of a batch, each as its blocks of rows in request order (the
/// runtime joins them as it copies them into ONNX Runtime).
fn input_columns(jobs: Vec<Job>) -> Vec<Vec<Tensor>> {
    let width = jobs[0].inputs.len();
    let mut columns: Vec<Vec<Tensor>> = (0..width).map(|_| Vec::with_capacity(jobs.len())).collect();
    for job in jobs {
        for (column, tensor) in columns.iter_mut().zip(job.inputs) {
            column.push(tensor);
        }
    }
    columns
}

fn worker(shared: Arc<Shared>, mut session: Session) {
    while let Some(batch) = shared.next_batch() {
        shared.execute(&mut session, batch);
    }
}

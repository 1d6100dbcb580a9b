//! The encoder's queue and workers: requests (each its tokenized inputs)
//! wait in a bounded queue (`admission`: QUEUE_FULL beyond it, counted in
//! `ferrite_queue_depth`); each worker, one per session, takes waiting
//! inputs in order into a batch by token count (`batch::Budget`), pads and
//! runs it, and hands each input's row back to its request. A long request
//! may span several batches; a short one joins the batch of others. A
//! request whose deadline passes before any of its inputs ran, or whose
//! client went away, leaves the queue.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::Histogram;
use tokio::sync::oneshot;

use super::batch::{pad, Budget, Padded};
use super::tokenize::Tokens;
use crate::admission::Admission;
use crate::error::{ErrorKind, InferError, InferResult};
use crate::inference::Priority;
use crate::metrics::{ModelMetrics, METRICS};
use crate::runtime::RunTimings;
use crate::stats::ModelStats;

/// What runs a padded batch: an encoder graph (`graph::Graph`), or a
/// stand-in in tests.
pub(crate) trait Runner: Send + 'static {
    /// One row per input (`lengths` are their real tokens), and where the
    /// time went.
    fn run(&mut self, batch: &Padded, lengths: &[usize]) -> InferResult<(Vec<Vec<f32>>, RunTimings)>;
}

/// What a request gets back: one row per input, in order.
pub(crate) type Rows = Vec<Vec<f32>>;

/// Where the rows of one request are gathered until all have run.
struct Collector {
    rows: Vec<Option<Vec<f32>>>,
    missing: usize,
    reply: Option<oneshot::Sender<InferResult<Rows>>>,
}

impl Collector {
    fn put(&mut self, index: usize, row: Vec<f32>) {
        if self.rows[index].replace(row).is_none() {
            self.missing -= 1;
        }
        if self.missing == 0 {
            if let Some(reply) = self.reply.take() {
                let rows = self.rows.iter_mut().map(|r| r.take().unwrap_or_default()).collect();
                let _ = reply.send(Ok(rows));
            }
        }
    }

    fn fail(&mut self, error: InferError) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(Err(error));
        }
    }

    fn abandoned(&self) -> bool {
        self.reply.as_ref().is_none_or(|r| r.is_closed())
    }
}

type Shared<T> = Arc<Mutex<T>>;

/// A request in the queue.
struct Job {
    id: u64,
    inputs: Vec<Tokens>,
    /// Inputs before this one are in a batch already.
    next: usize,
    collector: Shared<Collector>,
    enqueued: Instant,
    deadline: Option<Instant>,
}

struct Waiting {
    jobs: Admission<Job>,
    next_id: u64,
}

struct State {
    waiting: Mutex<Waiting>,
    changed: Condvar,
    max_batch_tokens: usize,
    max_batch_inputs: usize,
    pad_id: i64,
    metrics: ModelMetrics,
    batch_tokens: Histogram,
    stats: Arc<ModelStats>,
}

/// The queue and workers of one encoder.
pub(crate) struct Queue {
    state: Arc<State>,
}

/// How big a batch may grow and how long the queue may get.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Padded tokens of one batch.
    pub max_batch_tokens: usize,
    /// Inputs of one batch.
    pub max_batch_inputs: usize,
    /// Requests that may wait.
    pub max_queue: usize,
}

impl Queue {
    /// Starts one worker thread per graph.
    pub(crate) fn start<R: Runner>(
        model: &str,
        graphs: Vec<R>,
        limits: Limits,
        pad_id: i64,
        stats: Arc<ModelStats>,
    ) -> Queue {
        let state = Arc::new(State {
            waiting: Mutex::new(Waiting {
                jobs: Admission::new(limits.max_queue, METRICS.queue_depth.with_label_values(&[model])),
                next_id: 0,
            }),
            changed: Condvar::new(),
            max_batch_tokens: limits.max_batch_tokens,
            max_batch_inputs: limits.max_batch_inputs,
            pad_id,
            metrics: ModelMetrics::new(model),
            batch_tokens: METRICS.batch_tokens.with_label_values(&[model]),
            stats,
        });
        for (i, graph) in graphs.into_iter().enumerate() {
            let state = state.clone();
            std::thread::Builder::new()
                .name(format!("ferrite-{model}-{i}"))
                .spawn(move || worker(state, graph))
                .expect("spawn encoder worker");
        }
        Queue { state }
    }

    /// Queues a request's inputs and waits for their rows. Dropping the
    /// future (the client went away) takes the request out of the queue.
    pub(crate) async fn submit(
        &self,
        inputs: Vec<Tokens>,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> InferResult<Rows> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, mut result) = oneshot::channel();
        let collector = Arc::new(Mutex::new(Collector {
            rows: vec![None; inputs.len()],
            missing: inputs.len(),
            reply: Some(reply),
        }));
        let id = {
            let mut waiting = self.state.lock();
            let id = waiting.next_id;
            let job = Job { id, inputs, next: 0, collector, enqueued: Instant::now(), deadline };
            waiting.jobs.admit(priority, job)?;
            waiting.next_id += 1;
            id
        };
        self.state.changed.notify_one();
        let mut guard = LeaveOnDrop { state: &self.state, id: Some(id) };
        let outcome = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), &mut result).await {
                Ok(outcome) => outcome,
                // Nothing of it ran yet: it expired in the queue.
                Err(_) if self.state.leave_if_not_started(id) => {
                    guard.id = None;
                    return Err(deadline_exceeded());
                }
                Err(_) => result.await,
            },
            None => result.await,
        };
        guard.id = None;
        outcome.unwrap_or_else(|_| Err(InferError::internal("the encoder's worker stopped")))
    }

    /// Stops taking requests; those queued still run, then the workers exit.
    pub(crate) fn close(&self) {
        self.state.lock().jobs.close();
        self.state.changed.notify_all();
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.close();
    }
}

fn deadline_exceeded() -> InferError {
    InferError::new(ErrorKind::DeadlineExceeded, "the request's deadline passed while it waited in the queue")
}

struct LeaveOnDrop<'a> {
    state: &'a State,
    id: Option<u64>,
}

impl Drop for LeaveOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.state.lock().jobs.remove_first(|job| job.id == id);
        }
    }
}

/// One input of a batch: whose it is and its tokens.
struct Item {
    collector: Shared<Collector>,
    index: usize,
    tokens: Tokens,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes a waiting request out if none of its inputs ran yet.
    fn leave_if_not_started(&self, id: u64) -> bool {
        self.lock().jobs.remove_first(|job| job.id == id && job.next == 0).is_some()
    }

    /// Blocks until inputs wait, then takes a batch of them; `None` once
    /// closed and drained. Also returns the requests that joined (for
    /// in-flight counts) and their queue time.
    fn next_batch(&self) -> Option<(Vec<Item>, usize, Duration)> {
        let mut waiting = self.lock();
        loop {
            let (items, jobs, queued) = self.take_batch(&mut waiting);
            if !items.is_empty() {
                return Some((items, jobs, queued));
            }
            if waiting.jobs.is_closed() && waiting.jobs.is_empty() {
                return None;
            }
            waiting = self.changed.wait(waiting).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn take_batch(&self, waiting: &mut Waiting) -> (Vec<Item>, usize, Duration) {
        let now = Instant::now();
        let mut budget = Budget::new(self.max_batch_tokens, self.max_batch_inputs);
        let (mut items, mut jobs, mut queued) = (Vec::new(), 0, Duration::ZERO);
        'jobs: while let Some(job) = waiting.jobs.front_mut() {
            let collector = job.collector.clone();
            let mut slot = collector.lock().unwrap_or_else(|p| p.into_inner());
            if slot.abandoned() {
                drop(slot);
                waiting.jobs.pop_front();
                continue;
            }
            if job.next == 0 && job.deadline.is_some_and(|d| d <= now) {
                slot.fail(deadline_exceeded());
                drop(slot);
                waiting.jobs.pop_front();
                continue;
            }
            drop(slot);
            let mut joined = false;
            while job.next < job.inputs.len() {
                if !budget.try_add(job.inputs[job.next].len()) {
                    if joined {
                        jobs += 1;
                    }
                    break 'jobs;
                }
                if job.next == 0 {
                    let waited = now - job.enqueued;
                    self.metrics.queue_duration.observe(waited.as_secs_f64());
                    queued += waited;
                }
                joined = true;
                let tokens = std::mem::replace(&mut job.inputs[job.next], Tokens { ids: vec![], type_ids: vec![] });
                items.push(Item { collector: collector.clone(), index: job.next, tokens });
                job.next += 1;
            }
            jobs += 1;
            waiting.jobs.pop_front();
        }
        (items, jobs, queued)
    }

    /// Runs a batch and hands every row to its request.
    fn execute(&self, graph: &mut impl Runner, items: Vec<Item>, jobs: usize, queued: Duration) {
        let started = Instant::now();
        self.metrics.inflight.add(jobs as i64);
        self.metrics.batch_size.observe(items.len() as f64);
        let tokens: Vec<&Tokens> = items.iter().map(|i| &i.tokens).collect();
        let lengths: Vec<usize> = tokens.iter().map(|t| t.len()).collect();
        let padded = pad(&tokens, self.pad_id);
        self.batch_tokens.observe((padded.rows * padded.longest) as f64);
        let result = catch_unwind(AssertUnwindSafe(|| graph.run(&padded, &lengths)))
            .unwrap_or_else(|_| Err(InferError::internal("the runtime panicked while running the model")));
        self.metrics.compute_duration.observe(started.elapsed().as_secs_f64());
        let timings = result.as_ref().map(|(_, t)| *t).unwrap_or_default();
        self.stats.record_batch(jobs, queued, timings);
        match result {
            Ok((rows, _)) => {
                for (item, row) in items.into_iter().zip(rows) {
                    item.collector.lock().unwrap_or_else(|p| p.into_inner()).put(item.index, row);
                }
            }
            Err(error) => {
                for item in items {
                    item.collector.lock().unwrap_or_else(|p| p.into_inner()).fail(error.clone());
                }
            }
        }
        self.metrics.inflight.sub(jobs as i64);
    }
}

fn worker(state: Arc<State>, mut graph: impl Runner) {
    while let Some((items, jobs, queued)) = state.next_batch() {
        state.execute(&mut graph, items, jobs, queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holds the worker until opened.
    #[derive(Default)]
    struct Gate {
        open: Mutex<bool>,
        opened: Condvar,
    }

    impl Gate {
        fn wait(&self) {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }

        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    /// Answers each input with its length and first id, and records the
    /// inputs of every batch; waits for `gate` before each batch.
    struct Echo {
        batches: Arc<Mutex<Vec<usize>>>,
        gate: Arc<Gate>,
    }

    impl Runner for Echo {
        fn run(&mut self, batch: &Padded, lengths: &[usize]) -> InferResult<(Vec<Vec<f32>>, RunTimings)> {
            self.gate.wait();
            self.batches.lock().unwrap().push(batch.rows);
            let rows = (0..batch.rows).map(|r| vec![lengths[r] as f32, batch.ids[r * batch.longest] as f32]).collect();
            Ok((rows, RunTimings::default()))
        }
    }

    fn tokens(first: i64, len: usize) -> Tokens {
        let mut ids = vec![0; len];
        ids[0] = first;
        Tokens { ids, type_ids: vec![0; len] }
    }

    /// A queue over an [`Echo`], the batches it ran and its gate (closed).
    struct Fixture {
        queue: Arc<Queue>,
        batches: Arc<Mutex<Vec<usize>>>,
        gate: Arc<Gate>,
    }

    fn fixture(max_batch_tokens: usize, max_batch_inputs: usize, max_queue: usize) -> Fixture {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Gate::default());
        let echo = Echo { batches: batches.clone(), gate: gate.clone() };
        let limits = Limits { max_batch_tokens, max_batch_inputs, max_queue };
        let queue = Queue::start("encoder-queue-test", vec![echo], limits, 0, Arc::new(ModelStats::default()));
        Fixture { queue: Arc::new(queue), batches, gate }
    }

    #[tokio::test]
    async fn a_request_spans_batches_and_gets_its_rows_in_order() {
        let Fixture { queue, batches, gate } = fixture(40, 32, 8);
        gate.open();
        let inputs: Vec<Tokens> = (0..6).map(|i| tokens(i, 10)).collect();
        let rows = queue.submit(inputs, Priority::Normal, None).await.unwrap();
        assert_eq!(rows.iter().map(|r| r[1] as i64).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5]);
        assert!(rows.iter().all(|r| r[0] == 10.0));
        // 40 tokens hold four inputs of 10.
        assert_eq!(*batches.lock().unwrap(), vec![4, 2]);
    }

    #[tokio::test]
    async fn waiting_requests_share_a_batch() {
        let Fixture { queue, batches, gate } = fixture(1000, 32, 8);
        // The worker waits on its first batch while three more requests queue.
        let first = tokio::spawn({
            let queue = queue.clone();
            async move { queue.submit(vec![tokens(100, 3)], Priority::Normal, None).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let others: Vec<_> = (0..3)
            .map(|i| {
                let queue = queue.clone();
                tokio::spawn(async move { queue.submit(vec![tokens(i, 2 + i as usize)], Priority::Normal, None).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.open();
        assert_eq!(first.await.unwrap().unwrap(), vec![vec![3.0, 100.0]]);
        for (i, other) in others.into_iter().enumerate() {
            assert_eq!(other.await.unwrap().unwrap(), vec![vec![2.0 + i as f32, i as f32]]);
        }
        assert_eq!(*batches.lock().unwrap(), vec![1, 3], "the three waiting requests ran as one batch");
    }

    #[tokio::test]
    async fn full_queue_refuses_and_expired_requests_leave() {
        let Fixture { queue, batches, gate } = fixture(1000, 32, 1);
        let running = tokio::spawn({
            let queue = queue.clone();
            async move { queue.submit(vec![tokens(1, 2)], Priority::Normal, None).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let deadline = Some(Instant::now() + Duration::from_millis(30));
        let expiring = tokio::spawn({
            let queue = queue.clone();
            async move { queue.submit(vec![tokens(2, 2)], Priority::Normal, deadline).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let refused = queue.submit(vec![tokens(3, 2)], Priority::Normal, None).await.unwrap_err();
        assert_eq!(refused.kind, ErrorKind::QueueFull);
        assert_eq!(expiring.await.unwrap().unwrap_err().kind, ErrorKind::DeadlineExceeded);
        gate.open();
        assert!(running.await.unwrap().is_ok());
        assert_eq!(*batches.lock().unwrap(), vec![1], "the expired request never ran");
        assert!(queue.submit(Vec::new(), Priority::Normal, None).await.unwrap().is_empty());
        queue.close();
        assert_eq!(
            queue.submit(vec![tokens(4, 2)], Priority::Normal, None).await.unwrap_err().kind,
            ErrorKind::Unavailable
        );
    }
}

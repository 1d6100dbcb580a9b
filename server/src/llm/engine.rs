//! The generation engine of one LLM: a bounded waiting queue and one
//! dedicated thread that runs continuous batching on the model's
//! [`Decoder`] (whose runs block, so they stay off the async runtime).
//! Scheduling only: the forward pass and the cache layout are `runtime`'s.
//!
//! Each iteration of the thread:
//! 1. drops sequences whose client went away (their receiver is closed),
//!    waiting or running;
//! 2. admits waiting requests, first come first served, while the batch has
//!    room, its worst-case KV memory fits the budget ([`KvBudget`]), and up
//!    to a prompt-token budget, and prefills each (in chunks), sending its
//!    first token at once; a request whose memory does not fit yet waits
//!    (in the bounded queue, counted in `ferrite_queue_depth`);
//! 3. rebuilds the batch cache if a sequence joined or left (`cache`);
//! 4. runs one decode step for every running sequence, feeding the previous
//!    step's `present.*` back as `past_key_values.*`, and sends each
//!    sequence's new text on its own channel.
//!
//! No request waits for another to finish: a new one joins at the next
//! step, a finished one leaves at the next step.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::admission::Admission;
use crate::error::{InferError, InferResult};
use crate::inference::Priority;
use crate::llm::limits::KvBudget;
use crate::llm::request::{Event, FinishReason, GenerateRequest, Usage};
use crate::llm::sampling::Sampler;
use crate::llm::stop::{Scanned, StopMatcher};
use crate::llm::tokenizer::{IncrementalDecoder, TextCodec};
use crate::metrics::{ModelMetrics, METRICS};
use crate::runtime::decoder::Decoder;
use crate::runtime::kv_cache::{decode_mask, BatchCache, RowSource};
use crate::runtime::RunTimings;
use crate::stats::ModelStats;

/// Limits of one engine.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EngineSettings {
    /// Sequences decoded together at most.
    pub max_running: usize,
    /// Requests that may wait to join; more are refused (queue full).
    pub max_waiting: usize,
    /// Longest piece of a prompt prefilled in one run (bounds the memory of
    /// the attention scores for long prompts).
    pub prefill_chunk: usize,
    /// Prompt tokens prefilled per iteration while others decode (at least
    /// one request is always admitted), so running streams are not stalled.
    pub prefill_budget: usize,
    /// Memory for the batch's KV cache; requests wait until theirs fits.
    pub kv: KvBudget,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            max_running: 32,
            max_waiting: 1024,
            prefill_chunk: 512,
            prefill_budget: 512,
            kv: KvBudget { bytes_per_token: 1, budget: u64::MAX },
        }
    }
}

/// The rows of the batch cache as admission sees them.
#[derive(Debug, Clone, Copy, Default)]
struct Occupancy {
    /// Sequences still generating.
    live: usize,
    /// Rows in the cache (finished rows riding along count until rebuilt).
    rows: usize,
    /// The most tokens any row may reach.
    longest: usize,
}

/// What the engine thread takes from the queue.
struct Admitted {
    pending: Vec<Pending>,
    /// The next request waits for KV memory.
    blocked: bool,
}

/// What the engine needs to know about the model.
pub(crate) struct EngineModel {
    pub name: String,
    pub context_length: usize,
    pub eos_token_ids: Vec<u32>,
    pub codec: Arc<TextCodec>,
    pub stats: Arc<ModelStats>,
}

struct Pending {
    request: GenerateRequest,
    events: UnboundedSender<Event>,
    enqueued: Instant,
}

/// The metrics every backend keeps, and the LLM's own; resolved once.
struct EngineMetrics {
    model: ModelMetrics,
    waiting: IntGauge,
    running: IntGauge,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    prompt_tokens: IntCounter,
    generated_tokens: IntCounter,
}

impl EngineMetrics {
    fn new(model: &str) -> EngineMetrics {
        let m = &*METRICS;
        EngineMetrics {
            model: ModelMetrics::new(model),
            waiting: m.llm_waiting.with_label_values(&[model]),
            running: m.llm_running.with_label_values(&[model]),
            time_to_first_token: m.llm_time_to_first_token.with_label_values(&[model]),
            inter_token_latency: m.llm_inter_token_latency.with_label_values(&[model]),
            prompt_tokens: m.llm_prompt_tokens.with_label_values(&[model]),
            generated_tokens: m.llm_generated_tokens.with_label_values(&[model]),
        }
    }

    fn set_running(&self, n: usize) {
        self.running.set(n as i64);
        self.model.inflight.set(n as i64);
    }
}

struct Shared {
    queue: Mutex<Admission<Pending>>,
    wake: Condvar,
    settings: EngineSettings,
    metrics: EngineMetrics,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Admission<Pending>> {
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Blocks until there is work; returns the requests to admit now, or
    /// `None` once closed and drained. A request is admitted only when the
    /// batch with it still fits the KV budget; it waits otherwise, and the
    /// ones behind it too (first come, first served: a long request is not
    /// passed over forever). The first request always fits an empty batch
    /// (`Engine::submit` refuses one that never could).
    fn take(&self, batch: Occupancy) -> Option<Admitted> {
        let mut queue = self.lock();
        loop {
            queue.retain(|p| !p.events.is_closed());
            self.metrics.waiting.set(queue.len() as i64);
            if batch.live > 0 || !queue.is_empty() {
                break;
            }
            if queue.is_closed() {
                return None;
            }
            queue = self.wake.wait(queue).unwrap_or_else(|p| p.into_inner());
        }
        let mut admitted = Admitted { pending: Vec::new(), blocked: false };
        let (mut rows, mut longest) = if batch.live == 0 { (0, 0) } else { (batch.rows, batch.longest) };
        let mut tokens = 0;
        while batch.live + admitted.pending.len() < self.settings.max_running {
            let Some(next) = queue.front() else { break };
            let len = next.request.prompt.len();
            if !admitted.pending.is_empty() && tokens + len > self.settings.prefill_budget {
                break;
            }
            let reach = longest.max(next.request.reach());
            if !self.settings.kv.fits(rows + 1, reach) {
                admitted.blocked = true;
                break;
            }
            (rows, longest) = (rows + 1, reach);
            tokens += len;
            admitted.pending.extend(queue.pop_front());
        }
        self.metrics.waiting.set(queue.len() as i64);
        Some(admitted)
    }
}

/// The handle the model holds: admits requests, stops the thread.
pub(crate) struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts the engine thread.
    pub(crate) fn start(decoder: Decoder, model: EngineModel, settings: EngineSettings) -> anyhow::Result<Engine> {
        let depth = METRICS.queue_depth.with_label_values(&[&model.name]);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Admission::new(settings.max_waiting, depth)),
            wake: Condvar::new(),
            settings,
            metrics: EngineMetrics::new(&model.name),
        });
        shared.metrics.waiting.set(0);
        shared.metrics.set_running(0);
        let worker = Worker { shared: shared.clone(), decoder, model, running: Vec::new(), cache: None };
        std::thread::Builder::new()
            .name(format!("ferrite-llm-{}", worker.model.name))
            .spawn(move || worker.run())
            .map_err(|e| anyhow::anyhow!("cannot start the engine thread: {e}"))?;
        Ok(Engine { shared })
    }

    /// Queues a request; its events arrive on the returned channel. Dropping
    /// the receiver cancels the request (it leaves the queue or the batch at
    /// the engine's next step). A request whose KV memory could never fit
    /// the budget, even alone, is refused.
    pub(crate) fn submit(&self, request: GenerateRequest) -> InferResult<UnboundedReceiver<Event>> {
        self.shared.settings.kv.check_alone(request.prompt.len(), request.max_tokens)?;
        let (events, receiver) = unbounded_channel();
        {
            let mut queue = self.shared.lock();
            queue.admit(Priority::Normal, Pending { request, events, enqueued: Instant::now() })?;
            self.shared.metrics.waiting.set(queue.len() as i64);
        }
        self.shared.wake.notify_all();
        Ok(receiver)
    }

    /// Stops taking requests; admitted ones still finish, then the thread exits.
    pub(crate) fn close(&self) {
        self.shared.lock().close();
        self.shared.wake.notify_all();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.close();
    }
}

/// Whether the batch cache must be rebuilt before the next decode step.
/// Finished rows may ride along (masked work, their output unused) until
/// the next join rebuilds the cache anyway: in steady traffic a replacement
/// arrives within a step, so one rebuild serves both. At most a quarter of
/// the rows may be such passengers, and none once its memory is wanted
/// (`release`: a passenger would outgrow its reservation, or a request
/// waits for KV memory).
fn needs_rebuild(rows: usize, finished: usize, joining: usize, release: bool) -> bool {
    joining > 0 || (finished > 0 && (release || finished == rows || finished * 4 > rows))
}

/// One sequence being generated.
struct Sequence {
    events: UnboundedSender<Event>,
    prompt_len: usize,
    max_tokens: usize,
    /// Most positions this row may hold (its KV reservation).
    reach: usize,
    /// Tokens generated (an end-of-sequence token is not counted).
    generated: usize,
    /// Positions in the cache.
    len: usize,
    /// The token to feed at the next step.
    last_token: u32,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    ignore_eos: bool,
    enqueued: Instant,
    last_token_at: Option<Instant>,
    finished: bool,
}

impl Sequence {
    fn usage(&self) -> Usage {
        Usage { prompt_tokens: self.prompt_len, completion_tokens: self.generated }
    }

    fn finish(&mut self, text: String, finish_reason: FinishReason) {
        let usage = self.usage();
        let _ = self.events.send(Event::Done { text, finish_reason, usage });
        self.finished = true;
    }

    fn fail(&mut self, error: InferError) {
        let _ = self.events.send(Event::Error(error));
        self.finished = true;
    }
}

struct Worker {
    shared: Arc<Shared>,
    decoder: Decoder,
    model: EngineModel,
    /// In the order of the cache's rows.
    running: Vec<Sequence>,
    cache: Option<BatchCache>,
}

impl Worker {
    /// Sequences still generating (finished rows may wait in the batch
    /// for the next rebuild; they hold no slot).
    fn live(&self) -> usize {
        self.running.iter().filter(|s| !s.finished).count()
    }

    fn occupancy(&self) -> Occupancy {
        Occupancy {
            live: self.live(),
            rows: self.running.len(),
            longest: self.running.iter().map(|s| s.reach).max().unwrap_or(0),
        }
    }

    fn run(mut self) {
        while let Some(admitted) = self.shared.take(self.occupancy()) {
            let result = catch_unwind(AssertUnwindSafe(|| self.iterate(admitted)))
                .unwrap_or_else(|_| Err(InferError::internal("the LLM engine panicked")));
            if let Err(error) = result {
                tracing::error!(model = %self.model.name, %error, "generation step failed");
                for sequence in &mut self.running {
                    sequence.fail(error.clone());
                }
                self.running.clear();
                self.cache = None;
            }
            self.shared.metrics.set_running(self.live());
        }
        self.shared.metrics.set_running(0);
    }

    fn iterate(&mut self, admitted: Admitted) -> InferResult<()> {
        for sequence in &mut self.running {
            if sequence.events.is_closed() {
                sequence.finished = true;
            }
        }
        let mut joiners = Vec::new();
        for pending in admitted.pending {
            if pending.events.is_closed() {
                continue;
            }
            let waited = pending.enqueued.elapsed();
            self.shared.metrics.model.queue_duration.observe(waited.as_secs_f64());
            // A failed prefill fails its own request only.
            let events = pending.events.clone();
            match self.prefill(pending, waited) {
                Ok(Some(joiner)) => joiners.push(joiner),
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(model = %self.model.name, %error, "prefill failed");
                    let _ = events.send(Event::Error(error));
                }
            }
        }
        let done = self.running.iter().filter(|s| s.finished).count();
        // The next step writes position `len`: a passenger must not outgrow
        // the memory admission counted for it.
        let outgrown = self.running.iter().any(|s| s.finished && s.len + 1 >= s.reach);
        if needs_rebuild(self.running.len(), done, joiners.len(), outgrown || admitted.blocked) {
            self.rebuild(joiners)?;
        }
        self.shared.metrics.set_running(self.live());
        if !self.running.is_empty() {
            self.decode_step()?;
        }
        if self.live() == 0 {
            // Idle: give the cache's memory back now.
            self.running.clear();
            self.cache = None;
        }
        Ok(())
    }

    /// Prefills a prompt in chunks and handles its first token. Returns the
    /// sequence and its cache, or `None` if it already finished.
    fn prefill(&mut self, pending: Pending, waited: Duration) -> InferResult<Option<(Sequence, BatchCache)>> {
        let started = Instant::now();
        let Pending { request, events, enqueued } = pending;
        let prompt = &request.prompt;
        let mut cache = BatchCache::empty(self.decoder.shape(), 1)?;
        for chunk in prompt.chunks(self.shared.settings.prefill_chunk.max(1)) {
            let past = cache.past;
            let ids = chunk.iter().map(|&t| t as i64).collect();
            let mask = vec![1i64; past + chunk.len()];
            let positions = (past..past + chunk.len()).map(|p| p as i64).collect();
            let (logits, next) = self.decoder.forward(ids, mask, positions, cache)?;
            cache = next;
            if cache.past == prompt.len() {
                let mut sampler = Sampler::new(request.sampling, prompt).constrained(request.grammar.as_ref());
                let first = sampler.sample(logits.data()?);
                let mut sequence = Sequence {
                    events: events.clone(),
                    prompt_len: prompt.len(),
                    max_tokens: request.max_tokens,
                    reach: request.reach(),
                    generated: 0,
                    len: prompt.len(),
                    last_token: first,
                    sampler,
                    decoder: IncrementalDecoder::default(),
                    stop: StopMatcher::new(request.stop.clone()),
                    ignore_eos: request.ignore_eos,
                    enqueued,
                    last_token_at: None,
                    finished: false,
                };
                let compute = started.elapsed();
                self.record(1, waited, compute);
                self.shared.metrics.prompt_tokens.inc_by(prompt.len() as u64);
                self.accept(&mut sequence, first);
                return Ok((!sequence.finished).then_some((sequence, cache)));
            }
        }
        Err(InferError::internal("empty prompt reached the engine"))
    }

    /// Applies membership changes to the batch cache: finished sequences
    /// leave, `joiners` come in.
    fn rebuild(&mut self, joiners: Vec<(Sequence, BatchCache)>) -> InferResult<()> {
        let old = self.cache.take();
        let mut rows = Vec::new();
        let mut members = Vec::new();
        for (i, sequence) in std::mem::take(&mut self.running).into_iter().enumerate() {
            if !sequence.finished {
                rows.push(RowSource { source: 0, row: i, len: sequence.len });
                members.push(sequence);
            }
        }
        let base = usize::from(old.is_some());
        let (sequences, caches): (Vec<Sequence>, Vec<BatchCache>) = joiners.into_iter().unzip();
        for (k, sequence) in sequences.into_iter().enumerate() {
            rows.push(RowSource { source: base + k, row: 0, len: sequence.len });
            members.push(sequence);
        }
        self.running = members;
        if rows.is_empty() {
            return Ok(());
        }
        // A lone newcomer's prefill cache is already the batch cache.
        if rows.len() == 1 && rows[0].source == base && caches.len() == 1 {
            self.cache = caches.into_iter().next();
            return Ok(());
        }
        let sources: Vec<&BatchCache> = old.iter().chain(caches.iter()).collect();
        self.cache = Some(BatchCache::gather(self.decoder.shape(), &sources, &rows)?);
        Ok(())
    }

    /// One decode step for every running sequence.
    fn decode_step(&mut self) -> InferResult<()> {
        let started = Instant::now();
        let cache = self.cache.take().ok_or_else(|| InferError::internal("decode batch without a cache"))?;
        let past = cache.past;
        let ids = self.running.iter().map(|s| s.last_token as i64).collect();
        let positions = self.running.iter().map(|s| s.len as i64).collect();
        let mut mask = Vec::new();
        decode_mask(self.running.iter().map(|s| s.len), past, &mut mask);
        let (logits, cache) = self.decoder.forward(ids, mask, positions, cache)?;
        self.cache = Some(cache);
        let data = logits.data()?;
        let rows = self.running.len();
        let vocab = data.len() / rows;
        let live = self.live();
        let mut running = std::mem::take(&mut self.running);
        for (b, sequence) in running.iter_mut().enumerate() {
            sequence.len += 1;
            if sequence.finished {
                continue;
            }
            let token = sequence.sampler.sample(&data[b * vocab..(b + 1) * vocab]);
            self.accept(sequence, token);
        }
        self.running = running;
        self.record(live, Duration::ZERO, started.elapsed());
        Ok(())
    }

    /// Takes a sampled token: counts it, turns it into text, checks the end
    /// conditions and sends what the client may see.
    fn accept(&self, sequence: &mut Sequence, token: u32) {
        let metrics = &self.shared.metrics;
        let now = Instant::now();
        match sequence.last_token_at {
            None => metrics.time_to_first_token.observe((now - sequence.enqueued).as_secs_f64()),
            Some(previous) => metrics.inter_token_latency.observe((now - previous).as_secs_f64()),
        }
        sequence.last_token_at = Some(now);
        metrics.generated_tokens.inc();
        sequence.last_token = token;
        if !sequence.ignore_eos && self.model.eos_token_ids.contains(&token) {
            let text = sequence.stop.flush();
            sequence.finish(text, FinishReason::Stop);
            return;
        }
        sequence.generated += 1;
        sequence.sampler.observe(token);
        let codec = &self.model.codec;
        let text = sequence.decoder.push(|ids| codec.decode(ids), token);
        let scanned = if text.is_empty() { Scanned { text, stopped: false } } else { sequence.stop.push(&text) };
        if scanned.stopped {
            sequence.finish(scanned.text, FinishReason::Stop);
            return;
        }
        // The next step would feed this token at position `len`.
        if sequence.generated >= sequence.max_tokens || sequence.len >= self.model.context_length {
            let text = scanned.text + &sequence.stop.flush();
            sequence.finish(text, FinishReason::Length);
            return;
        }
        if !scanned.text.is_empty() && sequence.events.send(Event::Text(scanned.text)).is_err() {
            sequence.finished = true;
        }
    }

    fn record(&self, rows: usize, waited: Duration, compute: Duration) {
        let metrics = &self.shared.metrics;
        metrics.model.compute_duration.observe(compute.as_secs_f64());
        metrics.model.batch_size.observe(rows as f64);
        self.model.stats.record_batch(rows, waited, RunTimings { infer: compute, ..RunTimings::default() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuild_on_joins_and_on_many_leaves() {
        assert!(!needs_rebuild(8, 0, 0, false), "nothing changed");
        assert!(needs_rebuild(8, 0, 1, false), "a join");
        assert!(!needs_rebuild(8, 2, 0, false), "two of eight finished: they ride along");
        assert!(needs_rebuild(8, 2, 0, true), "unless their memory is wanted");
        assert!(!needs_rebuild(8, 0, 0, true), "no passenger to drop");
        assert!(needs_rebuild(8, 3, 0, false), "more than a quarter finished");
        assert!(needs_rebuild(1, 1, 0, false), "everyone finished");
        assert!(needs_rebuild(2, 1, 0, false));
        assert!(!needs_rebuild(0, 0, 0, false));
    }
}

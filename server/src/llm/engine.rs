//! The generation engine of one LLM: a bounded waiting queue and one
//! dedicated thread that runs continuous batching on the model's
//! [`Decoder`] (whose runs block, so they stay off the async runtime).
//! Scheduling only: the forward pass and the cache layout are `runtime`'s;
//! the decisions themselves are pure functions in [`schedule`].
//!
//! Each iteration of the thread:
//! 1. drops sequences whose client went away (their receiver is closed),
//!    waiting, prefilling or running;
//! 2. sizes this iteration's prefill: a whole chunk when nothing decodes,
//!    otherwise the prompt tokens that cost about one decode step (measured:
//!    moving averages of the decode step and of a prefilled token);
//! 3. runs at most one prefill forward: the next piece of a prompt already
//!    under way (its one-row cache is kept across iterations), or, when none
//!    is, the new arrivals (first come, first served, within the slots, the
//!    KV memory ([`KvBudget`]) and the token budget) together, left-padded in
//!    one batch; a prompt longer than the budget is prefilled alone in
//!    pieces. While arrivals wait behind a prompt under way, iterations
//!    alternate between its pieces and the arrivals that fit the budget.
//!    The first token is sampled when a prompt's last piece is done;
//!    requests not taken yet stay in the bounded queue (`ferrite_queue_depth`);
//! 4. places each newly prefilled sequence in a decode group: rows of
//!    similar length share one left-padded cache, so a long prompt does not
//!    make every short row copy and attend over its length
//!    ([`schedule::choose_group`]); rebuilds the groups whose rows changed;
//! 5. runs one decode step per group, feeding each step's `present.*` back
//!    as `past_key_values.*`, and sends each sequence's new text on its own
//!    channel.
//!
//! No request waits for another to finish, and a long prompt delays the
//! running streams by about one decode step per iteration, not by its whole
//! prefill.
//!
//! With a prefix cache ([`PrefixCache`]), a prompt starts after the longest
//! cached prefix of its blocks (prefilled alone, in pieces, from there) and
//! its blocks are cached as soon as its first token is out (a second request
//! with the same prompt, e.g. OpenAI `n` > 1, admitted next already hits); a
//! sequence that finishes caches its prompt and answer too (the next turn of
//! a chat resends both).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::admission::Admission;
use crate::error::{InferError, InferResult};
use crate::inference::Priority;
use crate::llm::limits::{kv_bytes_per_token, KvBudget};
use crate::llm::logprobs::{step_logprobs, StepLogprobs};
use crate::llm::prefix_cache::{PrefixCache, BLOCK_TOKENS};
use crate::llm::request::{Event, FinishReason, GenerateRequest, TokenLogprob, Usage};
use crate::llm::sampling::Sampler;
use crate::llm::schedule::{self, Ewma, GroupShape, Occupancy, Prefilling, Waiting};
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
    /// Most prompt tokens (padded) prefilled in one forward: bounds the
    /// memory of the attention scores for long prompts. While others
    /// decode, pieces are smaller (about one decode step's cost).
    pub prefill_chunk: usize,
    /// Memory for the batch's KV cache; requests wait until theirs fits.
    pub kv: KvBudget,
    /// Bytes of the prefix cache; 0: off.
    pub prefix_cache_bytes: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            max_running: 32,
            max_waiting: 1024,
            prefill_chunk: 512,
            kv: KvBudget { bytes_per_token: 1, budget: u64::MAX },
            prefix_cache_bytes: 0,
        }
    }
}

/// What the engine thread takes from the queue.
struct Admitted {
    /// New arrivals to prefill now.
    pending: Vec<Pending>,
    /// The next request waits for KV memory.
    blocked: bool,
    /// Prompt tokens (padded) this iteration may prefill.
    budget: usize,
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
    prefix_hit_tokens: IntCounter,
    prefix_miss_tokens: IntCounter,
    prefix_evictions: IntCounter,
    prefix_bytes: IntGauge,
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
            prefix_hit_tokens: m.llm_prefix_hit_tokens.with_label_values(&[model]),
            prefix_miss_tokens: m.llm_prefix_miss_tokens.with_label_values(&[model]),
            prefix_evictions: m.llm_prefix_evictions.with_label_values(&[model]),
            prefix_bytes: m.llm_prefix_bytes.with_label_values(&[model]),
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

    /// Blocks until there is work; returns the requests whose prefill
    /// starts now ([`schedule::admit`]), or `None` once closed and drained.
    /// A request that does not fit the KV memory yet waits, and the ones
    /// behind it too (first come, first served: a long request is not
    /// passed over forever).
    fn take(&self, occupancy: Occupancy, budget: usize) -> Option<Admitted> {
        let mut queue = self.lock();
        loop {
            queue.retain(|p| !p.events.is_closed());
            self.metrics.waiting.set(queue.len() as i64);
            if occupancy.live > 0 || !queue.is_empty() {
                break;
            }
            if queue.is_closed() {
                return None;
            }
            queue = self.wake.wait(queue).unwrap_or_else(|p| p.into_inner());
        }
        let waiting = queue.iter().map(|p| Waiting { prompt: p.request.prompt.len(), reach: p.request.reach() });
        let plan = schedule::admit(waiting, occupancy, self.settings.max_running, self.settings.kv.slots(), budget);
        let pending = (0..plan.take).filter_map(|_| queue.pop_front()).collect();
        self.metrics.waiting.set(queue.len() as i64);
        Some(Admitted { pending, blocked: plan.blocked, budget })
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
        shared.metrics.prefix_bytes.set(0);
        let worker = Worker {
            shared: shared.clone(),
            decoder,
            model,
            groups: Vec::new(),
            prefills: VecDeque::new(),
            step_time: Ewma::default(),
            token_time: Ewma::default(),
            arrivals_turn: false,
            prefix: (settings.prefix_cache_bytes > 0).then(|| PrefixCache::new(settings.prefix_cache_bytes)),
        };
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
    /// Prompt tokens whose KV came from the prefix cache.
    cached: usize,
    /// The tokens whose KV the cache holds (prompt, then each token fed).
    tokens: Vec<u32>,
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
    /// Alternatives per token when log-probabilities are asked for.
    top_logprobs: Option<usize>,
    /// Entries of tokens whose text is not sent yet.
    logprobs: Vec<TokenLogprob>,
}

impl Sequence {
    fn usage(&self) -> Usage {
        Usage { prompt_tokens: self.prompt_len, completion_tokens: self.generated, cached_tokens: self.cached }
    }

    fn finish(&mut self, text: String, finish_reason: FinishReason) {
        let usage = self.usage();
        let logprobs = std::mem::take(&mut self.logprobs);
        let _ = self.events.send(Event::Done { text, logprobs, finish_reason, usage });
        self.finished = true;
    }

    fn fail(&mut self, error: InferError) {
        let _ = self.events.send(Event::Error(error));
        self.finished = true;
    }
}

/// Sequences decoded together: one left-padded cache, one forward per step.
#[derive(Default)]
struct Group {
    /// In the order of the cache's rows.
    running: Vec<Sequence>,
    cache: Option<BatchCache>,
}

impl Group {
    fn live(&self) -> usize {
        self.running.iter().filter(|s| !s.finished).count()
    }

    /// Padded KV slots the group may grow to (finished rows riding along
    /// count until the group is rebuilt).
    fn slots(&self) -> u64 {
        self.running.len() as u64 * self.running.iter().map(|s| s.reach as u64).max().unwrap_or(0)
    }
}

/// The shape of a group after its next rebuild: its live rows and the
/// sequences about to join it.
fn next_shape<'a>(members: impl Iterator<Item = &'a Sequence>) -> GroupShape {
    let mut shape = GroupShape { rows: 0, longest_len: 0, total_len: 0, longest_reach: 0 };
    for s in members.filter(|s| !s.finished) {
        shape = shape.with(s.len, s.reach);
    }
    shape
}

/// An admitted request before its first token.
struct Job {
    request: GenerateRequest,
    events: UnboundedSender<Event>,
    enqueued: Instant,
    waited: Duration,
    /// Time spent prefilling it so far.
    compute: Duration,
    /// Prompt tokens taken from the prefix cache.
    cached: usize,
}

/// A prompt prefilled in pieces across iterations: its one-row cache holds
/// the positions done (`cache.past`).
struct Prefill {
    job: Job,
    cache: BatchCache,
}

/// Sequences whose prefill finished in this iteration, with the caches
/// their rows are in (row `row` of `caches[source]`).
#[derive(Default)]
struct Joiners {
    caches: Vec<Option<BatchCache>>,
    members: Vec<(Sequence, usize, usize)>,
}

struct Worker {
    shared: Arc<Shared>,
    decoder: Decoder,
    model: EngineModel,
    groups: Vec<Group>,
    /// Prompts under way, the front one prefilled next.
    prefills: VecDeque<Prefill>,
    /// Seconds of one iteration's decode steps (all groups).
    step_time: Ewma,
    /// Seconds per prefilled (padded) prompt token.
    token_time: Ewma,
    /// While a prompt is prefilled in pieces, the iterations alternate
    /// between its pieces and short new arrivals.
    arrivals_turn: bool,
    /// KV blocks of prompts seen; `None` when off.
    prefix: Option<PrefixCache>,
}

impl Worker {
    /// Sequences generating or being prefilled (finished rows may wait in
    /// a group for its next rebuild; they hold no slot).
    fn live(&self) -> usize {
        self.groups.iter().map(Group::live).sum::<usize>() + self.prefills.len()
    }

    fn occupancy(&self) -> Occupancy {
        let reserved: u64 = self.prefills.iter().map(|p| schedule::reservation(p.job.request.reach())).sum();
        let reaches = || {
            let grouped = self.groups.iter().flat_map(|g| g.running.iter().map(|s| s.reach));
            grouped.chain(self.prefills.iter().map(|p| p.job.request.reach()))
        };
        Occupancy {
            live: self.live(),
            slots: self.groups.iter().map(Group::slots).sum::<u64>() + reserved,
            rows: reaches().count(),
            longest_reach: reaches().max().unwrap_or(0),
            prefilling: match (self.prefills.is_empty(), self.arrivals_turn) {
                (true, _) => Prefilling::No,
                (false, false) => Prefilling::PieceTurn,
                (false, true) => Prefilling::ArrivalsTurn,
            },
        }
    }

    fn fail_all(&mut self, error: &InferError) {
        for group in &mut self.groups {
            for sequence in &mut group.running {
                sequence.fail(error.clone());
            }
        }
        for prefill in &self.prefills {
            let _ = prefill.job.events.send(Event::Error(error.clone()));
        }
        self.groups.clear();
        self.prefills.clear();
    }

    fn run(mut self) {
        loop {
            let decoding = self.groups.iter().any(|g| g.live() > 0);
            let budget = schedule::piece_budget(
                self.shared.settings.prefill_chunk,
                decoding,
                self.step_time.get(),
                self.token_time.get(),
            );
            let Some(admitted) = self.shared.take(self.occupancy(), budget) else { break };
            let result = catch_unwind(AssertUnwindSafe(|| self.iterate(admitted)))
                .unwrap_or_else(|_| Err(InferError::internal("the LLM engine panicked")));
            if let Err(error) = result {
                tracing::error!(model = %self.model.name, %error, "generation step failed");
                self.fail_all(&error);
            }
            self.arrivals_turn = !self.prefills.is_empty() && !self.arrivals_turn;
            self.shared.metrics.set_running(self.live());
        }
        self.shared.metrics.set_running(0);
    }

    fn iterate(&mut self, admitted: Admitted) -> InferResult<()> {
        for group in &mut self.groups {
            for sequence in &mut group.running {
                if sequence.events.is_closed() {
                    sequence.finished = true;
                }
            }
        }
        self.prefills.retain(|p| !p.job.events.is_closed());
        let mut joiners = Joiners::default();
        // At most one prefill forward per iteration.
        if !self.start(admitted.pending, admitted.budget, &mut joiners) {
            if let Some(prefill) = self.prefills.pop_front() {
                let events = prefill.job.events.clone();
                if let Err(error) = self.prefill_piece(prefill, admitted.budget, &mut joiners) {
                    tracing::error!(model = %self.model.name, %error, "prefill failed");
                    let _ = events.send(Event::Error(error));
                }
            }
        }
        self.shared.metrics.set_running(self.live());
        let mut groups = std::mem::take(&mut self.groups);
        let result = self.step_groups(&mut groups, joiners, admitted.blocked);
        // Idle groups give their cache's memory back now.
        groups.retain(|g| g.live() > 0);
        self.groups = groups;
        if let Some(stepped) = result? {
            self.step_time.observe(stepped.as_secs_f64());
        }
        Ok(())
    }

    /// Starts the prefill of new arrivals: those without a cached prefix
    /// and short enough are prefilled together now; the others are queued
    /// to be prefilled alone, in pieces. A failed prefill fails its own
    /// requests only. Returns whether a forward ran.
    fn start(&mut self, pending: Vec<Pending>, budget: usize, joiners: &mut Joiners) -> bool {
        let mut batch = Vec::new();
        for Pending { request, events, enqueued } in pending {
            if events.is_closed() {
                continue;
            }
            if request.prompt.is_empty() {
                let _ = events.send(Event::Error(InferError::internal("empty prompt reached the engine")));
                continue;
            }
            let waited = enqueued.elapsed();
            self.shared.metrics.model.queue_duration.observe(waited.as_secs_f64());
            let mut job = Job { request, events, enqueued, waited, compute: Duration::ZERO, cached: 0 };
            // A prefix hit (less than the whole prompt: its last token is
            // always computed, for the logits) is prefilled alone from there,
            // never in the batch.
            let cached = self.cached_prefix(&job.request.prompt);
            if let Ok(Some((cache, cached))) = cached {
                job.cached = cached;
                self.prefills.push_back(Prefill { job, cache });
                continue;
            }
            if let Err(error) = cached {
                let _ = job.events.send(Event::Error(error));
                continue;
            }
            // The twin of a prompt in this batch (OpenAI `n` > 1) waits for
            // its blocks: prefilled alone, it looks the prefix up again.
            let twin = self.prefix.is_some() && batch.iter().any(|j: &Job| j.request.prompt == job.request.prompt);
            if twin || job.request.prompt.len() > budget {
                match BatchCache::empty(self.decoder.shape(), 1) {
                    Ok(cache) => self.prefills.push_back(Prefill { job, cache }),
                    Err(error) => {
                        let _ = job.events.send(Event::Error(error));
                    }
                }
                continue;
            }
            batch.push(job);
        }
        if batch.is_empty() {
            return false;
        }
        let events: Vec<_> = batch.iter().map(|j| j.events.clone()).collect();
        if let Err(error) = self.prefill_batch(batch, joiners) {
            tracing::error!(model = %self.model.name, %error, "prefill failed");
            for events in events {
                let _ = events.send(Event::Error(error.clone()));
            }
        }
        true
    }

    /// Prefills whole prompts (no cache yet) together in one forward, rows
    /// left-padded to the longest; the mask hides the padding, whose keys
    /// and values are dropped when the rows join their groups.
    fn prefill_batch(&mut self, jobs: Vec<Job>, joiners: &mut Joiners) -> InferResult<()> {
        let started = Instant::now();
        let rows = jobs.len();
        let n = jobs.iter().map(|j| j.request.prompt.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows * n);
        let mut mask = Vec::with_capacity(rows * n);
        let mut positions = Vec::with_capacity(rows * n);
        for job in &jobs {
            let prompt = &job.request.prompt;
            let pad = n - prompt.len();
            ids.extend(std::iter::repeat_n(0, pad).chain(prompt.iter().map(|&t| t as i64)));
            mask.extend(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, prompt.len())));
            positions.extend(std::iter::repeat_n(0, pad).chain(0..prompt.len() as i64));
        }
        let (logits, cache) =
            self.decoder.forward(ids, mask, positions, BatchCache::empty(self.decoder.shape(), rows)?)?;
        let compute = started.elapsed();
        self.token_time.observe(compute.as_secs_f64() / (rows * n).max(1) as f64);
        let data = logits.data()?;
        let vocab = data.len() / rows.max(1);
        let waited = jobs.iter().map(|j| j.waited).max().unwrap_or_default();
        self.record(rows, waited, compute);
        let source = joiners.caches.len();
        for (b, mut job) in jobs.into_iter().enumerate() {
            job.compute = compute;
            let prompt = job.request.prompt.clone();
            if let Some(sequence) = self.first_token(job, &data[b * vocab..(b + 1) * vocab]) {
                joiners.members.push((sequence, source, b));
            }
            // After the first token went out (row `b`: its last
            // `prompt.len()` positions).
            self.cache_blocks(&prompt, &cache, b);
        }
        joiners.caches.push(Some(cache));
        Ok(())
    }

    /// Prefills the next piece (at most `budget` tokens) of a prompt under
    /// way; after its last piece, samples its first token.
    fn prefill_piece(&mut self, prefill: Prefill, budget: usize, joiners: &mut Joiners) -> InferResult<()> {
        let started = Instant::now();
        let Prefill { mut job, mut cache } = prefill;
        if cache.past == 0 {
            // A twin or an earlier prompt may have cached blocks since.
            if let Some((hit, cached)) = self.cached_prefix(&job.request.prompt)? {
                (cache, job.cached) = (hit, cached);
            }
        }
        let prompt = &job.request.prompt;
        let past = cache.past;
        let piece = &prompt[past..prompt.len().min(past + budget.max(1))];
        let ids = piece.iter().map(|&t| t as i64).collect();
        let mask = vec![1i64; past + piece.len()];
        let positions = (past..past + piece.len()).map(|p| p as i64).collect();
        let (logits, cache) = self.decoder.forward(ids, mask, positions, cache)?;
        let elapsed = started.elapsed();
        self.token_time.observe(elapsed.as_secs_f64() / piece.len().max(1) as f64);
        job.compute += elapsed;
        if cache.past < prompt.len() {
            self.prefills.push_front(Prefill { job, cache });
            return Ok(());
        }
        self.record(1, job.waited, job.compute);
        let prompt = job.request.prompt.clone();
        if let Some(sequence) = self.first_token(job, logits.data()?) {
            joiners.members.push((sequence, joiners.caches.len(), 0));
        }
        self.cache_blocks(&prompt, &cache, 0);
        joiners.caches.push(Some(cache));
        Ok(())
    }

    /// Samples a prefilled prompt's first token from its `logits` and sends
    /// it; returns the sequence, or `None` if it already finished.
    fn first_token(&self, job: Job, logits: &[f32]) -> Option<Sequence> {
        let Job { request, events, enqueued, cached, .. } = job;
        let prompt = &request.prompt;
        let mut sampler = Sampler::new(request.sampling, prompt).constrained(request.grammar.as_ref());
        let first = sampler.sample(logits);
        let logprobs = request.logprobs.map(|top| step_logprobs(logits, first, top));
        let mut sequence = Sequence {
            events,
            prompt_len: prompt.len(),
            cached,
            tokens: prompt.clone(),
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
            top_logprobs: request.logprobs,
            logprobs: Vec::new(),
        };
        let metrics = &self.shared.metrics;
        metrics.prompt_tokens.inc_by(prompt.len() as u64);
        if self.prefix.is_some() {
            metrics.prefix_hit_tokens.inc_by(cached as u64);
            metrics.prefix_miss_tokens.inc_by((prompt.len() - cached) as u64);
        }
        self.accept(&mut sequence, first, logprobs);
        (!sequence.finished).then_some(sequence)
    }

    /// Places the joiners in groups, rebuilds the groups whose rows change
    /// and runs one decode step per group. Returns the time of the decode
    /// steps, if any ran (rebuilds are left out: one join must not inflate
    /// the next prefill pieces).
    fn step_groups(
        &mut self,
        groups: &mut Vec<Group>,
        mut joiners: Joiners,
        blocked: bool,
    ) -> InferResult<Option<Duration>> {
        let mut incoming: Vec<Vec<(Sequence, usize, usize)>> = groups.iter().map(|_| Vec::new()).collect();
        for joiner in std::mem::take(&mut joiners.members) {
            let shapes: Vec<GroupShape> = groups
                .iter()
                .zip(&incoming)
                .map(|(g, new)| next_shape(g.running.iter().chain(new.iter().map(|(s, _, _)| s))))
                .collect();
            match schedule::choose_group(&shapes, joiner.0.len, joiner.0.reach) {
                Some(i) => incoming[i].push(joiner),
                None => {
                    groups.push(Group::default());
                    incoming.push(vec![joiner]);
                }
            }
        }
        let mut stepped = None;
        for (group, new) in groups.iter_mut().zip(incoming) {
            let done = group.running.iter().filter(|s| s.finished).count();
            // The next step writes position `len`: a passenger must not
            // outgrow the memory admission counted for it.
            let outgrown = group.running.iter().any(|s| s.finished && s.len + 1 >= s.reach);
            if needs_rebuild(group.running.len(), done, new.len(), outgrown || blocked) {
                self.rebuild(group, new, &mut joiners.caches)?;
            }
            if group.live() > 0 {
                let started = Instant::now();
                self.decode_step(group)?;
                stepped = Some(stepped.unwrap_or_default() + started.elapsed());
            }
        }
        Ok(stepped)
    }

    /// Applies membership changes to a group's cache: finished sequences
    /// leave, `joiners` (row `row` of `caches[source]`) come in.
    fn rebuild(
        &self,
        group: &mut Group,
        joiners: Vec<(Sequence, usize, usize)>,
        caches: &mut [Option<BatchCache>],
    ) -> InferResult<()> {
        let old = group.cache.take();
        let mut rows = Vec::new();
        let mut members = Vec::new();
        for (i, sequence) in std::mem::take(&mut group.running).into_iter().enumerate() {
            if !sequence.finished {
                rows.push(RowSource { source: 0, row: i, len: sequence.len });
                members.push(sequence);
            }
        }
        // A newly prefilled cache that is exactly the new group (every row of
        // it, no extra padding) becomes its cache without a copy.
        if rows.is_empty() && !joiners.is_empty() {
            let source = joiners[0].1;
            let whole = caches[source].as_ref().is_some_and(|cache| {
                cache.rows == joiners.len()
                    && joiners.iter().enumerate().all(|(b, j)| j.1 == source && j.2 == b)
                    && joiners.iter().map(|j| j.0.len).max() == Some(cache.past)
            });
            if whole {
                group.cache = caches[source].take();
                group.running = joiners.into_iter().map(|j| j.0).collect();
                return Ok(());
            }
        }
        // Sources: the old cache (index 0, if any), then the joiners' caches.
        let base = usize::from(old.is_some());
        let mut used: Vec<usize> = Vec::new();
        for (sequence, source, row) in joiners {
            let at = used.iter().position(|&s| s == source).unwrap_or_else(|| {
                used.push(source);
                used.len() - 1
            });
            rows.push(RowSource { source: base + at, row, len: sequence.len });
            members.push(sequence);
        }
        group.running = members;
        if rows.is_empty() {
            return Ok(());
        }
        let mut sources: Vec<&BatchCache> = old.iter().collect();
        for &source in &used {
            sources
                .push(caches[source].as_ref().ok_or_else(|| InferError::internal("a prefill cache was used twice"))?);
        }
        group.cache = Some(BatchCache::gather(self.decoder.shape(), &sources, &rows)?);
        Ok(())
    }

    /// One decode step for every row of a group.
    fn decode_step(&mut self, group: &mut Group) -> InferResult<()> {
        let started = Instant::now();
        let cache = group.cache.take().ok_or_else(|| InferError::internal("decode batch without a cache"))?;
        let past = cache.past;
        let ids = group.running.iter().map(|s| s.last_token as i64).collect();
        let positions = group.running.iter().map(|s| s.len as i64).collect();
        let mut mask = Vec::new();
        decode_mask(group.running.iter().map(|s| s.len), past, &mut mask);
        let (logits, cache) = self.decoder.forward(ids, mask, positions, cache)?;
        group.cache = Some(cache);
        let data = logits.data()?;
        let rows = group.running.len();
        let vocab = data.len() / rows;
        let live = group.live();
        for (b, sequence) in group.running.iter_mut().enumerate() {
            sequence.len += 1;
            if sequence.finished {
                continue;
            }
            sequence.tokens.push(sequence.last_token);
            let row = &data[b * vocab..(b + 1) * vocab];
            let token = sequence.sampler.sample(row);
            let logprobs = sequence.top_logprobs.map(|top| step_logprobs(row, token, top));
            self.accept(sequence, token, logprobs);
            if sequence.finished {
                // Its row is still in the cache: keep prompt and answer.
                if let Some(cache) = &group.cache {
                    self.cache_blocks(&sequence.tokens, cache, b);
                }
            }
        }
        self.record(live, Duration::ZERO, started.elapsed());
        Ok(())
    }

    /// Takes a sampled token (and its log-probabilities, when asked for):
    /// counts it, turns it into text, checks the end conditions and sends
    /// what the client may see.
    fn accept(&self, sequence: &mut Sequence, token: u32, logprobs: Option<StepLogprobs>) {
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
        if let Some(logprobs) = logprobs {
            sequence.logprobs.push(logprobs.render(codec));
        }
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
        if !scanned.text.is_empty() {
            let logprobs = std::mem::take(&mut sequence.logprobs);
            if sequence.events.send(Event::Text { text: scanned.text, logprobs }).is_err() {
                sequence.finished = true;
            }
        }
    }

    /// The start of a prefill: a one-row cache holding the longest cached
    /// prefix of `prompt`, and its length in tokens; `None` on a miss.
    fn cached_prefix(&mut self, prompt: &[u32]) -> InferResult<Option<(BatchCache, usize)>> {
        let shape = self.decoder.shape();
        let Some(prefix) = self.prefix.as_mut() else { return Ok(None) };
        let blocks = prefix.lookup(prompt);
        let cached = blocks.len() * BLOCK_TOKENS;
        if blocks.is_empty() {
            return Ok(None);
        }
        let views: Vec<&[f32]> = blocks.iter().map(|b| &b[..]).collect();
        Ok(Some((BatchCache::from_blocks(shape, &views, BLOCK_TOKENS)?, cached)))
    }

    /// Caches the whole blocks of `tokens`, the positions of row `row` of
    /// `cache`. A failure costs only the reuse, never the request.
    fn cache_blocks(&mut self, tokens: &[u32], cache: &BatchCache, row: usize) {
        let Some(prefix) = self.prefix.as_mut() else { return };
        let shape = self.decoder.shape();
        let block_bytes = kv_bytes_per_token(shape) * BLOCK_TOKENS as u64;
        let len = tokens.len();
        let inserted = prefix.insert(tokens, block_bytes, |i| {
            let mut blocks = cache.row_blocks(shape, row, len, i, 1, BLOCK_TOKENS)?;
            blocks.pop().ok_or_else(|| InferError::internal("no KV block copied"))
        });
        let metrics = &self.shared.metrics;
        match inserted {
            Ok(done) => metrics.prefix_evictions.inc_by(done.evicted as u64),
            Err(error) => tracing::warn!(model = %self.model.name, %error, "caching KV blocks failed"),
        }
        metrics.prefix_bytes.set(prefix.bytes() as i64);
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

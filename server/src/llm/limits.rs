//! What one client may ask of an LLM, resolved for a loaded model from the
//! server's flags (`config::LlmLimits`), the model and the container.
//!
//! The KV budget is what keeps a pod inside its memory: the engine admits a
//! sequence only when the batch's worst case still fits (see
//! [`KvBudget::cost`]), so no mix of requests can grow the caches past it.
//! The prefix cache's bytes are carved out of the same budget: batch caches
//! and prefix cache together never exceed `--llm-kv-budget-bytes`.

use crate::config::{self, LlmLimits};
use crate::error::{ErrorKind, InferError, InferResult};
use crate::runtime::kv_cache::CacheShape;

/// Memory kept aside from the budget for everything but the KV caches
/// (activations of a prefill chunk, logits, buffers, the allocator's slack):
/// an eighth of the memory limit, at least this much. Measured on
/// SmolLM2-135M (debug build): RSS grew by the budget's count plus 140 MiB
/// with 3 000-token prompts and plus 270 MiB with 4 000-token ones (the
/// attention scores of a 512-token prefill chunk grow with the context).
const MIN_MARGIN_BYTES: u64 = 512 << 20;

/// Copies of the batch cache alive at once: a step's `past` inputs and its
/// `present` outputs (and, while a sequence joins, the old and the rebuilt
/// cache).
const CACHE_COPIES: u64 = 2;

/// Bytes per token assumed for the default prompt cap, when the vocabulary
/// has longer tokens (SmolLM2's longest is 162 bytes of spaces). Text
/// averages 3 to 5 bytes per token; only a prompt of runs of such rare
/// tokens could fit the context with more.
const MAX_BYTES_PER_TOKEN: usize = 16;

/// The prefix cache's default share of the KV budget: an eighth (about 45
/// system prompts of 320 tokens in a 1 GiB budget for SmolLM2-135M), so the
/// batch keeps most of the memory; at most [`MAX_DEFAULT_PREFIX_BYTES`].
const DEFAULT_PREFIX_SHARE: u64 = 8;

/// The default prefix cache, at most (and when the KV budget is unlimited).
const MAX_DEFAULT_PREFIX_BYTES: u64 = 1 << 30;

/// Longest stop string, in bytes. Stop strings are matched against the
/// output after every token, so their length costs engine time for every
/// request in the batch.
pub(crate) const MAX_STOP_BYTES: usize = 256;

/// The limits of one loaded LLM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub max_prompt_bytes: usize,
    pub max_tokens: usize,
    pub allow_ignore_eos: bool,
    /// The batch caches' budget (the prefix cache's bytes taken out).
    pub kv: KvBudget,
    /// Bytes of the prefix cache; 0: off.
    pub prefix_cache_bytes: u64,
}

impl Limits {
    /// Resolves the flags for a model with `context` tokens of context,
    /// whose longest token is `longest_token_bytes` long and whose cache has
    /// `shape`. Call after the model's session is built: the derived KV
    /// budget counts the memory the process holds then.
    pub(crate) fn resolve(flags: &LlmLimits, context: usize, longest_token_bytes: usize, shape: CacheShape) -> Limits {
        let bytes_per_token = kv_bytes_per_token(shape);
        let total = match flags.kv_budget_bytes {
            0 => derived_budget(config::memory_limit(), config::resident_bytes()),
            bytes => bytes,
        };
        let (budget, prefix_cache_bytes) = split_budget(total, flags.prefix_cache_bytes);
        Limits {
            max_prompt_bytes: match flags.max_prompt_bytes {
                0 => context.saturating_mul(longest_token_bytes.min(MAX_BYTES_PER_TOKEN)),
                bytes => bytes,
            },
            max_tokens: match flags.max_tokens {
                0 => context,
                tokens => tokens,
            },
            allow_ignore_eos: flags.allow_ignore_eos,
            kv: KvBudget { bytes_per_token, budget },
            prefix_cache_bytes,
        }
    }
}

/// The KV budget `total` split into the batch's and the prefix cache's:
/// `prefix` as asked (at most half the total), or by default an eighth, at
/// most [`MAX_DEFAULT_PREFIX_BYTES`]. An unlimited total stays unlimited
/// for the batch; the prefix cache is always bounded.
fn split_budget(total: u64, prefix: Option<u64>) -> (u64, u64) {
    let prefix = match prefix {
        Some(bytes) if total == u64::MAX => bytes,
        Some(bytes) => bytes.min(total / 2),
        None if total == u64::MAX => MAX_DEFAULT_PREFIX_BYTES,
        None => (total / DEFAULT_PREFIX_SHARE).min(MAX_DEFAULT_PREFIX_BYTES),
    };
    if total == u64::MAX {
        return (total, prefix);
    }
    (total - prefix, prefix)
}

/// Bytes of key and value cache one token of one sequence takes (f32).
pub(crate) fn kv_bytes_per_token(shape: CacheShape) -> u64 {
    (2 * shape.layers * shape.heads * shape.head_dim * std::mem::size_of::<f32>()) as u64
}

/// The budget left when the process may use `limit` bytes and holds
/// `resident` now; unlimited when the limit is unknown.
fn derived_budget(limit: Option<u64>, resident: Option<u64>) -> u64 {
    let Some(limit) = limit else { return u64::MAX };
    let margin = (limit / 8).max(MIN_MARGIN_BYTES);
    limit.saturating_sub(resident.unwrap_or(0)).saturating_sub(margin)
}

/// The memory the engine may spend on KV caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KvBudget {
    pub bytes_per_token: u64,
    /// Bytes; `u64::MAX` when unlimited.
    pub budget: u64,
}

impl KvBudget {
    /// Peak bytes of a batch of `rows` sequences, the longest of which may
    /// reach `longest` tokens: rows are left-padded to the longest, and
    /// [`CACHE_COPIES`] copies live at once.
    pub(crate) fn cost(&self, rows: usize, longest: usize) -> u64 {
        (rows as u64).saturating_mul(longest as u64).saturating_mul(self.bytes_per_token).saturating_mul(CACHE_COPIES)
    }

    /// Whether such a batch fits.
    pub(crate) fn fits(&self, rows: usize, longest: usize) -> bool {
        self.cost(rows, longest) <= self.budget
    }

    /// Padded token slots the budget holds (see `llm::schedule`): each slot
    /// is a token of one row, in [`CACHE_COPIES`] copies.
    pub(crate) fn slots(&self) -> u64 {
        self.budget / self.bytes_per_token.saturating_mul(CACHE_COPIES).max(1)
    }

    /// Most tokens (prompt and completion) one sequence alone may reach.
    pub(crate) fn max_sequence_tokens(&self) -> usize {
        let per_token = self.bytes_per_token.saturating_mul(CACHE_COPIES).max(1);
        usize::try_from(self.budget / per_token).unwrap_or(usize::MAX)
    }

    /// Refuses a sequence of `tokens` that could never fit, even alone.
    pub(crate) fn check_alone(&self, prompt: usize, max_tokens: usize) -> InferResult<()> {
        let tokens = prompt.saturating_add(max_tokens);
        if self.fits(1, tokens) {
            return Ok(());
        }
        Err(InferError::new(
            ErrorKind::ContextLengthExceeded,
            format!(
                "This request needs up to {} MiB of KV cache ({prompt} prompt tokens + {max_tokens} for the \
                 completion), more than this server's budget of {} MiB allows (at most {} tokens per sequence; \
                 --llm-kv-budget-bytes). Please reduce the prompt or max_tokens.",
                self.cost(1, tokens) >> 20,
                self.budget >> 20,
                self.max_sequence_tokens()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: CacheShape = CacheShape { layers: 30, heads: 3, head_dim: 64 };

    #[test]
    fn smollm2_takes_45_kib_per_token() {
        assert_eq!(kv_bytes_per_token(SMOL), 46_080);
    }

    #[test]
    fn budget_derives_from_the_memory_limit() {
        const GIB: u64 = 1 << 30;
        assert_eq!(derived_budget(Some(2 * GIB), Some(GIB / 2)), 2 * GIB - GIB / 2 - GIB / 2);
        assert_eq!(derived_budget(Some(8 * GIB), Some(GIB)), 8 * GIB - GIB - GIB);
        assert_eq!(derived_budget(Some(GIB), Some(GIB)), 0, "nothing left");
        assert_eq!(derived_budget(Some(GIB), None), GIB - MIN_MARGIN_BYTES);
        assert_eq!(derived_budget(None, Some(GIB)), u64::MAX);
    }

    #[test]
    fn padded_batches_count_their_longest_row() {
        let kv = KvBudget { bytes_per_token: 100, budget: 100_000 };
        assert_eq!(kv.cost(4, 100), 80_000);
        assert!(kv.fits(5, 100));
        assert!(!kv.fits(6, 100));
        assert_eq!(kv.max_sequence_tokens(), 500);
        assert!(kv.check_alone(100, 400).is_ok());
        let err = kv.check_alone(100, 401).unwrap_err();
        assert_eq!(err.kind, ErrorKind::ContextLengthExceeded);
        assert!(err.message.contains("at most 500 tokens"), "{err}");
        let unlimited = KvBudget { bytes_per_token: 100, budget: u64::MAX };
        assert!(unlimited.fits(1 << 20, 1 << 20));
    }

    #[test]
    fn zero_flags_derive_from_the_model() {
        let flags = LlmLimits { kv_budget_bytes: 1 << 30, ..LlmLimits::default() };
        let limits = Limits::resolve(&flags, 8192, 162, SMOL);
        assert_eq!(limits.max_prompt_bytes, 8192 * 16);
        assert_eq!(Limits::resolve(&flags, 8192, 7, SMOL).max_prompt_bytes, 8192 * 7);
        assert_eq!(limits.max_tokens, 8192);
        assert!(!limits.allow_ignore_eos);
        assert_eq!(limits.kv.budget + limits.prefix_cache_bytes, 1 << 30, "the prefix cache is carved out");
        assert_eq!(limits.prefix_cache_bytes, 1 << 27);
    }

    #[test]
    fn the_prefix_cache_comes_out_of_the_kv_budget() {
        const GIB: u64 = 1 << 30;
        assert_eq!(split_budget(GIB, None), (GIB - GIB / 8, GIB / 8));
        assert_eq!(split_budget(64 * GIB, None), (63 * GIB, GIB), "at most 1 GiB by default");
        assert_eq!(split_budget(GIB, Some(0)), (GIB, 0), "off");
        assert_eq!(split_budget(GIB, Some(100)), (GIB - 100, 100));
        assert_eq!(split_budget(GIB, Some(2 * GIB)), (GIB / 2, GIB / 2), "at most half");
        assert_eq!(split_budget(u64::MAX, None), (u64::MAX, GIB), "bounded even when the budget is not");
        assert_eq!(split_budget(u64::MAX, Some(5)), (u64::MAX, 5));
    }
}

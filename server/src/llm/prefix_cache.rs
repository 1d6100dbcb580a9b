//! The prefix cache: the KV data of prompt blocks already computed, kept on
//! the host so that a request starting with the same tokens (a shared
//! system prompt, the history of a chat) prefills only what follows.
//!
//! A block is [`BLOCK_TOKENS`] tokens. Its key is its tokens and its parent
//! (the block before it, by id), hashed together into the index: a chain
//! hash, so a block matches only after the same whole prefix, and the key
//! is compared exactly (no hash collision can return another prompt's KV).
//! Blocks are shared: a lookup hands out `Arc`s of the cached data, and a
//! block is stored (and its bytes counted) once, whoever inserted it.
//!
//! Eviction is least recently used within a byte budget. Every touch
//! (lookup or insert) restamps the blocks of the chain so that a parent is
//! always newer than its children: the oldest block is then always a leaf,
//! and evicting it never strands a reachable block's descendants.
//!
//! This module holds the index and the budget only; copying KV data in and
//! out of ONNX Runtime tensors is `runtime::kv_cache`'s.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Tokens per block. 16 (vLLM's default): a request loses on average half
/// a block of reuse at the end of its shared prefix, so smaller blocks reuse
/// more; the cost of a block is one index entry and, per layer and head,
/// one copy of 16 x head_dim floats (4 KiB for SmolLM2), still a fast
/// memcpy. 32 would halve the entries for no measurable gain.
pub(crate) const BLOCK_TOKENS: usize = 16;

/// The KV data of one block: per layer key then value, each
/// `[heads, BLOCK_TOKENS, head_dim]` f32 (`runtime::kv_cache`'s layout).
pub(crate) type BlockData = Arc<[f32]>;

/// A block's identity: its parent's id (`ROOT` for the first block) and its
/// tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    parent: u64,
    tokens: [u32; BLOCK_TOKENS],
}

/// The parent id of a prompt's first block.
const ROOT: u64 = 0;

struct Entry {
    key: Key,
    stamp: u64,
    data: BlockData,
}

/// What an insert did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Inserted {
    /// Blocks added.
    pub added: usize,
    /// Blocks evicted to make room.
    pub evicted: usize,
}

/// The cache of one model's engine (single-threaded: the engine thread
/// owns it).
pub(crate) struct PrefixCache {
    budget: u64,
    bytes: u64,
    index: HashMap<Key, u64>,
    entries: HashMap<u64, Entry>,
    /// Stamp -> block id, oldest first.
    lru: BTreeMap<u64, u64>,
    next_id: u64,
    clock: u64,
}

impl PrefixCache {
    /// An empty cache that holds at most `budget` bytes of block data.
    pub(crate) fn new(budget: u64) -> PrefixCache {
        PrefixCache {
            budget,
            bytes: 0,
            index: HashMap::new(),
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            next_id: ROOT + 1,
            clock: 0,
        }
    }

    /// Bytes of block data held.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Blocks held.
    #[cfg(test)]
    pub(crate) fn blocks(&self) -> usize {
        self.entries.len()
    }

    /// The longest cached prefix of `prompt` that leaves at least its last
    /// token to prefill (the engine needs that token's logits): the blocks,
    /// in order. They become the most recently used.
    pub(crate) fn lookup(&mut self, prompt: &[u32]) -> Vec<BlockData> {
        let usable = prompt.len().saturating_sub(1) / BLOCK_TOKENS;
        let mut ids = Vec::new();
        let mut parent = ROOT;
        for chunk in prompt.chunks_exact(BLOCK_TOKENS).take(usable) {
            let Some(&id) = self.index.get(&key(parent, chunk)) else { break };
            ids.push(id);
            parent = id;
        }
        self.touch_chain(&ids);
        ids.iter().map(|id| self.entries[id].data.clone()).collect()
    }

    /// Caches the whole blocks of `tokens`, whose KV data `extract(i)` gives
    /// for block `i` (called only for blocks not cached yet, in order;
    /// `block_bytes` long).
    /// Makes room by evicting the least recently used blocks, never those of
    /// this chain; stops at the first block that does not fit. An error of
    /// `extract` stops the insert and is returned (what was added stays).
    pub(crate) fn insert<E>(
        &mut self,
        tokens: &[u32],
        block_bytes: u64,
        mut extract: impl FnMut(usize) -> Result<Vec<f32>, E>,
    ) -> Result<Inserted, E> {
        let mut done = Inserted::default();
        let n = tokens.len() / BLOCK_TOKENS;
        if n == 0 || block_bytes > self.budget {
            return Ok(done);
        }
        // This chain's stamps are base .. base + n, the parent newest.
        let base = self.clock + 1;
        self.clock += n as u64;
        let mut parent = ROOT;
        for (i, chunk) in tokens.chunks_exact(BLOCK_TOKENS).enumerate() {
            let stamp = base + (n - 1 - i) as u64;
            let key = key(parent, chunk);
            if let Some(&id) = self.index.get(&key) {
                self.restamp(id, stamp);
                parent = id;
                continue;
            }
            while self.bytes + block_bytes > self.budget {
                match self.lru.first_key_value() {
                    Some((&oldest, &id)) if oldest < base => {
                        self.evict(id);
                        done.evicted += 1;
                    }
                    // Only this chain is left: it does not fit further.
                    _ => return Ok(done),
                }
            }
            let data: BlockData = extract(i)?.into();
            let id = self.next_id;
            self.bytes += byte_len(&data);
            self.next_id += 1;
            self.index.insert(key, id);
            self.lru.insert(stamp, id);
            self.entries.insert(id, Entry { key, stamp, data });
            done.added += 1;
            parent = id;
        }
        Ok(done)
    }

    /// Makes the blocks `ids` (a chain from the root) the most recently
    /// used, the parent newer than its child.
    fn touch_chain(&mut self, ids: &[u64]) {
        let base = self.clock + 1;
        self.clock += ids.len() as u64;
        for (i, &id) in ids.iter().enumerate() {
            self.restamp(id, base + (ids.len() - 1 - i) as u64);
        }
    }

    fn restamp(&mut self, id: u64, stamp: u64) {
        let entry = self.entries.get_mut(&id).expect("indexed blocks have entries");
        self.lru.remove(&entry.stamp);
        entry.stamp = stamp;
        self.lru.insert(stamp, id);
    }

    fn evict(&mut self, id: u64) {
        if let Some(entry) = self.entries.remove(&id) {
            self.lru.remove(&entry.stamp);
            self.index.remove(&entry.key);
            // Its data is freed once no sequence holds it (lookups copy at once).
            self.bytes -= byte_len(&entry.data);
        }
    }
}

fn byte_len(data: &[f32]) -> u64 {
    std::mem::size_of_val(data) as u64
}

fn key(parent: u64, chunk: &[u32]) -> Key {
    let mut tokens = [0; BLOCK_TOKENS];
    tokens.copy_from_slice(chunk);
    Key { parent, tokens }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// Two floats per block, each the block's first token: enough to tell
    /// blocks apart.
    const FLOATS: usize = 2;
    const BYTES: u64 = (FLOATS * 4) as u64;

    fn tokens(start: u32, blocks: usize) -> Vec<u32> {
        (start..start + (blocks * BLOCK_TOKENS) as u32).collect()
    }

    fn insert(cache: &mut PrefixCache, tokens: &[u32]) -> (Inserted, Vec<usize>) {
        let mut extracted = Vec::new();
        let done = cache
            .insert(tokens, BYTES, |i| {
                extracted.push(i);
                Ok::<_, Infallible>(vec![tokens[i * BLOCK_TOKENS] as f32; FLOATS])
            })
            .unwrap();
        (done, extracted)
    }

    fn firsts(blocks: &[BlockData]) -> Vec<f32> {
        blocks.iter().map(|b| b[0]).collect()
    }

    #[test]
    fn longest_prefix_of_whole_blocks_leaving_the_last_token() {
        let mut cache = PrefixCache::new(1 << 20);
        let prompt = tokens(0, 3);
        assert!(cache.lookup(&prompt).is_empty(), "cold");
        assert_eq!(insert(&mut cache, &prompt).0, Inserted { added: 3, evicted: 0 });
        // The same prompt: its last token must be prefilled, so two blocks.
        assert_eq!(firsts(&cache.lookup(&prompt)), [0.0, 16.0]);
        // One more token: all three blocks.
        let mut longer = prompt.clone();
        longer.push(999);
        assert_eq!(firsts(&cache.lookup(&longer)), [0.0, 16.0, 32.0]);
        // Diverging inside block 1: block 0 only.
        let mut diverged = longer.clone();
        diverged[20] = 7;
        assert_eq!(firsts(&cache.lookup(&diverged)), [0.0]);
        // Shorter than a block plus one: nothing.
        assert!(cache.lookup(&prompt[..16]).is_empty());
        assert_eq!(cache.lookup(&prompt[..17]).len(), 1);
    }

    #[test]
    fn a_block_matches_only_after_the_same_prefix() {
        let mut cache = PrefixCache::new(1 << 20);
        let a = tokens(0, 2);
        insert(&mut cache, &a);
        // b's second block equals a's second block, after another first one.
        let mut b = a.clone();
        b[0] = 5000;
        b.push(1);
        assert!(cache.lookup(&b).is_empty());
        let (done, extracted) = insert(&mut cache, &b);
        assert_eq!(done.added, 2, "both blocks are new: their keys chain from another parent");
        assert_eq!(extracted, [0, 1]);
        assert_eq!(cache.blocks(), 4);
    }

    #[test]
    fn inserting_skips_cached_blocks_and_counts_shared_ones_once() {
        let mut cache = PrefixCache::new(1 << 20);
        let system = tokens(0, 2);
        insert(&mut cache, &system);
        let mut turn = system.clone();
        turn.extend(tokens(100, 1));
        let (done, extracted) = insert(&mut cache, &turn);
        assert_eq!(done.added, 1);
        assert_eq!(extracted, [2], "only the new block is copied out");
        let mut other = system.clone();
        other.extend(tokens(200, 1));
        insert(&mut cache, &other);
        assert_eq!(cache.blocks(), 4, "the shared system blocks once, two different third blocks");
        assert_eq!(cache.bytes(), 4 * BYTES);
        // Two sequences hold the same block: the same allocation.
        let one = cache.lookup(&turn);
        let two = cache.lookup(&other);
        assert!(Arc::ptr_eq(&one[0], &two[0]));
    }

    #[test]
    fn evicts_least_recently_used_leaves_within_the_budget() {
        let mut cache = PrefixCache::new(4 * BYTES);
        let a = tokens(0, 2);
        let b = tokens(1000, 2);
        insert(&mut cache, &a);
        insert(&mut cache, &b);
        assert_eq!(cache.bytes(), 4 * BYTES);
        // Use a again: b is now the oldest.
        let mut a_plus = a.clone();
        a_plus.push(1);
        assert_eq!(cache.lookup(&a_plus).len(), 2);
        let c = tokens(2000, 1);
        assert_eq!(insert(&mut cache, &c).0, Inserted { added: 1, evicted: 1 });
        assert_eq!(cache.bytes(), 4 * BYTES, "within the budget");
        // b's leaf went first; its first block is still there and reachable.
        let mut b_plus = b.clone();
        b_plus.push(1);
        assert_eq!(firsts(&cache.lookup(&b_plus)), [1000.0]);
        assert_eq!(cache.lookup(&a_plus).len(), 2, "a was used recently: kept");
    }

    #[test]
    fn a_chain_longer_than_the_budget_keeps_its_first_blocks() {
        let mut cache = PrefixCache::new(2 * BYTES);
        insert(&mut cache, &tokens(500, 1));
        let long = tokens(0, 4);
        let (done, extracted) = insert(&mut cache, &long);
        assert_eq!(done, Inserted { added: 2, evicted: 1 });
        assert_eq!(extracted, [0, 1], "stops at the first block that does not fit");
        assert_eq!(cache.bytes(), 2 * BYTES);
        assert_eq!(firsts(&cache.lookup(&long)), [0.0, 16.0]);
    }

    #[test]
    fn a_zero_budget_caches_nothing() {
        let mut cache = PrefixCache::new(0);
        let (done, extracted) = insert(&mut cache, &tokens(0, 3));
        assert_eq!(done, Inserted::default());
        assert!(extracted.is_empty());
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn an_extract_error_stops_the_insert() {
        let mut cache = PrefixCache::new(1 << 20);
        let prompt = tokens(0, 3);
        let result = cache.insert(&prompt, BYTES, |i| if i < 1 { Ok(vec![0.0; FLOATS]) } else { Err("boom") });
        assert_eq!(result, Err("boom"));
        assert_eq!(cache.blocks(), 1);
        assert_eq!(cache.bytes(), BYTES);
    }
}

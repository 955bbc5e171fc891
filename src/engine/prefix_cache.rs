//! The prefix cache: keys and values of full prompt blocks, shared by every request on the
//! same base or adapter version, LRU under a byte budget.
//!
//! A prompt is cut into blocks of [`BLOCK`] tokens. Block `i`'s key is a SHA-256 chained over
//! what shaped its keys and values: the namespace (the base model, or an adapter's name and
//! content digest), then every token of blocks `0..=i`. A replaced adapter has a new digest, so
//! its requests can never hit the old version's blocks; a block hit also checks the stored
//! tokens and parent key, so a hash collision could only miss, never serve the wrong block.
//!
//! A hit copies the blocks' keys and values into the sequence's own [`KvCache`] (which stays
//! one contiguous buffer per layer for the attention kernels), and the sequence holds the
//! blocks it used or wrote until it ends: a block in use by a running sequence is never
//! evicted. Only prompt blocks are cached, never the block holding a prompt's last token (its
//! logits must be computed), and requests asking for prompt log-probabilities bypass lookups
//! (every prompt position's logits are needed) but still fill the cache.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{Result, Tensor};
use sha2::{Digest, Sha256};

use crate::model::KvCache;

/// Tokens per cached block.
pub const BLOCK: usize = 16;

/// A block's chained key.
pub type BlockKey = [u8; 32];

/// One block's keys and values for every layer, each `[kv_heads, BLOCK, head_dim]`.
#[derive(Debug)]
pub struct BlockKv {
    /// Per layer, the block's keys and values (a sliding-window layer's rows that no later
    /// query can see may be zeros: see `KvCache::positions`).
    layers: Vec<(Tensor, Tensor)>,
    bytes: usize,
}

struct Entry {
    parent: Option<BlockKey>,
    tokens: [u32; BLOCK],
    kv: Arc<BlockKv>,
    used: u64,
}

/// The chained keys of every full block of `tokens` under `namespace`.
pub fn block_keys(namespace: &str, tokens: &[u32]) -> Vec<BlockKey> {
    let mut h = Sha256::new();
    h.update((namespace.len() as u64).to_le_bytes());
    h.update(namespace.as_bytes());
    tokens
        .chunks_exact(BLOCK)
        .map(|block| {
            for t in block {
                h.update(t.to_le_bytes());
            }
            h.clone().finalize().into()
        })
        .collect()
}

/// Cached blocks by key, least recently used evicted first once over the byte budget.
pub struct PrefixCache {
    budget: usize,
    bytes: usize,
    entries: HashMap<BlockKey, Entry>,
    /// `used` tick → key, for LRU order.
    order: BTreeMap<u64, BlockKey>,
    clock: u64,
    /// Prompt tokens looked up, and those found (vLLM's counters count tokens).
    pub queries: u64,
    pub hits: u64,
}

impl PrefixCache {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            bytes: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            queries: 0,
            hits: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn blocks(&self) -> usize {
        self.entries.len()
    }

    /// How many leading blocks of a prompt (`tokens`, keyed `keys`) are cached, at most
    /// `max_blocks`. Changes nothing.
    pub fn peek(&self, keys: &[BlockKey], tokens: &[u32], max_blocks: usize) -> usize {
        let mut parent = None;
        let mut n = 0;
        for (i, key) in keys.iter().take(max_blocks).enumerate() {
            match self.entries.get(key) {
                Some(e)
                    if e.parent == parent && e.tokens[..] == tokens[i * BLOCK..(i + 1) * BLOCK] =>
                {
                    parent = Some(*key);
                    n += 1;
                }
                _ => break,
            }
        }
        n
    }

    /// The leading cached blocks (as [`peek`](Self::peek) counts them), marked used; counts
    /// `query_tokens` queried and the blocks' tokens hit.
    pub fn take(
        &mut self,
        keys: &[BlockKey],
        tokens: &[u32],
        max_blocks: usize,
        query_tokens: usize,
    ) -> Vec<Arc<BlockKv>> {
        let n = self.peek(keys, tokens, max_blocks);
        self.queries += query_tokens as u64;
        self.hits += (n * BLOCK) as u64;
        keys[..n].iter().map(|k| self.touch(k)).collect()
    }

    fn touch(&mut self, key: &BlockKey) -> Arc<BlockKv> {
        self.clock += 1;
        let e = self.entries.get_mut(key).expect("peeked");
        self.order.remove(&e.used);
        e.used = self.clock;
        self.order.insert(self.clock, *key);
        Arc::clone(&e.kv)
    }

    /// Block `key`, marked used, if cached.
    pub fn get(&mut self, key: &BlockKey) -> Option<Arc<BlockKv>> {
        self.entries.contains_key(key).then(|| self.touch(key))
    }

    /// Whether block `key` is cached.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Cache block `kv` under `key`, then evict to the budget. Returns the cached block (the
    /// one already there, if another sequence wrote it first).
    pub fn insert(
        &mut self,
        key: BlockKey,
        parent: Option<BlockKey>,
        tokens: &[u32],
        kv: BlockKv,
    ) -> Arc<BlockKv> {
        if self.entries.contains_key(&key) {
            return self.touch(&key);
        }
        let tokens: [u32; BLOCK] = tokens.try_into().expect("a full block");
        let kv = Arc::new(kv);
        self.clock += 1;
        self.bytes += kv.bytes;
        self.entries.insert(
            key,
            Entry {
                parent,
                tokens,
                kv: Arc::clone(&kv),
                used: self.clock,
            },
        );
        self.order.insert(self.clock, key);
        self.evict_to_budget();
        kv
    }

    /// Evict least recently used blocks that no running sequence holds until within budget.
    pub fn evict_to_budget(&mut self) {
        if self.bytes <= self.budget {
            return;
        }
        let victims: Vec<(u64, BlockKey)> = self
            .order
            .iter()
            .filter(|(_, k)| Arc::strong_count(&self.entries[*k].kv) == 1)
            .map(|(t, k)| (*t, *k))
            .collect();
        for (tick, key) in victims {
            if self.bytes <= self.budget {
                break;
            }
            self.order.remove(&tick);
            if let Some(e) = self.entries.remove(&key) {
                self.bytes -= e.kv.bytes;
            }
        }
    }
}

/// Copy blocks into an empty sequence cache, in order.
pub fn restore(cache: &mut KvCache, blocks: &[Arc<BlockKv>]) -> Result<()> {
    if !cache.is_empty() {
        candle_core::bail!("prefix blocks go into an empty cache only");
    }
    for b in blocks {
        for (layer, (k, v)) in b.layers.iter().enumerate() {
            cache.append(layer, k, v)?;
        }
        cache.advance(BLOCK);
    }
    Ok(())
}

/// Block `index` of a sequence's cache, copied out.
pub fn snapshot(cache: &KvCache, index: usize) -> Result<BlockKv> {
    let mut layers = Vec::with_capacity(cache.num_layers());
    let mut bytes = 0;
    for layer in 0..cache.num_layers() {
        let (k, v) = cache.positions(layer, index * BLOCK, BLOCK)?;
        bytes += (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes();
        layers.push((k, v));
    }
    Ok(BlockKv { layers, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn block(fill: f32, kvh: usize, hd: usize, layers: usize) -> BlockKv {
        let dev = Device::Cpu;
        let t = (Tensor::ones((kvh, BLOCK, hd), DType::F32, &dev).unwrap() * fill as f64).unwrap();
        let bytes = 2 * layers * t.elem_count() * 4;
        BlockKv {
            layers: (0..layers).map(|_| (t.clone(), t.clone())).collect(),
            bytes,
        }
    }

    /// Keys chain: the same tokens under another namespace (an adapter's other version), or
    /// after another earlier block, never share a key.
    #[test]
    fn keys_chain_over_namespace_and_every_earlier_token() {
        let toks: Vec<u32> = (0..48).collect();
        let a = block_keys("base", &toks);
        assert_eq!(a.len(), 3);
        assert_eq!(
            a,
            block_keys(
                "base",
                &toks[..47].iter().chain([&47]).copied().collect::<Vec<_>>()
            )
        );
        let b = block_keys("adapter:x@sha256:1", &toks);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        let mut other = toks.clone();
        other[3] = 999;
        let c = block_keys("base", &other);
        assert!(
            a.iter().zip(&c).all(|(x, y)| x != y),
            "a change in block 0 changes every later key"
        );
        // Partial trailing blocks are not keyed.
        assert_eq!(block_keys("base", &toks[..47]).len(), 2);
    }

    /// Lookups stop at the first missing block, respect the limit, count tokens, and check
    /// the stored tokens and parent.
    #[test]
    fn lookups_take_the_leading_run() {
        let toks: Vec<u32> = (0..64).collect();
        let keys = block_keys("base", &toks);
        let mut c = PrefixCache::new(1 << 30);
        c.insert(keys[0], None, &toks[..16], block(0.0, 1, 4, 2));
        c.insert(keys[1], Some(keys[0]), &toks[16..32], block(1.0, 1, 4, 2));
        c.insert(keys[3], Some(keys[2]), &toks[48..64], block(3.0, 1, 4, 2));
        assert_eq!(c.peek(&keys, &toks, 4), 2);
        assert_eq!(c.peek(&keys, &toks, 1), 1);
        let got = c.take(&keys, &toks, 4, 64);
        assert_eq!(got.len(), 2);
        assert_eq!((c.queries, c.hits), (64, 32));
        // Same keys, other tokens (what a collision would look like): a miss.
        let mut wrong = toks.clone();
        wrong[0] = 7;
        assert_eq!(c.peek(&keys, &wrong, 4), 0);
    }

    /// Over budget, the least recently used block goes first, and blocks a sequence holds
    /// stay whatever the budget.
    #[test]
    fn eviction_is_lru_and_spares_held_blocks() {
        let per = 2 * 2 * BLOCK * 4 * 4; // one block: 2 layers, k and v, [1, 16, 4] f32
        let mut c = PrefixCache::new(2 * per);
        let toks: Vec<u32> = (0..64).collect();
        let keys = block_keys("base", &toks);
        let held = c.insert(keys[0], None, &toks[..16], block(0.0, 1, 4, 2));
        drop(c.insert(keys[1], Some(keys[0]), &toks[16..32], block(1.0, 1, 4, 2)));
        // keys[0] is the oldest but held; keys[1] is evicted for keys[2].
        drop(c.insert(keys[2], Some(keys[1]), &toks[32..48], block(2.0, 1, 4, 2)));
        assert!(c.contains(&keys[0]) && !c.contains(&keys[1]) && c.contains(&keys[2]));
        assert_eq!(c.bytes(), 2 * per);
        drop(held);
        drop(c.insert(keys[3], Some(keys[2]), &toks[48..64], block(3.0, 1, 4, 2)));
        assert!(!c.contains(&keys[0]), "released, then the least recent");
        assert_eq!(c.blocks(), 2);
    }
}

//! The worker's side of the prefix cache: keying prompts once their adapter is known,
//! counting and restoring cached leading blocks at admission, and storing newly completed
//! prompt blocks after each prefill chunk.

use super::{Seq, Worker};
use crate::engine::prefix_cache::{self, BLOCK};

impl Worker {
    /// Key the prompts of waiting sequences whose adapter (and so namespace) is now known.
    pub(super) fn key_prompts(&mut self) {
        if !self.prefix.enabled() {
            return;
        }
        for id in &self.waiting {
            let Some(s) = self.seqs.get_mut(id) else {
                continue;
            };
            if s.prefix_keys.is_none() {
                let namespace = match &s.lease {
                    None => "base".to_string(),
                    Some(l) => format!("adapter\0{}\0{}", l.name, l.info.digest),
                };
                s.prefix_keys = Some(prefix_cache::block_keys(
                    &namespace,
                    &s.req.prompt_token_ids,
                ));
            }
        }
    }

    /// How many leading blocks of a waiting sequence's prompt the prefix cache would restore:
    /// never the block of the prompt's last token (its logits must be computed), and none
    /// for prompt log-probabilities (every position's logits are needed).
    pub(super) fn cached_blocks(&self, s: &Seq) -> usize {
        match &s.prefix_keys {
            Some(keys) if s.fed == 0 && s.req.prompt_logprobs.is_none() => {
                let plen = s.req.prompt_token_ids.len();
                self.prefix
                    .peek(keys, &s.req.prompt_token_ids, (plen - 1) / BLOCK)
            }
            _ => 0,
        }
    }

    /// At admission, copy the cached leading blocks into the sequence's cache: the blocks
    /// [`cached_blocks`](Self::cached_blocks) counted when the step was planned (nothing
    /// changes the prefix cache in between).
    pub(super) fn restore_prefix(&mut self, s: &mut Seq) {
        let Some(keys) = &s.prefix_keys else { return };
        let plen = s.req.prompt_token_ids.len();
        if s.fed != 0 || s.req.prompt_logprobs.is_some() {
            return;
        }
        let blocks = self
            .prefix
            .take(keys, &s.req.prompt_token_ids, (plen - 1) / BLOCK, plen);
        if blocks.is_empty() {
            return;
        }
        match prefix_cache::restore(&mut s.cache, &blocks) {
            Ok(()) => {
                s.fed = blocks.len() * BLOCK;
                s.cached_tokens = s.fed;
                s.prefix_held = blocks;
            }
            Err(e) => {
                // Prefill then starts from the first token: slower, still right.
                tracing::warn!("restoring cached prefix blocks failed: {e}");
                s.cache = self.model.new_cache();
            }
        }
    }

    /// Cache the sequence's newly completed full prompt blocks.
    pub(super) fn remember_prefix(&mut self, s: &mut Seq) {
        if !self.prefix.enabled() || s.prefix_lossy {
            return;
        }
        let Some(keys) = &s.prefix_keys else { return };
        let done = (s.fed / BLOCK).min(keys.len());
        for b in s.prefix_held.len()..done {
            let key = keys[b];
            let parent = b.checked_sub(1).map(|p| keys[p]);
            let tokens = &s.req.prompt_token_ids[b * BLOCK..(b + 1) * BLOCK];
            let kv = if self.prefix.contains(&key) {
                None
            } else {
                match prefix_cache::snapshot(&s.cache, b) {
                    Ok(kv) => Some(kv),
                    Err(e) => {
                        tracing::warn!("copying a prefix block failed: {e}");
                        return;
                    }
                }
            };
            let held = match kv {
                Some(kv) => self.prefix.insert(key, parent, tokens, kv),
                None => match self.prefix.get(&key) {
                    Some(kv) => kv,
                    None => return,
                },
            };
            s.prefix_held.push(held);
        }
    }
}

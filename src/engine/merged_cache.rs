//! Merged weights by adapter instance, LRU under a byte budget.

use std::collections::HashMap;
use std::sync::Arc;

use crate::adapter::Lease;
use crate::model::Decoder;
use crate::ops::MergedWeights;

/// Merged weights by adapter instance, LRU under a byte budget.
pub(super) struct MergedCache {
    pub(super) budget: usize,
    pub(super) entries: HashMap<u64, (Arc<MergedWeights>, u64, String)>,
    pub(super) clock: u64,
    pub(super) merges: u64,
}

impl MergedCache {
    pub(super) fn new(budget: usize) -> Self {
        Self {
            budget,
            entries: HashMap::new(),
            clock: 0,
            merges: 0,
        }
    }

    pub(super) fn get_or_merge(
        &mut self,
        lease: &Lease,
        model: &Decoder,
    ) -> candle_core::Result<Arc<MergedWeights>> {
        self.clock += 1;
        let id = lease.weights.id();
        if let Some((m, used, _)) = self.entries.get_mut(&id) {
            *used = self.clock;
            return Ok(Arc::clone(m));
        }
        let m = Arc::new(model.merge(&lease.weights)?);
        self.merges += 1;
        self.entries
            .insert(id, (Arc::clone(&m), self.clock, lease.name.clone()));
        // Keep the one in use even when it alone exceeds the budget.
        while self.bytes() > self.budget && self.entries.len() > 1 {
            let victim = self
                .entries
                .iter()
                .filter(|(k, _)| **k != id)
                .min_by_key(|(_, (_, used, _))| *used)
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    self.entries.remove(&k);
                }
                None => break,
            }
        }
        Ok(m)
    }

    pub(super) fn bytes(&self) -> usize {
        self.entries.values().map(|(m, _, _)| m.bytes()).sum()
    }
}

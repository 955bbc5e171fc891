//! The loaded-adapter cache: an LRU over adapters with a byte budget, where a lease (an
//! `Arc` held by a request from admission to finish) keeps an adapter from being evicted.
//!
//! The cache belongs to the engine's worker; loads happen elsewhere and are handed in with
//! [`AdapterCache::insert`]. Replacing a name installs a new version: leases on the old one keep
//! it alive until their requests finish, new lookups get the new one.

use std::collections::HashMap;
use std::sync::Arc;

use super::Adapter;

/// A request's hold on a loaded adapter; the adapter cannot be evicted while any exists.
pub type Lease = Arc<Adapter>;

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub loads: u64,
    pub load_failures: u64,
    pub load_secs_total: f64,
    pub evictions: u64,
    pub bytes_resident: usize,
    pub adapters_resident: usize,
}

struct Entry {
    adapter: Lease,
    last_used: u64,
}

pub struct AdapterCache {
    budget: usize,
    entries: HashMap<String, Entry>,
    clock: u64,
    stats: CacheStats,
}

impl AdapterCache {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget: budget_bytes,
            entries: HashMap::new(),
            clock: 0,
            stats: CacheStats::default(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// A lease on `name` if it is loaded (a hit), else `None` (a miss: the caller loads it).
    pub fn get(&mut self, name: &str) -> Option<Lease> {
        let now = self.tick();
        match self.entries.get_mut(name) {
            Some(e) => {
                e.last_used = now;
                self.stats.hits += 1;
                Some(Arc::clone(&e.adapter))
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Whether `name` is loaded (no counters touched).
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Install a freshly loaded adapter (replacing any older version of the name) and return a
    /// lease on it. Unleased adapters are evicted, least recently used first, to fit the budget;
    /// leased ones may keep the cache over it until their requests finish.
    pub fn insert(&mut self, adapter: Adapter, load_secs: f64) -> Lease {
        let now = self.tick();
        self.stats.loads += 1;
        self.stats.load_secs_total += load_secs;
        let lease = Arc::new(adapter);
        self.entries.insert(
            lease.name.clone(),
            Entry {
                adapter: Arc::clone(&lease),
                last_used: now,
            },
        );
        self.evict_to_budget();
        lease
    }

    pub fn record_load_failure(&mut self) {
        self.stats.load_failures += 1;
    }

    /// Forget `name` (deleted or replaced on disk). Running requests keep their leases.
    pub fn remove(&mut self, name: &str) -> bool {
        let removed = self.entries.remove(name).is_some();
        self.refresh_gauges();
        removed
    }

    /// Evict unleased adapters, least recently used first, while over budget. Call after
    /// leases are released too.
    pub fn evict_to_budget(&mut self) {
        while self.bytes() > self.budget {
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| Arc::strong_count(&e.adapter) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    self.entries.remove(&k);
                    self.stats.evictions += 1;
                }
                None => break,
            }
        }
        self.refresh_gauges();
    }

    fn bytes(&self) -> usize {
        self.entries.values().map(|e| e.adapter.info.bytes).sum()
    }

    fn refresh_gauges(&mut self) {
        self.stats.bytes_resident = self.bytes();
        self.stats.adapters_resident = self.entries.len();
    }

    /// Bytes of loaded adapters that no request holds.
    pub fn unleased_bytes(&self) -> usize {
        self.entries
            .values()
            .filter(|e| Arc::strong_count(&e.adapter) == 1)
            .map(|e| e.adapter.info.bytes)
            .sum()
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Names of the loaded adapters.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }
}

//! Cold adapters: loads on threads of their own (one per name however many requests wait),
//! and what happens when one finishes, possibly after the catalog changed the name.

use std::sync::Arc;
use std::time::Instant;

use super::{Command, EngineError, Worker};
use crate::adapter::{self, Lease};

impl Worker {
    /// Load `name`'s current files on a thread of its own, for the sequences waiting in
    /// `self.loading[name]`; they fail with `AdapterNotFound` if the name is gone.
    pub(super) fn start_load(&mut self, name: String) {
        let Some(resolved) = self.catalog.resolve(&name) else {
            for id in self.loading.remove(&name).unwrap_or_default() {
                self.finish_with_error(id, EngineError::AdapterNotFound(name.clone()));
            }
            return;
        };
        let (model, tx) = (Arc::clone(&self.model), self.tx.clone());
        let catalog = Arc::clone(&self.catalog);
        let delay = self.cfg.load_delay;
        let gate = self.cfg.load_gate.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let result = catalog.load(&name, &resolved, &*model);
            let secs = start.elapsed().as_secs_f64();
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            if let Some(g) = gate {
                let until = Instant::now() + std::time::Duration::from_secs(60);
                while !g.pass(std::time::Duration::from_millis(50)) && Instant::now() < until {}
            }
            let _ = tx.send(Command::Loaded {
                name,
                result,
                secs,
                generation: resolved.generation,
            });
        });
    }

    pub(super) fn loaded(
        &mut self,
        name: String,
        result: Result<adapter::Adapter, adapter::AdapterError>,
        secs: f64,
        generation: u64,
    ) {
        if self.catalog.generation(&name) != generation {
            // The name changed while its files were read (replaced, deleted, re-registered):
            // this version must not serve anyone. The new one is in the cache if it was
            // uploaded; otherwise load again from what the name is now.
            if let Some(lease) = self.cache.get(&name) {
                self.serve_waiters(&name, lease);
            } else if self.loading.contains_key(&name) {
                self.start_load(name);
            }
            return;
        }
        match result {
            Ok(a) => {
                let lease = self.cache.insert(a, secs);
                self.serve_waiters(&name, lease);
            }
            Err(e) => {
                self.cache.record_load_failure();
                let error = Arc::new(e);
                for id in self.loading.remove(&name).unwrap_or_default() {
                    let e = EngineError::AdapterLoad {
                        name: name.clone(),
                        error: Arc::clone(&error),
                    };
                    self.finish_with_error(id, e);
                }
            }
        }
    }

    /// The sequences waiting for `name` run on `lease`.
    fn serve_waiters(&mut self, name: &str, lease: Lease) {
        for id in self.loading.remove(name).unwrap_or_default() {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.lease = Some(Arc::clone(&lease));
                self.waiting.push_back(id);
            }
        }
        drop(lease);
        self.cache.evict_to_budget();
    }
}

//! The cloneable handle to the engine: submit requests, read stats, manage adapters.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use super::request::ValidRequest;
use super::types::*;
use super::EngineError;
use crate::adapter::{
    AdapterInfo, Catalog, CatalogError, DiskCacheStats, StoreError, StoreHealth, Upload,
};
use crate::model::{Decoder, LoadedModel, ModelInfo, Tokenizer};

/// The cloneable handle to the engine.
#[derive(Clone)]
pub struct Engine {
    pub(super) tx: Sender<Command>,
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) max_queued: usize,
    pub(super) stats: Arc<Mutex<EngineStats>>,
    pub(super) model: Arc<Decoder>,
    pub(super) tokenizer: Arc<Tokenizer>,
    pub(super) info: Arc<ModelInfo>,
    pub(super) catalog: Arc<Catalog>,
}

impl Engine {
    /// Start an engine on `loaded`, serving the adapters of `catalog`: the handle, and the
    /// worker thread behind it.
    pub fn start(loaded: LoadedModel, catalog: Catalog, cfg: EngineConfig) -> Engine {
        let (tx, rx) = mpsc::channel();
        let engine = Engine {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            max_queued: cfg.max_queued,
            stats: Arc::new(Mutex::new(EngineStats::default())),
            model: Arc::new(loaded.model),
            tokenizer: Arc::new(loaded.tokenizer),
            info: Arc::new(loaded.info),
            catalog: Arc::new(catalog),
        };
        super::worker::spawn(&engine, rx, cfg);
        engine
    }

    /// Queue every choice of a validated request (prompt-major: choice `p·n + k` is prompt
    /// `p` with seed `seed + k`) and return their event streams in that order. Fails at once,
    /// with nothing queued, when the queue has no room for all of them (`Overloaded`);
    /// everything else (unknown adapter, load failure) arrives as an `Error` event.
    pub fn submit(&self, valid: ValidRequest) -> Result<Vec<EventStream>, EngineError> {
        self.reserve(valid.choices())?;
        let (seqs, streams) = self.sequences(valid);
        let n = seqs.len();
        for (i, (seq, etx)) in seqs.into_iter().enumerate() {
            if self.tx.send(Command::Submit(Box::new(seq), etx)).is_err() {
                self.queued.fetch_sub(n - i, Ordering::AcqRel);
                return Err(EngineError::ShuttingDown);
            }
        }
        Ok(streams)
    }

    /// [`submit`](Self::submit) for several requests that the worker takes in together:
    /// one command, so that all of them are queued before its next step, and the first step
    /// prefills every prompt it has room for (`generate --batch`: sent one by one, a step
    /// could start on the first rows and prefill the rest apart, which sums them in another
    /// order). The streams come request by request; all or nothing is queued.
    pub fn submit_all(
        &self,
        valid: Vec<ValidRequest>,
    ) -> Result<Vec<Vec<EventStream>>, EngineError> {
        self.reserve(valid.iter().map(|v| v.choices()).sum())?;
        let mut all = Vec::new();
        let mut streams = Vec::with_capacity(valid.len());
        for v in valid {
            let (seqs, s) = self.sequences(v);
            all.extend(seqs);
            streams.push(s);
        }
        let n = all.len();
        if self.tx.send(Command::SubmitAll(all)).is_err() {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            return Err(EngineError::ShuttingDown);
        }
        Ok(streams)
    }

    /// Reserve `choices` queue slots, or refuse: memory stays bounded under any load.
    fn reserve(&self, choices: usize) -> Result<(), EngineError> {
        let mut cur = self.queued.load(Ordering::Acquire);
        loop {
            if cur + choices > self.max_queued {
                return Err(EngineError::Overloaded);
            }
            match self.queued.compare_exchange(
                cur,
                cur + choices,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// A validated request's sequences (prompt-major, as [`submit`](Self::submit) says), each
    /// with the sender of its event stream, and the streams.
    fn sequences(
        &self,
        valid: ValidRequest,
    ) -> (Vec<(SeqRequest, UnboundedSender<Event>)>, Vec<EventStream>) {
        let ctx = self.model.config().max_context;
        let req = valid.req;
        let mut seqs = Vec::with_capacity(req.prompts.len() * req.n);
        let mut streams = Vec::with_capacity(seqs.capacity());
        for prompt in &req.prompts {
            for k in 0..req.n {
                let mut sampling = req.sampling.clone();
                sampling.seed = sampling.seed.wrapping_add(k as u64);
                let logprobs = req.logprobs.map(|l| l.top);
                let seq = SeqRequest {
                    max_tokens: req
                        .max_tokens
                        .unwrap_or(ctx.saturating_sub(prompt.len()).max(1)),
                    prompt_token_ids: prompt.clone(),
                    sampling,
                    logprobs,
                    stop_token_ids: req.stop_token_ids.clone(),
                    stop_strings: req.stop_strings.clone(),
                    ignore_eos: req.ignore_eos,
                    adapter: req.adapter.clone(),
                    prompt_logprobs: if req.prompt_logprobs { logprobs } else { None },
                };
                let (etx, erx) = unbounded_channel();
                seqs.push((seq, etx));
                streams.push(EventStream { rx: erx });
            }
        }
        (seqs, streams)
    }

    /// Send the worker a command that answers `done`, and wait for the answer, so that what
    /// answers next (the adapter's state, a request) sees its effect; a stopped worker drops
    /// `done` and the wait ends.
    fn tell(&self, cmd: impl FnOnce(Sender<()>) -> Command) {
        let (done, ack) = mpsc::channel();
        if self.tx.send(cmd(done)).is_ok() {
            let _ = ack.recv();
        }
    }

    fn install(&self) -> impl FnOnce(crate::adapter::Adapter, f64) + '_ {
        move |adapter, secs| {
            self.tell(|done| Command::Install {
                adapter: Box::new(adapter),
                secs,
                done,
            })
        }
    }

    fn invalidate<'a>(&'a self, name: &'a str) -> impl FnOnce() + 'a {
        move || {
            self.tell(|done| Command::Invalidate {
                name: name.to_string(),
                done,
            })
        }
    }

    /// Validate an upload against the base model, write it to the store (replacing the old
    /// version if asked) and put the loaded adapter into the cache as it is: the first request
    /// on it does not load it again. Running requests finish on the version they started with.
    /// Blocking (a full adapter load): call it off the async threads.
    pub fn upload_adapter(&self, up: Upload<'_>) -> Result<AdapterInfo, CatalogError> {
        self.catalog.upload(up, &*self.model, self.install())
    }

    /// Delete a stored adapter (or drop a registration); in-flight requests finish normally.
    pub fn delete_adapter(&self, name: &str) -> Result<(), CatalogError> {
        self.catalog.delete(name, self.invalidate(name))
    }

    /// vLLM's `load_lora_adapter`: serve the folder `path` (under the registration root) as
    /// `name`, validated and loaded into the cache. Blocking.
    pub fn register_adapter(&self, name: &str, path: &str) -> Result<AdapterInfo, CatalogError> {
        self.catalog
            .register(name, path, &*self.model, self.install())
    }

    /// vLLM's `unload_lora_adapter`: drop a registration (`true`), or a stored adapter from
    /// memory only (`false`).
    pub fn unregister_adapter(&self, name: &str) -> Result<bool, CatalogError> {
        self.catalog.unregister(name, self.invalidate(name))
    }

    /// Drop what the cache holds for `name` (running requests keep their version; the next
    /// request loads the current files).
    pub fn evict_adapter(&self, name: &str) {
        self.invalidate(name)();
    }

    /// Take in what other replicas changed in a shared adapter store (a no-op for a folder
    /// store): changed names are dropped from the caches, so their next request loads the
    /// current version; running requests finish on theirs. Blocking (network); the server
    /// calls it every `--adapter-refresh` seconds on a thread of its own.
    pub fn refresh_adapters(&self) -> Result<Vec<String>, StoreError> {
        self.catalog.refresh(|name| self.invalidate(name)())
    }

    /// A request names `name`, unknown here: look in a shared store now (rate-limited per
    /// name) rather than at the next refresh. True if it exists. Blocking (network).
    pub fn lookup_adapter(&self, name: &str) -> bool {
        self.catalog.lookup(name, self.invalidate(name))
    }

    /// Whether the adapter store answers (always, for a folder store).
    pub fn store_health(&self) -> StoreHealth {
        self.catalog.store().health()
    }

    /// The disk cache below the in-memory LRU, for an object store.
    pub fn disk_cache_stats(&self) -> Option<DiskCacheStats> {
        self.catalog.store().disk_cache()
    }

    /// Whether a request may name `name`.
    pub fn adapter_exists(&self, name: &str) -> bool {
        self.catalog.exists(name)
    }

    /// Every adapter, sorted by name, with its state here.
    pub fn adapters(&self) -> Vec<AdapterEntry> {
        let stats = self.stats();
        self.catalog
            .list()
            .iter()
            .filter_map(|n| self.entry(n, &stats))
            .collect()
    }

    /// One adapter, if the name exists.
    pub fn adapter(&self, name: &str) -> Option<AdapterEntry> {
        self.entry(name, &self.stats())
    }

    fn entry(&self, name: &str, stats: &EngineStats) -> Option<AdapterEntry> {
        let d = self.catalog.describe(name)?;
        let has = |v: &[String]| v.iter().any(|n| n == name);
        let state = if d.refused.is_some() {
            AdapterState::Invalid
        } else if has(&stats.merged_adapters) {
            AdapterState::Merged
        } else if has(&stats.loaded_adapters) {
            AdapterState::Loaded
        } else if has(&stats.loading_adapters) {
            AdapterState::Loading
        } else {
            AdapterState::OnDisk
        };
        Some(AdapterEntry {
            name: d.name,
            source: d.source,
            config: d.config,
            state,
            error: d.refused,
        })
    }

    /// Validate every stored adapter (a full load each); those that fail are listed as
    /// `invalid` with the loader's error until replaced or deleted. Returns their names.
    /// Blocking: the server runs it on a thread of its own after it starts listening.
    pub fn check_adapters(&self) -> Vec<String> {
        self.catalog.check_store(&*self.model)
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn model(&self) -> &Arc<Decoder> {
        &self.model
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Stop the worker after the current step; in-flight requests get an error.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}

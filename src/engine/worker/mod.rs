//! The serving engine: one worker thread owns the model's KV caches, the adapter caches and
//! every running sequence; the rest of the program holds a cloneable [`Engine`] handle.
//!
//! Each step, the [`Scheduler`] picks rows (new requests join at step boundaries, finished
//! ones leave), the model runs them in one packed forward (unmerged, or on one adapter's merged
//! weights), and tokens stream back per request. Cold adapters load on their own threads, so a
//! load never stalls decoding; concurrent requests for one cold adapter share one load.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

mod loads;
mod prefix;
mod step;

use super::handle::Engine;
use super::merged_cache::MergedCache;
use super::prefix_cache::{BlockKey, BlockKv, PrefixCache};
use super::sampling::{logprobs_of, Sampler, TokenLogprob};
use super::scheduler::{Scheduler, SchedulerConfig, SeqId};
use super::text::TextState;
use super::types::*;
use super::{EngineError, FinishReason};
use crate::adapter::{AdapterCache, Catalog, Lease};
use crate::model::{Decoder, KvCache, Tokenizer};

/// Start the worker thread for `engine` (the handle, built by [`Engine::start`]), which owns
/// everything mutable: sequences, KV caches, the adapter caches and the scheduler.
pub(super) fn spawn(engine: &Engine, rx: Receiver<Command>, cfg: EngineConfig) {
    let worker = Worker {
        sched: Scheduler::new(SchedulerConfig {
            max_running: cfg.max_running,
            max_step_tokens: cfg.max_step_tokens,
            mode: cfg.mode,
            // `auto` keeps adapters unmerged where merged copies outgrow the base.
            merge_after: if engine.model.merging_grows_weights() {
                usize::MAX
            } else {
                cfg.merge_after
            },
            turn_steps: cfg.turn_steps,
            prefill_share: cfg.prefill_share,
        }),
        cache: AdapterCache::new(cfg.adapter_cache_bytes),
        merged: MergedCache::new(cfg.merged_cache_bytes),
        prefix: PrefixCache::new(cfg.prefix_cache_bytes),
        cfg,
        model: Arc::clone(&engine.model),
        catalog: Arc::clone(&engine.catalog),
        tokenizer: Arc::clone(&engine.tokenizer),
        eos: engine.info.eos_token_ids.clone(),
        tx: engine.tx.clone(),
        rx,
        queued: Arc::clone(&engine.queued),
        stats_out: Arc::clone(&engine.stats),
        seqs: HashMap::new(),
        running: Vec::new(),
        waiting: VecDeque::new(),
        loading: HashMap::new(),
        counters: EngineStats::default(),
        outbox: Vec::new(),
    };
    // The worker runs on a thread of its own rayon pool, so the tensor kernels it calls split
    // their work between it and the pool's other threads: it computes a share itself instead
    // of handing every matmul to the global pool and sleeping until it is done (measured:
    // ~15% of decode time went to those hand-offs and wake-ups).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(|i| format!("dora-engine-{i}"))
        .build()
        .expect("building the engine's thread pool");
    std::thread::Builder::new()
        .name("dora-engine".into())
        .spawn(move || pool.install(move || worker.run()))
        .expect("spawning the engine thread");
}

struct Seq {
    req: SeqRequest,
    events: UnboundedSender<Event>,
    lease: Option<Lease>,
    cache: KvCache,
    sampler: Sampler,
    /// Prompt tokens fed so far.
    fed: usize,
    out: Vec<u32>,
    text: TextState,
    /// Counted in the handle's queue until admitted.
    queued: bool,
    /// Prompt log-probabilities gathered over prefill chunks.
    prompt_lps: Vec<TokenLogprob>,
    /// The prompt's block keys for the prefix cache (`None` until its adapter is known).
    prefix_keys: Option<Vec<BlockKey>>,
    /// Prefix blocks this sequence restored or wrote, held so that none is evicted while it
    /// runs; the count of leading prompt blocks already in the cache.
    prefix_held: Vec<Arc<BlockKv>>,
    /// Prompt tokens restored from the prefix cache.
    cached_tokens: usize,
    /// Ran a step on lossy merged weights (`--merged-dtype` bf16/f16): its keys and values
    /// are not those of the exact path, so none of its blocks is cached from then on.
    prefix_lossy: bool,
}

impl Seq {
    fn adapter_name(&self) -> Option<String> {
        match &self.req.adapter {
            Some(AdapterSpec::Named(n)) => Some(n.clone()),
            Some(AdapterSpec::Loaded(l)) => Some(l.name.clone()),
            None => None,
        }
    }
}

struct Worker {
    cfg: EngineConfig,
    sched: Scheduler,
    cache: AdapterCache,
    merged: MergedCache,
    prefix: PrefixCache,
    model: Arc<Decoder>,
    catalog: Arc<Catalog>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    tx: Sender<Command>,
    rx: Receiver<Command>,
    queued: Arc<AtomicUsize>,
    stats_out: Arc<Mutex<EngineStats>>,
    seqs: HashMap<SeqId, Seq>,
    /// Admitted sequences, in admission order.
    running: Vec<SeqId>,
    /// Sequences whose adapter is ready, in arrival order.
    waiting: VecDeque<SeqId>,
    /// Adapter name → sequences waiting for its load.
    loading: HashMap<String, Vec<SeqId>>,
    counters: EngineStats,
    /// Events of this iteration, sent after the stats are published so that a client that
    /// sees an event also sees the engine state it follows from.
    outbox: Vec<(UnboundedSender<Event>, Event)>,
}

static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

impl Worker {
    fn run(mut self) {
        loop {
            // Block only when there is nothing to step.
            let idle = self.running.is_empty() && self.waiting.is_empty();
            let first = if idle {
                match self.rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => {
                        self.publish();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                None
            };
            let cmds: Vec<Command> = first.into_iter().chain(self.rx.try_iter()).collect();
            for cmd in cmds {
                if !self.handle(cmd) {
                    self.fail_all(EngineError::ShuttingDown);
                    self.publish();
                    self.flush();
                    return;
                }
            }
            self.drop_cancelled();
            let has_work = !(self.running.is_empty() && self.waiting.is_empty());
            if has_work {
                if let Some(gate) = &self.cfg.step_gate {
                    // Held by a test: go back to the commands (new requests, cancellations)
                    // and publish, without planning, so the scheduler's state does not move.
                    if !gate.pass(Duration::from_millis(5)) {
                        self.publish();
                        self.flush();
                        continue;
                    }
                }
            }
            if let Err(e) = self.step() {
                // A failed forward fails the sequences it ran; the engine keeps serving.
                tracing::error!("engine step failed: {e}");
                let ids: Vec<SeqId> = self.running.clone();
                for id in ids {
                    self.finish_with_error(id, EngineError::Internal(e.to_string()));
                }
            }
            self.publish();
            self.flush();
            if has_work && !self.cfg.step_delay.is_zero() {
                std::thread::sleep(self.cfg.step_delay);
            }
        }
    }

    fn flush(&mut self) {
        for (tx, ev) in self.outbox.drain(..) {
            let _ = tx.send(ev);
        }
    }

    /// Returns false on shutdown.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(req, events) => self.submit(*req, events),
            Command::SubmitAll(seqs) => {
                for (req, events) in seqs {
                    self.submit(req, events);
                }
            }
            Command::Loaded {
                name,
                result,
                secs,
                generation,
            } => self.loaded(name, result, secs, generation),
            Command::Install {
                adapter,
                secs,
                done,
            } => {
                // Kept unless the byte budget says otherwise: nothing leases it yet.
                drop(self.cache.insert(*adapter, secs));
                self.cache.evict_to_budget();
                self.answer(done);
            }
            Command::Invalidate { name, done } => {
                self.cache.remove(&name);
                self.answer(done);
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn submit(&mut self, req: SeqRequest, events: UnboundedSender<Event>) {
        let id = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let seq = Seq {
            sampler: Sampler::new(&req.sampling),
            cache: self.model.new_cache(),
            lease: None,
            fed: 0,
            out: Vec::new(),
            text: TextState::default(),
            queued: true,
            prompt_lps: Vec::new(),
            prefix_keys: None,
            prefix_held: Vec::new(),
            cached_tokens: 0,
            prefix_lossy: false,
            events,
            req,
        };
        let spec = seq.req.adapter.clone();
        self.seqs.insert(id, seq);
        match spec {
            None => self.waiting.push_back(id),
            Some(AdapterSpec::Loaded(lease)) => {
                self.seqs.get_mut(&id).expect("just inserted").lease = Some(lease);
                self.waiting.push_back(id);
            }
            Some(AdapterSpec::Named(name)) => {
                if let Some(lease) = self.cache.get(&name) {
                    self.seqs.get_mut(&id).expect("just inserted").lease = Some(lease);
                    self.waiting.push_back(id);
                } else if let Some(waiters) = self.loading.get_mut(&name) {
                    waiters.push(id);
                } else {
                    self.loading.insert(name.clone(), vec![id]);
                    self.start_load(name);
                }
            }
        }
    }

    /// A cache command is done: publish the state it left, then tell the caller.
    fn answer(&mut self, done: std::sync::mpsc::Sender<()>) {
        self.publish();
        let _ = done.send(());
    }

    /// Requests whose client went away stop now and free their memory.
    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: SeqId) -> Option<Seq> {
        let seq = self.seqs.remove(&id)?;
        if seq.queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        self.running.retain(|r| *r != id);
        self.waiting.retain(|r| *r != id);
        for waiters in self.loading.values_mut() {
            waiters.retain(|r| *r != id);
        }
        Some(seq)
    }

    fn finish_with_error(&mut self, id: SeqId, e: EngineError) {
        if let Some(seq) = self.remove(id) {
            self.outbox.push((seq.events.clone(), Event::Error(e)));
            drop(seq);
            self.cache.evict_to_budget();
        }
    }

    fn fail_all(&mut self, e: EngineError) {
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for id in ids {
            self.finish_with_error(id, e.clone());
        }
    }

    /// A sequence ended: its last text, usage and the adapter version that served it.
    fn finish(&mut self, id: SeqId, mut s: Seq, reason: FinishReason) {
        self.running.retain(|r| *r != id);
        let text = s.text.flush();
        self.outbox.push((
            s.events.clone(),
            Event::Done {
                finish_reason: reason,
                prompt_tokens: s.req.prompt_token_ids.len(),
                cached_tokens: s.cached_tokens,
                completion_tokens: s.out.len(),
                adapter: s.lease.as_ref().map(|l| AdapterVersion {
                    name: l.name.clone(),
                    version: l.weights.id(),
                    digest: l.info.digest.clone(),
                }),
                text,
            },
        ));
    }

    /// Sample the next token of `s`; `Some(reason)` when it finished.
    fn sample(
        &mut self,
        s: &mut Seq,
        logits: &candle_core::Tensor,
    ) -> Result<Option<FinishReason>, EngineError> {
        let row = logits.squeeze(0)?;
        let token = s.sampler.sample(&row, &s.out)?;
        let stop_id = s.req.stop_token_ids.contains(&token)
            || (!s.req.ignore_eos && self.eos.contains(&token));
        if stop_id {
            return Ok(Some(FinishReason::Stop));
        }
        let logprob = match s.req.logprobs {
            Some(k) => Some(logprobs_of(&row.to_vec1::<f32>()?, token, k)),
            None => None,
        };
        s.out.push(token);
        self.counters.tokens_generated += 1;
        let step = s.text.push(&self.tokenizer, &s.out, &s.req.stop_strings)?;
        self.outbox.push((
            s.events.clone(),
            Event::Token {
                token_id: token,
                text: step.delta,
                logprob,
            },
        ));
        if step.stopped {
            return Ok(Some(FinishReason::Stop));
        }
        let ctx = self.model.config().max_context;
        if s.out.len() >= s.req.max_tokens || s.cache.len() + 1 >= ctx {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    fn publish(&mut self) {
        let names = |ids: &mut dyn Iterator<Item = &SeqId>| {
            let mut v: Vec<String> = ids
                .filter_map(|id| self.seqs.get(id))
                .filter_map(Seq::adapter_name)
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let mut stats = self.counters.clone();
        stats.running = self.running.len();
        stats.waiting = self.waiting.len() + self.loading.values().map(Vec::len).sum::<usize>();
        stats.loading = self.loading.len();
        let mut loading: Vec<String> = self.loading.keys().cloned().collect();
        loading.sort();
        stats.loading_adapters = loading;
        stats.kv_bytes = self.seqs.values().map(|s| s.cache.bytes()).sum();
        stats.adapter_cache = self.cache.stats();
        stats.merged_bytes = self.merged.bytes();
        stats.merges = self.merged.merges;
        stats.prefix_queries = self.prefix.queries;
        stats.prefix_hits = self.prefix.hits;
        stats.prefix_bytes = self.prefix.bytes();
        stats.prefix_blocks = self.prefix.blocks();
        stats.prefix_budget = self.prefix.budget();
        stats.loaded_adapters = self.cache.names();
        let mut merged: Vec<String> = self
            .merged
            .entries
            .values()
            .map(|(_, _, n)| n.clone())
            .collect();
        merged.sort();
        merged.dedup();
        stats.merged_adapters = merged;
        let c = self.model.config();
        stats.max_running = self.cfg.max_running;
        stats.mode = self.cfg.mode;
        stats.kv_capacity_bytes = self.cfg.max_running
            * c.max_context
            * 2
            * c.num_hidden_layers
            * c.kv_dim()
            * self.model.dtype().size_in_bytes();
        stats.running_adapters = names(&mut self.running.iter());
        let waiting_ids: Vec<SeqId> = self
            .waiting
            .iter()
            .copied()
            .chain(self.loading.values().flatten().copied())
            .collect();
        stats.waiting_adapters = names(&mut waiting_ids.iter());
        if let Ok(mut out) = self.stats_out.lock() {
            *out = stats;
        }
    }
}

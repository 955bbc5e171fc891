//! The engine's public vocabulary: configuration, requests, events, stats.

use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::hooks::StepGate;
use super::sampling::{SamplingParams, TokenLogprob};
use super::scheduler::AdapterMode;
use super::{EngineError, FinishReason};
use crate::adapter::{self, CacheStats, Lease};

/// Engine limits and policies (validated by the caller's config).
#[derive(Clone)]
pub struct EngineConfig {
    pub max_running: usize,
    pub max_step_tokens: usize,
    pub max_queued: usize,
    pub mode: AdapterMode,
    /// `auto`: single-adapter steps before merging.
    pub merge_after: usize,
    /// `merged`: steps per adapter turn.
    pub turn_steps: usize,
    pub adapter_cache_bytes: usize,
    pub merged_cache_bytes: usize,
    /// Byte budget of the prefix cache (0: off).
    pub prefix_cache_bytes: usize,
    /// While sequences decode, the most of the step time prompt chunks may take (1.0: no
    /// limit); see [`super::scheduler::SchedulerConfig::prefill_share`].
    pub prefill_share: f64,
    /// Test hook: every step waits for the gate's permit (`None`: steps run freely).
    pub step_gate: Option<StepGate>,
    /// Test hook: a pause after each step, so the real process can be made slow enough for a
    /// test to act while a request runs (the hidden `--test-step-delay-ms`; zero in service).
    pub step_delay: Duration,
    /// Test hook: a pause between reading a cold adapter's files and handing the load to the
    /// worker, so a test can replace the adapter while the load is in flight (zero in service).
    pub load_delay: Duration,
    /// Test hook: each cold load, once its files are read, waits for one of this gate's
    /// permits before it is handed to the worker (up to a minute), so a test decides whether
    /// a replace or delete lands while the load is in flight (`None` in service).
    pub load_gate: Option<StepGate>,
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("max_running", &self.max_running)
            .field("max_step_tokens", &self.max_step_tokens)
            .field("max_queued", &self.max_queued)
            .field("mode", &self.mode)
            .field("merge_after", &self.merge_after)
            .field("turn_steps", &self.turn_steps)
            .field("adapter_cache_bytes", &self.adapter_cache_bytes)
            .field("merged_cache_bytes", &self.merged_cache_bytes)
            .field("prefix_cache_bytes", &self.prefix_cache_bytes)
            .field("prefill_share", &self.prefill_share)
            .field("step_gate", &self.step_gate)
            .field("step_delay", &self.step_delay)
            .field("load_delay", &self.load_delay)
            .field("load_gate", &self.load_gate)
            .finish_non_exhaustive()
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_running: 16,
            max_step_tokens: super::generate::PREFILL_CHUNK,
            max_queued: 256,
            mode: AdapterMode::Unmerged,
            // From benches/DECODE.md, "auto's crossover" (`benches/decode.sh 3 64`, committed in
            // benches/data/decode_modes.json; SmolLM2-135M, f32, 2 cores, one r16 DoRA adapter
            // on every projection): a merge takes 0.227 s and a merged step saves 3.2 ms at 1
            // sequence and 5.3 ms at 8, so a merge pays for itself after ~72 steps at 1 sequence
            // and ~40 at 8. Waiting as many steps as a merge costs is the ski-rental rule (never
            // worse than twice the best choice in hindsight); 48 lies in that range, nearer the
            // batched case the server sees under load. Merged weights are then cached, so later
            // switches back are free.
            merge_after: 48,
            turn_steps: 32,
            adapter_cache_bytes: 1 << 30,
            merged_cache_bytes: 2 << 30,
            prefix_cache_bytes: 1 << 30,
            prefill_share: 1.0,
            step_gate: None,
            step_delay: Duration::ZERO,
            load_delay: Duration::ZERO,
            load_gate: None,
        }
    }
}

/// Which adapter a request runs on.
#[derive(Debug, Clone)]
pub enum AdapterSpec {
    /// A name in the adapter store, resolved (and loaded if cold) by the engine.
    Named(String),
    /// An adapter the caller loaded itself (the CLI's folders).
    Loaded(Lease),
}

/// One sequence (one choice of a [`ValidRequest`](super::ValidRequest)), as the worker runs it.
#[derive(Debug, Clone)]
pub(super) struct SeqRequest {
    pub prompt_token_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub logprobs: Option<usize>,
    /// Extra stop ids besides the model's end-of-sequence ids.
    pub stop_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// Do not stop at end-of-sequence ids (fixed-length benchmark runs).
    pub ignore_eos: bool,
    pub adapter: Option<AdapterSpec>,
    /// Report log-probabilities of the prompt's tokens (OpenAI's `echo` with `logprobs`), with
    /// this many alternatives each.
    pub prompt_logprobs: Option<usize>,
}

/// Which adapter version served a request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdapterVersion {
    pub name: String,
    /// Unique per load: a replaced adapter gets a new one.
    pub version: u64,
    /// Content digest of the files it was loaded from (`sha256:…`).
    pub digest: String,
}

/// What a request's stream yields.
#[derive(Debug)]
pub enum Event {
    /// Log-probabilities of prompt tokens 1.. (token 0 has none), when asked for; sent before
    /// the first token.
    PromptLogprobs(Vec<TokenLogprob>),
    Token {
        token_id: u32,
        /// Text that became final with this token (may be empty, or span several tokens).
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache.
        cached_tokens: usize,
        completion_tokens: usize,
        adapter: Option<AdapterVersion>,
        /// Any text still held back (end of generation).
        text: String,
    },
    Error(EngineError),
}

/// A request's events; dropping it cancels the request.
pub struct EventStream {
    pub(super) rx: UnboundedReceiver<Event>,
}

impl EventStream {
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// For synchronous callers (not from inside an async runtime).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

/// A snapshot of the engine for metrics and tests.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub loading: usize,
    pub kv_bytes: usize,
    /// Steps with at least one adapter row, by how adapters applied.
    pub steps_unmerged: u64,
    pub steps_merged: u64,
    /// Steps whose rows all ran on the base model (no adapter to apply either way).
    pub steps_base: u64,
    pub tokens_generated: u64,
    pub prompt_tokens: u64,
    pub adapter_cache: CacheStats,
    pub merged_bytes: usize,
    pub merges: u64,
    pub running_adapters: Vec<String>,
    pub waiting_adapters: Vec<String>,
    /// Names of the adapters loaded in the cache, and of those with merged weights.
    pub loaded_adapters: Vec<String>,
    pub merged_adapters: Vec<String>,
    /// Names being loaded for waiting requests.
    pub loading_adapters: Vec<String>,
    pub max_running: usize,
    /// KV bytes if every running slot held a full context (for a usage fraction).
    pub kv_capacity_bytes: usize,
    /// The `--adapter-mode`.
    pub mode: AdapterMode,
    /// Prefix cache: prompt tokens looked up and found (vLLM counts tokens), bytes and blocks
    /// held, and its budget.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub prefix_bytes: usize,
    pub prefix_blocks: usize,
    pub prefix_budget: usize,
}

pub(super) enum Command {
    Submit(Box<SeqRequest>, UnboundedSender<Event>),
    /// Several sequences that arrive together: the worker queues all of them before it plans
    /// its next step ([`Engine::submit_all`](super::Engine::submit_all)).
    SubmitAll(Vec<(SeqRequest, UnboundedSender<Event>)>),
    /// A load the worker started has finished; `generation` is the name's catalog generation
    /// when its files were resolved.
    Loaded {
        name: String,
        result: Result<adapter::Adapter, adapter::AdapterError>,
        secs: f64,
        generation: u64,
    },
    /// A validated upload or registration, to go into the cache as it is (no second load).
    /// `done` is answered once the cache holds it and the stats say so.
    Install {
        adapter: Box<adapter::Adapter>,
        secs: f64,
        done: std::sync::mpsc::Sender<()>,
    },
    /// A name was deleted or unloaded: drop what the cache holds for it, then answer `done`.
    Invalidate {
        name: String,
        done: std::sync::mpsc::Sender<()>,
    },
    Shutdown,
}

/// Where an adapter stands in this engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterState {
    /// Known (stored or registered), not in memory.
    OnDisk,
    /// Being loaded for a request.
    Loading,
    /// In the adapter cache.
    Loaded,
    /// In the cache, with merged weights too.
    Merged,
    /// Its stored files failed validation (see [`AdapterEntry::error`]).
    Invalid,
}

impl AdapterState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterState::OnDisk => "on_disk",
            AdapterState::Loading => "loading",
            AdapterState::Loaded => "loaded",
            AdapterState::Merged => "merged",
            AdapterState::Invalid => "invalid",
        }
    }
}

/// One adapter as the engine lists it: the catalog's description and the cache's state.
#[derive(Debug, Clone)]
pub struct AdapterEntry {
    pub name: String,
    pub source: adapter::Source,
    /// `None` when its `adapter_config.json` does not parse.
    pub config: Option<adapter::AdapterConfig>,
    pub state: AdapterState,
    /// The loader's error, for state `Invalid`.
    pub error: Option<String>,
}

//! The serving engine: the [`Engine`] handle (validate, submit, the adapter verbs, stats) to
//! one worker thread that owns the model's KV caches, the adapter caches and every running
//! sequence, under the pure [`scheduler`]; the [`adapter::Catalog`](crate::adapter::Catalog) it
//! owns; the one validated request type ([`ValidRequest`]); sampling and log-probabilities;
//! text streaming with stop strings; the merged-weights cache; test hooks ([`StepGate`]); and
//! [`generate`], the plain reference generation loop.

mod generate;
mod handle;
mod hooks;
mod merged_cache;
pub mod prefix_cache;
mod request;
mod sampling;
pub mod scheduler;
mod text;
mod types;
mod worker;

/// The adapter vocabulary the engine's verbs speak (re-exported so callers need only the
/// engine).
pub use crate::adapter::{
    AdapterError, AdapterInfo, CatalogError, DiskCacheStats, StoreError, StoreHealth, Upload,
};
pub use generate::{
    generate, generate_with_stats, FinishReason, GenerateOutput, GenerateRequest, GenerateStats,
    MAX_LOGPROBS,
};
pub use handle::Engine;
pub use hooks::StepGate;
pub use request::{EngineRequest, LogprobsAsk, Param, ValidRequest, MAX_CHOICES, MAX_N, MAX_STOP};
pub use sampling::{logprobs_of, Sampler, SamplingParams, TokenLogprob, TopLogprob};
pub use scheduler::AdapterMode;
pub use types::{
    AdapterEntry, AdapterSpec, AdapterState, AdapterVersion, EngineConfig, EngineStats, Event,
    EventStream,
};

use crate::model::ModelError;

/// Errors of generation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be served as given: `param` is the field, the message says what to
    /// change.
    #[error("invalid request: {msg}")]
    InvalidRequest { param: Param, msg: String },
    #[error("model {0:?} is neither the base model nor an adapter")]
    ModelNotFound(String),
    #[error(
        "the prompt has {prompt} tokens and max_tokens is {max_tokens}, but the model's context is {context} tokens: \
         shorten the prompt or lower max_tokens"
    )]
    ContextLength {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("the server is at capacity: the request queue is full; retry later")]
    Overloaded,
    #[error("adapter {0:?} is not in the adapter store")]
    AdapterNotFound(String),
    #[error("adapter {name:?} failed to load: {error}")]
    AdapterLoad {
        name: String,
        error: std::sync::Arc<crate::adapter::AdapterError>,
    },
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ModelError> for EngineError {
    fn from(e: ModelError) -> Self {
        EngineError::Internal(e.to_string())
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Internal(e.to_string())
    }
}

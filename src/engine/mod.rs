//! Generation on top of the model: sampling, log-probabilities, and the batched generation
//! loop used by `dora-serve generate`. (The serving engine, with its worker, queue and
//! scheduler, grows here.)

mod generate;
pub mod scheduler;
mod sampling;

pub use generate::{
    generate, generate_with_stats, ApplyMode, FinishReason, GenerateOutput, GenerateRequest,
    GenerateStats, MAX_LOGPROBS,
};
pub use sampling::{logprobs_of, Sampler, SamplingParams, TokenLogprob, TopLogprob};

use crate::model::ModelError;

/// Errors of generation.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be served as given; the message says what to change.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
}

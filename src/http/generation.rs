//! What completions and chat share before their requests are validated: request ids,
//! tokenizing off the async threads, the sampling fields, and the texts of tokens and finish
//! reasons.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{now_secs, ApiError, AppState};
use crate::engine::{AdapterSpec, EngineRequest, FinishReason, SamplingParams, ValidRequest};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(super) fn request_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:x}{:08x}",
        now_secs(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// The sampling fields both endpoints take, as the API gives them.
pub(super) struct SamplingFields {
    pub(super) temperature: Option<f64>,
    pub(super) top_p: Option<f64>,
    pub(super) top_k: Option<u32>,
    pub(super) seed: Option<u64>,
    pub(super) presence_penalty: Option<f64>,
    pub(super) frequency_penalty: Option<f64>,
}

impl SamplingFields {
    /// With OpenAI's defaults; without a seed each request draws its own. Checked by the
    /// engine's validation.
    pub(super) fn params(self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.map(|k| k as usize),
            seed: self.seed.unwrap_or_else(|| {
                now_secs()
                    ^ NEXT_ID
                        .fetch_add(1, Ordering::Relaxed)
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            }),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
        }
    }
}

/// How a text becomes tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Encoding {
    /// A completion prompt: the tokenizer's own BOS and post-processing added.
    Prompt,
    /// A rendered chat template: tokens as written, nothing added (the template writes its
    /// own BOS, as transformers' `apply_chat_template` assumes).
    Rendered,
}

pub(super) async fn tokenize(
    s: &AppState,
    texts: Vec<String>,
    how: Encoding,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let tok = std::sync::Arc::clone(s.engine.tokenizer());
    tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .map(|t| {
                match how {
                    Encoding::Prompt => tok.encode(t),
                    Encoding::Rendered => tok.encode_plain(t),
                }
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}

/// The engine's validation, after a name this replica does not know was looked up in a shared
/// adapter store (uploaded elsewhere a moment ago, before the next refresh saw it).
pub(super) async fn validate(s: &AppState, req: EngineRequest) -> Result<ValidRequest, ApiError> {
    if s.engine.store_health().remote {
        let adapter = match &req.adapter {
            Some(AdapterSpec::Named(n)) => Some(n.as_str()),
            _ => None,
        };
        for name in [req.model.as_deref(), adapter].into_iter().flatten() {
            if name.is_empty() || name == s.engine.info().id || s.engine.adapter_exists(name) {
                continue;
            }
            let (engine, name) = (s.engine.clone(), name.to_string());
            let _ = tokio::task::spawn_blocking(move || engine.lookup_adapter(&name)).await;
        }
    }
    Ok(s.engine.validate(req)?)
}

pub(super) fn token_text(s: &AppState, id: u32) -> String {
    s.engine
        .tokenizer()
        .decode(&[id], false)
        .unwrap_or_default()
}

pub(super) fn finish_str(r: FinishReason) -> String {
    match r {
        FinishReason::Stop => "stop".into(),
        FinishReason::Length => "length".into(),
    }
}

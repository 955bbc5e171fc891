//! What completions and chat share: resolving the adapter a request names, validating the
//! common fields, submitting choices to the engine, and merging their event streams.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::response::sse::Event as SseEvent;
use futures_util::stream::{self, Stream, StreamExt};

use super::dto::*;
use super::{now_secs, ApiError, AppState};
use crate::engine::{AdapterSpec, EngineRequest, Event, EventStream, FinishReason, SamplingParams};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(super) fn request_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:x}{:08x}",
        now_secs(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// The adapter a request names through `adapter` and/or `model` (vLLM style).
pub(super) fn resolve_adapter(
    s: &AppState,
    model: Option<&str>,
    adapter: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let from_model = match model {
        None | Some("") => None,
        Some(m) if m == s.cfg.model_id => None,
        Some(m) if s.engine.adapter_exists(m) => Some(m.to_string()),
        Some(m) => {
            return Err(if adapter.is_none() {
                ApiError::ModelNotFound(m.to_string())
            } else {
                ApiError::invalid(
                    "model",
                    format!(
                        "model {m:?} is neither the base model {:?} nor an adapter",
                        s.cfg.model_id
                    ),
                )
            })
        }
    };
    match (from_model, adapter) {
        (Some(m), Some(a)) if m != a => Err(ApiError::invalid(
            "adapter",
            format!("model names adapter {m:?} but adapter names {a:?}: name one adapter"),
        )),
        (_, Some(a)) if !s.engine.adapter_exists(a) => {
            Err(ApiError::AdapterNotFound(a.to_string()))
        }
        (_, Some(a)) => Ok(Some(a.to_string())),
        (m, None) => Ok(m),
    }
}

/// What completions and chat share, validated.
pub(super) struct Common {
    pub(super) sampling: SamplingParams,
    pub(super) max_tokens: usize,
    pub(super) n: usize,
    pub(super) stop: Vec<String>,
    pub(super) adapter: Option<String>,
    pub(super) ignore_eos: bool,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn common(
    s: &AppState,
    model: Option<&str>,
    adapter: Option<&str>,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u32>,
    n: Option<u32>,
    stop: Option<Stop>,
    seed: Option<u64>,
    presence: Option<f64>,
    frequency: Option<f64>,
    ignore_eos: Option<bool>,
    default_max_tokens: usize,
) -> Result<Common, ApiError> {
    let adapter = resolve_adapter(s, model, adapter)?;
    let n = n.unwrap_or(1) as usize;
    if !(1..=16).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n must be between 1 and 16, got {n}"),
        ));
    }
    let stop = stop.map(Stop::into_vec).unwrap_or_default();
    if stop.len() > 4 || stop.iter().any(|x| x.is_empty()) {
        return Err(ApiError::invalid(
            "stop",
            "give at most 4 non-empty stop strings",
        ));
    }
    let sampling = SamplingParams {
        temperature: temperature.unwrap_or(1.0),
        top_p: top_p.unwrap_or(1.0),
        top_k: top_k.map(|k| k as usize),
        // Without a seed each request draws its own.
        seed: seed.unwrap_or_else(|| {
            now_secs()
                ^ NEXT_ID
                    .fetch_add(1, Ordering::Relaxed)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        }),
        presence_penalty: presence.unwrap_or(0.0),
        frequency_penalty: frequency.unwrap_or(0.0),
    };
    sampling.check().map_err(|m| {
        let param = [
            "temperature",
            "top_p",
            "top_k",
            "presence_penalty",
            "frequency_penalty",
        ]
        .into_iter()
        .find(|p| m.starts_with(p))
        .unwrap_or("temperature");
        ApiError::invalid(param, m)
    })?;
    Ok(Common {
        sampling,
        max_tokens: max_tokens.map_or(default_max_tokens, |m| m as usize),
        n,
        stop,
        adapter,
        ignore_eos: ignore_eos.unwrap_or(false),
    })
}

/// One choice being generated.
pub(super) struct Choice {
    pub(super) index: usize,
    pub(super) prompt: Vec<u32>,
    pub(super) stream: EventStream,
    /// An event read ahead to catch load errors before answering.
    pub(super) first: Option<Event>,
}

/// Submit every (prompt, n) choice; wait for each one's first event so that errors (adapter
/// load failures) become HTTP errors rather than broken streams.
pub(super) async fn start(
    s: &AppState,
    c: &Common,
    prompts: Vec<Vec<u32>>,
    logprobs: Option<usize>,
    echo_logprobs: bool,
) -> Result<Vec<Choice>, ApiError> {
    let mut choices = Vec::with_capacity(prompts.len() * c.n);
    for (pi, prompt) in prompts.into_iter().enumerate() {
        for k in 0..c.n {
            let mut sampling = c.sampling.clone();
            sampling.seed = sampling.seed.wrapping_add(k as u64);
            let stream = s.engine.submit(EngineRequest {
                prompt_token_ids: prompt.clone(),
                max_tokens: c.max_tokens,
                sampling,
                logprobs,
                stop_token_ids: vec![],
                stop_strings: c.stop.clone(),
                ignore_eos: c.ignore_eos,
                adapter: c.adapter.clone().map(AdapterSpec::Named),
                prompt_logprobs: if echo_logprobs { logprobs } else { None },
            })?;
            choices.push(Choice {
                index: pi * c.n + k,
                prompt: prompt.clone(),
                stream,
                first: None,
            });
        }
    }
    for ch in choices.iter_mut() {
        match ch.stream.next().await {
            Some(Event::Error(e)) => return Err(e.into()),
            Some(ev) => ch.first = Some(ev),
            None => return Err(ApiError::Unavailable),
        }
    }
    Ok(choices)
}

pub(super) async fn tokenize(s: &AppState, texts: Vec<String>) -> Result<Vec<Vec<u32>>, ApiError> {
    let tok = std::sync::Arc::clone(s.engine.tokenizer());
    tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .map(|t| {
                tok.encode(t)
                    .map_err(|e| ApiError::invalid("prompt", e.to_string()))
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
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

/// Merge the choices' events into one event stream (choices interleave as tokens arrive).
pub(super) fn merged_events(
    choices: Vec<Choice>,
) -> impl Stream<Item = (usize, Vec<u32>, Event)> + Send {
    let per_choice = choices.into_iter().map(|mut ch| {
        let first = ch.first.take();
        let (index, prompt) = (ch.index, ch.prompt.clone());
        stream::iter(first)
            .chain(stream::unfold(ch.stream, |mut s| async move {
                s.next().await.map(|e| (e, s))
            }))
            .map(move |e| (index, prompt.clone(), e))
            .boxed()
    });
    stream::select_all(per_choice)
}

pub(super) fn sse_json<T: serde::Serialize>(v: &T) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(serde_json::to_string(v).unwrap_or_default()))
}

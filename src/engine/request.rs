//! One validated request. [`EngineRequest`] is what a caller asks for (the API's fields, the
//! CLI's, a test's), nothing checked; [`Engine::validate`] is the one function that turns it
//! into a [`ValidRequest`], naming the offending parameter structurally ([`Param`]) when it
//! cannot; [`Engine::submit`] accepts nothing else. (TGI's `ValidGenerateRequest`.)

use super::handle::Engine;
use super::sampling::SamplingParams;
use super::types::AdapterSpec;
use super::{EngineError, MAX_LOGPROBS};

/// A request field, as the OpenAI API names it: what an invalid request points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    Prompt,
    Messages,
    Model,
    Adapter,
    MaxTokens,
    N,
    Stop,
    Temperature,
    TopP,
    TopK,
    PresencePenalty,
    FrequencyPenalty,
    Logprobs,
    TopLogprobs,
}

impl Param {
    pub fn as_str(self) -> &'static str {
        match self {
            Param::Prompt => "prompt",
            Param::Messages => "messages",
            Param::Model => "model",
            Param::Adapter => "adapter",
            Param::MaxTokens => "max_tokens",
            Param::N => "n",
            Param::Stop => "stop",
            Param::Temperature => "temperature",
            Param::TopP => "top_p",
            Param::TopK => "top_k",
            Param::PresencePenalty => "presence_penalty",
            Param::FrequencyPenalty => "frequency_penalty",
            Param::Logprobs => "logprobs",
            Param::TopLogprobs => "top_logprobs",
        }
    }
}

/// Most choices (prompts × n) one request may ask for.
pub const MAX_CHOICES: usize = 64;
/// Most choices per prompt (`n`).
pub const MAX_N: usize = 16;
/// Most stop strings.
pub const MAX_STOP: usize = 4;

/// How many log-probability alternatives a request asks for, and under which field and limit
/// (OpenAI's completions allow `logprobs` up to 5, chat `top_logprobs` up to 20).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogprobsAsk {
    pub top: usize,
    pub param: Param,
    pub limit: usize,
}

impl LogprobsAsk {
    /// `top` alternatives under the engine's own limit ([`MAX_LOGPROBS`]).
    pub fn top(top: usize) -> Self {
        Self {
            top,
            param: Param::Logprobs,
            limit: MAX_LOGPROBS,
        }
    }
}

/// What a caller asks for: one or more prompts, `n` choices each, and how to generate them.
/// Nothing is checked until [`Engine::validate`].
#[derive(Debug, Clone)]
pub struct EngineRequest {
    /// Token ids of each prompt.
    pub prompts: Vec<Vec<u32>>,
    /// Choices per prompt; choice `k` samples with seed `sampling.seed + k`.
    pub n: usize,
    /// `None`: until the end of the context (or a stop).
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Log-probabilities of each generated token, with alternatives.
    pub logprobs: Option<LogprobsAsk>,
    /// Also report the prompt tokens' log-probabilities (OpenAI's `echo` with `logprobs`).
    pub prompt_logprobs: bool,
    /// Extra stop ids besides the model's end-of-sequence ids.
    pub stop_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// Do not stop at end-of-sequence ids (fixed-length benchmark runs).
    pub ignore_eos: bool,
    /// The OpenAI `model` field: the base model's id, or an adapter's name (vLLM style).
    pub model: Option<String>,
    pub adapter: Option<AdapterSpec>,
}

impl EngineRequest {
    /// One prompt, one choice, `max_tokens` tokens, default sampling, on the base model.
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompts: vec![prompt],
            n: 1,
            max_tokens: Some(max_tokens),
            sampling: SamplingParams::default(),
            logprobs: None,
            prompt_logprobs: false,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
            model: None,
            adapter: None,
        }
    }
}

/// A request that [`Engine::validate`] accepted: every limit holds, the adapter exists (or is
/// in hand), and each choice fits the context. Only [`Engine::validate`] makes one.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub(super) req: EngineRequest,
}

impl ValidRequest {
    pub fn prompts(&self) -> &[Vec<u32>] {
        &self.req.prompts
    }

    /// Choices per prompt.
    pub fn n(&self) -> usize {
        self.req.n
    }

    /// All choices: prompts × n, numbered prompt-major (choice `p·n + k`).
    pub fn choices(&self) -> usize {
        self.req.prompts.len() * self.req.n
    }

    /// The adapter the request runs on, by name.
    pub fn adapter_name(&self) -> Option<&str> {
        match &self.req.adapter {
            Some(AdapterSpec::Named(n)) => Some(n),
            Some(AdapterSpec::Loaded(l)) => Some(&l.name),
            None => None,
        }
    }

    pub fn logprobs(&self) -> Option<usize> {
        self.req.logprobs.map(|l| l.top)
    }
}

fn invalid(param: Param, msg: impl Into<String>) -> EngineError {
    EngineError::InvalidRequest {
        param,
        msg: msg.into(),
    }
}

/// Checks that need only the vocabulary: shared with the reference loop.
pub(super) fn check_prompt(prompt: &[u32], vocab_size: usize) -> Result<(), EngineError> {
    if prompt.is_empty() {
        return Err(invalid(
            Param::Prompt,
            "the prompt is empty: give at least one token",
        ));
    }
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(invalid(
            Param::Prompt,
            format!("prompt token id {t} is outside the vocabulary (0..{vocab_size})"),
        ));
    }
    Ok(())
}

impl Engine {
    /// The one validation of a request: limits, sampling settings, prompts against the
    /// vocabulary and the context, and the adapter it names (through `adapter` and/or
    /// `model`, vLLM style). Errors name their parameter.
    pub fn validate(&self, mut req: EngineRequest) -> Result<ValidRequest, EngineError> {
        let cfg = self.model().config();
        req.adapter = self.resolve_adapter(req.model.as_deref(), req.adapter.take())?;
        if !(1..=MAX_N).contains(&req.n) {
            return Err(invalid(
                Param::N,
                format!("n must be between 1 and {MAX_N}, got {}", req.n),
            ));
        }
        if req.stop_strings.len() > MAX_STOP || req.stop_strings.iter().any(String::is_empty) {
            return Err(invalid(
                Param::Stop,
                format!("give at most {MAX_STOP} non-empty stop strings"),
            ));
        }
        req.sampling.check()?;
        if let Some(l) = req.logprobs {
            if l.top > l.limit.min(MAX_LOGPROBS) {
                return Err(invalid(
                    l.param,
                    format!("{} must be between 0 and {}", l.param.as_str(), l.limit),
                ));
            }
        }
        if req.prompts.is_empty() {
            return Err(invalid(Param::Prompt, "the prompt is empty"));
        }
        if req.prompts.len() * req.n > MAX_CHOICES {
            return Err(invalid(
                Param::Prompt,
                format!("at most {MAX_CHOICES} completions (prompts × n) per request"),
            ));
        }
        for p in &req.prompts {
            check_prompt(p, cfg.vocab_size)?;
            // Like OpenAI and vLLM: the whole request must fit, not be cut short at the context.
            let max_tokens = req.max_tokens.unwrap_or(1).max(1);
            if p.len() + max_tokens > cfg.max_context {
                return Err(EngineError::ContextLength {
                    prompt: p.len(),
                    max_tokens: req.max_tokens.unwrap_or(0),
                    context: cfg.max_context,
                });
            }
        }
        Ok(ValidRequest { req })
    }

    /// The adapter a request names through `adapter` and/or `model` (vLLM style).
    fn resolve_adapter(
        &self,
        model: Option<&str>,
        adapter: Option<AdapterSpec>,
    ) -> Result<Option<AdapterSpec>, EngineError> {
        let base = &self.info().id;
        let from_model = match model {
            None | Some("") => None,
            Some(m) if m == base => None,
            Some(m) if self.adapter_exists(m) => Some(m.to_string()),
            Some(m) if adapter.is_none() => return Err(EngineError::ModelNotFound(m.into())),
            Some(m) => {
                return Err(invalid(
                    Param::Model,
                    format!("model {m:?} is neither the base model {base:?} nor an adapter"),
                ))
            }
        };
        let named = |a: &AdapterSpec| match a {
            AdapterSpec::Named(n) => n.clone(),
            AdapterSpec::Loaded(l) => l.name.clone(),
        };
        match (from_model, adapter) {
            (Some(m), Some(a)) if m != named(&a) => Err(invalid(
                Param::Adapter,
                format!(
                    "model names adapter {m:?} but adapter names {:?}: name one adapter",
                    named(&a)
                ),
            )),
            (_, Some(AdapterSpec::Named(a))) if !self.adapter_exists(&a) => {
                Err(EngineError::AdapterNotFound(a))
            }
            (_, Some(a)) => Ok(Some(a)),
            (m, None) => Ok(m.map(AdapterSpec::Named)),
        }
    }
}

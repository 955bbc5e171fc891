//! The generation loop: every request's prompt is prefilled in one packed forward, then all
//! unfinished sequences decode together, one token each per step.

use serde::Serialize;

use super::sampling::{logprobs_of, Sampler, SamplingParams, TokenLogprob};
use super::EngineError;
use crate::model::{KvCache, Llama, LogitsFor, SeqInput, Tokenizer};

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token was produced.
    Stop,
    /// `max_tokens` or the model's context was reached.
    Length,
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_token_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Report this many top alternatives per generated token (0–20); `None` reports nothing.
    pub logprobs: Option<usize>,
    /// Generation stops when one of these is produced (it is not part of the output).
    pub stop_token_ids: Vec<u32>,
}

/// The result for one request; `dora-serve generate --json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateOutput {
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// Where the time of a [`generate`] call went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerateStats {
    /// The first step: every prompt prefilled, first tokens sampled.
    pub prefill_secs: f64,
    /// All later steps.
    pub decode_secs: f64,
    /// Tokens produced by the decode steps, over all sequences.
    pub decode_tokens: usize,
}

impl GenerateStats {
    /// Aggregate decode throughput over all sequences.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        if self.decode_secs > 0.0 {
            self.decode_tokens as f64 / self.decode_secs
        } else {
            0.0
        }
    }
}

struct Running {
    cache: KvCache,
    sampler: Sampler,
    out: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    /// The token to feed next (the last one sampled).
    next: u32,
    finish: Option<FinishReason>,
}

pub const MAX_LOGPROBS: usize = 20;

fn check(model: &Llama, req: &GenerateRequest) -> Result<(), EngineError> {
    let cfg = model.config();
    let bad = |m: String| Err(EngineError::InvalidRequest(m));
    if req.prompt_token_ids.is_empty() {
        return bad("the prompt is empty: give at least one token".into());
    }
    if let Some(&t) = req
        .prompt_token_ids
        .iter()
        .find(|&&t| t as usize >= cfg.vocab_size)
    {
        return bad(format!(
            "prompt token id {t} is outside the vocabulary (0..{})",
            cfg.vocab_size
        ));
    }
    if req.prompt_token_ids.len() >= cfg.max_context {
        return bad(format!(
            "the prompt has {} tokens; the model's context is {} and must leave room for at least one new token",
            req.prompt_token_ids.len(),
            cfg.max_context
        ));
    }
    if req.logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
        return bad(format!("logprobs must be at most {MAX_LOGPROBS}"));
    }
    req.sampling.check().map_err(EngineError::InvalidRequest)
}

/// Generate for every request at once, returning outputs in request order.
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    reqs: &[GenerateRequest],
) -> Result<Vec<GenerateOutput>, EngineError> {
    generate_with_stats(model, tokenizer, reqs).map(|(out, _)| out)
}

/// [`generate`], also saying where the time went.
pub fn generate_with_stats(
    model: &Llama,
    tokenizer: &Tokenizer,
    reqs: &[GenerateRequest],
) -> Result<(Vec<GenerateOutput>, GenerateStats), EngineError> {
    let mut stats = GenerateStats::default();
    for r in reqs {
        check(model, r)?;
    }
    let ctx = model.config().max_context;
    let mut seqs: Vec<Running> = reqs
        .iter()
        .map(|r| Running {
            cache: model.new_cache(),
            sampler: Sampler::new(&r.sampling),
            out: Vec::new(),
            logprobs: Vec::new(),
            next: 0,
            finish: (r.max_tokens == 0).then_some(FinishReason::Length),
        })
        .collect();

    let mut first = true;
    loop {
        let step_start = std::time::Instant::now();
        let is_prefill = first;
        let active: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].finish.is_none())
            .collect();
        if active.is_empty() {
            break;
        }
        let feeds: Vec<Vec<u32>> = active
            .iter()
            .map(|&i| {
                if first {
                    reqs[i].prompt_token_ids.clone()
                } else {
                    vec![seqs[i].next]
                }
            })
            .collect();
        first = false;
        let logits = {
            let mut inputs: Vec<SeqInput> = Vec::with_capacity(active.len());
            let mut caches: Vec<&mut KvCache> = seqs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| active.contains(i))
                .map(|(_, s)| &mut s.cache)
                .collect();
            for (cache, tokens) in caches.drain(..).zip(&feeds) {
                inputs.push(SeqInput {
                    tokens,
                    cache,
                    logits: LogitsFor::Last,
                });
            }
            model.forward(&mut inputs)?
        };
        for (&i, logits) in active.iter().zip(logits) {
            let row = logits.squeeze(0)?;
            let seq = &mut seqs[i];
            let req = &reqs[i];
            let token = seq.sampler.sample(&row)?;
            if req.stop_token_ids.contains(&token) {
                seq.finish = Some(FinishReason::Stop);
                continue;
            }
            if let Some(k) = req.logprobs {
                seq.logprobs
                    .push(logprobs_of(&row.to_vec1::<f32>()?, token, k));
            }
            seq.out.push(token);
            seq.next = token;
            // The sequence now holds `cache.len() + 1` tokens; the next feed needs one more position.
            if seq.out.len() >= req.max_tokens || seq.cache.len() + 1 >= ctx {
                seq.finish = Some(FinishReason::Length);
            }
            if !is_prefill {
                stats.decode_tokens += 1;
            }
        }
        let secs = step_start.elapsed().as_secs_f64();
        if is_prefill {
            stats.prefill_secs += secs;
        } else {
            stats.decode_secs += secs;
        }
    }

    let outs = seqs
        .into_iter()
        .zip(reqs)
        .map(|(s, r)| {
            Ok(GenerateOutput {
                text: tokenizer.decode(&s.out, true)?,
                prompt_token_ids: r.prompt_token_ids.clone(),
                token_ids: s.out,
                finish_reason: s.finish.unwrap_or(FinishReason::Length),
                logprobs: r.logprobs.map(|_| s.logprobs),
            })
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    Ok((outs, stats))
}

//! The generation loop: every request's prompt is prefilled in one packed forward, then all
//! unfinished sequences decode together, one token each per step. Unmerged, one batch mixes
//! any adapters; merged, each adapter's requests run as their own batch on that adapter's
//! merged weights, in turn.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::request::{check_prompt, Param};
use super::sampling::{logprobs_of, Sampler, SamplingParams, TokenLogprob};
use super::scheduler::AdapterMode;
use super::EngineError;
use crate::model::{Decoder, KvCache, LogitsFor, SeqInput, Tokenizer};
use crate::ops::{AdapterWeights, MergedWeights};

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
    /// `None` runs the base model.
    pub adapter: Option<Arc<AdapterWeights>>,
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
    /// Steps that fed prompt chunks (prompts prefilled, first tokens sampled).
    pub prefill_secs: f64,
    /// All later steps.
    pub decode_secs: f64,
    /// Tokens produced by the decode steps, over all sequences.
    pub decode_tokens: usize,
    /// Time spent merging adapters (merged mode).
    pub merge_secs: f64,
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

/// A sequence of the reference loop as it runs (the engine's is `worker::Seq`).
struct RefSeq {
    cache: KvCache,
    sampler: Sampler,
    out: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
}

pub const MAX_LOGPROBS: usize = 20;

/// Prompt tokens fed per sequence per step of [`generate`]: the server's default
/// `--max-step-tokens`.
pub const PREFILL_CHUNK: usize = 512;

fn check(model: &Decoder, req: &GenerateRequest) -> Result<(), EngineError> {
    let cfg = model.config();
    check_prompt(&req.prompt_token_ids, cfg.vocab_size)?;
    if req.logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
        return Err(EngineError::InvalidRequest {
            param: Param::Logprobs,
            msg: format!("logprobs must be at most {MAX_LOGPROBS}"),
        });
    }
    req.sampling.check()?;
    // The reference loop stops at the context; it only needs room for one new token.
    if req.prompt_token_ids.len() >= cfg.max_context {
        return Err(EngineError::InvalidRequest {
            param: Param::Prompt,
            msg: format!(
                "the prompt has {} tokens; the model's context is {} and must leave room for at least one new token",
                req.prompt_token_ids.len(),
                cfg.max_context
            ),
        });
    }
    Ok(())
}

/// Generate for every request, returning outputs in request order.
pub fn generate(
    model: &Decoder,
    tokenizer: &Tokenizer,
    reqs: &[GenerateRequest],
    mode: AdapterMode,
) -> Result<Vec<GenerateOutput>, EngineError> {
    generate_with_stats(model, tokenizer, reqs, mode).map(|(out, _)| out)
}

/// [`generate`], also saying where the time went.
pub fn generate_with_stats(
    model: &Decoder,
    tokenizer: &Tokenizer,
    reqs: &[GenerateRequest],
    mode: AdapterMode,
) -> Result<(Vec<GenerateOutput>, GenerateStats), EngineError> {
    for r in reqs {
        check(model, r)?;
    }
    let mut stats = GenerateStats::default();
    let mut outs: Vec<Option<GenerateOutput>> = vec![None; reqs.len()];
    // Auto, without the engine's hysteresis (this loop runs one batch): merged when every
    // request runs on one adapter, unmerged otherwise.
    let mode = match mode {
        AdapterMode::Auto => {
            let key = |r: &GenerateRequest| r.adapter.as_ref().map(|a| a.id());
            let one = reqs.windows(2).all(|w| key(&w[0]) == key(&w[1]));
            if one {
                AdapterMode::Merged
            } else {
                AdapterMode::Unmerged
            }
        }
        m => m,
    };
    // Batches as (request indices, merged weights): one mixed batch unmerged; one batch per
    // adapter (in order of first appearance) merged.
    let mut batches: Vec<Vec<usize>> = Vec::new();
    match mode {
        AdapterMode::Unmerged => batches.push((0..reqs.len()).collect()),
        AdapterMode::Merged | AdapterMode::Auto => {
            let mut keys: Vec<Option<u64>> = Vec::new();
            for (i, r) in reqs.iter().enumerate() {
                let key = r.adapter.as_ref().map(|a| a.id());
                match keys.iter().position(|k| *k == key) {
                    Some(b) => batches[b].push(i),
                    None => {
                        keys.push(key);
                        batches.push(vec![i]);
                    }
                }
            }
        }
    }
    for batch in batches {
        let merged = match (mode, &reqs[batch[0]].adapter) {
            (AdapterMode::Merged, Some(adapter)) => {
                let start = Instant::now();
                let m = model.merge(adapter)?;
                stats.merge_secs += start.elapsed().as_secs_f64();
                Some(m)
            }
            _ => None,
        };
        let group: Vec<&GenerateRequest> = batch.iter().map(|&i| &reqs[i]).collect();
        let results = run_batch(model, tokenizer, &group, merged.as_ref(), &mut stats)?;
        for (i, out) in batch.into_iter().zip(results) {
            outs[i] = Some(out);
        }
    }
    let outs = outs
        .into_iter()
        .map(|o| o.expect("every request ran in a batch"))
        .collect();
    Ok((outs, stats))
}

fn run_batch(
    model: &Decoder,
    tokenizer: &Tokenizer,
    reqs: &[&GenerateRequest],
    merged: Option<&MergedWeights>,
    stats: &mut GenerateStats,
) -> Result<Vec<GenerateOutput>, EngineError> {
    let ctx = model.config().max_context;
    let mut seqs: Vec<RefSeq> = reqs
        .iter()
        .map(|r| RefSeq {
            cache: model.new_cache(),
            sampler: Sampler::new(&r.sampling),
            out: Vec::new(),
            logprobs: Vec::new(),
            finish: (r.max_tokens == 0).then_some(FinishReason::Length),
        })
        .collect();

    // Prompts are fed in chunks of at most PREFILL_CHUNK tokens a step, as the server's
    // scheduler feeds them (`--max-step-tokens`, same default), so both run the same chunked
    // attention over the cache; the step that feeds a prompt's last chunk samples its first
    // token.
    let mut fed = vec![0usize; seqs.len()];
    loop {
        let step_start = Instant::now();
        let mut active: Vec<(usize, &mut RefSeq)> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| s.finish.is_none())
            .collect();
        if active.is_empty() {
            break;
        }
        let prefill = active
            .iter()
            .any(|(i, _)| fed[*i] < reqs[*i].prompt_token_ids.len());
        let feeds: Vec<Vec<u32>> = active
            .iter()
            .map(|(i, s)| {
                let prompt = &reqs[*i].prompt_token_ids;
                if fed[*i] < prompt.len() {
                    let end = (fed[*i] + PREFILL_CHUNK).min(prompt.len());
                    prompt[fed[*i]..end].to_vec()
                } else {
                    vec![*s.out.last().expect("a decoding sequence has output")]
                }
            })
            .collect();
        let logits = {
            let mut inputs: Vec<SeqInput> = active
                .iter_mut()
                .zip(&feeds)
                .map(|((i, s), tokens)| SeqInput {
                    tokens,
                    cache: &mut s.cache,
                    logits: LogitsFor::Last,
                    adapter: reqs[*i].adapter.as_deref(),
                    prompt_len: reqs[*i].prompt_token_ids.len(),
                })
                .collect();
            model.forward(&mut inputs, merged)?
        };
        for (((i, seq), logits), tokens) in active.iter_mut().zip(logits).zip(&feeds) {
            let req = reqs[*i];
            let decoding = fed[*i] >= req.prompt_token_ids.len();
            if !decoding {
                fed[*i] += tokens.len();
                if fed[*i] < req.prompt_token_ids.len() {
                    continue;
                }
            }
            let row = logits.squeeze(0)?;
            let token = seq.sampler.sample(&row, &seq.out)?;
            if req.stop_token_ids.contains(&token) {
                seq.finish = Some(FinishReason::Stop);
                continue;
            }
            if let Some(k) = req.logprobs {
                seq.logprobs
                    .push(logprobs_of(&row.to_vec1::<f32>()?, token, k));
            }
            seq.out.push(token);
            if !prefill {
                stats.decode_tokens += 1;
            }
            // The sequence now holds `cache.len() + 1` tokens; the next feed needs one more position.
            if seq.out.len() >= req.max_tokens || seq.cache.len() + 1 >= ctx {
                seq.finish = Some(FinishReason::Length);
            }
        }
        let secs = step_start.elapsed().as_secs_f64();
        if prefill {
            stats.prefill_secs += secs;
        } else {
            stats.decode_secs += secs;
        }
    }

    seqs.into_iter()
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
        .collect()
}

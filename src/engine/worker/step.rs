//! One engine step: plan it, admit the planned sequences, run the planned rows in one packed
//! forward (unmerged, or on one adapter's merged weights), and absorb each row's logits.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Seq, Worker};
use crate::engine::prefix_cache::BLOCK;
use crate::engine::sampling::{logprobs_of, TokenLogprob};
use crate::engine::scheduler::{Plan, Running, SeqId, StepApply, Waiting, HELD_SHORT_PROMPT};
use crate::engine::types::*;
use crate::engine::EngineError;
use crate::model::{LogitsFor, SeqInput};

impl Worker {
    /// One engine step: plan it, admit, run the planned rows in one packed forward, and turn
    /// each row's logits into prompt progress, a token, or a finished sequence.
    pub(super) fn step(&mut self) -> Result<(), EngineError> {
        let Plan { admit, rows, apply } = self.plan();
        self.admit(&admit);
        let Some(apply) = apply else { return Ok(()) };
        if rows.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        // Prefill, for the share the scheduler keeps: chunks of prompts it may hold. Short
        // prompts are never held, so they are not counted either: new streams' prompts used
        // up a share of 0.2 and held a 4096-token prompt nearly to a standstill.
        let (prefill, decode) = rows.iter().fold((false, false), |(p, d), (id, _)| {
            let s = &self.seqs[id];
            let pending = s.req.prompt_token_ids.len().saturating_sub(s.fed);
            (p || pending > HELD_SHORT_PROMPT, d || pending == 0)
        });
        let merged = self.apply(&rows, apply)?;
        if merged.is_some() && self.model.merged_dtype() != candle_core::quantized::GgmlDType::F32 {
            for (id, _) in &rows {
                if let Some(s) = self.seqs.get_mut(id) {
                    s.prefix_lossy = true;
                }
            }
        }
        if let Some(msg) = self.cfg.step_gate.as_ref().and_then(|g| g.take_fault()) {
            return Err(EngineError::Internal(msg));
        }
        let feeds = self.feeds(&rows);
        let mut seqs: Vec<(SeqId, Seq)> = rows
            .iter()
            .map(|(id, _)| (*id, self.seqs.remove(id).expect("planned")))
            .collect();
        let logits = match self.forward(&mut seqs, &feeds, merged.as_deref()) {
            Ok(l) => l,
            Err(e) => {
                for (id, s) in seqs {
                    self.seqs.insert(id, s);
                }
                return Err(e.into());
            }
        };
        for (((id, s), logits), tokens) in seqs.into_iter().zip(logits).zip(&feeds) {
            self.absorb(id, s, logits, tokens.len())?;
        }
        self.sched
            .observe(started.elapsed().as_secs_f64(), prefill, decode);
        self.cache.evict_to_budget();
        self.prefix.evict_to_budget();
        Ok(())
    }

    /// Ask the scheduler for this step, from views of the running and waiting sequences.
    fn plan(&mut self) -> Plan {
        self.key_prompts();
        let key = |s: &Seq| s.lease.as_ref().map(|l| l.weights.id());
        let running: Vec<Running> = self
            .running
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                Running {
                    id: *id,
                    adapter: key(s),
                    pending_prompt: s.req.prompt_token_ids.len() - s.fed,
                }
            })
            .collect();
        let waiting: Vec<Waiting> = self
            .waiting
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                Waiting {
                    id: *id,
                    adapter: key(s),
                    prompt_len: s.req.prompt_token_ids.len() - BLOCK * self.cached_blocks(s),
                }
            })
            .collect();
        self.sched.plan(&running, &waiting)
    }

    fn admit(&mut self, admit: &[SeqId]) {
        for id in admit {
            self.waiting.retain(|w| w != id);
            self.running.push(*id);
            if let Some(mut s) = self.seqs.remove(id) {
                s.queued = false;
                self.queued.fetch_sub(1, Ordering::AcqRel);
                self.restore_prefix(&mut s);
                self.seqs.insert(*id, s);
            }
        }
    }

    /// Count the step by how adapters apply, and fetch (or make) the merged weights it runs on.
    fn apply(
        &mut self,
        rows: &[(SeqId, usize)],
        apply: StepApply,
    ) -> Result<Option<Arc<crate::ops::MergedWeights>>, EngineError> {
        // A step of base rows only applies no adapter, whatever the mode: counted apart.
        let base_only = rows.iter().all(|(id, _)| self.seqs[id].lease.is_none());
        if base_only {
            self.counters.steps_base += 1;
        } else if apply == StepApply::Unmerged {
            self.counters.steps_unmerged += 1;
        } else {
            self.counters.steps_merged += 1;
        }
        Ok(match apply {
            StepApply::Unmerged | StepApply::Merged(None) => None,
            StepApply::Merged(Some(_)) => {
                let lease = self.seqs[&rows[0].0]
                    .lease
                    .clone()
                    .expect("merged rows have an adapter");
                Some(self.merged.get_or_merge(&lease, &self.model)?)
            }
        })
    }

    /// Each planned row's tokens: its next prompt chunk, or its last sampled token.
    fn feeds(&self, rows: &[(SeqId, usize)]) -> Vec<Vec<u32>> {
        rows.iter()
            .map(|(id, n)| {
                let s = &self.seqs[id];
                if s.fed < s.req.prompt_token_ids.len() {
                    s.req.prompt_token_ids[s.fed..s.fed + n].to_vec()
                } else {
                    vec![*s.out.last().expect("a decoding sequence has output")]
                }
            })
            .collect()
    }

    /// All rows in one packed forward.
    fn forward(
        &self,
        seqs: &mut [(SeqId, Seq)],
        feeds: &[Vec<u32>],
        merged: Option<&crate::ops::MergedWeights>,
    ) -> candle_core::Result<Vec<candle_core::Tensor>> {
        let mut inputs: Vec<SeqInput> = seqs
            .iter_mut()
            .zip(feeds)
            .map(|((_, s), tokens)| SeqInput {
                tokens,
                cache: &mut s.cache,
                logits: if s.req.prompt_logprobs.is_some() && s.fed < s.req.prompt_token_ids.len() {
                    LogitsFor::All
                } else {
                    LogitsFor::Last
                },
                adapter: s.lease.as_ref().map(|l| &*l.weights),
                prompt_len: s.req.prompt_token_ids.len(),
            })
            .collect();
        self.model.forward(&mut inputs, merged)
    }

    /// One row's logits after a forward of `fed_now` tokens: prompt log-probabilities while
    /// prefilling, then the next token; the sequence goes back to `seqs` unless it finished.
    fn absorb(
        &mut self,
        id: SeqId,
        mut s: Seq,
        logits: candle_core::Tensor,
        fed_now: usize,
    ) -> Result<(), EngineError> {
        let plen = s.req.prompt_token_ids.len();
        let prefilling = s.fed < plen;
        let logits = if prefilling && s.req.prompt_logprobs.is_some() {
            // Row i predicts prompt token fed + i + 1; the last row, past the prompt, is
            // the first generated token's distribution.
            let k = s.req.prompt_logprobs.unwrap_or(0);
            let n = logits.dim(0)?;
            let lps: Vec<TokenLogprob> = (0..n)
                .filter(|i| s.fed + i + 1 < plen)
                .map(|i| {
                    let row = logits.get(i)?.to_vec1::<f32>()?;
                    Ok(logprobs_of(&row, s.req.prompt_token_ids[s.fed + i + 1], k))
                })
                .collect::<candle_core::Result<_>>()?;
            s.prompt_lps.extend(lps);
            if s.fed + fed_now >= plen {
                let lps = std::mem::take(&mut s.prompt_lps);
                self.outbox
                    .push((s.events.clone(), Event::PromptLogprobs(lps)));
            }
            logits.narrow(0, n - 1, 1)?
        } else {
            logits
        };
        if prefilling {
            s.fed += fed_now;
            self.counters.prompt_tokens += fed_now as u64;
            self.remember_prefix(&mut s);
            if s.fed < plen {
                self.seqs.insert(id, s);
                return Ok(());
            }
        }
        match self.sample(&mut s, &logits) {
            Ok(Some(reason)) => self.finish(id, s, reason),
            Ok(None) => {
                self.seqs.insert(id, s);
            }
            Err(e) => {
                self.outbox.push((s.events.clone(), Event::Error(e)));
                self.running.retain(|r| *r != id);
            }
        }
        Ok(())
    }
}

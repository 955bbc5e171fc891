//! The scheduling policy: which waiting requests join, how many tokens each running sequence
//! feeds this step, and how adapters apply. A pure function of its inputs and its own small
//! state: no tensors, no clocks, so it is tested table-style.

use std::collections::BTreeSet;

/// Identifies a sequence in the engine.
pub type SeqId = u64;

/// The adapter instance a sequence runs on (`None` = the base model). Instances, not names:
/// two versions of one name never share merged weights.
pub type AdapterKey = Option<u64>;

/// How adapters apply: the `--adapter-mode` of the server, the `--mode` of `generate`, and the
/// mode of the reference loop. (A step's own choice is [`StepApply`]; what one forward does
/// with concrete weights is `ops::Apply`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterMode {
    /// Every step is one mixed batch: low-rank terms added per row group.
    #[default]
    Unmerged,
    /// Every step serves one adapter's sequences on its merged weights; adapters take turns.
    Merged,
    /// Merged while one adapter has had all running rows for `merge_after` steps; unmerged as
    /// soon as a second adapter runs.
    Auto,
}

impl AdapterMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterMode::Unmerged => "unmerged",
            AdapterMode::Merged => "merged",
            AdapterMode::Auto => "auto",
        }
    }
}

/// The apply mode of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepApply {
    /// Each row on its own adapter; any mix.
    Unmerged,
    /// All rows on this adapter's merged weights (`None`: the base model, nothing to merge).
    Merged(AdapterKey),
}

/// While prompt chunks are held back for `prefill_share`, prompts with at most this many
/// tokens left are still fed.
pub const HELD_SHORT_PROMPT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerConfig {
    pub max_running: usize,
    /// Tokens fed through the model in one step, over all rows (prefill chunks + decodes).
    pub max_step_tokens: usize,
    pub mode: AdapterMode,
    /// `Auto`: consecutive single-adapter steps before merging (hysteresis).
    pub merge_after: usize,
    /// `Merged`: steps one adapter group keeps the model before the next group's turn.
    pub turn_steps: usize,
    /// While sequences decode, the most of the step time that steps carrying prompt chunks
    /// may take (Sarathi-style stall control): a step whose prefill would push the share past
    /// it feeds only the decoding rows, so their time per token stays near
    /// `1 / (1 − share)` of decode alone while long prompts still progress. 1.0: no limit
    /// (prompts get every step's spare budget, the fastest time to first token).
    pub prefill_share: f64,
}

/// A running sequence as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    pub id: SeqId,
    pub adapter: AdapterKey,
    /// Prompt tokens not yet fed; 0 once decoding.
    pub pending_prompt: usize,
}

/// A queued request whose adapter is ready (loaded and leased); in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    pub id: SeqId,
    pub adapter: AdapterKey,
    pub prompt_len: usize,
}

/// What to do this step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Waiting requests that join the running set now (their rows are in `rows` too).
    pub admit: Vec<SeqId>,
    /// (sequence, tokens to feed). Sequences not listed sit this step out.
    pub rows: Vec<(SeqId, usize)>,
    pub apply: Option<StepApply>,
}

#[derive(Debug, Clone)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    /// `Auto`: consecutive steps whose rows all used one adapter.
    single_adapter_steps: usize,
    /// `Merged`: the group that has the model, and for how many more steps.
    turn: Option<(AdapterKey, usize)>,
    /// Recent seconds of steps that carried prompt chunks while sequences decoded, and of
    /// steps that only decoded (see [`Scheduler::observe`]).
    prefill_secs: f64,
    decode_secs: f64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        assert!(
            cfg.max_running > 0
                && cfg.max_step_tokens > 0
                && cfg.prefill_share > 0.0
                && cfg.prefill_share <= 1.0,
            "validated by the config"
        );
        Self {
            cfg,
            single_adapter_steps: 0,
            turn: None,
            prefill_secs: 0.0,
            decode_secs: 0.0,
        }
    }

    /// After each step: how long it took, whether it fed prompt tokens and whether it
    /// decoded. The prefill share is kept over steps that decoded, in a window that halves
    /// past 10 s so that it follows the load; a step with no decoding row starts afresh.
    pub fn observe(&mut self, secs: f64, prefill: bool, decode: bool) {
        if !decode {
            (self.prefill_secs, self.decode_secs) = (0.0, 0.0);
            return;
        }
        if prefill {
            self.prefill_secs += secs;
        } else {
            self.decode_secs += secs;
        }
        if self.prefill_secs + self.decode_secs > 10.0 {
            self.prefill_secs /= 2.0;
            self.decode_secs /= 2.0;
        }
    }

    /// Whether this step's prompt chunks must wait so the decoding rows keep their pace.
    fn hold_prefill(&self) -> bool {
        self.cfg.prefill_share < 1.0
            && self.prefill_secs > self.cfg.prefill_share * (self.prefill_secs + self.decode_secs)
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn plan(&mut self, running: &[Running], waiting: &[Waiting]) -> Plan {
        let mut plan = Plan::default();
        // 1. Admission, first come first served, up to the running limit.
        let room = self.cfg.max_running.saturating_sub(running.len());
        let admitted: Vec<Running> = waiting
            .iter()
            .take(room)
            .map(|w| Running {
                id: w.id,
                adapter: w.adapter,
                pending_prompt: w.prompt_len,
            })
            .collect();
        plan.admit = admitted.iter().map(|r| r.id).collect();
        let candidates: Vec<Running> = running.iter().chain(&admitted).copied().collect();
        if candidates.is_empty() {
            self.single_adapter_steps = 0;
            return plan;
        }

        // 2. The apply mode, and which candidates it lets run.
        let keys: BTreeSet<AdapterKey> = candidates.iter().map(|c| c.adapter).collect();
        let apply = match self.cfg.mode {
            AdapterMode::Unmerged => StepApply::Unmerged,
            AdapterMode::Merged => StepApply::Merged(self.next_turn(&keys)),
            AdapterMode::Auto => {
                if keys.len() == 1 {
                    self.single_adapter_steps += 1;
                } else {
                    self.single_adapter_steps = 0;
                }
                match keys.iter().next() {
                    Some(&key)
                        if keys.len() == 1 && self.single_adapter_steps > self.cfg.merge_after =>
                    {
                        StepApply::Merged(key)
                    }
                    _ => StepApply::Unmerged,
                }
            }
        };
        plan.apply = Some(apply);
        let eligible = candidates.iter().filter(|c| match apply {
            StepApply::Unmerged => true,
            StepApply::Merged(k) => c.adapter == k,
        });

        // 3. Tokens: every decoding row gets its one token first (cheap, and latency-critical),
        // then prompts are fed in chunks, oldest first, while the step budget lasts.
        let mut budget = self.cfg.max_step_tokens;
        let (decoding, mut prefilling): (Vec<&Running>, Vec<&Running>) =
            eligible.partition(|c| c.pending_prompt == 0);
        if !decoding.is_empty() && self.hold_prefill() {
            // Short prompts (new chat turns) still start: they cost about a decode step, and
            // holding them starved new streams (8 streams' output fell from 218 to 32 tok/s).
            prefilling.retain(|c| c.pending_prompt <= HELD_SHORT_PROMPT);
        }
        // Under a prefill share, while rows decode, prompt chunks are also cut to that share
        // of the step budget (never below a short prompt), so that the share's stalls come
        // as many short ones rather than a few long ones: a stream's time per token averages
        // over the steps of its answer, and one whole-budget chunk inside 31 tokens of
        // SmolLM2 F32 lifted its TPOT p99 to 1.6× its pace alone.
        // And under a share short prompts go first (a stable sort: oldest first within each
        // kind), decoding or not, so a long prompt's chunks never keep new streams from
        // starting: else, once every stream waited behind it, none decoded, nothing was cut,
        // and all of them waited for the whole prompt (TTFT p90 10.7 s).
        let mut prompt_budget = budget;
        if self.cfg.prefill_share < 1.0 {
            prefilling.sort_by_key(|c| c.pending_prompt > HELD_SHORT_PROMPT);
            if !decoding.is_empty() {
                let cut = self.cfg.prefill_share * self.cfg.max_step_tokens as f64;
                prompt_budget = (cut.ceil() as usize).max(HELD_SHORT_PROMPT);
            }
        }
        for c in decoding {
            if budget == 0 {
                break;
            }
            plan.rows.push((c.id, 1));
            budget -= 1;
        }
        for c in prefilling {
            if budget == 0 || prompt_budget == 0 {
                break;
            }
            let n = c.pending_prompt.min(budget).min(prompt_budget);
            plan.rows.push((c.id, n));
            budget -= n;
            prompt_budget -= n;
        }
        // Admit only what runs now, so nothing sits admitted without being fed.
        plan.admit
            .retain(|id| plan.rows.iter().any(|(r, _)| r == id));
        plan
    }

    /// `Merged`: keep the current group for its turn, then move to the next group present
    /// (in key order, wrapping), so no adapter starves.
    fn next_turn(&mut self, keys: &BTreeSet<AdapterKey>) -> AdapterKey {
        if let Some((key, left)) = self.turn {
            if left > 0 && keys.contains(&key) {
                self.turn = Some((key, left - 1));
                return key;
            }
        }
        let next = match self.turn {
            Some((prev, _)) => keys
                .range((std::ops::Bound::Excluded(prev), std::ops::Bound::Unbounded))
                .next()
                .or_else(|| keys.iter().next()),
            None => keys.iter().next(),
        }
        .copied()
        .expect("called with at least one candidate");
        self.turn = Some((next, self.cfg.turn_steps.saturating_sub(1)));
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: AdapterMode) -> SchedulerConfig {
        SchedulerConfig {
            max_running: 4,
            max_step_tokens: 10,
            mode,
            merge_after: 2,
            turn_steps: 2,
            prefill_share: 1.0,
        }
    }

    fn run(id: SeqId, adapter: AdapterKey, pending_prompt: usize) -> Running {
        Running {
            id,
            adapter,
            pending_prompt,
        }
    }

    fn wait(id: SeqId, adapter: AdapterKey, prompt_len: usize) -> Waiting {
        Waiting {
            id,
            adapter,
            prompt_len,
        }
    }

    #[test]
    fn admission_and_token_budget() {
        // (running, waiting, expected admit, expected rows)
        type Case = (Vec<Running>, Vec<Waiting>, Vec<SeqId>, Vec<(SeqId, usize)>);
        let cases: Vec<Case> = vec![
            // Nothing to do.
            (vec![], vec![], vec![], vec![]),
            // A short prompt is admitted and fed whole.
            (vec![], vec![wait(1, None, 4)], vec![1], vec![(1, 4)]),
            // A long prompt is chunked to the step budget.
            (vec![], vec![wait(1, None, 25)], vec![1], vec![(1, 10)]),
            // Decodes go first, then the prefill gets what is left.
            (
                vec![run(1, None, 0), run(2, Some(7), 0)],
                vec![wait(3, None, 20)],
                vec![3],
                vec![(1, 1), (2, 1), (3, 8)],
            ),
            // The running limit holds back later arrivals, in order.
            (
                vec![run(1, None, 0), run(2, None, 0), run(3, None, 0)],
                vec![wait(4, None, 2), wait(5, None, 2)],
                vec![4],
                vec![(1, 1), (2, 1), (3, 1), (4, 2)],
            ),
            // A budget spent on an earlier prompt leaves a later admission waiting.
            (
                vec![],
                vec![wait(1, None, 10), wait(2, None, 3)],
                vec![1],
                vec![(1, 10)],
            ),
            // A prompt half fed continues.
            (vec![run(1, None, 3)], vec![], vec![], vec![(1, 3)]),
        ];
        for (i, (running, waiting, admit, rows)) in cases.into_iter().enumerate() {
            let plan = Scheduler::new(cfg(AdapterMode::Unmerged)).plan(&running, &waiting);
            assert_eq!(plan.admit, admit, "case {i}");
            assert_eq!(plan.rows, rows, "case {i}");
        }
    }

    #[test]
    fn unmerged_mixes_every_adapter() {
        let mut s = Scheduler::new(cfg(AdapterMode::Unmerged));
        let running = [run(1, Some(1), 0), run(2, Some(2), 0), run(3, None, 0)];
        let plan = s.plan(&running, &[]);
        assert_eq!(plan.apply, Some(StepApply::Unmerged));
        assert_eq!(plan.rows.len(), 3);
    }

    #[test]
    fn merged_gives_adapters_turns_without_starving_any() {
        let mut s = Scheduler::new(cfg(AdapterMode::Merged));
        let running = [
            run(1, Some(1), 0),
            run(2, Some(2), 0),
            run(3, None, 0),
            run(4, Some(1), 0),
        ];
        let mut served = Vec::new();
        for _ in 0..6 {
            let plan = s.plan(&running, &[]);
            let Some(StepApply::Merged(k)) = plan.apply else {
                panic!("merged mode")
            };
            // Only that group's rows run.
            assert!(plan
                .rows
                .iter()
                .all(|(id, _)| running.iter().any(|r| r.id == *id && r.adapter == k)));
            served.push(k);
        }
        // Turns of 2 steps each, every group served.
        assert_eq!(served, vec![None, None, Some(1), Some(1), Some(2), Some(2)]);
        // A group that empties hands over at once.
        let plan = s.plan(&[run(2, Some(2), 0)], &[]);
        assert_eq!(plan.apply, Some(StepApply::Merged(Some(2))));
        let plan = s.plan(&[run(1, Some(1), 0)], &[]);
        assert_eq!(plan.apply, Some(StepApply::Merged(Some(1))));
    }

    #[test]
    fn auto_merges_after_hysteresis_and_unmerges_at_once() {
        let mut s = Scheduler::new(cfg(AdapterMode::Auto));
        let one = [run(1, Some(5), 0), run(2, Some(5), 0)];
        let two = [run(1, Some(5), 0), run(3, Some(6), 0)];
        // (rows this step, expected apply)
        let script: Vec<(&[Running], StepApply)> = vec![
            (&one, StepApply::Unmerged),
            (&one, StepApply::Unmerged),
            (&one, StepApply::Merged(Some(5))),
            (&one, StepApply::Merged(Some(5))),
            (&two, StepApply::Unmerged),
            (&one, StepApply::Unmerged),
            (&one, StepApply::Unmerged),
            (&one, StepApply::Merged(Some(5))),
        ];
        for (step, (rows, want)) in script.into_iter().enumerate() {
            assert_eq!(s.plan(rows, &[]).apply, Some(want), "step {step}");
        }
    }

    #[test]
    fn prefill_share_cuts_prompt_chunks_while_rows_decode() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_step_tokens: 512,
            prefill_share: 0.2,
            ..cfg(AdapterMode::Unmerged)
        });
        let long = [run(1, None, 0), run(2, None, 4096)];
        let plan = s.plan(&long, &[]);
        // ceil(0.2 × 512) prompt tokens beside the decoding row.
        assert_eq!(plan.rows, vec![(1, 1), (2, 103)]);
        // Never below a short prompt's length, and all of one that fits.
        let tiny = Scheduler::new(SchedulerConfig {
            max_step_tokens: 100,
            prefill_share: 0.1,
            ..cfg(AdapterMode::Unmerged)
        })
        .plan(&[run(1, None, 0), run(2, None, 4096)], &[]);
        assert_eq!(tiny.rows, vec![(1, 1), (2, HELD_SHORT_PROMPT)]);
        // A short prompt that came later still goes first.
        let both = [run(1, None, 0), run(2, None, 4096), run(3, None, 20)];
        assert_eq!(s.plan(&both, &[]).rows, vec![(1, 1), (3, 20), (2, 83)]);
        // Nothing decoding: the whole budget, short prompts first.
        let starting = [run(2, None, 4096), run(3, None, 20)];
        assert_eq!(s.plan(&starting, &[]).rows, vec![(3, 20), (2, 492)]);
        assert_eq!(s.plan(&[run(2, None, 4096)], &[]).rows, vec![(2, 512)]);
        // No share: the whole spare budget beside decoding rows.
        let mut free = Scheduler::new(SchedulerConfig {
            max_step_tokens: 512,
            ..cfg(AdapterMode::Unmerged)
        });
        assert_eq!(free.plan(&long, &[]).rows, vec![(1, 1), (2, 511)]);
    }

    #[test]
    fn prefill_share_spaces_prompt_chunks_between_decode_steps() {
        let mut s = Scheduler::new(SchedulerConfig {
            prefill_share: 0.25,
            ..cfg(AdapterMode::Unmerged)
        });
        let running = [run(1, None, 0), run(2, None, 0), run(3, None, 100)];
        let (mut prefill_steps, mut fed, mut clock) = (0, 0, 0.0);
        for _ in 0..400 {
            let plan = s.plan(&running, &[]);
            // Decoding rows get their token every step, held prefill or not.
            assert!(plan.rows.contains(&(1, 1)) && plan.rows.contains(&(2, 1)));
            let chunk = plan.rows.iter().find(|(id, _)| *id == 3).map(|r| r.1);
            // A step with a prompt chunk costs 0.3 s, a decode-only step 0.03 s.
            let secs = if chunk.is_some() { 0.3 } else { 0.03 };
            s.observe(secs, chunk.is_some(), true);
            prefill_steps += chunk.is_some() as usize;
            fed += chunk.unwrap_or(0);
            clock += secs;
        }
        // About a quarter of the time went to steps with prefill; prompts still progressed.
        let share = prefill_steps as f64 * 0.3 / clock;
        assert!((0.2..=0.3).contains(&share), "{share}");
        assert!(
            fed >= 8 * prefill_steps && prefill_steps >= 8,
            "{fed} {prefill_steps}"
        );

        // A short prompt is fed even while long ones are held.
        let short = [
            run(1, None, 0),
            run(2, None, 0),
            run(3, None, 100),
            run(4, None, 5),
        ];
        let mut held = 0;
        for _ in 0..40 {
            let plan = s.plan(&short, &[]);
            assert!(plan.rows.contains(&(4, 5)), "{plan:?}");
            held += !plan.rows.iter().any(|(id, _)| *id == 3) as usize;
            s.observe(0.03, true, true);
        }
        assert!(held > 0, "the long prompt was held in some step");

        // Without decoding rows nothing is held, and the share starts afresh.
        s.observe(0.3, true, false);
        let alone = s.plan(&[run(3, None, 100)], &[]);
        assert_eq!(alone.rows, vec![(3, 10)]);
        let plan = s.plan(&running, &[]);
        assert!(plan.rows.iter().any(|(id, _)| *id == 3), "{plan:?}");

        // 1.0 never holds.
        let mut free = Scheduler::new(cfg(AdapterMode::Unmerged));
        for _ in 0..50 {
            let plan = free.plan(&running, &[]);
            assert!(plan.rows.iter().any(|(id, _)| *id == 3));
            free.observe(0.3, true, true);
        }
    }
}

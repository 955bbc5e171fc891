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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub max_running: usize,
    /// Tokens fed through the model in one step, over all rows (prefill chunks + decodes).
    pub max_step_tokens: usize,
    pub mode: AdapterMode,
    /// `Auto`: consecutive single-adapter steps before merging (hysteresis).
    pub merge_after: usize,
    /// `Merged`: steps one adapter group keeps the model before the next group's turn.
    pub turn_steps: usize,
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
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        assert!(
            cfg.max_running > 0 && cfg.max_step_tokens > 0,
            "validated by the config"
        );
        Self {
            cfg,
            single_adapter_steps: 0,
            turn: None,
        }
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
        let (decoding, prefilling): (Vec<&Running>, Vec<&Running>) =
            eligible.partition(|c| c.pending_prompt == 0);
        for c in decoding {
            if budget == 0 {
                break;
            }
            plan.rows.push((c.id, 1));
            budget -= 1;
        }
        for c in prefilling {
            if budget == 0 {
                break;
            }
            let n = c.pending_prompt.min(budget);
            plan.rows.push((c.id, n));
            budget -= n;
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
}

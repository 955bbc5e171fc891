//! Choosing the next token, and the log-probabilities reported alongside it.

use candle_core::{Result, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::Serialize;

use super::request::Param;
use super::EngineError;

/// Per-request sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus sampling mass; 1 disables it.
    pub top_p: f64,
    /// Keep only the `k` most likely tokens; `None` disables it.
    pub top_k: Option<usize>,
    /// Seeds this request's own generator: the same seed gives the same tokens whatever else
    /// runs in the batch.
    pub seed: u64,
    /// OpenAI's penalties on tokens already generated, in \[-2, 2\]: each generated token's
    /// logit drops by `presence` once and by `frequency` per occurrence.
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Say what is wrong, if anything.
    /// Whether the settings are usable; the error names the offending field.
    pub fn check(&self) -> std::result::Result<(), EngineError> {
        let bad = |param, msg: String| Err(EngineError::InvalidRequest { param, msg });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                Param::Temperature,
                format!(
                    "temperature must be a finite number ≥ 0, got {}",
                    self.temperature
                ),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                Param::TopP,
                format!("top_p must be in (0, 1], got {}", self.top_p),
            );
        }
        if self.top_k == Some(0) {
            return bad(Param::TopK, "top_k must be at least 1".into());
        }
        for (param, v) in [
            (Param::PresencePenalty, self.presence_penalty),
            (Param::FrequencyPenalty, self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(
                    param,
                    format!("{} must be in [-2, 2], got {v}", param.as_str()),
                );
            }
        }
        Ok(())
    }
}

/// Temperatures below this sample greedily.
const GREEDY_BELOW: f64 = 1e-5;

/// A request's token chooser, with its own seeded generator.
pub struct Sampler {
    inner: LogitsProcessor,
    presence: f32,
    frequency: f32,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        let t = p.temperature;
        // Sampling runs in f32: a top_p that rounds to 0 there would keep no token at all (found
        // by schemathesis: top_p 5e-324 was a 500). The smallest positive f32 keeps the top one,
        // which is what top_p → 0 means.
        let top_p = (p.top_p < 1.0).then_some(p.top_p.max(f32::MIN_POSITIVE as f64));
        // Likewise logits divided by a temperature this small overflow f32; below it, sampling
        // is greedy to within rounding anyway (vLLM uses the same 1e-5).
        let sampling = if t < GREEDY_BELOW {
            Sampling::ArgMax
        } else {
            match (p.top_k, top_p) {
                (None, None) => Sampling::All { temperature: t },
                (Some(k), None) => Sampling::TopK { k, temperature: t },
                (None, Some(p)) => Sampling::TopP { p, temperature: t },
                (Some(k), Some(p)) => Sampling::TopKThenTopP {
                    k,
                    p,
                    temperature: t,
                },
            }
        };
        Self {
            inner: LogitsProcessor::from_sampling(p.seed, sampling),
            presence: p.presence_penalty as f32,
            frequency: p.frequency_penalty as f32,
        }
    }

    /// `logits` is one row `[vocab]`, f32; `previous` are the tokens generated so far (for the
    /// penalties).
    pub fn sample(&mut self, logits: &Tensor, previous: &[u32]) -> Result<u32> {
        if (self.presence == 0.0 && self.frequency == 0.0) || previous.is_empty() {
            return self.inner.sample(logits);
        }
        let mut counts: std::collections::HashMap<u32, f32> = std::collections::HashMap::new();
        for &t in previous {
            *counts.entry(t).or_default() += 1.0;
        }
        let mut v = logits.to_vec1::<f32>()?;
        for (t, c) in counts {
            if let Some(l) = v.get_mut(t as usize) {
                *l -= self.presence + self.frequency * c;
            }
        }
        self.inner
            .sample(&Tensor::from_vec(v, logits.dims1()?, logits.device())?)
    }
}

/// One alternative in a top-k log-probability list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

/// The chosen token's log-probability and the `k` most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

/// Natural-log probabilities of the full-vocabulary softmax of `logits` at temperature 1 (as
/// OpenAI reports them, whatever the sampling settings), for `chosen` and the top `k`.
pub fn logprobs_of(logits: &[f32], chosen: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let lp = |id: usize| (logits[id] as f64 - log_z) as f32;
    let mut top: Vec<TopLogprob> = Vec::with_capacity(k);
    if k > 0 {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        let k = k.min(idx.len());
        // Ties resolve to the lower id, so the order is deterministic.
        let cmp = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
        idx.sort_by(cmp);
        top = idx
            .into_iter()
            .map(|i| TopLogprob {
                token_id: i as u32,
                logprob: lp(i),
            })
            .collect();
    }
    TokenLogprob {
        token_id: chosen,
        logprob: lp(chosen as usize),
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vanishing_top_p_and_temperature_sample_the_top_token() {
        let logits = Tensor::new(&[0.5f32, 2.0, 1.0, -1.0], &candle_core::Device::Cpu).unwrap();
        for (temperature, top_p) in [
            (1.0, 5e-324),
            (1.0, 1e-40),
            (1e-300, 1.0),
            (5e-324, 0.5),
            (1e-6, 1.0),
        ] {
            let mut s = Sampler::new(&SamplingParams {
                temperature,
                top_p,
                ..SamplingParams::default()
            });
            for _ in 0..8 {
                assert_eq!(
                    s.sample(&logits, &[]).unwrap(),
                    1,
                    "t={temperature} p={top_p}"
                );
            }
        }
    }

    #[test]
    fn logprobs_are_a_normalised_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let lp = logprobs_of(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((lp.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6);
        // Ties keep the lower id first.
        let ids: Vec<u32> = lp.top.iter().map(|t| t.token_id).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        let total: f64 = logits
            .iter()
            .enumerate()
            .map(|(i, _)| (logprobs_of(&logits, i as u32, 0).logprob as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    /// The error names its field structurally (and in the message), for every field.
    #[test]
    fn bad_sampling_params_are_named() {
        let named = |p: &SamplingParams| match p.check() {
            Err(EngineError::InvalidRequest { param, msg }) => {
                assert!(msg.contains(param.as_str()), "{msg}");
                param
            }
            other => panic!("expected InvalidRequest, got {other:?}"),
        };
        let mut p = SamplingParams {
            temperature: f64::NAN,
            ..Default::default()
        };
        assert_eq!(named(&p), Param::Temperature);
        p.temperature = 1.0;
        p.top_p = 0.0;
        assert_eq!(named(&p), Param::TopP);
        p.top_p = 1.0;
        p.top_k = Some(0);
        assert_eq!(named(&p), Param::TopK);
        p.top_k = None;
        p.presence_penalty = 3.0;
        assert_eq!(named(&p), Param::PresencePenalty);
        p.presence_penalty = 0.0;
        p.frequency_penalty = -2.5;
        assert_eq!(named(&p), Param::FrequencyPenalty);
        p.frequency_penalty = 0.0;
        assert!(p.check().is_ok());
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits = Tensor::new(
            &[0.1f32, 0.2, 0.3, 0.4, 0.5, 0.0],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p);
            (0..20)
                .map(|_| s.sample(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&p), draw(&p));
        let other = SamplingParams {
            seed: 8,
            ..p.clone()
        };
        assert_ne!(draw(&p), draw(&other));
    }

    /// Frequencies of `n` draws from logits whose softmax is exactly `probs`.
    fn frequencies(probs: &[f64], p: SamplingParams, n: usize) -> Vec<f64> {
        let logits: Vec<f32> = probs.iter().map(|q| q.ln() as f32).collect();
        let logits = Tensor::new(logits.as_slice(), &candle_core::Device::Cpu).unwrap();
        let mut s = Sampler::new(&p);
        let mut counts = vec![0usize; probs.len()];
        for _ in 0..n {
            counts[s.sample(&logits, &[]).unwrap() as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    /// Each filter on a hand-made distribution: which tokens it keeps, and that the kept ones
    /// are drawn in proportion (4,000 seeded draws; ±0.03 is about 4 standard deviations).
    #[test]
    fn each_filter_keeps_the_tokens_it_should_in_proportion() {
        let probs = [0.4, 0.3, 0.2, 0.1];
        let at = |temperature: f64, top_p: f64, top_k: Option<usize>| SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: 11,
            ..Default::default()
        };
        let close = |got: &[f64], want: &[f64], what: &str| {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 0.03, "{what}: {got:?} vs {want:?}");
            }
        };
        // Temperature 1, no filter: the distribution itself.
        close(
            &frequencies(&probs, at(1.0, 1.0, None), 4000),
            &probs,
            "plain",
        );
        // Temperature 2 flattens it: p^(1/2), renormalised.
        let sq: Vec<f64> = probs.iter().map(|p: &f64| p.sqrt()).collect();
        let z: f64 = sq.iter().sum();
        let flat: Vec<f64> = sq.iter().map(|q| q / z).collect();
        close(
            &frequencies(&probs, at(2.0, 1.0, None), 4000),
            &flat,
            "temperature 2",
        );
        // top_k 3 drops only the least likely token; the rest keep their ratios.
        close(
            &frequencies(&probs, at(1.0, 1.0, Some(3)), 4000),
            &[0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0.0],
            "top_k 3",
        );
        // top_p 0.65: the smallest set whose mass reaches 0.65 is {0, 1} (0.4, then 0.7).
        close(
            &frequencies(&probs, at(1.0, 0.65, None), 4000),
            &[0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0],
            "top_p 0.65",
        );
        // So top_k 3 keeps token 2 and top_p 0.65 does not: swapping them would fail above.
        // Together, the stricter one decides.
        close(
            &frequencies(&probs, at(1.0, 0.65, Some(3)), 4000),
            &[0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0],
            "top_k 3 + top_p 0.65",
        );
        close(
            &frequencies(&probs, at(1.0, 0.95, Some(2)), 4000),
            &[0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0],
            "top_k 2 + top_p 0.95",
        );
        // The degenerate ends keep the top token only.
        for p in [at(1.0, 1.0, Some(1)), at(1.0, 0.35, None)] {
            assert_eq!(
                frequencies(&probs, p.clone(), 200),
                vec![1.0, 0.0, 0.0, 0.0],
                "{p:?}"
            );
        }
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let logits = Tensor::new(&[1.0f32, 0.9, 0.0], &candle_core::Device::Cpu).unwrap();
        let mut greedy = Sampler::new(&SamplingParams::default());
        assert_eq!(greedy.sample(&logits, &[0, 0]).unwrap(), 0);
        let mut s = Sampler::new(&SamplingParams {
            frequency_penalty: 0.1,
            ..Default::default()
        });
        // 1.0 - 0.1·1 = 0.9 ties with token 1 (argmax keeps the first); two uses drop it below.
        assert_eq!(s.sample(&logits, &[0, 0]).unwrap(), 1);
        let mut s = Sampler::new(&SamplingParams {
            presence_penalty: 0.2,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[0]).unwrap(), 1);
        assert!(SamplingParams {
            presence_penalty: 2.5,
            ..Default::default()
        }
        .check()
        .is_err());
    }
}

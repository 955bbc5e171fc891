//! What each request asks for: adapter (Zipf popularity, a base fraction), prompt and output
//! lengths, and Poisson inter-arrival times, all from one seeded generator so runs repeat.

use crate::config::Range;

/// SplitMix64: small, fast, and a function of the seed alone.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn in_range(&mut self, r: Range) -> usize {
        r.lo + (self.next_u64() % (r.hi - r.lo + 1) as u64) as usize
    }

    /// Exponential with mean 1/rate (Poisson arrivals).
    pub fn exponential(&mut self, rate: f64) -> f64 {
        -(1.0 - self.uniform()).ln() / rate
    }
}

/// Zipf over ranks 1..=n: P(k) ∝ 1/k^s (s = 0 is uniform), by inverse CDF.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    /// A 0-based index.
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.uniform();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// Common English words: prompts of N words are about N tokens for a BPE vocabulary.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "it",
    "by",
    "at",
    "from",
    "his",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "has",
    "had",
    "one",
    "first",
    "their",
    "its",
    "new",
    "after",
    "who",
    "they",
    "have",
    "her",
    "she",
    "two",
    "been",
    "other",
    "when",
    "there",
    "all",
    "during",
    "into",
    "school",
    "time",
    "may",
    "years",
    "more",
    "most",
    "only",
    "over",
    "city",
    "some",
    "world",
    "would",
    "where",
    "later",
    "up",
    "such",
    "used",
    "many",
    "can",
    "state",
    "about",
    "national",
    "out",
    "known",
    "university",
    "united",
    "then",
    "made",
    "team",
    "film",
    "war",
    "three",
    "between",
    "him",
    "while",
    "under",
    "year",
];

/// One request to send.
#[derive(Debug, Clone)]
pub struct Spec {
    pub adapter: Option<String>,
    pub prompt: String,
    pub max_tokens: usize,
}

pub struct Workload {
    rng: Rng,
    adapters: Vec<String>,
    zipf: Zipf,
    base_fraction: f64,
    prompt_words: Range,
    max_tokens: Range,
    /// Shared system prompts; each request starts with one when there are any.
    prefixes: Vec<String>,
}

/// `n` words from `rng`.
fn words(rng: &mut Rng, n: usize) -> String {
    let w: Vec<&str> = (0..n)
        .map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize])
        .collect();
    w.join(" ")
}

impl Workload {
    pub fn new(
        seed: u64,
        adapters: Vec<String>,
        zipf_s: f64,
        base_fraction: f64,
        prompt_words: Range,
        max_tokens: Range,
    ) -> Self {
        let zipf = Zipf::new(adapters.len().max(1), zipf_s);
        Workload {
            rng: Rng::new(seed),
            adapters,
            zipf,
            base_fraction,
            prompt_words,
            max_tokens,
            prefixes: Vec::new(),
        }
    }

    /// The shared-prefix workload: `n` system prompts of `words` words, each from its own
    /// generator (the same for the same seed, whatever else the run asks for).
    pub fn with_shared_prefixes(mut self, seed: u64, n: usize, prefix_words: usize) -> Self {
        self.prefixes = (0..n)
            .map(|i| {
                let mut rng = Rng::new(seed ^ 0x5EED_0000_0000_0000 ^ ((i as u64) << 1));
                format!("System prompt {i}: {}\n", words(&mut rng, prefix_words))
            })
            .collect();
        self
    }

    pub fn next_spec(&mut self) -> Spec {
        let adapter = if self.adapters.is_empty() || self.rng.uniform() < self.base_fraction {
            None
        } else {
            Some(self.adapters[self.zipf.sample(&mut self.rng)].clone())
        };
        let prefix = if self.prefixes.is_empty() {
            ""
        } else {
            &self.prefixes[(self.rng.next_u64() % self.prefixes.len() as u64) as usize]
        };
        let n = self.rng.in_range(self.prompt_words);
        let own = words(&mut self.rng, n);
        Spec {
            adapter,
            prompt: format!("{prefix}{own}"),
            max_tokens: self.rng.in_range(self.max_tokens),
        }
    }

    pub fn gap(&mut self, rate: f64) -> f64 {
        self.rng.exponential(rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_frequencies_follow_the_exponent() {
        let mut rng = Rng::new(1);
        for s in [0.0, 1.0] {
            let z = Zipf::new(10, s);
            let mut counts = [0usize; 10];
            for _ in 0..200_000 {
                counts[z.sample(&mut rng)] += 1;
            }
            let h: f64 = (1..=10).map(|k| 1.0 / (k as f64).powf(s)).sum();
            for (k, &c) in counts.iter().enumerate() {
                let want = 200_000.0 / ((k + 1) as f64).powf(s) / h;
                assert!(
                    (c as f64 - want).abs() < 0.05 * want + 50.0,
                    "s={s} k={k}: {c} vs {want}"
                );
            }
        }
    }

    #[test]
    fn base_fraction_and_ranges_hold() {
        let r = |lo, hi| Range { lo, hi };
        let mut w = Workload::new(
            3,
            vec!["a".into(), "b".into()],
            1.0,
            0.25,
            r(4, 8),
            r(16, 16),
        );
        let specs: Vec<Spec> = (0..4000).map(|_| w.next_spec()).collect();
        let base = specs.iter().filter(|s| s.adapter.is_none()).count() as f64 / 4000.0;
        assert!((base - 0.25).abs() < 0.03, "{base}");
        assert!(specs.iter().all(|s| s.max_tokens == 16));
        assert!(specs
            .iter()
            .all(|s| (4..=8).contains(&s.prompt.split(' ').count())));
        let mean_gap = (0..20_000).map(|_| w.gap(50.0)).sum::<f64>() / 20_000.0;
        assert!((mean_gap - 0.02).abs() < 0.001, "{mean_gap}");
    }

    #[test]
    fn shared_prefixes_lead_every_prompt() {
        let r = |lo, hi| Range { lo, hi };
        let make = || {
            Workload::new(5, vec!["a".into()], 0.0, 0.5, r(3, 3), r(8, 8))
                .with_shared_prefixes(5, 3, 100)
        };
        let mut w = make();
        let specs: Vec<Spec> = (0..300).map(|_| w.next_spec()).collect();
        let mut seen = std::collections::BTreeMap::new();
        for s in &specs {
            let (prefix, own) = s.prompt.split_once('\n').expect("a prefix line");
            assert_eq!(prefix.split(' ').count(), 3 + 100, "{prefix}");
            assert_eq!(own.split(' ').count(), 3);
            *seen.entry(prefix.to_string()).or_insert(0) += 1;
        }
        // Three distinct prefixes, each used by about a third of the requests, and the same
        // again for the same seed.
        assert_eq!(seen.len(), 3);
        assert!(seen.values().all(|&c| (70..=130).contains(&c)), "{seen:?}");
        let again: Vec<String> = {
            let mut w = make();
            (0..300).map(|_| w.next_spec().prompt).collect()
        };
        assert!(specs.iter().zip(&again).all(|(a, b)| a.prompt == *b));
    }
}

//! The numbers of a run: throughput, latency percentiles, errors by code, and what the server's
//! own counters (`/metrics`) say happened to its adapter cache and apply mode meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::client::Record;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(mut v: Vec<f64>) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_by(f64::total_cmp);
        // Nearest rank.
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }
}

/// Counter deltas read from `/metrics` before and after the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerSide {
    /// The server's `--adapter-mode`.
    pub mode: Option<String>,
    pub cache_hits: f64,
    pub cache_misses: f64,
    /// hits ÷ (hits + misses), None without adapter requests.
    pub cache_hit_rate: Option<f64>,
    pub adapter_loads: f64,
    pub adapter_load_seconds: f64,
    pub evictions: f64,
    pub merges: f64,
    pub steps_merged: f64,
    pub steps_unmerged: f64,
    /// Steps of base rows only (no adapter applied); reports before this field read 0.
    #[serde(default)]
    pub steps_base: f64,
}

/// Prometheus text → name (labels dropped) → value, plus the mode label.
pub fn scrape(text: &str) -> (HashMap<String, f64>, Option<String>) {
    let mut out = HashMap::new();
    let mut mode = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(rest) = name.strip_prefix("dora_adapter_mode_info{mode=\"") {
            mode = rest.split('"').next().map(str::to_string);
        }
        if let Ok(v) = value.parse::<f64>() {
            out.insert(name.split('{').next().unwrap_or(name).to_string(), v);
        }
    }
    (out, mode)
}

impl ServerSide {
    pub fn delta(
        before: &HashMap<String, f64>,
        after: &HashMap<String, f64>,
        mode: Option<String>,
    ) -> Self {
        let d =
            |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
        let (hits, misses) = (
            d("dora_adapter_cache_hits_total"),
            d("dora_adapter_cache_misses_total"),
        );
        ServerSide {
            mode,
            cache_hits: hits,
            cache_misses: misses,
            cache_hit_rate: (hits + misses > 0.0).then(|| hits / (hits + misses)),
            adapter_loads: d("dora_adapter_loads_total"),
            adapter_load_seconds: d("dora_adapter_load_seconds_total"),
            evictions: d("dora_adapter_evictions_total"),
            merges: d("dora_merges_total"),
            steps_merged: d("dora_steps_merged_total"),
            steps_unmerged: d("dora_steps_unmerged_total"),
            steps_base: d("dora_steps_base_total"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub url: String,
    /// `closed loop, C clients` or `Poisson, R req/s`.
    pub arrivals: String,
    pub adapters: Vec<String>,
    pub zipf: f64,
    pub base_fraction: f64,
    pub warmup_s: f64,
    /// From the first counted request's start to the last one's end.
    pub window_s: f64,
    /// Requests counted (started after the warm-up).
    pub requests: usize,
    pub ok: usize,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub prompt_tokens_per_s: f64,
    /// Of the counted requests' prompt tokens, the fraction served from the prefix cache.
    #[serde(default)]
    pub cached_prompt_fraction: f64,
    pub ttft_s: Percentiles,
    pub tpot_s: Percentiles,
    pub e2e_s: Percentiles,
    pub errors: BTreeMap<String, usize>,
    /// Open loop: arrivals not sent because --max-inflight requests were outstanding.
    pub client_dropped: usize,
    pub server: ServerSide,
    pub records: Vec<Record>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        url: &str,
        arrivals: String,
        adapters: Vec<String>,
        zipf: f64,
        base_fraction: f64,
        warmup_s: f64,
        records: Vec<Record>,
        client_dropped: usize,
        server: ServerSide,
    ) -> Report {
        let counted: Vec<&Record> = records.iter().filter(|r| r.start >= warmup_s).collect();
        let ok: Vec<&&Record> = counted.iter().filter(|r| r.ok()).collect();
        let first = counted
            .iter()
            .map(|r| r.start)
            .fold(f64::INFINITY, f64::min);
        let last = counted.iter().map(|r| r.end).fold(0.0, f64::max);
        let window_s = if counted.is_empty() {
            0.0
        } else {
            (last - first).max(1e-9)
        };
        let per_s = |x: f64| if window_s > 0.0 { x / window_s } else { 0.0 };
        let mut errors = BTreeMap::new();
        for r in counted.iter().filter(|r| !r.ok()) {
            *errors.entry(r.outcome.clone()).or_insert(0) += 1;
        }
        Report {
            url: url.to_string(),
            arrivals,
            adapters,
            zipf,
            base_fraction,
            warmup_s,
            window_s,
            requests: counted.len(),
            ok: ok.len(),
            requests_per_s: per_s(ok.len() as f64),
            output_tokens_per_s: per_s(ok.iter().map(|r| r.output_tokens).sum::<usize>() as f64),
            prompt_tokens_per_s: per_s(ok.iter().map(|r| r.prompt_tokens).sum::<usize>() as f64),
            cached_prompt_fraction: {
                let prompt: usize = ok.iter().map(|r| r.prompt_tokens).sum();
                let cached: usize = ok.iter().map(|r| r.cached_tokens).sum();
                if prompt == 0 {
                    0.0
                } else {
                    cached as f64 / prompt as f64
                }
            },
            ttft_s: Percentiles::of(ok.iter().filter_map(|r| r.ttft).collect()),
            tpot_s: Percentiles::of(ok.iter().filter_map(|r| r.tpot()).collect()),
            e2e_s: Percentiles::of(ok.iter().map(|r| r.e2e()).collect()),
            errors,
            client_dropped,
            server,
            records,
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let ms = |p: &Percentiles| {
            format!(
                "{:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                p.p50 * 1e3,
                p.p90 * 1e3,
                p.p99 * 1e3,
                p.mean * 1e3
            )
        };
        let _ = writeln!(s, "dora-serve bench → {} ({})", self.url, self.arrivals);
        let _ = writeln!(
            s,
            "adapters: {} (zipf {}, base fraction {:.2}); server mode: {}",
            self.adapters.len(),
            self.zipf,
            self.base_fraction,
            self.server.mode.as_deref().unwrap_or("?")
        );
        let _ = writeln!(
            s,
            "counted {} requests ({} ok) over {:.1} s after {:.1} s warm-up",
            self.requests, self.ok, self.window_s, self.warmup_s
        );
        let _ = writeln!(
            s,
            "throughput: {:.2} req/s, {:.1} output tok/s, {:.1} prompt tok/s",
            self.requests_per_s, self.output_tokens_per_s, self.prompt_tokens_per_s
        );
        if self.cached_prompt_fraction > 0.0 {
            let _ = writeln!(
                s,
                "prompt tokens from the prefix cache: {:.1}%",
                self.cached_prompt_fraction * 100.0
            );
        }
        let _ = writeln!(s, "latency (ms)        p50       p90       p99      mean");
        let _ = writeln!(s, "  ttft        {}", ms(&self.ttft_s));
        let _ = writeln!(s, "  tpot        {}", ms(&self.tpot_s));
        let _ = writeln!(s, "  e2e         {}", ms(&self.e2e_s));
        if self.errors.is_empty() {
            let _ = writeln!(s, "errors: none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "errors: {}", list.join(", "));
        }
        if self.client_dropped > 0 {
            let _ = writeln!(s, "not sent (over --max-inflight): {}", self.client_dropped);
        }
        let sv = &self.server;
        let _ = writeln!(
            s,
            "server: cache hit rate {}, {} loads ({:.2} s), {} evictions, {} merges, steps merged/unmerged/base-only {}/{}/{}",
            sv.cache_hit_rate.map_or("-".into(), |h| format!("{:.3}", h)),
            sv.adapter_loads,
            sv.adapter_load_seconds,
            sv.evictions,
            sv.merges,
            sv.steps_merged,
            sv.steps_unmerged,
            sv.steps_base
        );
        s
    }
}

/// B ÷ A for the figures that matter.
pub fn compare(a: &Report, b: &Report) -> String {
    let rows: [(&str, f64, f64); 9] = [
        ("requests/s", a.requests_per_s, b.requests_per_s),
        ("output tok/s", a.output_tokens_per_s, b.output_tokens_per_s),
        ("ttft p50", a.ttft_s.p50, b.ttft_s.p50),
        ("ttft p99", a.ttft_s.p99, b.ttft_s.p99),
        ("tpot p50", a.tpot_s.p50, b.tpot_s.p50),
        ("tpot p99", a.tpot_s.p99, b.tpot_s.p99),
        ("e2e p50", a.e2e_s.p50, b.e2e_s.p50),
        ("e2e p99", a.e2e_s.p99, b.e2e_s.p99),
        (
            "errors",
            a.errors.values().sum::<usize>() as f64,
            b.errors.values().sum::<usize>() as f64,
        ),
    ];
    let mut s = format!("{:<14} {:>12} {:>12} {:>8}\n", "", "A", "B", "B ÷ A");
    for (name, x, y) in rows {
        let ratio = if x != 0.0 {
            format!("{:.3}", y / x)
        } else {
            "-".into()
        };
        let _ = writeln!(s, "{name:<14} {x:>12.4} {y:>12.4} {ratio:>8}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99, p.mean), (50.0, 90.0, 99.0, 50.5));
        assert_eq!(Percentiles::of(vec![]).p99, 0.0);
    }

    #[test]
    fn scrape_reads_counters_and_mode() {
        let (m, mode) = scrape("# TYPE x counter\ndora_adapter_loads_total 3\ndora_adapter_mode_info{mode=\"auto\"} 1\nh_bucket{le=\"0.1\"} 2\n");
        assert_eq!(m["dora_adapter_loads_total"], 3.0);
        assert_eq!(mode.as_deref(), Some("auto"));
    }
}

//! `GET /metrics`: Prometheus text. Request counts and latency, time to first token and per
//! output token, token counters, queue depth, adapter cache counters, and the gauges the
//! Kubernetes Gateway API Inference Extension scrapes for LoRA-affinity routing.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::{now_secs, AppState};

const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    ttft: Histogram,
    tpot: Histogram,
    prompt_tokens: u64,
    completion_tokens: u64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16, secs: f64) {
        if let Ok(mut m) = self.inner.lock() {
            *m.requests
                .entry((endpoint.to_string(), status))
                .or_default() += 1;
            m.latency
                .entry(endpoint.to_string())
                .or_default()
                .observe(secs);
        }
    }

    pub fn observe_ttft(&self, secs: f64) {
        if let Ok(mut m) = self.inner.lock() {
            m.ttft.observe(secs);
        }
    }

    /// A finished completion: its tokens and its whole duration.
    pub fn record_tokens(&self, prompt: usize, completion: usize, secs: f64) {
        if let Ok(mut m) = self.inner.lock() {
            m.prompt_tokens += prompt as u64;
            m.completion_tokens += completion as u64;
            if completion > 0 {
                m.tpot.observe(secs / completion as f64);
            }
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn render(State(s): State<AppState>) -> impl IntoResponse {
    let st = s.engine.stats();
    let mut out = String::new();
    {
        let m = s.metrics.inner.lock().map(|m| {
            (
                m.requests.clone(),
                m.latency.clone(),
                m.ttft.clone(),
                m.tpot.clone(),
                m.prompt_tokens,
                m.completion_tokens,
            )
        });
        if let Ok((requests, latency, ttft, tpot, pt, ct)) = m {
            out.push_str("# HELP dora_requests_total HTTP requests by endpoint and status.\n# TYPE dora_requests_total counter\n");
            for ((e, code), n) in &requests {
                let _ = writeln!(
                    out,
                    "dora_requests_total{{endpoint=\"{}\",status=\"{code}\"}} {n}",
                    esc(e)
                );
            }
            out.push_str("# HELP dora_request_duration_seconds HTTP request latency.\n# TYPE dora_request_duration_seconds histogram\n");
            for (e, h) in &latency {
                h.render(
                    &mut out,
                    "dora_request_duration_seconds",
                    &format!("endpoint=\"{}\"", esc(e)),
                );
            }
            out.push_str("# HELP dora_time_to_first_token_seconds Time to first token.\n# TYPE dora_time_to_first_token_seconds histogram\n");
            ttft.render(&mut out, "dora_time_to_first_token_seconds", "");
            out.push_str("# HELP dora_time_per_output_token_seconds Request duration per output token.\n# TYPE dora_time_per_output_token_seconds histogram\n");
            tpot.render(&mut out, "dora_time_per_output_token_seconds", "");
            let _ = writeln!(
                out,
                "# TYPE dora_prompt_tokens_total counter\ndora_prompt_tokens_total {pt}"
            );
            let _ = writeln!(
                out,
                "# TYPE dora_generation_tokens_total counter\ndora_generation_tokens_total {ct}"
            );
        }
    }
    let c = &st.adapter_cache;
    for (name, kind, v) in [
        ("dora_queue_depth", "gauge", st.waiting as f64),
        ("dora_running_requests", "gauge", st.running as f64),
        ("dora_kv_cache_bytes", "gauge", st.kv_bytes as f64),
        ("dora_adapter_cache_hits_total", "counter", c.hits as f64),
        (
            "dora_adapter_cache_misses_total",
            "counter",
            c.misses as f64,
        ),
        ("dora_adapter_loads_total", "counter", c.loads as f64),
        (
            "dora_adapter_load_failures_total",
            "counter",
            c.load_failures as f64,
        ),
        (
            "dora_adapter_load_seconds_total",
            "counter",
            c.load_secs_total,
        ),
        (
            "dora_adapter_evictions_total",
            "counter",
            c.evictions as f64,
        ),
        ("dora_adapter_cache_bytes", "gauge", c.bytes_resident as f64),
        (
            "dora_adapters_resident",
            "gauge",
            c.adapters_resident as f64,
        ),
        ("dora_merged_cache_bytes", "gauge", st.merged_bytes as f64),
        ("dora_merges_total", "counter", st.merges as f64),
        (
            "dora_steps_unmerged_total",
            "counter",
            st.steps_unmerged as f64,
        ),
        ("dora_steps_merged_total", "counter", st.steps_merged as f64),
        ("dora_steps_base_total", "counter", st.steps_base as f64),
        ("vllm:num_requests_waiting", "gauge", st.waiting as f64),
        ("vllm:num_requests_running", "gauge", st.running as f64),
        (
            "vllm:kv_cache_usage_perc",
            "gauge",
            if st.kv_capacity_bytes > 0 {
                st.kv_bytes as f64 / st.kv_capacity_bytes as f64
            } else {
                0.0
            },
        ),
    ] {
        let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {v}");
    }
    let _ = writeln!(
        out,
        "# TYPE dora_adapter_mode_info gauge\ndora_adapter_mode_info{{mode=\"{}\"}} 1",
        st.mode.as_str()
    );
    let _ = writeln!(
        out,
        "# TYPE vllm:lora_requests_info gauge\nvllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {}",
        st.max_running,
        esc(&st.running_adapters.join(",")),
        esc(&st.waiting_adapters.join(",")),
        now_secs()
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

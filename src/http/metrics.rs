//! `GET /metrics`: Prometheus text. Request counts and latency, time to first token and per
//! output token, token counters, queue depth, adapter cache counters, and the gauges the
//! Kubernetes Gateway API Inference Extension scrapes for LoRA-affinity routing.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::AppState;

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
    /// The running and waiting adapter lists last seen, and when they last changed (the
    /// value of `vllm:lora_requests_info`, as vLLM reports it).
    lora_lists: (String, String),
    lora_changed: f64,
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

    /// When the adapter lists last changed, `lists` being what they are now.
    fn lora_changed(&self, lists: &(String, String)) -> f64 {
        let Ok(mut m) = self.inner.lock() else {
            return 0.0;
        };
        if m.lora_changed == 0.0 || m.lora_lists != *lists {
            m.lora_lists = lists.clone();
            m.lora_changed = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
        }
        m.lora_changed
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
    let h = s.engine.store_health();
    let _ = writeln!(
        out,
        "# HELP dora_adapter_store_up Whether the adapter store answered its last request.\n# TYPE dora_adapter_store_up gauge\ndora_adapter_store_up{{remote=\"{}\"}} {}",
        h.remote,
        u8::from(h.up)
    );
    if let Some(d) = s.engine.disk_cache_stats() {
        for (name, kind, v) in [
            ("dora_adapter_disk_cache_bytes", "gauge", d.bytes),
            ("dora_adapter_disk_cache_entries", "gauge", d.entries as u64),
            ("dora_adapter_disk_cache_hits_total", "counter", d.hits),
            ("dora_adapter_disk_cache_misses_total", "counter", d.misses),
        ] {
            let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {v}");
        }
    }
    let lists = (st.running_adapters.join(","), st.waiting_adapters.join(","));
    let changed = s.metrics.lora_changed(&lists);
    let _ = writeln!(
        out,
        "# HELP vllm:lora_requests_info Running and waiting adapters; the value is when the lists last changed (Unix seconds).\n# TYPE vllm:lora_requests_info gauge\nvllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {changed}",
        st.max_running,
        esc(&lists.0),
        esc(&lists.1),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

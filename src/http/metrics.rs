//! `GET /metrics`: the Prometheus text format (0.0.4), written by the `prometheus-client`
//! crate. Request counts and latency, time to first token and per output token, token
//! counters, queue depth, adapter cache and store counters, and the gauges the Kubernetes
//! Gateway API Inference Extension (and llm-d) scrape for LoRA-affinity routing, under vLLM's
//! names: `vllm:num_requests_waiting`, `vllm:num_requests_running`,
//! `vllm:kv_cache_usage_perc`, `vllm:lora_requests_info`.
//!
//! Histograms and request counters live here; everything the engine knows is read from its
//! stats at scrape time into constant gauges and counters of a registry built per scrape.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::AppState;

const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

type Labels = Vec<(String, String)>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The request-side metrics, kept between scrapes.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    ttft: Histogram,
    tpot: Histogram,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    /// The running and waiting adapter lists last seen, and when they last changed (the
    /// value of `vllm:lora_requests_info`, as vLLM reports it).
    lora: Mutex<((String, String), f64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(histogram),
            ttft: histogram(),
            tpot: histogram(),
            prompt_tokens: Counter::default(),
            completion_tokens: Counter::default(),
            lora: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16, secs: f64) {
        self.requests
            .get_or_create(&vec![
                ("endpoint".into(), endpoint.into()),
                ("status".into(), status.to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("endpoint".into(), endpoint.into())])
            .observe(secs);
    }

    pub fn observe_ttft(&self, secs: f64) {
        self.ttft.observe(secs);
    }

    /// A finished completion: its tokens and its whole duration.
    pub fn record_tokens(&self, prompt: usize, completion: usize, secs: f64) {
        self.prompt_tokens.inc_by(prompt as u64);
        self.completion_tokens.inc_by(completion as u64);
        if completion > 0 {
            self.tpot.observe(secs / completion as f64);
        }
    }

    /// When the adapter lists last changed, `lists` being what they are now.
    fn lora_changed(&self, lists: &(String, String)) -> f64 {
        let mut m = self.lora.lock().unwrap_or_else(|p| p.into_inner());
        if m.1 == 0.0 || m.0 != *lists {
            m.0 = lists.clone();
            m.1 = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
        }
        m.1
    }
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: f64) {
    r.register(name, help, ConstGauge::<f64>::new(v));
}

/// A counter read from the engine; the encoder adds `_total` to `name`.
fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    r.register(name, help, ConstCounter::new(v));
}

/// A gauge of value `v` with one labelled series.
fn labelled(r: &mut Registry, name: &str, help: &str, labels: Labels, v: f64) {
    let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    family.get_or_create(&labels).set(v);
    r.register(name, help, family);
}

pub async fn render(State(s): State<AppState>) -> impl IntoResponse {
    let st = s.engine.stats();
    let m = &s.metrics;
    let mut r = Registry::default();
    r.register(
        "dora_requests",
        "HTTP requests by endpoint and status",
        m.requests.clone(),
    );
    r.register(
        "dora_request_duration_seconds",
        "HTTP request latency",
        m.latency.clone(),
    );
    r.register(
        "dora_time_to_first_token_seconds",
        "Time to first token",
        m.ttft.clone(),
    );
    r.register(
        "dora_time_per_output_token_seconds",
        "Request duration per output token",
        m.tpot.clone(),
    );
    r.register(
        "dora_prompt_tokens",
        "Prompt tokens of finished requests",
        m.prompt_tokens.clone(),
    );
    r.register(
        "dora_generation_tokens",
        "Generated tokens of finished requests",
        m.completion_tokens.clone(),
    );
    let c = &st.adapter_cache;
    // Cached prefix blocks are KV too: held bytes over running capacity plus the prefix budget.
    let kv_capacity = st.kv_capacity_bytes + st.prefix_budget;
    let kv_usage = if kv_capacity > 0 {
        ((st.kv_bytes + st.prefix_bytes) as f64 / kv_capacity as f64).clamp(0.0, 1.0)
    } else {
        0.0
    };
    counter(
        &mut r,
        "vllm:prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache",
        st.prefix_queries,
    );
    counter(
        &mut r,
        "vllm:prefix_cache_hits",
        "Prompt tokens found in the prefix cache",
        st.prefix_hits,
    );
    for (name, help, v) in [
        (
            "dora_queue_depth",
            "Requests waiting to run",
            st.waiting as f64,
        ),
        (
            "dora_running_requests",
            "Requests running",
            st.running as f64,
        ),
        (
            "dora_kv_cache_bytes",
            "KV cache bytes held",
            st.kv_bytes as f64,
        ),
        (
            "dora_adapter_cache_bytes",
            "Bytes of adapters loaded in memory",
            c.bytes_resident as f64,
        ),
        (
            "dora_adapters_resident",
            "Adapters loaded in memory",
            c.adapters_resident as f64,
        ),
        (
            "dora_prefix_cache_bytes",
            "Bytes of cached prefix blocks",
            st.prefix_bytes as f64,
        ),
        (
            "dora_prefix_cache_blocks",
            "Cached prefix blocks",
            st.prefix_blocks as f64,
        ),
        (
            "dora_merged_cache_bytes",
            "Bytes of merged weight copies",
            st.merged_bytes as f64,
        ),
        (
            "vllm:num_requests_waiting",
            "Requests waiting to be scheduled",
            st.waiting as f64,
        ),
        (
            "vllm:num_requests_running",
            "Requests running",
            st.running as f64,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "KV cache usage, 0 to 1",
            kv_usage,
        ),
    ] {
        gauge(&mut r, name, help, v);
    }
    // vLLM's name before v0.10, still the default of older GIE endpoint pickers.
    gauge(
        &mut r,
        "vllm:gpu_cache_usage_perc",
        "KV cache usage, 0 to 1 (the older vLLM name)",
        kv_usage,
    );
    for (name, help, v) in [
        (
            "dora_adapter_cache_hits",
            "Adapter requests served from memory",
            c.hits,
        ),
        (
            "dora_adapter_cache_misses",
            "Adapter requests that needed a load",
            c.misses,
        ),
        ("dora_adapter_loads", "Adapter loads", c.loads),
        (
            "dora_adapter_load_failures",
            "Adapter loads that failed",
            c.load_failures,
        ),
        (
            "dora_adapter_evictions",
            "Adapters evicted from memory",
            c.evictions,
        ),
        ("dora_merges", "Merged weight copies built", st.merges),
        (
            "dora_steps_unmerged",
            "Engine steps with adapters unmerged",
            st.steps_unmerged,
        ),
        (
            "dora_steps_merged",
            "Engine steps on a merged adapter",
            st.steps_merged,
        ),
        (
            "dora_steps_base",
            "Engine steps on the base model only",
            st.steps_base,
        ),
    ] {
        counter(&mut r, name, help, v);
    }
    r.register(
        "dora_adapter_load_seconds",
        "Seconds spent loading adapters",
        ConstCounter::new(c.load_secs_total),
    );
    labelled(
        &mut r,
        "dora_adapter_mode_info",
        "How adapters are applied",
        vec![("mode".into(), st.mode.as_str().into())],
        1.0,
    );
    let h = s.engine.store_health();
    labelled(
        &mut r,
        "dora_adapter_store_up",
        "Whether the adapter store answered its last request",
        vec![("remote".into(), h.remote.to_string())],
        f64::from(u8::from(h.up)),
    );
    if let Some(d) = s.engine.disk_cache_stats() {
        gauge(
            &mut r,
            "dora_adapter_disk_cache_bytes",
            "Bytes of adapters in the local disk cache",
            d.bytes as f64,
        );
        gauge(
            &mut r,
            "dora_adapter_disk_cache_entries",
            "Adapter versions in the local disk cache",
            d.entries as f64,
        );
        counter(
            &mut r,
            "dora_adapter_disk_cache_hits",
            "Adapter fetches served by the disk cache",
            d.hits,
        );
        counter(
            &mut r,
            "dora_adapter_disk_cache_misses",
            "Adapter fetches that went to the object store",
            d.misses,
        );
    }
    let lists = (st.running_adapters.join(","), st.waiting_adapters.join(","));
    let changed = m.lora_changed(&lists);
    labelled(
        &mut r,
        "vllm:lora_requests_info",
        "Running and waiting adapters; the value is when the lists last changed (Unix seconds)",
        vec![
            ("max_lora".into(), st.max_running.to_string()),
            ("running_lora_adapters".into(), lists.0),
            ("waiting_lora_adapters".into(), lists.1),
        ],
        changed,
    );
    let mut out = String::new();
    let _ = prometheus_text::encode(&mut out, &r);
    ([(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], out)
}

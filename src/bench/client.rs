//! One streamed completion, timed: when it was sent, when its first token came, when it ended,
//! and how it ended.

use std::time::Instant;

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::workload::Spec;

/// What one request did. Times are seconds since the run started.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub start: f64,
    /// Time to first token (None when none came).
    pub ttft: Option<f64>,
    pub end: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Prompt tokens the server took from its prefix cache
    /// (`usage.prompt_tokens_details.cached_tokens`).
    #[serde(default)]
    pub cached_tokens: usize,
    pub adapter: Option<String>,
    /// `ok`, an API error `code`, `http_NNN`, or `connection`.
    pub outcome: String,
}

impl Record {
    pub fn ok(&self) -> bool {
        self.outcome == "ok"
    }

    pub fn e2e(&self) -> f64 {
        self.end - self.start
    }

    /// Time per output token after the first.
    pub fn tpot(&self) -> Option<f64> {
        let ttft = self.ttft?;
        (self.output_tokens > 1).then(|| (self.e2e() - ttft) / (self.output_tokens - 1) as f64)
    }
}

pub async fn send(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    spec: Spec,
    ignore_eos: bool,
    t0: Instant,
) -> Record {
    let start = t0.elapsed().as_secs_f64();
    let body = json!({
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "adapter": spec.adapter,
        "ignore_eos": ignore_eos,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut rec = Record {
        start,
        ttft: None,
        end: start,
        prompt_tokens: 0,
        output_tokens: 0,
        cached_tokens: 0,
        adapter: spec.adapter,
        outcome: "ok".into(),
    };
    let mut req = client
        .post(format!("{url}/v1/completions"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(_) => {
            rec.outcome = "connection".into();
            rec.end = t0.elapsed().as_secs_f64();
            return rec;
        }
    };
    let status = resp.status();
    if !status.is_success() {
        let v: Value = resp
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        rec.outcome = v["error"]["code"]
            .as_str()
            .map_or_else(|| format!("http_{}", status.as_u16()), str::to_string);
        rec.end = t0.elapsed().as_secs_f64();
        return rec;
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut chunks = 0;
    'read: while let Some(item) = stream.next().await {
        let Ok::<_, reqwest::Error>(bytes) = item else {
            rec.outcome = "connection".into();
            break;
        };
        buf.extend_from_slice(&bytes);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let Some(data) = std::str::from_utf8(&event)
                .ok()
                .and_then(|e| e.trim().strip_prefix("data: "))
            else {
                continue;
            };
            if data == "[DONE]" {
                break 'read;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(code) = v["error"]["code"].as_str() {
                rec.outcome = code.to_string();
                break 'read;
            }
            if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                chunks += 1;
                if rec.ttft.is_none() {
                    rec.ttft = Some(t0.elapsed().as_secs_f64() - start);
                }
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                rec.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                rec.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
                rec.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0) as usize;
            }
        }
    }
    if rec.output_tokens == 0 {
        rec.output_tokens = chunks;
    }
    rec.end = t0.elapsed().as_secs_f64();
    rec
}

//! Helpers for tests of the HTTP API: a server on the tiny model over a temporary store,
//! driven through its router (`oneshot`).

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use dora_serve::adapter::Catalog;
use dora_serve::engine::AdapterMode;
use dora_serve::engine::{Engine, EngineConfig, StepGate};
use dora_serve::http::{self, AppState, HttpConfig};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::util::{fixtures, load};

pub const PROMPT: &str = "The capital of France is";

pub struct Server {
    pub app: Router,
    pub engine: Engine,
    pub store: tempfile::TempDir,
    pub outside: tempfile::TempDir,
}

pub fn server_with(keys: (Option<&str>, Option<&str>), max_upload: usize) -> Server {
    server_opts(Opts {
        keys,
        max_upload,
        ..Opts::default()
    })
}

/// How a test server is set up.
pub struct Opts<'a> {
    /// (api key, admin key)
    pub keys: (Option<&'a str>, Option<&'a str>),
    pub max_upload: usize,
    /// (max running, max queued)
    pub limits: (usize, usize),
    pub request_timeout: Option<std::time::Duration>,
    /// Engine steps wait for this gate (tests that need the engine to hold still).
    pub gate: Option<StepGate>,
    /// A pause inside every cold adapter load, after its files are read.
    pub load_delay: std::time::Duration,
    /// The adapter cache's byte budget (the engine's default when `None`).
    pub adapter_cache_bytes: Option<usize>,
    /// Cold loads wait for this gate's permits once their files are read.
    pub load_gate: Option<StepGate>,
    /// The adapters (default: a folder store holding dora-all-r8 and lora-r8).
    pub catalog: Option<Catalog>,
    /// The fixture model served (default: tiny-llama).
    pub model: Option<&'a str>,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Self {
            keys: (None, None),
            max_upload: 1 << 20,
            limits: (8, 64),
            request_timeout: None,
            gate: None,
            load_delay: std::time::Duration::ZERO,
            adapter_cache_bytes: None,
            load_gate: None,
            catalog: None,
            model: None,
        }
    }
}

pub fn server_opts(o: Opts) -> Server {
    let store_dir = tempfile::tempdir().unwrap();
    for name in ["dora-all-r8", "lora-r8"] {
        let to = store_dir.path().join(name);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(fixtures().join("adapters").join(name)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let catalog = o
        .catalog
        .unwrap_or_else(|| Catalog::open(store_dir.path()).unwrap());
    let mut model = load(o.model.unwrap_or("tiny-llama"));
    model.info.id = "tiny-llama".into(); // as --served-model-name tiny-llama
    let engine = Engine::start(
        model,
        catalog,
        EngineConfig {
            max_running: o.limits.0,
            max_step_tokens: 256,
            max_queued: o.limits.1,
            mode: AdapterMode::Auto,
            step_gate: o.gate,
            load_delay: o.load_delay,
            load_gate: o.load_gate,
            adapter_cache_bytes: o
                .adapter_cache_bytes
                .unwrap_or(EngineConfig::default().adapter_cache_bytes),
            ..EngineConfig::default()
        },
    );
    let state = AppState::new(
        engine.clone(),
        HttpConfig {
            api_key: o.keys.0.map(str::to_string),
            admin_key: o.keys.1.map(str::to_string),
            max_upload_bytes: o.max_upload,
            request_timeout: o.request_timeout,
        },
    );
    Server {
        engine,
        app: http::app(state),
        store: store_dir,
        outside: tempfile::tempdir().unwrap(),
    }
}

/// A server whose engine steps only when the returned gate allows.
pub fn gated_server(limits: (usize, usize)) -> (Server, StepGate) {
    let gate = StepGate::closed();
    let s = server_opts(Opts {
        limits,
        gate: Some(gate.clone()),
        ..Opts::default()
    });
    (s, gate)
}

pub fn server() -> Server {
    server_with((None, None), 1 << 20)
}

pub async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Value, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

pub fn post_json(path: &str, body: Value) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

pub fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

pub fn multipart(fields: &[(&str, &[u8])], path: &str) -> Request<Body> {
    let boundary = "dora-boundary-7d3c";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n\r\n").as_bytes());
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Request::post(path)
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(body))
        .unwrap()
}

pub fn fixture_files(name: &str) -> (Vec<u8>, Vec<u8>) {
    let d = fixtures().join("adapters").join(name);
    (
        std::fs::read(d.join("adapter_config.json")).unwrap(),
        std::fs::read(d.join("adapter_model.safetensors")).unwrap(),
    )
}

pub fn adapter_greedy(name: &str, prompt: usize) -> Vec<u32> {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("adapters/expected.json")).unwrap(),
    )
    .unwrap();
    serde_json::from_value(v["adapters"][name]["unmerged_greedy"][prompt].clone()).unwrap()
}

pub fn decode(ids: &[u32]) -> String {
    load("tiny-llama").tokenizer.decode(ids, true).unwrap()
}

pub fn assert_error(status: StatusCode, body: &Value, want_status: StatusCode, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["error"]["type"].is_string());
}

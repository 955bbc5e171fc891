//! The real Gemma 3 270M served through the HTTP API with a PEFT DoRA adapter uploaded over
//! HTTP: greedy answers for the base and the adapter equal transformers' and PEFT's
//! (`scripts/gemma3_adapter_reference.py`), in one mixed batch, and the chat endpoint renders
//! Gemma's template. Needs `scripts/fetch-model.sh gemma3-270m`, hence ignored:
//! `cargo test --release --test it -- --ignored real_model`.

use std::path::PathBuf;

use axum::http::StatusCode;
use candle_core::{DType, Device};
use dora_serve::adapter::Catalog;
use dora_serve::engine::{AdapterMode, Engine, EngineConfig};
use dora_serve::http::{self, AppState, HttpConfig};
use dora_serve::model::{self, LoadOptions};
use serde::Deserialize;
use serde_json::json;

use crate::web::{call, multipart, post_json};

#[derive(Deserialize)]
struct Reference {
    prompt_token_ids: Vec<Vec<u32>>,
    base: Vec<Vec<u32>>,
    adapter: Vec<Vec<u32>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs models/ from scripts/fetch-model.sh gemma3-270m"]
async fn real_model_gemma3_270m_serves_a_peft_dora_adapter_over_http() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let reference: Reference = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/gemma3_270m_adapter_reference.json"))
            .unwrap(),
    )
    .unwrap();
    let m = model::load(
        &root.join("models/gemma-3-270m-q4_k_m.gguf"),
        &LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            stored: true,
        },
    )
    .expect("run scripts/fetch-model.sh gemma3-270m first");
    let store = tempfile::tempdir().unwrap();
    let engine = Engine::start(
        m,
        Catalog::open(store.path()).unwrap(),
        EngineConfig {
            mode: AdapterMode::Unmerged,
            ..EngineConfig::default()
        },
    );
    let app = http::app(AppState::new(
        engine,
        HttpConfig {
            api_key: None,
            admin_key: None,
            max_upload_bytes: 64 << 20,
            request_timeout: None,
        },
    ));
    let dir = root.join("tests/fixtures/gemma3_270m_dora");
    let cfg = std::fs::read(dir.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let (st, v, text) = call(
        &app,
        multipart(
            &[
                ("name", b"gemma-dora"),
                ("adapter_config", &cfg),
                ("adapter_model", &weights),
            ],
            "/v1/adapters",
        ),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    assert_eq!(v["type"], "dora", "{v}");

    // Base and adapter requests at once: they share steps (a mixed batch).
    let ask = |ids: &Vec<u32>, n: usize, adapter: Option<&str>| {
        let mut body = json!({
            "prompt": ids, "max_tokens": n, "temperature": 0,
        });
        if let Some(a) = adapter {
            body["adapter"] = a.into();
        }
        let app = app.clone();
        async move { call(&app, post_json("/v1/completions", body)).await }
    };
    let mut calls = Vec::new();
    for (i, ids) in reference.prompt_token_ids.iter().enumerate() {
        calls.push(ask(ids, reference.base[i].len(), None));
        calls.push(ask(ids, reference.adapter[i].len(), Some("gemma-dora")));
    }
    let answers = futures_util::future::join_all(calls).await;
    for (k, (st, v, text)) in answers.into_iter().enumerate() {
        assert_eq!(st, StatusCode::OK, "{text}");
        let (i, on_adapter) = (k / 2, k % 2 == 1);
        let want = if on_adapter {
            &reference.adapter[i]
        } else {
            &reference.base[i]
        };
        let mut want = want.clone();
        if want.last().is_some_and(|t| [1, 106].contains(t)) {
            want.pop();
        }
        let text_got = v["choices"][0]["text"].as_str().unwrap().to_string();
        let text_want = decode(&want);
        assert_eq!(
            text_got,
            text_want,
            "prompt {i}, {}",
            if on_adapter { "adapter" } else { "base" }
        );
    }

    // Chat through Gemma's template (the file has none; the family's is used).
    let (st, v, text) = call(
        &app,
        post_json(
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "Answer briefly."},
                                 {"role": "user", "content": "What is the capital of France?"}],
                   "max_tokens": 12, "temperature": 0, "adapter": "gemma-dora"}),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{text}");
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
}

/// The text of `ids` as the server's tokenizer decodes it.
fn decode(ids: &[u32]) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tok = model::load_gguf_tokenizer(&root.join("models/gemma-3-270m-q4_k_m.gguf")).unwrap();
    tok.decode(ids, true).unwrap()
}

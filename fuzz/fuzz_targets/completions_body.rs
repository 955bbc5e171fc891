//! The completions endpoint on arbitrary request bodies, through the real router and engine on
//! the tiny fixture model: never a panic, never a 5xx, and every answer is JSON (an error in
//! OpenAI's shape with a code, or a completion) or an event stream.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{header, Request};
use axum::Router;
use candle_core::{DType, Device};
use dora_serve::adapter::Catalog;
use dora_serve::engine::{Engine, EngineConfig};
use dora_serve::http::{self, AppState, HttpConfig};
use dora_serve::model::{self, LoadOptions};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct Harness {
    rt: tokio::runtime::Runtime,
    app: Router,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let opts = LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            stored: false,
        };
        let mut loaded = model::load(&root.join("tiny-llama"), &opts).expect("tiny model");
        loaded.info.id = "tiny-llama".into();
        // The fixture adapters, read-only: uploads are not reachable from this endpoint.
        let catalog = Catalog::open(&root.join("adapters")).expect("store");
        let engine = Engine::start(loaded, catalog, EngineConfig::default());
        let state = AppState::new(
            engine,
            HttpConfig {
                api_key: None,
                admin_key: None,
                max_upload_bytes: 1 << 20,
                request_timeout: None,
            },
        );
        Harness {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            app: http::app(state),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let req = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(data.to_vec()))
        .unwrap();
    h.rt.block_on(async {
        let resp = h.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let stream = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            !status.is_server_error(),
            "{status} for {:?}: {}",
            String::from_utf8_lossy(data),
            String::from_utf8_lossy(&body)
        );
        if stream {
            assert!(body.ends_with(b"data: [DONE]\n\n"), "stream not terminated");
            return;
        }
        let v: serde_json::Value = serde_json::from_slice(&body).expect("a JSON answer");
        if status.is_success() {
            assert!(v["choices"].is_array(), "{v}");
        } else {
            assert!(v["error"]["code"].is_string(), "{v}");
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    });
});

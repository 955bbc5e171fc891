//! The adapter catalog below HTTP: an upload is loaded once (the cache counters show it), the
//! same broken adapter answers the same status and code however it was loaded, and a request
//! never runs on files the catalog has since replaced.

use std::path::Path;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use dora_serve::engine::{EngineStats, StepGate};
use serde_json::{json, Value};

use crate::web::*;

fn stats_when(s: &Server, what: &str, cond: impl Fn(&EngineStats) -> bool) -> EngineStats {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = s.engine.stats();
        if cond(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "never {what}: {st:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

async fn complete(s: &Server, adapter: &str) -> (StatusCode, Value) {
    let (st, v, _) = call(
        &s.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "adapter": adapter}),
        ),
    )
    .await;
    (st, v)
}

/// `POST /v1/adapters` validates the upload with a full load and puts that load into the
/// cache: the first request on it is a hit, and no second load from disk happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_loaded_once_and_its_first_request_is_a_hit() {
    let s = server();
    let before = s.engine.stats().adapter_cache;
    let (cfg, weights) = fixture_files("dora-all-r8");
    let (st, v, text) = call(
        &s.app,
        multipart(
            &[
                ("name", b"fresh"),
                ("adapter_config", &cfg),
                ("adapter_model", &weights),
            ],
            "/v1/adapters",
        ),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    assert_eq!(v["state"], "loaded", "{v}");
    let digest = v["digest"].as_str().unwrap().to_string();
    // The upload's load is handed to the engine's worker; once it is in, nothing else loads.
    stats_when(&s, "the upload in the cache", |st| {
        st.loaded_adapters.iter().any(|n| n == "fresh")
    });
    let (st, v) = complete(&s, "fresh").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["adapter_digest"], digest.as_str());
    let after = s.engine.stats().adapter_cache;
    assert_eq!(after.loads, before.loads + 1, "one load: the upload's");
    assert_eq!(after.misses, before.misses, "the request did not miss");
    assert_eq!(after.hits, before.hits + 1, "the request was a hit");
    // A replace installs the new version the same way: still no load from disk, and the next
    // request is served by the new digest.
    let (cfg2, weights2) = fixture_files("lora-r8");
    let (st, v, text) = call(
        &s.app,
        multipart(
            &[
                ("name", b"fresh"),
                ("adapter_config", &cfg2),
                ("adapter_model", &weights2),
            ],
            "/v1/adapters?replace=true",
        ),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    let digest2 = v["digest"].as_str().unwrap().to_string();
    assert_ne!(digest, digest2);
    let (st, v) = complete(&s, "fresh").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["adapter_digest"], digest2.as_str());
    let last = s.engine.stats().adapter_cache;
    assert_eq!(
        last.loads,
        before.loads + 2,
        "one load per upload, none per request"
    );
    assert_eq!(last.misses, before.misses);
}

/// The byte budget still rules an upload: over it, the validated adapter is not kept, and
/// the first request loads it from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_the_cache_budget_is_not_kept() {
    let s = server_opts(Opts {
        adapter_cache_bytes: Some(1),
        ..Opts::default()
    });
    let (cfg, weights) = fixture_files("dora-all-r8");
    let (st, _, text) = call(
        &s.app,
        multipart(
            &[
                ("name", b"big"),
                ("adapter_config", &cfg),
                ("adapter_model", &weights),
            ],
            "/v1/adapters",
        ),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    let st = s.engine.stats();
    assert_eq!(st.adapter_cache.adapters_resident, 0, "{st:?}");
    assert_eq!(st.adapter_cache.evictions, 1, "{st:?}");
    let misses = st.adapter_cache.misses;
    let (st, v) = complete(&s, "big").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(s.engine.stats().adapter_cache.misses, misses + 1);
}

/// Write a broken copy of `lora-r8` into `dir`, broken as `how` says.
fn broken_adapter(dir: &Path, how: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let (cfg, weights) = fixture_files("lora-r8");
    match how {
        "config-json" => {
            std::fs::write(dir.join("adapter_config.json"), b"{not json").unwrap();
            std::fs::write(dir.join("adapter_model.safetensors"), &weights).unwrap();
        }
        "weights" => {
            std::fs::write(dir.join("adapter_config.json"), &cfg).unwrap();
            std::fs::write(
                dir.join("adapter_model.safetensors"),
                &weights[..weights.len() / 2],
            )
            .unwrap();
        }
        "missing-weights" => {
            std::fs::write(dir.join("adapter_config.json"), &cfg).unwrap();
        }
        #[cfg(target_os = "linux")]
        "unreadable" => {
            std::fs::write(dir.join("adapter_config.json"), &cfg).unwrap();
            std::os::unix::fs::symlink("/proc/self/mem", dir.join("adapter_model.safetensors"))
                .unwrap();
        }
        other => panic!("no such breakage {other}"),
    }
}

/// One mapping from the loader's error to HTTP: `load_lora_adapter` on a broken folder and a
/// request that loads the same broken files from the store answer the same status and code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_adapter_answers_alike_wherever_it_is_loaded() {
    let s = server();
    let mut cases = vec![
        ("config-json", "adapter_config_invalid_json"),
        ("weights", "adapter_weights_invalid"),
        ("missing-weights", "adapter_file_missing"),
    ];
    if cfg!(target_os = "linux") {
        cases.push(("unreadable", "adapter_io_error"));
    }
    for (how, code) in cases {
        let stored = format!("broken-{how}");
        broken_adapter(&s.store.path().join(&stored), how);
        broken_adapter(&s.store.path().join("registered").join(how), how);
        let (st_req, v_req) = complete(&s, &stored).await;
        let (st_reg, v_reg, _) = call(
            &s.app,
            post_json(
                "/v1/load_lora_adapter",
                json!({"lora_name": format!("reg-{how}"), "lora_path": format!("registered/{how}")}),
            ),
        )
        .await;
        assert_error(st_req, &v_req, StatusCode::UNPROCESSABLE_ENTITY, code);
        assert_error(st_reg, &v_reg, StatusCode::UNPROCESSABLE_ENTITY, code);
        // Neither refusal registered or changed anything.
        let (st, _, _) = call(&s.app, get(&format!("/v1/adapters/reg-{how}"))).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{how}");
    }
    // And the good adapters still serve.
    let (st, v) = complete(&s, "lora-r8").await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

async fn replace(s: &Server, name: &str, files: &(Vec<u8>, Vec<u8>)) -> String {
    let (st, v, text) = call(
        &s.app,
        multipart(
            &[
                ("name", name.as_bytes()),
                ("adapter_config", &files.0),
                ("adapter_model", &files.1),
            ],
            "/v1/adapters?replace=true",
        ),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    v["digest"].as_str().unwrap().to_string()
}

/// A request on `adapter` (out of memory), returned once the engine is loading it for it.
fn request_while_loading(
    s: &Server,
    adapter: &str,
) -> tokio::task::JoinHandle<(StatusCode, Value, String)> {
    let app = s.app.clone();
    let body = json!({"prompt": PROMPT, "max_tokens": 2, "adapter": adapter});
    let request = tokio::spawn(async move { call(&app, post_json("/v1/completions", body)).await });
    stats_when(s, "loading", |st| {
        st.loading_adapters.iter().any(|n| n == adapter)
    });
    request
}

/// A load that read a name's files before they were replaced never serves: the requests
/// waiting on it get the new version, and so does every later one. (Each cold load here waits
/// at a gate after reading its files, opened only once the replace has answered, so the replace
/// lands while the load is in flight however slow the machine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_overtaken_by_a_replace_never_serves_the_old_files() {
    let gate = StepGate::closed();
    let s = server_opts(Opts {
        load_gate: Some(gate.clone()),
        ..Opts::default()
    });
    let (a, b) = (fixture_files("dora-all-r8"), fixture_files("lora-r8"));
    for round in 0..3 {
        let (old, new) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let old_digest = replace(&s, "racer", old).await;
        // Out of memory, so the request loads the old files from disk.
        s.engine.evict_adapter("racer");
        stats_when(&s, "evicted", |st| {
            !st.loaded_adapters.iter().any(|n| n == "racer")
        });
        gate.close();
        let request = request_while_loading(&s, "racer");
        let new_digest = replace(&s, "racer", new).await;
        gate.open();
        assert_ne!(old_digest, new_digest);
        let (st, v, _) = request.await.unwrap();
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(
            v["adapter_digest"],
            new_digest.as_str(),
            "round {round}: {v}"
        );
        let (st, v) = complete(&s, "racer").await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["adapter_digest"], new_digest.as_str(), "round {round}");
    }
    // A delete overtaking a load: its waiters are told the adapter is gone.
    s.engine.evict_adapter("racer");
    stats_when(&s, "evicted", |st| {
        !st.loaded_adapters.iter().any(|n| n == "racer")
    });
    gate.close();
    let request = request_while_loading(&s, "racer");
    let (st, _, text) = call(
        &s.app,
        axum::http::Request::delete("/v1/adapters/racer")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{text}");
    gate.open();
    let (st, v, _) = request.await.unwrap();
    assert_error(st, &v, StatusCode::NOT_FOUND, "adapter_not_found");
}

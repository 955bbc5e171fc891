//! Concurrency and cancellation through the HTTP API: replace, delete and re-register adapters
//! while requests stream on them, upload one name from many clients at once, disconnect
//! mid-stream, run past the request deadline. Every answer names the adapter files that served
//! it (`adapter_digest`), and its text must be exactly what those files produce alone.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::web::*;

/// One finished request, streamed or not.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    text: String,
    digest: Option<String>,
    error_code: Option<String>,
}

fn body(adapter: &str, max_tokens: usize, stream: bool) -> Value {
    json!({"prompt": PROMPT, "adapter": adapter, "max_tokens": max_tokens, "temperature": 0,
           "ignore_eos": true, "stream": stream})
}

/// Run a completion; for streams, `first` is told when the first text arrives.
async fn complete(
    app: Router,
    body: Value,
    first: Option<tokio::sync::oneshot::Sender<()>>,
) -> Answer {
    let resp = app
        .oneshot(post_json("/v1/completions", body))
        .await
        .unwrap();
    let status = resp.status();
    let is_stream = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut body = resp.into_body();
    if !is_stream {
        let bytes = body.collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        return Answer {
            status,
            text: v["choices"][0]["text"].as_str().unwrap_or("").to_string(),
            digest: v["adapter_digest"].as_str().map(str::to_string),
            error_code: v["error"]["code"].as_str().map(str::to_string),
        };
    }
    let (mut buf, mut text, mut digest, mut error_code) =
        (String::new(), String::new(), None, None);
    let mut first = first;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.unwrap().into_data() else {
            continue;
        };
        buf.push_str(std::str::from_utf8(&data).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(code) = v["error"]["code"].as_str() {
                error_code = Some(code.to_string());
            }
            text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
            if let Some(d) = v["adapter_digest"].as_str() {
                digest = Some(d.to_string());
            }
            if !text.is_empty() {
                if let Some(f) = first.take() {
                    let _ = f.send(());
                }
            }
        }
    }
    Answer {
        status,
        text,
        digest,
        error_code,
    }
}

async fn upload(
    s: &Server,
    name: &str,
    files: &(Vec<u8>, Vec<u8>),
    replace: bool,
) -> (StatusCode, Value) {
    let path = if replace {
        "/v1/adapters?replace=true"
    } else {
        "/v1/adapters"
    };
    let (st, v, _) = call(
        &s.app,
        multipart(
            &[
                ("name", name.as_bytes()),
                ("adapter_config", &files.0),
                ("adapter_model", &files.1),
            ],
            path,
        ),
    )
    .await;
    (st, v)
}

/// Upload each fixture under a reference name; map its digest to what it answers alone.
async fn references(s: &Server, fixtures: &[&str], max_tokens: usize) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for f in fixtures {
        let name = format!("ref-{f}");
        let (st, v) = upload(s, &name, &fixture_files(f), false).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let a = complete(s.app.clone(), body(&name, max_tokens, false), None).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.digest.as_deref(), v["digest"].as_str());
        out.insert(a.digest.unwrap(), a.text);
    }
    let texts: std::collections::HashSet<_> = out.values().collect();
    assert_eq!(
        texts.len(),
        fixtures.len(),
        "the fixtures must answer differently"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_adapter_finishes_running_streams_on_the_old_version() {
    let s = server();
    let refs = references(&s, &["lora-r8", "dora-qv-r4-rslora"], 60).await;
    let a = fixture_files("lora-r8");
    let b = fixture_files("dora-qv-r4-rslora");
    let (_, v) = upload(&s, "swap", &a, false).await;
    let digest_a = v["digest"].as_str().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let running = tokio::spawn(complete(s.app.clone(), body("swap", 60, true), Some(tx)));
    rx.await.unwrap();
    let (st, v) = upload(&s, "swap", &b, true).await;
    assert_eq!(st, StatusCode::CREATED);
    let digest_b = v["digest"].as_str().unwrap().to_string();
    assert_ne!(digest_a, digest_b);
    let old = running.await.unwrap();
    assert_eq!(old.digest.as_deref(), Some(digest_a.as_str()));
    assert_eq!(
        old.text, refs[&digest_a],
        "the running stream stayed on its version"
    );
    let new = complete(s.app.clone(), body("swap", 60, false), None).await;
    assert_eq!(new.digest.as_deref(), Some(digest_b.as_str()));
    assert_eq!(new.text, refs[&digest_b]);
    // Deleting it while a stream runs: the stream finishes, new requests get 404.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let running = tokio::spawn(complete(s.app.clone(), body("swap", 60, true), Some(tx)));
    rx.await.unwrap();
    let (st, _, _) = call(
        &s.app,
        axum::http::Request::delete("/v1/adapters/swap")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let last = running.await.unwrap();
    assert_eq!(
        (last.digest.as_deref(), last.text.as_str()),
        (Some(digest_b.as_str()), refs[&digest_b].as_str())
    );
    let gone = complete(s.app.clone(), body("swap", 4, false), None).await;
    assert_eq!(gone.error_code.as_deref(), Some("adapter_not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_name_uploaded_by_many_clients_at_once_is_never_mixed() {
    let s = server();
    let refs = references(&s, &["lora-r8", "dora-qv-r4-rslora"], 8).await;
    let files = [fixture_files("lora-r8"), fixture_files("dora-qv-r4-rslora")];
    // Without replace: exactly one creates it, the others are told it exists.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (app, f) = (s.app.clone(), files[i % 2].clone());
            tokio::spawn(async move {
                let (st, v, _) = call(
                    &app,
                    multipart(
                        &[
                            ("name", b"first"),
                            ("adapter_config", &f.0),
                            ("adapter_model", &f.1),
                        ],
                        "/v1/adapters",
                    ),
                )
                .await;
                (st, v)
            })
        })
        .collect();
    let mut codes = HashMap::new();
    for t in tasks {
        let (st, v) = t.await.unwrap();
        *codes.entry(st).or_insert(0) += 1;
        if st != StatusCode::CREATED {
            assert_error(st, &v, StatusCode::CONFLICT, "adapter_exists");
        }
    }
    assert_eq!(codes[&StatusCode::CREATED], 1, "{codes:?}");
    // With replace: all succeed; the survivor is one upload whole, never config of one and
    // weights of another.
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let (app, f) = (s.app.clone(), files[i % 2].clone());
            tokio::spawn(async move {
                call(
                    &app,
                    multipart(
                        &[
                            ("name", b"race"),
                            ("adapter_config", &f.0),
                            ("adapter_model", &f.1),
                        ],
                        "/v1/adapters?replace=true",
                    ),
                )
                .await
                .0
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::CREATED);
    }
    let dir = s.store.path().join("race");
    let on_disk = (
        std::fs::read(dir.join("adapter_config.json")).unwrap(),
        std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
    );
    assert!(
        files.contains(&on_disk),
        "the stored adapter mixes two uploads"
    );
    let leftovers: Vec<_> = std::fs::read_dir(s.store.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let a = complete(s.app.clone(), body("race", 8, false), None).await;
    assert_eq!(a.text, refs[a.digest.as_ref().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_unload_delete_storms_never_serve_the_wrong_version() {
    let s = server();
    let refs = references(&s, &["lora-r8", "dora-qv-r4-rslora", "dora-all-r8"], 10).await;
    let files = [fixture_files("lora-r8"), fixture_files("dora-qv-r4-rslora")];
    upload(&s, "storm", &files[0], false).await;
    // An adapter outside the store, registered and unregistered by vLLM's endpoints.
    let ext = s.store.path().join("ext-src");
    std::fs::create_dir_all(&ext).unwrap();
    let (cfg, st) = fixture_files("dora-all-r8");
    std::fs::write(ext.join("adapter_config.json"), cfg).unwrap();
    std::fs::write(ext.join("adapter_model.safetensors"), st).unwrap();
    let ext_path = ext.to_string_lossy().into_owned();

    let storm = async {
        let writer = {
            let (app, files) = (s.app.clone(), files.clone());
            tokio::spawn(async move {
                for i in 0..16 {
                    let f = &files[i % 2];
                    if i % 3 == 2 {
                        let req = axum::http::Request::delete("/v1/adapters/storm")
                            .body(Body::empty())
                            .unwrap();
                        call(&app, req).await;
                    }
                    let (st, _, text) = call(
                        &app,
                        multipart(
                            &[
                                ("name", b"storm"),
                                ("adapter_config", &f.0),
                                ("adapter_model", &f.1),
                            ],
                            "/v1/adapters?replace=true",
                        ),
                    )
                    .await;
                    assert_eq!(st, StatusCode::CREATED, "{text}");
                }
            })
        };
        let registrar = {
            let app = s.app.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    let (st, _, text) = call(
                        &app,
                        post_json(
                            "/v1/load_lora_adapter",
                            json!({"lora_name": "ext", "lora_path": ext_path}),
                        ),
                    )
                    .await;
                    assert!(
                        st == StatusCode::OK || st == StatusCode::CONFLICT,
                        "{st} {text}"
                    );
                    let (st, _, text) = call(
                        &app,
                        post_json("/v1/unload_lora_adapter", json!({"lora_name": "ext"})),
                    )
                    .await;
                    assert!(
                        st == StatusCode::OK || st == StatusCode::NOT_FOUND,
                        "{st} {text}"
                    );
                }
            })
        };
        let readers: Vec<_> = (0..4)
            .map(|r| {
                let app = s.app.clone();
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    for i in 0..12 {
                        let name = if (r + i) % 2 == 0 { "storm" } else { "ext" };
                        answers.push((
                            name,
                            complete(app.clone(), body(name, 10, (r + i) % 3 == 0), None).await,
                        ));
                    }
                    answers
                })
            })
            .collect();
        writer.await.unwrap();
        registrar.await.unwrap();
        let mut all = Vec::new();
        for r in readers {
            all.extend(r.await.unwrap());
        }
        all
    };
    let answers = tokio::time::timeout(Duration::from_secs(300), storm)
        .await
        .expect("no deadlock: the storm finishes");
    let mut served = 0;
    for (name, a) in &answers {
        match a.status {
            StatusCode::OK if a.error_code.is_none() => {
                let d = a
                    .digest
                    .as_ref()
                    .expect("an adapter answer names its digest");
                assert_eq!(
                    &a.text, &refs[d],
                    "{name}: text differs from what {d} answers alone"
                );
                served += 1;
            }
            StatusCode::NOT_FOUND => assert_eq!(a.error_code.as_deref(), Some("adapter_not_found")),
            _ => panic!("{name}: unexpected answer {a:?}"),
        }
    }
    // How many land between a delete and the next upload depends on the machine's speed; what
    // must hold is that answers are exact, and that the name serves once the storm is over.
    assert!(
        served > 0,
        "none of {} requests was served: {answers:?}",
        answers.len()
    );
    let last = complete(s.app.clone(), body("storm", 10, false), None).await;
    let want = digest_of(&s, "storm");
    assert_eq!(
        (last.digest.as_deref(), last.text.as_str()),
        (Some(want.as_str()), refs[&want].as_str())
    );
    let (st, v, _) = call(&s.app, get("/health")).await;
    assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("ok")));
}

/// The digest of the files the store holds for `name`.
fn digest_of(s: &Server, name: &str) -> String {
    let d = s.store.path().join(name);
    dora_serve::adapter::digest(
        &std::fs::read(d.join("adapter_config.json")).unwrap(),
        &std::fs::read(d.join("adapter_model.safetensors")).unwrap(),
    )
}

async fn settled(s: &Server) -> dora_serve::engine::EngineStats {
    for _ in 0..200 {
        let st = s.engine.stats();
        if st.running == 0 && st.waiting == 0 && st.kv_bytes == 0 {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    s.engine.stats()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_stops_its_generation() {
    let s = server();
    let resp = s
        .app
        .clone()
        .oneshot(post_json("/v1/completions", body("dora-all-r8", 240, true)))
        .await
        .unwrap();
    let mut b = resp.into_body();
    b.frame().await.unwrap().unwrap();
    b.frame().await.unwrap().unwrap();
    assert!(s.engine.stats().running == 1 && s.engine.stats().kv_bytes > 0);
    drop(b);
    let st = settled(&s).await;
    assert_eq!(
        (st.running, st.kv_bytes),
        (0, 0),
        "the sequence and its KV memory are freed"
    );
    assert!(
        st.tokens_generated < 200,
        "generation stopped early ({} tokens)",
        st.tokens_generated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_deadline_end_with_request_timeout() {
    let s = server_timeout(
        (None, None),
        1 << 20,
        (8, 64),
        Some(Duration::from_millis(40)),
    );
    let long =
        json!({"prompt": PROMPT, "max_tokens": 240, "ignore_eos": true, "n": 8, "temperature": 0});
    let (st, v, _) = call(&s.app, post_json("/v1/completions", long.clone())).await;
    assert_error(st, &v, StatusCode::REQUEST_TIMEOUT, "request_timeout");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let a = complete(s.app.clone(), streamed, None).await;
    assert_eq!(a.status, StatusCode::OK, "the stream had started");
    assert_eq!(a.error_code.as_deref(), Some("request_timeout"));
    let st = settled(&s).await;
    assert_eq!(
        (st.running, st.waiting, st.kv_bytes),
        (0, 0, 0),
        "timed-out work is cancelled"
    );
    // Short requests still complete.
    let (st, _, text) = call(
        &s.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 1}),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{text}");
}

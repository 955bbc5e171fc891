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

use dora_serve::engine::StepGate;

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

/// Run a completion; for streams, `first` is told when the first token's chunk arrives.
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
            if v["choices"][0].is_object() {
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
    let (st, v, _) = upload_to(&s.app, name, files, replace).await;
    (st, v)
}

/// Upload `files` as adapter `name` through `app`: (status, body, body text).
async fn upload_to(
    app: &Router,
    name: &str,
    files: &(Vec<u8>, Vec<u8>),
    replace: bool,
) -> (StatusCode, Value, String) {
    let path = if replace {
        "/v1/adapters?replace=true"
    } else {
        "/v1/adapters"
    };
    call(
        app,
        multipart(
            &[
                ("name", name.as_bytes()),
                ("adapter_config", &files.0),
                ("adapter_model", &files.1),
            ],
            path,
        ),
    )
    .await
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
    let (s, gate) = gated_server((8, 64));
    gate.open();
    let refs = references(&s, &["lora-r8", "dora-qv-r4-rslora"], 60).await;
    let a = fixture_files("lora-r8");
    let b = fixture_files("dora-qv-r4-rslora");
    let (_, v) = upload(&s, "swap", &a, false).await;
    let digest_a = v["digest"].as_str().unwrap().to_string();
    // The stream makes its first token, then holds until the replace is done: the replace
    // certainly lands mid-stream.
    gate.close();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let running = tokio::spawn(complete(s.app.clone(), body("swap", 60, true), Some(tx)));
    gate.allow(1);
    rx.await.unwrap();
    let (st, v) = upload(&s, "swap", &b, true).await;
    assert_eq!(st, StatusCode::CREATED);
    let digest_b = v["digest"].as_str().unwrap().to_string();
    assert_ne!(digest_a, digest_b);
    assert_eq!(s.engine.stats().running, 1, "the stream is still running");
    gate.open();
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
    gate.close();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let running = tokio::spawn(complete(s.app.clone(), body("swap", 60, true), Some(tx)));
    gate.allow(1);
    rx.await.unwrap();
    let (st, _, _) = call(
        &s.app,
        axum::http::Request::delete("/v1/adapters/swap")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(s.engine.stats().running, 1, "the stream is still running");
    gate.open();
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
                let (st, v, _) = upload_to(&app, "first", &f, false).await;
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
            tokio::spawn(async move { upload_to(&app, "race", &f, true).await.0 })
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
                    let (st, _, text) = upload_to(&app, "storm", f, true).await;
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

/// The README's promise: replacing an adapter swaps it in one step, so no request ever sees
/// its name missing. Writers only replace (never delete); every reader's answer must be a 200
/// that is exactly what one of the two versions answers alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_never_makes_the_name_missing() {
    let s = server();
    let refs = references(&s, &["lora-r8", "dora-qv-r4-rslora"], 6).await;
    let files = [fixture_files("lora-r8"), fixture_files("dora-qv-r4-rslora")];
    upload(&s, "hot", &files[0], false).await;
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (app, files) = (s.app.clone(), files.clone());
            tokio::spawn(async move {
                for i in 0..12 {
                    let f = &files[(i + w) % 2];
                    let (st, _, text) = upload_to(&app, "hot", f, true).await;
                    assert_eq!(st, StatusCode::CREATED, "{text}");
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let app = s.app.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for i in 0..10 {
                    let by_model = (r + i) % 2 == 0;
                    let mut b = body("hot", 6, (r + i) % 3 == 0);
                    if by_model {
                        // `model` naming the adapter takes another lookup path.
                        b.as_object_mut().unwrap().remove("adapter");
                        b["model"] = json!("hot");
                    }
                    answers.push(complete(app.clone(), b, None).await);
                    let (st, v, _) = call(&app, get("/v1/adapters/hot")).await;
                    assert_eq!(st, StatusCode::OK, "GET /v1/adapters/hot mid-replace: {v}");
                }
                answers
            })
        })
        .collect();
    let storm = async {
        for w in writers {
            w.await.unwrap();
        }
        let mut all = Vec::new();
        for r in readers {
            all.extend(r.await.unwrap());
        }
        all
    };
    let answers = tokio::time::timeout(Duration::from_secs(300), storm)
        .await
        .expect("no deadlock: the storm finishes");
    assert_eq!(answers.len(), 40);
    for a in &answers {
        assert!(
            a.status == StatusCode::OK && a.error_code.is_none(),
            "a request during replaces failed: {a:?}"
        );
        let d = a
            .digest
            .as_ref()
            .expect("an adapter answer names its digest");
        assert_eq!(
            &a.text, &refs[d],
            "text differs from what {d} answers alone"
        );
    }
}

/// The digest of the files the store holds for `name`.
fn digest_of(s: &Server, name: &str) -> String {
    let d = s.store.path().join(name);
    dora_serve::adapter::digest(
        &std::fs::read(d.join("adapter_config.json")).unwrap(),
        &std::fs::read(d.join("adapter_model.safetensors")).unwrap(),
    )
}

/// The engine's stats once nothing runs, waits or holds KV memory (a panic after 60 s).
async fn settled(s: &Server) -> dora_serve::engine::EngineStats {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = s.engine.stats();
        if st.running == 0 && st.waiting == 0 && st.kv_bytes == 0 {
            return st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never settled: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_stops_its_generation() {
    let (s, gate) = gated_server((8, 64));
    // Two steps: the prefill (first token) and one decode. (The response starts once the
    // first token is there.)
    gate.allow(2);
    let resp = s
        .app
        .clone()
        .oneshot(post_json("/v1/completions", body("dora-all-r8", 240, true)))
        .await
        .unwrap();
    let mut b = resp.into_body();
    let mut text = String::new();
    while text.matches("\"text\"").count() < 2 {
        let frame = b.frame().await.unwrap().unwrap();
        if let Ok(d) = frame.into_data() {
            text.push_str(std::str::from_utf8(&d).unwrap());
        }
    }
    let st = s.engine.stats();
    assert!(st.running == 1 && st.kv_bytes > 0, "{st:?}");
    drop(b);
    // The gate holds every further step: only the disconnect can end the sequence.
    let st = settled(&s).await;
    assert_eq!(
        (st.running, st.kv_bytes),
        (0, 0),
        "the sequence and its KV memory are freed"
    );
    assert_eq!(
        st.tokens_generated, 2,
        "generation stopped at the disconnect"
    );
    assert_eq!(gate.passed(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_deadline_end_with_request_timeout() {
    let gate = StepGate::closed();
    let s = server_opts(Opts {
        request_timeout: Some(Duration::from_secs(2)),
        gate: Some(gate.clone()),
        ..Opts::default()
    });
    // The gate lets no step run: these requests cannot finish before their deadline, however
    // fast the machine.
    let long =
        json!({"prompt": PROMPT, "max_tokens": 240, "ignore_eos": true, "n": 8, "temperature": 0});
    let (st, v, _) = call(&s.app, post_json("/v1/completions", long.clone())).await;
    assert_error(st, &v, StatusCode::REQUEST_TIMEOUT, "request_timeout");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    let st = settled(&s).await;
    assert_eq!(
        (st.running, st.waiting, st.kv_bytes, st.tokens_generated),
        (0, 0, 0, 0),
        "timed-out work is cancelled"
    );
    // A stream starts with its first tokens: one step (the prefill of all 8 choices), then
    // the gate holds the rest past the deadline.
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let a = tokio::spawn(complete(s.app.clone(), streamed, None));
    while s.engine.stats().waiting < 8 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    gate.allow(1);
    let a = a.await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "the stream had started");
    assert_eq!(a.error_code.as_deref(), Some("request_timeout"));
    let st = settled(&s).await;
    assert_eq!(
        (st.running, st.waiting, st.kv_bytes, st.tokens_generated),
        (0, 0, 0, 8),
        "timed-out work is cancelled after its first step"
    );
    // With steps running, a short request completes well within a deadline.
    let s2 = server_opts(Opts {
        request_timeout: Some(Duration::from_secs(60)),
        ..Opts::default()
    });
    let (st, _, text) = call(
        &s2.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 1}),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{text}");
}

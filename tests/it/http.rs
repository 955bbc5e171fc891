//! The HTTP API through its router (`oneshot`), plus one end-to-end test over a real socket.

use std::path::Path;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use dora_serve::http;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::util::{expected, fixtures, load};
use crate::web::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_match_the_reference_with_and_without_adapters() {
    let s = server();
    let base = &expected()["tiny-llama"][0];
    let (st, v, _) = call(
        &s.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 6, "temperature": 0}),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], decode(&base.greedy_token_ids[..6]));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], 13);
    assert_eq!(v["adapter"], Value::Null);
    // The adapter field, and `model` naming the adapter (vLLM style), give the adapter's tokens.
    let want = decode(&adapter_greedy("dora-all-r8", 0)[..6]);
    for body in [
        json!({"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "adapter": "dora-all-r8"}),
        json!({"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "model": "dora-all-r8"}),
        json!({"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "model": "tiny-llama", "adapter": "dora-all-r8"}),
    ] {
        let (st, v, _) = call(&s.app, post_json("/v1/completions", body)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["choices"][0]["text"], want);
        assert_eq!(v["adapter"], "dora-all-r8");
        assert!(v["adapter_version"].is_u64());
    }
    // Every prompt form; n choices per prompt, each the greedy text of its own prompt.
    let ids = base.prompt_token_ids.clone();
    let other = &expected()["tiny-llama"][1];
    assert_eq!(other.prompt, "Once upon a time");
    let (t0, t1) = (
        decode(&base.greedy_token_ids[..2]),
        decode(&other.greedy_token_ids[..2]),
    );
    for (prompt, texts) in [
        (
            json!([PROMPT, "Once upon a time"]),
            vec![&t0, &t0, &t1, &t1],
        ),
        (json!(ids), vec![&t0, &t0]),
        (
            json!([ids.clone(), other.prompt_token_ids]),
            vec![&t0, &t0, &t1, &t1],
        ),
    ] {
        let choices = texts.len();
        let (st, v, _) = call(
            &s.app,
            post_json(
                "/v1/completions",
                json!({"prompt": prompt, "max_tokens": 2, "n": 2, "temperature": 0}),
            ),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let cs = v["choices"].as_array().unwrap();
        assert_eq!(cs.len(), choices);
        assert!(cs.iter().enumerate().all(|(i, c)| c["index"] == i));
        for (c, want) in cs.iter().zip(&texts) {
            assert_eq!(c["text"], want.as_str(), "{prompt}: choice {}", c["index"]);
        }
    }
    // Echo with logprobs: the prompt's tokens come first, the very first without a logprob.
    let (st, v, _) = call(&s.app, post_json("/v1/completions", json!({"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "echo": true, "logprobs": 2}))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 9);
    assert_eq!(lp["token_logprobs"][0], Value::Null);
    assert!(lp["token_logprobs"][1].as_f64().unwrap() < 0.0);
    assert!(v["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with(PROMPT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_equals_non_streaming() {
    let s = server();
    let body = json!({"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "adapter": "lora-r8"});
    let (_, whole, _) = call(&s.app, post_json("/v1/completions", body.clone())).await;
    let mut sb = body;
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let (st, _, text) = call(&s.app, post_json("/v1/completions", sb)).await;
    assert_eq!(st, StatusCode::OK);
    let datas: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(joined, whole["choices"][0]["text"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 8);
    assert!(chunks.iter().any(|c| c["choices"]
        .get(0)
        .is_some_and(|c| c["finish_reason"] == "length")));

    // Chat: streamed deltas add up to the JSON answer.
    let chat = json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 6, "temperature": 0, "adapter": "dora-all-r8"});
    let (st, whole, _) = call(&s.app, post_json("/v1/chat/completions", chat.clone())).await;
    assert_eq!(st, StatusCode::OK, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let mut sc = chat;
    sc["stream"] = json!(true);
    let (_, _, text) = call(&s.app, post_json("/v1/chat/completions", sc)).await;
    let deltas: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        deltas,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // The chat prompt went through the template.
    assert_eq!(
        whole["usage"]["prompt_tokens"],
        load("tiny-llama")
            .tokenizer
            .encode("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
            .unwrap()
            .len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_specific_codes() {
    let s = server();
    let c = |b: Value| post_json("/v1/completions", b);
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            c(json!({"prompt": "x", "adapter": "nope"})),
            StatusCode::NOT_FOUND,
            "adapter_not_found",
        ),
        (
            c(json!({"prompt": "x", "model": "nope"})),
            StatusCode::NOT_FOUND,
            "model_not_found",
        ),
        (
            c(json!({"prompt": "x", "model": "lora-r8", "adapter": "dora-all-r8"})),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            c(json!({"prompt": "x", "max_tokens": 10_000})),
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
        ),
        (
            c(json!({"prompt": "x", "temperature": -1})),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            c(json!({"prompt": "x", "n": 100})),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            c(json!({"prompt": [99999]})),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            c(json!({"prompt": "x", "logprobs": 6})),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            c(json!({"prompt": "x", "best_of": 3})),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            c(json!({"prompt": "x".repeat(100_000)})),
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
        ),
        (
            c(json!({"prompt": 5})),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Request::post("/v1/completions")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{not json"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Request::post("/v1/completions")
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from("{}"))
                .unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            post_json("/v1/chat/completions", json!({"messages": []})),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            post_json(
                "/v1/chat/completions",
                json!({"messages": [{"role": "wizard", "content": "x"}]}),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            get("/v1/adapters/nope"),
            StatusCode::NOT_FOUND,
            "adapter_not_found",
        ),
    ];
    for (i, (req, status, code)) in cases.into_iter().enumerate() {
        let (st, v, text) = call(&s.app, req).await;
        assert_eq!(st, status, "case {i}: {text}");
        assert_error(st, &v, status, code);
    }
    let (_, v, _) = call(&s.app, c(json!({"prompt": "x", "temperature": -1}))).await;
    assert_eq!(v["error"]["param"], "temperature");
    // The server is still healthy.
    let (st, v, _) = call(&s.app, get("/health")).await;
    assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("ok")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_complete_replace_delete() {
    let s = server();
    let (cfg, st_bytes) = fixture_files("dora-qv-r4-rslora");
    let (st, v, _) = call(
        &s.app,
        multipart(
            &[
                ("name", b"mine"),
                ("adapter_config", &cfg),
                ("adapter_model", &st_bytes),
            ],
            "/v1/adapters",
        ),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["type"], "dora");
    assert_eq!(v["r"], 4);
    assert!(s
        .store
        .path()
        .join("mine/adapter_model.safetensors")
        .is_file());
    // Completing with it equals the PEFT reference for that adapter.
    let (_, v, _) = call(
        &s.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "adapter": "mine"}),
        ),
    )
    .await;
    assert_eq!(
        v["choices"][0]["text"],
        decode(&adapter_greedy("dora-qv-r4-rslora", 0)[..5])
    );
    let v1 = v["adapter_version"].clone();
    // A second upload under the name is refused, unless replace=true.
    let (lcfg, lst) = fixture_files("lora-r8");
    let (st, v, _) = call(
        &s.app,
        multipart(
            &[
                ("name", b"mine"),
                ("adapter_config", &lcfg),
                ("adapter_model", &lst),
            ],
            "/v1/adapters",
        ),
    )
    .await;
    assert_error(st, &v, StatusCode::CONFLICT, "adapter_exists");
    let (st, _, _) = call(
        &s.app,
        multipart(
            &[
                ("name", b"mine"),
                ("adapter_config", &lcfg),
                ("adapter_model", &lst),
            ],
            "/v1/adapters?replace=true",
        ),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let (_, v, _) = call(
        &s.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "adapter": "mine"}),
        ),
    )
    .await;
    assert_eq!(
        v["choices"][0]["text"],
        decode(&adapter_greedy("lora-r8", 0)[..5])
    );
    assert_ne!(v["adapter_version"], v1, "the replacement is a new version");
    // Listed, in models too.
    let (_, v, _) = call(&s.app, get("/v1/models")).await;
    let card = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "mine")
        .unwrap()
        .clone();
    assert_eq!(card["parent"], "tiny-llama");
    assert_eq!(card["type"], "lora");
    assert_eq!(card["state"], "loaded");
    // Delete: gone from the store and from completions.
    let (st, v, _) = call(
        &s.app,
        Request::delete("/v1/adapters/mine")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!((st, v["deleted"].as_bool()), (StatusCode::OK, Some(true)));
    assert!(!s.store.path().join("mine").exists());
    let (st, v, _) = call(
        &s.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "adapter": "mine"}),
        ),
    )
    .await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "adapter_not_found");
    let (st, v, _) = call(
        &s.app,
        Request::delete("/v1/adapters/mine")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "adapter_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_and_change_nothing() {
    let s = server_with((None, None), 64 * 1024);
    let (cfg, st_bytes) = fixture_files("lora-r8");
    let before: Vec<_> = std::fs::read_dir(s.store.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    type Fields<'a> = Vec<(&'a str, Vec<u8>)>;
    let cases: Vec<(Fields, StatusCode, &str)> = vec![
        (vec![("name", b"x1".to_vec()), ("adapter_config", b"{nope".to_vec()), ("adapter_model", st_bytes.clone())], StatusCode::UNPROCESSABLE_ENTITY, "adapter_config_invalid_json"),
        (vec![("name", b"x2".to_vec()), ("adapter_config", cfg.clone()), ("adapter_model", st_bytes[..100].to_vec())], StatusCode::UNPROCESSABLE_ENTITY, "adapter_weights_invalid"),
        (vec![("name", b"x3".to_vec()), ("adapter_config", cfg.clone()), ("adapter_model", Vec::new())], StatusCode::UNPROCESSABLE_ENTITY, "adapter_weights_invalid"),
        (vec![("name", b"x4".to_vec()), ("adapter_config", br#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":["q_proj"],"bias":"all"}"#.to_vec()), ("adapter_model", st_bytes.clone())], StatusCode::UNPROCESSABLE_ENTITY, "adapter_unsupported"),
        (vec![("name", b"x5".to_vec()), ("adapter_config", cfg.clone())], StatusCode::BAD_REQUEST, "invalid_request"),
        (vec![("adapter_config", cfg.clone()), ("adapter_model", st_bytes.clone())], StatusCode::BAD_REQUEST, "invalid_request"),
        (vec![("name", b"../evil".to_vec()), ("adapter_config", cfg.clone()), ("adapter_model", st_bytes.clone())], StatusCode::BAD_REQUEST, "invalid_request"),
        (vec![("name", b"a/b".to_vec()), ("adapter_config", cfg.clone()), ("adapter_model", st_bytes.clone())], StatusCode::BAD_REQUEST, "invalid_request"),
        (vec![("name", b"nul\0x".to_vec()), ("adapter_config", cfg.clone()), ("adapter_model", st_bytes.clone())], StatusCode::BAD_REQUEST, "invalid_request"),
        (vec![("name", "n".repeat(65).into_bytes()), ("adapter_config", cfg.clone()), ("adapter_model", st_bytes.clone())], StatusCode::BAD_REQUEST, "invalid_request"),
        (vec![("name", b"big".to_vec()), ("adapter_config", cfg.clone()), ("adapter_model", vec![0u8; 100 * 1024])], StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
    ];
    for (i, (fields, status, code)) in cases.into_iter().enumerate() {
        let f: Vec<(&str, &[u8])> = fields.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        let (st, v, text) = call(&s.app, multipart(&f, "/v1/adapters")).await;
        assert_eq!(st, status, "case {i}: {text}");
        assert_error(st, &v, status, code);
    }
    let (st, v, _) = call(&s.app, post_json("/v1/adapters", json!({}))).await;
    assert_error(
        st,
        &v,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let after: Vec<_> = std::fs::read_dir(s.store.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "the store is unchanged");
    // Other adapters still serve.
    let (_, v, _) = call(
        &s.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "adapter": "lora-r8"}),
        ),
    )
    .await;
    assert_eq!(
        v["choices"][0]["text"],
        decode(&adapter_greedy("lora-r8", 0)[..3])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_load_and_unload() {
    let s = server();
    let sub = s.store.path().join("nested/dir/x");
    std::fs::create_dir_all(&sub).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            fixtures().join("adapters/dora-patterns").join(f),
            sub.join(f),
        )
        .unwrap();
    }
    let (st, v, _) = call(
        &s.app,
        post_json(
            "/v1/load_lora_adapter",
            json!({"lora_name": "pat", "lora_path": sub}),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (_, v, _) = call(
        &s.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "model": "pat"}),
        ),
    )
    .await;
    assert_eq!(
        v["choices"][0]["text"],
        decode(&adapter_greedy("dora-patterns", 0)[..4])
    );
    // Paths outside the root are refused, however they are spelled.
    let outside = s.outside.path().join("o");
    std::fs::create_dir_all(&outside).unwrap();
    for path in [
        outside.to_string_lossy().to_string(),
        format!("{}/../../{}", s.store.path().display(), outside.display()),
        "../".into(),
    ] {
        let (st, v, _) = call(
            &s.app,
            post_json(
                "/v1/load_lora_adapter",
                json!({"lora_name": "o", "lora_path": path}),
            ),
        )
        .await;
        assert_error(st, &v, StatusCode::BAD_REQUEST, "invalid_request");
    }
    let (st, v, _) = call(
        &s.app,
        post_json(
            "/v1/load_lora_adapter",
            json!({"lora_name": "pat", "lora_path": sub}),
        ),
    )
    .await;
    assert_error(st, &v, StatusCode::CONFLICT, "adapter_exists");
    let (st, _, _) = call(
        &s.app,
        post_json("/v1/unload_lora_adapter", json!({"lora_name": "pat"})),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v, _) = call(
        &s.app,
        post_json("/v1/completions", json!({"prompt": PROMPT, "model": "pat"})),
    )
    .await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "model_not_found");
    let (st, v, _) = call(
        &s.app,
        post_json("/v1/unload_lora_adapter", json!({"lora_name": "pat"})),
    )
    .await;
    assert_error(st, &v, StatusCode::NOT_FOUND, "adapter_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_guard_the_api_but_not_health() {
    let s = server_with((Some("user-key"), Some("admin-key")), 1 << 20);
    let with = |mut r: Request<Body>, key: &str| {
        r.headers_mut().insert(
            header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        r
    };
    let (st, _, _) = call(&s.app, get("/health")).await;
    assert_eq!(st, StatusCode::OK);
    let (st, v, _) = call(&s.app, get("/v1/models")).await;
    assert_error(st, &v, StatusCode::UNAUTHORIZED, "invalid_api_key");
    let (st, v, _) = call(&s.app, with(get("/v1/models"), "wrong")).await;
    assert_error(st, &v, StatusCode::UNAUTHORIZED, "invalid_api_key");
    let (st, _, _) = call(&s.app, with(get("/v1/models"), "user-key")).await;
    assert_eq!(st, StatusCode::OK);
    let del = || {
        Request::delete("/v1/adapters/lora-r8")
            .body(Body::empty())
            .unwrap()
    };
    let (st, v, _) = call(&s.app, with(del(), "user-key")).await;
    assert_error(st, &v, StatusCode::FORBIDDEN, "admin_key_required");
    let (st, _, _) = call(&s.app, with(del(), "admin-key")).await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_openapi() {
    let s = server();
    call(
        &s.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 2, "adapter": "lora-r8"}),
        ),
    )
    .await;
    let (st, _, text) = call(&s.app, get("/metrics")).await;
    assert_eq!(st, StatusCode::OK);
    for want in [
        "dora_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1",
        "dora_time_to_first_token_seconds_count 1",
        "dora_generation_tokens_total 2",
        "dora_adapter_loads_total 1",
        "vllm:num_requests_waiting 0",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info{max_lora=\"8\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}",
    ] {
        assert!(text.contains(want), "{want:?} missing from\n{text}");
    }
    let (st, v, _) = call(&s.app, get("/openapi.json")).await;
    assert_eq!(st, StatusCode::OK);
    assert!(v["paths"]["/v1/completions"]["post"].is_object());
    assert!(v["openapi"].as_str().unwrap().starts_with("3.1"));
}

/// `openapi.yaml` at the repo root is generated from the code: regenerate it with
/// `cargo run -- openapi > openapi.yaml` when this fails.
#[test]
fn openapi_yaml_has_not_drifted() {
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml"))
            .unwrap();
    assert!(
        committed == http::openapi::yaml(),
        "openapi.yaml is stale: run `cargo run -- openapi > openapi.yaml`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_over_a_socket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = s.app.clone();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let body =
        json!({"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "adapter": "dora-all-r8"})
            .to_string();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let json_start = resp.find("\r\n\r\n").unwrap() + 4;
    let v: Value = serde_json::from_str(resp[json_start..].trim()).unwrap();
    assert_eq!(
        v["choices"][0]["text"],
        decode(&adapter_greedy("dora-all-r8", 0)[..4])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_429_with_retry_after() {
    // The gate holds every step: the long request stays running and the next one queued for
    // as long as the test needs, however fast the machine.
    let (s, gate) = gated_server((1, 1));
    // One request running, one queued: the next is refused at once.
    let app = s.app.clone();
    let long = tokio::spawn(async move {
        call(
            &app,
            post_json(
                "/v1/completions",
                json!({"prompt": PROMPT, "max_tokens": 200, "ignore_eos": true}),
            ),
        )
        .await
    });
    gate.allow(1); // admits it and runs its prefill
    while s.engine.stats().running == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let app = s.app.clone();
    let queued = tokio::spawn(async move {
        call(
            &app,
            post_json(
                "/v1/completions",
                json!({"prompt": PROMPT, "max_tokens": 1}),
            ),
        )
        .await
    });
    while s.engine.stats().waiting == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let resp = s
        .app
        .clone()
        .oneshot(post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 1}),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        resp.headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    gate.open();
    // Both accepted requests complete normally, and service resumes.
    assert_eq!(long.await.unwrap().0, StatusCode::OK);
    assert_eq!(queued.await.unwrap().0, StatusCode::OK);
    let (st, _, _) = call(
        &s.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 1}),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
}

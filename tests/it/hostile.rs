//! Bad input never hurts: every hostile or broken upload gets a 4xx with its own `code` and a
//! message that says what to fix, the store is unchanged, the server stays healthy, and every
//! other adapter answers bit-identically before and after.

use std::collections::HashMap;

use axum::http::StatusCode;
use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::util::{fixture_bytes, safetensors_bytes};
use crate::web::*;

const A0: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const B0: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
const MAG: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";

/// A fixture adapter's two files, edited.
fn variant(
    name: &str,
    edit_cfg: impl FnOnce(&mut Value),
    edit_tensors: impl FnOnce(&mut HashMap<String, Tensor>),
) -> (Vec<u8>, Vec<u8>) {
    let (mut cfg, mut tensors) = fixture_bytes(name);
    edit_cfg(&mut cfg);
    edit_tensors(&mut tensors);
    (cfg.to_string().into_bytes(), safetensors_bytes(&tensors))
}

/// The fixture's weights with their safetensors header edited (and its length rewritten).
fn edit_header(name: &str, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let (_, st) = fixture_files(name);
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
    edit(&mut header);
    let h = header.to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&st[8 + n..]);
    out
}

fn keep<T>(_: &mut T) {}

fn set(key: &'static str, v: Value) -> impl FnOnce(&mut Value) {
    move |c| c[key] = v
}

fn remove(key: &'static str) -> impl FnOnce(&mut Value) {
    move |c| {
        c.as_object_mut().unwrap().remove(key);
    }
}

fn poison(v: f32) -> impl FnOnce(&mut HashMap<String, Tensor>) {
    move |t| {
        let a = &t[A0];
        let mut vals = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        vals[3] = v;
        t.insert(
            A0.into(),
            Tensor::from_vec(vals, a.shape(), a.device()).unwrap(),
        );
    }
}

/// One case: form fields, expected status, code, and words the message must contain.
struct Case {
    label: &'static str,
    fields: Vec<(&'static str, Vec<u8>)>,
    status: StatusCode,
    code: &'static str,
    words: &'static [&'static str],
}

fn upload_case(
    label: &'static str,
    name: &str,
    (cfg, st): (Vec<u8>, Vec<u8>),
    code: &'static str,
    words: &'static [&'static str],
) -> Case {
    Case {
        label,
        fields: vec![
            ("name", name.as_bytes().to_vec()),
            ("adapter_config", cfg),
            ("adapter_model", st),
        ],
        status: StatusCode::UNPROCESSABLE_ENTITY,
        code,
        words,
    }
}

fn catalogue() -> Vec<Case> {
    let (lora_cfg, lora_st) = fixture_files("lora-r8");
    let (dora_cfg, _) = fixture_files("dora-all-r8");
    let with = |cfg: &[u8], st: Vec<u8>| (cfg.to_vec(), st);
    let bad_name = |label, name: Vec<u8>| Case {
        label,
        fields: vec![
            ("name", name),
            ("adapter_config", lora_cfg.clone()),
            ("adapter_model", lora_st.clone()),
        ],
        status: StatusCode::BAD_REQUEST,
        code: "invalid_request",
        words: &["name"],
    };
    let missing = |label, drop: &str| Case {
        label,
        fields: [
            ("name", b"fine".to_vec()),
            ("adapter_config", lora_cfg.clone()),
            ("adapter_model", lora_st.clone()),
        ]
        .into_iter()
        .filter(|(k, _)| *k != drop)
        .collect(),
        status: StatusCode::BAD_REQUEST,
        code: "invalid_request",
        words: &["missing"],
    };
    vec![
        upload_case(
            "config not JSON",
            "c1",
            with(b"{nope", lora_st.clone()),
            "adapter_config_invalid_json",
            &["not valid JSON"],
        ),
        upload_case(
            "config a JSON array",
            "c2",
            with(b"[1,2]", lora_st.clone()),
            "adapter_config_invalid_json",
            &["object"],
        ),
        upload_case(
            "r of the wrong type",
            "c3",
            variant("lora-r8", set("r", json!("eight")), keep),
            "adapter_config_invalid",
            &["\"r\""],
        ),
        upload_case(
            "target_modules of the wrong type",
            "c4",
            variant("lora-r8", set("target_modules", json!(7)), keep),
            "adapter_config_invalid",
            &["target_modules"],
        ),
        upload_case(
            "missing r",
            "c5",
            variant("lora-r8", remove("r"), keep),
            "adapter_config_invalid",
            &["\"r\""],
        ),
        upload_case(
            "missing lora_alpha",
            "c6",
            variant("lora-r8", remove("lora_alpha"), keep),
            "adapter_config_invalid",
            &["lora_alpha"],
        ),
        upload_case(
            "unsupported peft_type",
            "c7",
            variant("lora-r8", set("peft_type", json!("IA3")), keep),
            "adapter_unsupported",
            &["peft_type", "IA3"],
        ),
        upload_case(
            "bias all",
            "c8",
            variant("lora-r8", set("bias", json!("all")), keep),
            "adapter_unsupported",
            &["bias"],
        ),
        upload_case(
            "modules_to_save",
            "c9",
            variant("lora-r8", set("modules_to_save", json!(["lm_head"])), keep),
            "adapter_unsupported",
            &["modules_to_save"],
        ),
        upload_case(
            "truncated safetensors",
            "w1",
            with(&lora_cfg, lora_st[..lora_st.len() - 100].to_vec()),
            "adapter_weights_invalid",
            &["safetensors"],
        ),
        upload_case(
            "header longer than the file",
            "w2",
            with(&lora_cfg, {
                let mut b = lora_st.clone();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                b
            }),
            "adapter_weights_invalid",
            &["safetensors"],
        ),
        upload_case(
            "header not JSON",
            "w3",
            with(&lora_cfg, {
                let mut b = 16u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"this is not json");
                b
            }),
            "adapter_weights_invalid",
            &["safetensors"],
        ),
        upload_case(
            "overlapping offsets",
            "w4",
            with(
                &lora_cfg,
                edit_header("lora-r8", |h| {
                    let key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight";
                    h[key]["data_offsets"] = json!([1024, 2048]);
                }),
            ),
            "adapter_weights_invalid",
            &["safetensors"],
        ),
        upload_case(
            "offsets out of range",
            "w5",
            with(
                &lora_cfg,
                edit_header("lora-r8", |h| {
                    let key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight";
                    h[key]["data_offsets"] = json!([0, 1 << 30]);
                }),
            ),
            "adapter_weights_invalid",
            &["safetensors"],
        ),
        upload_case(
            "integer tensor",
            "w6",
            variant("lora-r8", keep, |t| {
                t.insert(A0.into(), t[A0].to_dtype(DType::I64).unwrap());
            }),
            "adapter_tensor_invalid",
            &["dtype", "lora_A"],
        ),
        upload_case(
            "NaN value",
            "w7",
            variant("lora-r8", keep, poison(f32::NAN)),
            "adapter_tensor_invalid",
            &["non-finite"],
        ),
        upload_case(
            "Inf value",
            "w8",
            variant("lora-r8", keep, poison(f32::INFINITY)),
            "adapter_tensor_invalid",
            &["non-finite"],
        ),
        upload_case(
            "lora_A rank differs from r",
            "w9",
            variant("lora-r8", set("r", json!(4)), keep),
            "adapter_tensor_invalid",
            &["lora_A", "[4, 32]"],
        ),
        upload_case(
            "lora_B out-dim differs from the module",
            "w10",
            variant("lora-r8", keep, |t| {
                t.insert(B0.into(), t[B0].narrow(0, 0, 16).unwrap());
            }),
            "adapter_tensor_invalid",
            &["lora_B", "[32, 8]"],
        ),
        upload_case(
            "magnitude of the wrong length",
            "w11",
            variant("dora-all-r8", keep, |t| {
                t.insert(MAG.into(), t[MAG].narrow(0, 0, 31).unwrap());
            }),
            "adapter_tensor_invalid",
            &["lora_magnitude_vector", "[32]"],
        ),
        upload_case(
            "magnitude on a LoRA adapter",
            "w12",
            variant("lora-r8", keep, |t| {
                t.insert(
                    MAG.into(),
                    Tensor::ones(32, DType::F32, &candle_core::Device::Cpu).unwrap(),
                );
            }),
            "adapter_tensor_invalid",
            &["use_dora", "plain LoRA"],
        ),
        upload_case(
            "DoRA module without magnitude",
            "w13",
            variant("dora-all-r8", keep, |t| {
                t.remove(MAG);
            }),
            "adapter_module_mismatch",
            &["magnitude"],
        ),
        upload_case(
            "unknown tensor key",
            "w14",
            variant("lora-r8", keep, |t| {
                t.insert("optimizer_state".into(), t[A0].clone());
            }),
            "adapter_tensor_invalid",
            &["optimizer_state"],
        ),
        upload_case(
            "module the base model lacks",
            "w15",
            variant("lora-r8", keep, |t| {
                let a = t.remove(A0).unwrap();
                let b = t.remove(B0).unwrap();
                t.insert(A0.replace("layers.0", "layers.7"), a);
                t.insert(B0.replace("layers.0", "layers.7"), b);
            }),
            "adapter_module_mismatch",
            &["layer 7", "2 layers"],
        ),
        upload_case(
            "pickle file",
            "w16",
            with(
                &lora_cfg,
                b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}q\x00.".to_vec(),
            ),
            "adapter_pickle_refused",
            &["pickle", "safetensors"],
        ),
        upload_case(
            "torch zip file",
            "w17",
            with(&lora_cfg, b"PK\x03\x04archive/data.pkl".to_vec()),
            "adapter_pickle_refused",
            &["pickle"],
        ),
        upload_case(
            "empty weights",
            "w18",
            with(&lora_cfg, Vec::new()),
            "adapter_weights_invalid",
            &["safetensors"],
        ),
        upload_case(
            "DoRA config over LoRA weights",
            "w19",
            with(&dora_cfg, lora_st.clone()),
            "adapter_module_mismatch",
            &["magnitude"],
        ),
        Case {
            label: "body over the size limit",
            fields: vec![
                ("name", b"big".to_vec()),
                ("adapter_config", lora_cfg.clone()),
                ("adapter_model", vec![0u8; 300 * 1024]),
            ],
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "payload_too_large",
            words: &["limit"],
        },
        missing("missing name", "name"),
        missing("missing adapter_config", "adapter_config"),
        missing("missing adapter_model", "adapter_model"),
        bad_name("name with /", b"a/b".to_vec()),
        bad_name("name ..", b"..".to_vec()),
        bad_name("name ../x", b"../x".to_vec()),
        bad_name("name with NUL", b"nul\0x".to_vec()),
        bad_name("name of 65 characters", "n".repeat(65).into_bytes()),
        bad_name("empty name", Vec::new()),
        bad_name("name not UTF-8", vec![0xff, 0xfe]),
        Case {
            label: "upload over a name in use without replace",
            fields: vec![
                ("name", b"lora-r8".to_vec()),
                ("adapter_config", dora_cfg.clone()),
                ("adapter_model", fixture_files("dora-all-r8").1),
            ],
            status: StatusCode::CONFLICT,
            code: "adapter_exists",
            words: &["replace=true"],
        },
    ]
}

/// What base, dora-all-r8 and lora-r8 answer (text and log-probabilities, exactly).
async fn fingerprint(s: &Server) -> Vec<Value> {
    let mut out = Vec::new();
    for adapter in [Value::Null, json!("dora-all-r8"), json!("lora-r8")] {
        let (st, v, text) = call(
            &s.app,
            post_json(
                "/v1/completions",
                json!({"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3, "adapter": adapter}),
            ),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{text}");
        out.push(v["choices"].clone());
    }
    out
}

fn listing(s: &Server) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(s.store.path())
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let read = |f: &str| std::fs::read(p.join(f)).unwrap_or_default();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                read("adapter_config.json"),
                read("adapter_model.safetensors"),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_upload_is_refused_by_code_and_hurts_nothing() {
    let s = server_with((None, None), 256 * 1024);
    let before = fingerprint(&s).await;
    let files_before = listing(&s);
    for case in catalogue() {
        let fields: Vec<(&str, &[u8])> = case
            .fields
            .iter()
            .map(|(k, v)| (*k, v.as_slice()))
            .collect();
        let (st, v, text) = call(&s.app, multipart(&fields, "/v1/adapters")).await;
        assert_eq!(st, case.status, "{}: {text}", case.label);
        assert_error(st, &v, case.status, case.code);
        let msg = v["error"]["message"].as_str().unwrap();
        for w in case.words {
            assert!(
                msg.contains(w),
                "{}: message {msg:?} should mention {w:?}",
                case.label
            );
        }
    }
    assert!(listing(&s) == files_before, "the store changed");
    let (st, v, _) = call(&s.app, get("/health")).await;
    assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    assert_eq!(
        fingerprint(&s).await,
        before,
        "other adapters' outputs changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_generation_requests_are_refused_by_code_and_hurt_nothing() {
    let s = server();
    let before = fingerprint(&s).await;
    let c = |b: Value| post_json("/v1/completions", b);
    let cases: Vec<(Value, StatusCode, &str, &str)> = vec![
        (
            json!({"prompt": "x", "adapter": "nope"}),
            StatusCode::NOT_FOUND,
            "adapter_not_found",
            "GET /v1/adapters",
        ),
        (
            json!({"prompt": "x", "max_tokens": 100_000}),
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
            "max_tokens",
        ),
        (
            json!({"prompt": "x", "temperature": -0.5}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "temperature",
        ),
        (
            json!({"prompt": "x", "top_p": 0}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "top_p",
        ),
        (
            json!({"prompt": "x", "n": 1000}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "n",
        ),
        (
            json!({"prompt": [0, 1, 1_000_000]}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "vocabulary",
        ),
        (
            json!({"prompt": [-1]}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "prompt",
        ),
        (
            json!({"prompt": "x".repeat(100_000)}),
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
            "prompt",
        ),
        (
            json!({"prompt": "x", "max_tokens": -3}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "max_tokens",
        ),
        (
            json!({"prompt": "x", "stop": 5}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "stop",
        ),
        (
            json!({"prompt": "x", "adapter": "../../etc/passwd"}),
            StatusCode::NOT_FOUND,
            "adapter_not_found",
            "adapter",
        ),
    ];
    for (body, status, code, word) in cases {
        let (st, v, text) = call(&s.app, c(body.clone())).await;
        assert_eq!(st, status, "{body}: {text}");
        assert_error(st, &v, status, code);
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(word),
            "{body}: {msg:?} should mention {word:?}"
        );
    }
    // Found by schemathesis: values that vanish in f32 were a 500. They mean greedy.
    let greedy = call(
        &s.app,
        c(json!({"prompt": PROMPT, "max_tokens": 4, "temperature": 0})),
    )
    .await
    .1;
    for extreme in [
        json!({"top_p": 5e-324}),
        json!({"temperature": 1e-300}),
        json!({"temperature": 5e-324, "top_p": 1e-40}),
    ] {
        let mut b = json!({"prompt": PROMPT, "max_tokens": 4});
        b.as_object_mut()
            .unwrap()
            .extend(extreme.as_object().unwrap().clone());
        let (st, v, text) = call(&s.app, c(b)).await;
        assert_eq!(st, StatusCode::OK, "{extreme}: {text}");
        assert_eq!(
            v["choices"][0]["text"], greedy["choices"][0]["text"],
            "{extreme}"
        );
    }
    // NaN cannot be written in JSON; the nearest a client can send is a bare token.
    let raw = axum::http::Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            r#"{"prompt":"x","temperature":NaN}"#,
        ))
        .unwrap();
    let (st, v, _) = call(&s.app, raw).await;
    assert_error(st, &v, StatusCode::BAD_REQUEST, "invalid_json");
    let (st, v, _) = call(&s.app, get("/health")).await;
    assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    assert_eq!(fingerprint(&s).await, before, "outputs changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_adapters_that_no_longer_validate_are_refused_at_start() {
    let s = server();
    // Damaged on disk while the server was down: half the weights file is gone.
    let dir = s.store.path().join("damaged");
    std::fs::create_dir_all(&dir).unwrap();
    let (cfg, st) = fixture_files("lora-r8");
    std::fs::write(dir.join("adapter_config.json"), cfg).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), &st[..st.len() / 2]).unwrap();
    let before = fingerprint(&s).await;
    assert_eq!(s.engine.check_adapters(), vec!["damaged".to_string()]);
    let (st, v, _) = call(&s.app, get("/v1/adapters/damaged")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["state"], "invalid");
    assert!(v["error"].as_str().unwrap().contains("safetensors"), "{v}");
    let (st, v, _) = call(
        &s.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "adapter": "damaged"}),
        ),
    )
    .await;
    assert_error(
        st,
        &v,
        StatusCode::UNPROCESSABLE_ENTITY,
        "adapter_weights_invalid",
    );
    assert_eq!(fingerprint(&s).await, before);
    // Replacing it with good files clears the mark and serves it.
    let (cfg, st_bytes) = fixture_files("lora-r8");
    let (st, v, text) = call(
        &s.app,
        multipart(
            &[
                ("name", b"damaged"),
                ("adapter_config", &cfg),
                ("adapter_model", &st_bytes),
            ],
            "/v1/adapters?replace=true",
        ),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    assert!(v["digest"].as_str().unwrap().starts_with("sha256:"));
    // No longer refused: the validated upload went into the cache as it is.
    let (_, v, _) = call(&s.app, get("/v1/adapters/damaged")).await;
    assert_eq!(v["state"], "loaded", "{v}");
    assert!(v.get("error").is_none(), "{v}");
    let (st, v, _) = call(
        &s.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "adapter": "damaged", "max_tokens": 6, "temperature": 0, "logprobs": 3}),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        v["choices"], before[2],
        "the same files as lora-r8 answer the same"
    );
}

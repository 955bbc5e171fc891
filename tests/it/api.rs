//! The API's values checked against references, field by field: log-probabilities against
//! transformers' logits, every prompt form's text against its own greedy reference, each
//! sampling field against the reference generation loop run with the same settings, chat
//! forms, the adapter list, and the error codes that only faults produce.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::Tensor;
use dora_serve::engine::{generate, AdapterMode, GenerateRequest, SamplingParams};
use serde_json::{json, Value};

use crate::util::{expected, expected_logits, load};
use crate::web::*;

/// log_softmax of each row of `logits` `[rows, vocab]`, in f64.
fn log_softmax(logits: &Tensor) -> Vec<Vec<f64>> {
    logits
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
            row.iter().map(|&l| l as f64 - max - z.ln()).collect()
        })
        .collect()
}

/// The `k` most likely ids of a log-probability row, most likely first.
fn top_ids(row: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|a, b| row[*b].total_cmp(&row[*a]).then(a.cmp(b)));
    idx.truncate(k);
    idx
}

fn token_text(id: usize) -> String {
    load("tiny-llama")
        .tokenizer
        .decode(&[id as u32], false)
        .unwrap()
}

/// Echoed prompt log-probabilities, the first generated token's log-probability and its
/// top-k, all equal log_softmax of transformers' logits (`expected.safetensors` keeps the last
/// 6 positions of each prompt: for a 7-token prompt that covers prompt tokens 2–6 and the
/// first generated token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_equal_log_softmax_of_the_reference_logits() {
    let s = server();
    let exp = &expected()["tiny-llama"];
    for (i, p) in exp.iter().enumerate().take(4) {
        let ids = &p.prompt_token_ids;
        let reference = log_softmax(&expected_logits("tiny-llama", i));
        let kept = reference.len();
        // Reference row j holds position ids.len() - kept + j, which predicts the next token.
        let row_of = |position: usize| &reference[position + kept - ids.len()];
        let (st, v, _) = completion(&s, json!({"prompt": p.prompt, "max_tokens": 1, "temperature": 0, "echo": true, "logprobs": 3})).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let lp = &v["choices"][0]["logprobs"];
        let token_lps = lp["token_logprobs"].as_array().unwrap();
        let tops = lp["top_logprobs"].as_array().unwrap();
        assert_eq!(token_lps.len(), ids.len() + 1);
        assert_eq!(token_lps[0], Value::Null, "the first prompt token has none");
        let mut checked = 0;
        for (t, got) in token_lps.iter().enumerate().skip(1) {
            // Token t (a prompt token, or the generated one at t = len) is predicted by
            // position t - 1.
            if t - 1 < ids.len() - kept {
                continue; // the fixture does not hold that position
            }
            let row = row_of(t - 1);
            let id = if t < ids.len() {
                ids[t] as usize
            } else {
                p.greedy_token_ids[0] as usize
            };
            let got = got.as_f64().unwrap();
            assert!(
                (got - row[id]).abs() <= 1e-4,
                "prompt {i} token {t}: logprob {got} vs reference {}",
                row[id]
            );
            // The top 3 alternatives, as token text → logprob (OpenAI's shape: ids whose
            // texts are equal, such as lone bytes of a multi-byte character, share one key).
            let top = tops[t].as_object().unwrap();
            let want = top_ids(row, 3);
            let mut texts: Vec<String> = want.iter().map(|&id| token_text(id)).collect();
            texts.sort();
            texts.dedup();
            let mut keys: Vec<&String> = top.keys().collect();
            keys.sort();
            assert_eq!(
                keys,
                texts.iter().collect::<Vec<_>>(),
                "prompt {i} token {t}"
            );
            for (text, got) in top {
                let got = got.as_f64().unwrap();
                assert!(
                    want.iter()
                        .any(|&id| token_text(id) == *text && (got - row[id]).abs() <= 1e-4),
                    "prompt {i} token {t}: top logprob {text:?} {got} is none of {:?}",
                    want.iter().map(|&id| row[id]).collect::<Vec<_>>()
                );
            }
            checked += 1;
        }
        assert_eq!(checked, kept, "prompt {i}");
    }
    // Chat: the template of prompt 4 is the chat prompt; logprobs and top_logprobs of the
    // first generated token.
    let row = &log_softmax(&expected_logits("tiny-llama", 4))[5];
    let first = exp[4].greedy_token_ids[0] as usize;
    let (st, v, _) = call(
        &s.app,
        post_json(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 1,
                   "temperature": 0, "logprobs": true, "top_logprobs": 4}),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let c = &v["choices"][0]["logprobs"]["content"][0];
    assert_eq!(c["token"], token_text(first));
    assert!(
        (c["logprob"].as_f64().unwrap() - row[first]).abs() <= 1e-4,
        "{c}"
    );
    let tops = c["top_logprobs"].as_array().unwrap();
    let want = top_ids(row, 4);
    assert_eq!(tops.len(), 4);
    for (got, want) in tops.iter().zip(want) {
        assert_eq!(got["token"], token_text(want));
        assert!(
            (got["logprob"].as_f64().unwrap() - row[want]).abs() <= 1e-4,
            "{got}"
        );
        assert_eq!(got["bytes"], json!(token_text(want).into_bytes()));
    }
}

/// Every prompt form, n choices each: each choice's text is the greedy reference of its own
/// prompt, in prompt order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_prompt_form_answers_each_prompt_with_its_own_text() {
    let s = server();
    let exp = &expected()["tiny-llama"];
    let greedy = |i: usize| decode(&exp[i].greedy_token_ids[..3]);
    let ids = |i: usize| json!(exp[i].prompt_token_ids);
    for (prompt, want) in [
        (json!(exp[1].prompt), vec![1]),
        (
            json!([exp[0].prompt, exp[1].prompt, exp[3].prompt]),
            vec![0, 1, 3],
        ),
        (ids(2), vec![2]),
        (json!([ids(2), ids(0)]), vec![2, 0]),
    ] {
        let (st, v, _) = completion(
            &s,
            json!({"prompt": prompt, "max_tokens": 3, "n": 2, "temperature": 0}),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let cs = v["choices"].as_array().unwrap();
        assert_eq!(cs.len(), 2 * want.len());
        for (k, c) in cs.iter().enumerate() {
            assert_eq!(c["index"], k);
            assert_eq!(c["text"], greedy(want[k / 2]), "{prompt}: choice {k}");
        }
        let prompt_tokens: usize = want.iter().map(|i| exp[*i].prompt_token_ids.len()).sum();
        assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens * 2, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 3 * 2 * want.len());
    }
}

/// POST /v1/completions: (status, body, body text).
async fn completion(s: &Server, body: Value) -> (StatusCode, Value, String) {
    call(&s.app, post_json("/v1/completions", body)).await
}

async fn text_of(s: &Server, body: Value) -> String {
    let (st, v, _) = completion(s, body).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// seed, top_k, top_p, temperature and the penalties reach the sampler: each answer equals
/// the reference loop run with the same settings, and differs where the setting matters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_fields_reach_the_sampler() {
    let s = server();
    let p = &expected()["tiny-llama"][1];
    let n = 10;
    let body = |extra: Value| {
        let mut b = json!({"prompt": p.prompt, "max_tokens": n, "ignore_eos": true});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let sampled = |seed: u64| SamplingParams {
        temperature: 1.5,
        seed,
        ..Default::default()
    };
    // seed: reproducible, and another seed gives another text.
    let a = text_of(&s, body(json!({"temperature": 1.5, "seed": 5}))).await;
    let again = text_of(&s, body(json!({"temperature": 1.5, "seed": 5}))).await;
    let other = text_of(&s, body(json!({"temperature": 1.5, "seed": 6}))).await;
    assert_eq!(a, again);
    assert_ne!(a, other, "seeds 5 and 6 gave the same {n} sampled tokens");
    let ids = &p.prompt_token_ids;
    let reference_eos = |sp: SamplingParams| {
        // ignore_eos: the reference loop stops at eos ids, so give it none to stop at.
        let m = load("tiny-llama");
        let out = generate(
            &m.model,
            &m.tokenizer,
            &[GenerateRequest {
                prompt_token_ids: ids.clone(),
                max_tokens: n,
                sampling: sp,
                logprobs: None,
                stop_token_ids: vec![],
                adapter: None,
            }],
            AdapterMode::Unmerged,
        )
        .unwrap();
        out[0].text.clone()
    };
    assert_eq!(a, reference_eos(sampled(5)));
    // top_k 1 at a high temperature is greedy.
    let greedy = reference_eos(SamplingParams::default());
    let k1 = text_of(&s, body(json!({"temperature": 1.5, "seed": 5, "top_k": 1}))).await;
    assert_eq!(k1, greedy);
    let k3 = text_of(&s, body(json!({"temperature": 1.5, "seed": 5, "top_k": 3}))).await;
    assert_eq!(
        k3,
        reference_eos(SamplingParams {
            top_k: Some(3),
            ..sampled(5)
        })
    );
    let tp = text_of(
        &s,
        body(json!({"temperature": 1.5, "seed": 5, "top_p": 0.5})),
    )
    .await;
    assert_eq!(
        tp,
        reference_eos(SamplingParams {
            top_p: 0.5,
            ..sampled(5)
        })
    );
    // Penalties: greedy with a strong frequency or presence penalty departs from plain greedy
    // (the tiny model repeats itself) and equals the reference loop with the same penalty.
    for (field, sp) in [
        (
            "frequency_penalty",
            SamplingParams {
                frequency_penalty: 2.0,
                ..Default::default()
            },
        ),
        (
            "presence_penalty",
            SamplingParams {
                presence_penalty: 2.0,
                ..Default::default()
            },
        ),
    ] {
        let got = text_of(&s, body(json!({"temperature": 0, field: 2.0}))).await;
        assert_eq!(got, reference_eos(sp), "{field}");
        assert_ne!(got, greedy, "{field} 2.0 changed nothing");
    }
    // A stop string cuts the text right before it; finish_reason says stop.
    let chars: Vec<char> = greedy.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let (st, v, _) = completion(
        &s,
        body(json!({"temperature": 0, "stop": [stop.clone(), "never-appears"]})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        v["choices"][0]["text"],
        greedy[..greedy.find(&stop).unwrap()]
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let (_, v, _) = completion(&s, body(json!({"temperature": 0, "stop": stop.clone()}))).await;
    assert_eq!(
        v["choices"][0]["text"],
        greedy[..greedy.find(&stop).unwrap()]
    );
}

async fn chat(s: &Server, body: Value) -> Value {
    let (st, v, _) = call(&s.app, post_json("/v1/chat/completions", body)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v
}

/// System and multi-turn chats go through the template whole; content parts are joined;
/// max_completion_tokens limits the answer; tools are refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_forms_render_through_the_template() {
    let s = server();
    let m = load("tiny-llama");
    let messages = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "developer", "content": "Stay terse."},
        {"role": "user", "content": "And now?"}
    ]);
    let rendered =
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n\
        <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>system\nStay terse.<|im_end|>\n\
        <|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n";
    let ids = m.tokenizer.encode(rendered).unwrap();
    let v = chat(
        &s,
        json!({"messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    let want = {
        let out = generate(
            &m.model,
            &m.tokenizer,
            &[GenerateRequest {
                prompt_token_ids: ids.clone(),
                max_tokens: 5,
                sampling: SamplingParams::default(),
                logprobs: None,
                stop_token_ids: vec![],
                adapter: None,
            }],
            AdapterMode::Unmerged,
        )
        .unwrap();
        out[0].text.clone()
    };
    assert_eq!(v["choices"][0]["message"]["content"], want);
    // Content parts are the same message as their joined text.
    let plain = chat(
        &s,
        json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 4, "temperature": 0}),
    )
    .await;
    let parts = chat(
        &s,
        json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
               "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(
        parts["choices"][0]["message"],
        plain["choices"][0]["message"]
    );
    // The same prompt again: its first full block now comes from the prefix cache.
    assert_eq!(
        parts["usage"]["prompt_tokens"],
        plain["usage"]["prompt_tokens"]
    );
    assert_eq!(
        parts["usage"]["completion_tokens"],
        plain["usage"]["completion_tokens"]
    );
    assert_eq!(plain["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(parts["usage"]["prompt_tokens_details"]["cached_tokens"], 16);
    let exp = &expected()["tiny-llama"][4];
    assert_eq!(
        plain["choices"][0]["message"]["content"],
        decode(&exp.greedy_token_ids[..4])
    );
    // max_completion_tokens wins over max_tokens, as OpenAI's newer name.
    let v = chat(
        &s,
        json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 9,
               "max_completion_tokens": 2, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(v["usage"]["completion_tokens"], 2);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // Refused by name.
    for (body, param) in [
        (
            json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages",
        ),
    ] {
        let (st, v, _) = call(&s.app, post_json("/v1/chat/completions", body)).await;
        assert_error(st, &v, StatusCode::BAD_REQUEST, "invalid_request");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
}

/// `GET /v1/adapters` lists the store and registered adapters with what they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapter_list_describes_each_adapter() {
    let s = server();
    let (st, v, _) = call(&s.app, get("/v1/adapters")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["object"], "list");
    let names: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dora-all-r8", "lora-r8"]);
    let d = &v["data"][0];
    assert_eq!(
        (d["type"].as_str(), d["r"].as_u64()),
        (Some("dora"), Some(8))
    );
    assert_eq!(d["state"], "on_disk");
    assert_eq!(v["data"][1]["type"], "lora");
    // After a request it is loaded.
    completion(
        &s,
        json!({"prompt": PROMPT, "max_tokens": 1, "adapter": "lora-r8"}),
    )
    .await;
    let (_, v, _) = call(&s.app, get("/v1/adapters")).await;
    assert_eq!(v["data"][1]["state"], "loaded", "{v}");
}

/// `internal_error`: a failed engine step (injected) fails the requests it ran with 500 and
/// the engine's message; the next request is served normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_is_an_internal_error_and_the_server_goes_on() {
    let (s, gate) = gated_server((8, 64));
    gate.fail_next_step("injected fault");
    gate.open();
    let (st, v, _) = completion(&s, json!({"prompt": PROMPT, "max_tokens": 2})).await;
    assert_error(st, &v, StatusCode::INTERNAL_SERVER_ERROR, "internal_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("injected fault"),
        "{v}"
    );
    let (st, v, _) = completion(
        &s,
        json!({"prompt": PROMPT, "max_tokens": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        v["choices"][0]["text"],
        decode(&expected()["tiny-llama"][0].greedy_token_ids[..2])
    );
}

/// `shutting_down`: a request in flight when the engine stops gets it as an error event;
/// requests after get 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_and_after_shutdown_get_shutting_down() {
    let (s, gate) = gated_server((8, 64));
    let app = s.app.clone();
    let inflight = tokio::spawn(async move {
        call(
            &app,
            post_json(
                "/v1/completions",
                json!({"prompt": PROMPT, "max_tokens": 50, "stream": true}),
            ),
        )
        .await
    });
    gate.allow(1);
    assert!(gate.wait_passed(1, std::time::Duration::from_secs(60)));
    s.engine.shutdown();
    let (st, _, text) = inflight.await.unwrap();
    assert_eq!(st, StatusCode::OK, "the stream had started");
    assert!(text.contains("\"code\":\"shutting_down\""), "{text}");
    let (st, v, _) = completion(&s, json!({"prompt": PROMPT, "max_tokens": 2})).await;
    assert_error(st, &v, StatusCode::SERVICE_UNAVAILABLE, "shutting_down");
}

/// `adapter_io_error`: a stored adapter whose weights cannot be read (a link to
/// /proc/self/mem: it opens, and reading offset 0, never mapped, fails with EIO). The
/// request fails with that code; other adapters serve.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_stored_adapter_is_an_adapter_io_error() {
    let s = server();
    let dir = s.store.path().join("unreadable");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        s.store.path().join("lora-r8/adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    std::os::unix::fs::symlink("/proc/self/mem", dir.join("adapter_model.safetensors")).unwrap();
    assert!(std::fs::read(dir.join("adapter_model.safetensors")).is_err());
    let (st, v, _) = completion(
        &s,
        json!({"prompt": PROMPT, "max_tokens": 2, "adapter": "unreadable"}),
    )
    .await;
    assert_error(st, &v, StatusCode::UNPROCESSABLE_ENTITY, "adapter_io_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unreadable"),
        "{v}"
    );
    let (st, _, _) = completion(
        &s,
        json!({"prompt": PROMPT, "max_tokens": 2, "adapter": "lora-r8"}),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
}

/// Two `load_lora_adapter` calls with one name at once: exactly one registers it, the other
/// is told it exists; never both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_of_one_name_have_one_winner() {
    let s = server();
    let src = s.store.path().join("nested/pat");
    std::fs::create_dir_all(&src).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            crate::util::fixtures()
                .join("adapters/dora-patterns")
                .join(f),
            src.join(f),
        )
        .unwrap();
    }
    for round in 0..8 {
        let name = format!("race-{round}");
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (app, body) = (s.app.clone(), json!({"lora_name": name, "lora_path": src}));
                tokio::spawn(
                    async move { call(&app, post_json("/v1/load_lora_adapter", body)).await },
                )
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            let (st, v, _) = t.await.unwrap();
            if st == StatusCode::OK {
                ok += 1;
            } else {
                assert_error(st, &v, StatusCode::CONFLICT, "adapter_exists");
            }
        }
        assert_eq!(ok, 1, "round {round}: {ok} registrations won");
    }
    let (_, v, _) = call(
        &s.app,
        Request::get("/v1/adapters").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["name"].as_str().unwrap().starts_with("race-"))
            .count(),
        8
    );
}

//! The real SmolLM2-135M-Instruct GGUF against transformers' record of it
//! (`scripts/smollm2_reference.py`). Needs `scripts/fetch-model.sh` first, hence ignored:
//! `cargo test --release -- --ignored real_model`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use dora_serve::engine::{generate, AdapterMode, GenerateRequest, SamplingParams};
use dora_serve::model::{self, KvCache, LoadOptions, LogitsFor, SeqInput};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<RefPrompt>,
}

#[derive(Deserialize)]
struct RefPrompt {
    prompt: String,
    prompt_token_ids: Vec<u32>,
    last_top_ids: Vec<u32>,
    last_top_logits: Vec<f32>,
    greedy_token_ids: Vec<u32>,
}

#[test]
#[ignore = "needs models/ from scripts/fetch-model.sh"]
fn smollm2_gguf_matches_transformers() {
    // Dequantised to f32 at load, and kept as stored (Q4_1 blocks dequantised on the fly).
    for stored in [false, true] {
        smollm2_matches_transformers(stored);
    }
}

fn smollm2_matches_transformers(stored: bool) {
    matches_transformers(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2_reference.json",
        2,
        stored,
    );
}

/// The real Gemma 3 270M (Q4_K_M) against transformers' record of it
/// (`scripts/smollm2_reference.py gemma3-270m`): SentencePiece tokenizer rebuilt from the GGUF,
/// top-10 last-position logits within 1e-3, greedy text equal.
#[test]
#[ignore = "needs models/ from scripts/fetch-model.sh gemma3-270m"]
fn gemma3_270m_gguf_matches_transformers() {
    for stored in [false, true] {
        matches_transformers(
            "gemma-3-270m-q4_k_m.gguf",
            "gemma3_270m_reference.json",
            106,
            stored,
        );
    }
}

/// `file` in models/ against the transformers record `reference` in tests/fixtures/, whose
/// greedy runs stop at `eos`.
fn matches_transformers(file: &str, reference: &str, eos: u32, stored: bool) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("models").join(file);
    let reference: Reference = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures").join(reference)).unwrap(),
    )
    .unwrap();
    let m = model::load(
        &path,
        &LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            stored,
        },
    )
    .expect("run scripts/fetch-model.sh first");
    assert!(
        m.info.eos_token_ids.contains(&eos),
        "{:?}",
        m.info.eos_token_ids
    );
    let mut reqs = Vec::new();
    for p in &reference.prompts {
        assert_eq!(
            m.tokenizer.encode(&p.prompt).unwrap(),
            p.prompt_token_ids,
            "{:?}",
            p.prompt
        );
        let mut cache = m.model.new_cache();
        let mut input = [SeqInput {
            tokens: &p.prompt_token_ids,
            cache: &mut cache,
            logits: LogitsFor::Last,
            adapter: None,
            prompt_len: 0,
        }];
        let logits = m
            .model
            .forward(&mut input, None)
            .unwrap()
            .pop()
            .unwrap()
            .squeeze(0)
            .unwrap();
        let ids = Tensor::new(p.last_top_ids.as_slice(), &Device::Cpu).unwrap();
        let got: Vec<f32> = logits.index_select(&ids, 0).unwrap().to_vec1().unwrap();
        for (g, w) in got.iter().zip(&p.last_top_logits) {
            assert!(
                (g - w).abs() <= 1e-3,
                "{:?}: logit {g} vs transformers {w}",
                p.prompt
            );
        }
        let gap = got
            .iter()
            .zip(&p.last_top_logits)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{file} (stored: {stored}): top-10 max |Δlogit| {gap:.2e} on {:?}",
            p.prompt
        );
        reqs.push(GenerateRequest {
            prompt_token_ids: p.prompt_token_ids.clone(),
            max_tokens: p.greedy_token_ids.len(),
            sampling: SamplingParams::default(),
            logprobs: None,
            stop_token_ids: m.info.eos_token_ids.clone(),
            adapter: None,
        });
    }
    let outs = generate(&m.model, &m.tokenizer, &reqs, AdapterMode::Unmerged).unwrap();
    for (p, out) in reference.prompts.iter().zip(outs) {
        let mut want = p.greedy_token_ids.clone();
        if want.last() == Some(&eos) {
            want.pop();
        }
        assert_eq!(out.token_ids, want, "{:?}", p.prompt);
    }
}

#[derive(Deserialize)]
struct AdapterReference {
    prompts: Vec<String>,
    adapters: std::collections::HashMap<String, Vec<Vec<u32>>>,
    base: Vec<Vec<u32>>,
}

/// The example adapters (trained with PEFT on the HF form of SmolLM2) served from the
/// GGUF-loaded base, unmerged and merged, against PEFT's greedy answers
/// (`scripts/train_example_adapters.py`).
#[test]
#[ignore = "needs models/ from scripts/fetch-model.sh"]
fn example_adapters_on_smollm2_match_peft() {
    for stored in [false, true] {
        example_adapters_match_peft(stored);
    }
}

fn example_adapters_match_peft(stored: bool) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let reference: AdapterReference = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/smollm2_adapters_reference.json"))
            .unwrap(),
    )
    .unwrap();
    let m = model::load(
        &root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            stored,
        },
    )
    .expect("run scripts/fetch-model.sh first");
    let mut names: Vec<&String> = reference.adapters.keys().collect();
    names.sort();
    for mode in [AdapterMode::Unmerged, AdapterMode::Merged] {
        // Every (adapter, prompt) pair and the base model in one batch.
        let mut reqs = Vec::new();
        let mut want = Vec::new();
        for name in &names {
            let a =
                dora_serve::adapter::load_dir(&root.join("adapters").join(name), &m.model).unwrap();
            for (p, w) in reference.prompts.iter().zip(&reference.adapters[*name]) {
                reqs.push(GenerateRequest {
                    prompt_token_ids: m.tokenizer.encode(p).unwrap(),
                    max_tokens: w.len(),
                    sampling: SamplingParams::default(),
                    logprobs: None,
                    stop_token_ids: m.info.eos_token_ids.clone(),
                    adapter: Some(std::sync::Arc::clone(&a.weights)),
                });
                want.push((name.to_string(), w.clone()));
            }
        }
        for (p, w) in reference.prompts.iter().zip(&reference.base) {
            reqs.push(GenerateRequest {
                prompt_token_ids: m.tokenizer.encode(p).unwrap(),
                max_tokens: w.len(),
                sampling: SamplingParams::default(),
                logprobs: None,
                stop_token_ids: m.info.eos_token_ids.clone(),
                adapter: None,
            });
            want.push(("base".into(), w.clone()));
        }
        let outs = generate(&m.model, &m.tokenizer, &reqs, mode).unwrap();
        for (i, (out, (name, w))) in outs.iter().zip(&want).enumerate() {
            let mut w = w.clone();
            if w.last() == Some(&2) {
                w.pop();
            }
            assert_eq!(
                out.token_ids, w,
                "{mode:?} {name} request {i}: {:?}",
                out.text
            );
        }
    }
}

/// `--merged-dtype bf16` on the SmolLM2 file kept as Q4_1: the logit error of bf16-rounded merged
/// weights against the exact f32 merge (which equals PEFT within 1e-4, above), for each example
/// adapter. Printed (README states it) and bounded.
#[test]
#[ignore = "needs models/ from scripts/fetch-model.sh"]
fn bf16_merged_weights_error_on_smollm2() {
    use candle_core::quantized::GgmlDType;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut m = model::load(
        &root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            stored: true,
        },
    )
    .expect("run scripts/fetch-model.sh first");
    let ids = m
        .tokenizer
        .encode("The old sailor looked at the sea and said")
        .unwrap();
    for name in ["pirate", "shouty"] {
        let a = dora_serve::adapter::load_dir(&root.join("adapters").join(name), &m.model).unwrap();
        let logits = |m: &model::LoadedModel| -> Tensor {
            let merged = m.model.merge(&a.weights).unwrap();
            let mut cache = KvCache::new(m.model.config().num_hidden_layers);
            let mut input = [SeqInput {
                tokens: &ids,
                cache: &mut cache,
                logits: LogitsFor::All,
                adapter: Some(&a.weights),
                prompt_len: 0,
            }];
            m.model
                .forward(&mut input, Some(&merged))
                .unwrap()
                .pop()
                .unwrap()
        };
        m.model.set_merged_dtype(GgmlDType::F32).unwrap();
        let exact = logits(&m);
        m.model.set_merged_dtype(GgmlDType::BF16).unwrap();
        let rounded = logits(&m);
        // The suite's helpers, as every other logit comparison uses them.
        let diff = crate::util::max_abs_diff(&exact, &rounded);
        let scale = crate::util::max_abs(&exact);
        println!(
            "{name}: bf16 merged vs f32 merged, max |Δlogit| {diff:.4} over {} positions (max |logit| {scale:.2}, relative {:.2e})",
            ids.len(),
            diff / scale
        );
        assert!(
            diff > 0.0 && diff < 0.05 * scale,
            "{name}: {diff} of {scale}"
        );
    }
}

/// `--int8-activations` on the real models: what rounding the input rows of products to int8
/// does to the logits, against the exact path on the same stored weights, over every position
/// of each reference prompt followed by its greedy answer (up to 64 tokens), fed both ways the
/// int8 kernels take: as one forward of that many rows (the VNNI kernel's, AVX-512) and one
/// token at a time, as decode steps of one sequence (the one-row kernel's, AVX2 without
/// AVX-512). The README quotes the lines this prints.
#[test]
#[ignore = "needs models/ from scripts/fetch-model.sh and scripts/fetch-model.sh gemma3-270m"]
fn int8_activations_error_on_real_models() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for (file, reference) in [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2_reference.json"),
        ("gemma-3-270m-q4_k_m.gguf", "gemma3_270m_reference.json"),
    ] {
        let reference: Reference = serde_json::from_str(
            &std::fs::read_to_string(root.join("tests/fixtures").join(reference)).unwrap(),
        )
        .unwrap();
        let m = model::load(
            &root.join("models").join(file),
            &LoadOptions {
                dtype: DType::F32,
                device: Device::Cpu,
                stored: true,
            },
        )
        .expect("run scripts/fetch-model.sh (and gemma3-270m) first");
        // Every position's logits `[n, vocab]`, from one forward or from `n` decode steps.
        let logits = |tokens: &[u32], int8: bool, steps: bool| -> Tensor {
            m.model.set_int8_activations(int8);
            let mut cache = m.model.new_cache();
            let mut forward = |tokens: &[u32]| {
                let mut input = [SeqInput {
                    tokens,
                    cache: &mut cache,
                    logits: LogitsFor::All,
                    adapter: None,
                    prompt_len: 0,
                }];
                m.model.forward(&mut input, None).unwrap().pop().unwrap()
            };
            if !steps {
                return forward(tokens);
            }
            let rows: Vec<Tensor> = tokens.chunks(1).map(&mut forward).collect();
            Tensor::cat(&rows, 0).unwrap()
        };
        if m.model.set_int8_activations(true) == 0 {
            println!("{file}: the int8 kernels apply to no matrix here (not its formats on this CPU, or weights dequantised at load by --kernels generic)");
            continue;
        }
        let mut ran = false;
        for (how, steps) in [("one forward", false), ("decode steps", true)] {
            let (mut diff, mut scale, mut dlogprob) = (0f32, 0f32, 0f32);
            let (mut positions, mut same_top) = (0, 0);
            for p in &reference.prompts {
                let tokens: Vec<u32> = p
                    .prompt_token_ids
                    .iter()
                    .chain(&p.greedy_token_ids)
                    .copied()
                    .take(64)
                    .collect();
                let exact = logits(&tokens, false, steps);
                let rounded = logits(&tokens, true, steps);
                diff = diff.max(crate::util::max_abs_diff(&exact, &rounded));
                scale = scale.max(crate::util::max_abs(&exact));
                let top = |t: &Tensor| -> Vec<u32> { t.argmax(1).unwrap().to_vec1().unwrap() };
                let (te, tr) = (top(&exact), top(&rounded));
                positions += te.len();
                same_top += te.iter().zip(&tr).filter(|(a, b)| a == b).count();
                // The log-probability of the exact path's top token, both ways.
                let lp = |t: &Tensor| candle_nn::ops::log_softmax(t, 1).unwrap();
                let ids = Tensor::new(te.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(1)
                    .unwrap();
                let (le, lr) = (
                    lp(&exact).gather(&ids, 1).unwrap(),
                    lp(&rounded).gather(&ids, 1).unwrap(),
                );
                dlogprob = dlogprob.max(crate::util::max_abs_diff(&le, &lr));
            }
            if diff == 0.0 {
                println!("{file}, {how}: no int8 kernel on this CPU for these products");
                continue;
            }
            ran = true;
            println!(
                "{file}, {how}: int8 activations vs exact over {positions} positions: max |Δlogit| {diff:.4} (max |logit| {scale:.2}, relative {:.2e}); top token equal at {same_top}/{positions}; max |Δlogprob| of the exact top token {dlogprob:.4}",
                diff / scale
            );
            assert!(diff < 0.05 * scale, "{file}, {how}: {diff} of {scale}");
            assert!(
                same_top * 10 >= positions * 9,
                "{file}, {how}: {same_top}/{positions}"
            );
        }
        assert!(ran, "{file}: an int8 kernel applies, yet no logit moved");
    }
}

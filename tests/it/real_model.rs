//! The real SmolLM2-135M-Instruct GGUF against transformers' record of it
//! (`scripts/smollm2_reference.py`). Needs `scripts/fetch-model.sh` first, hence ignored:
//! `cargo test --release -- --ignored real_model`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use dora_serve::engine::{generate, ApplyMode, GenerateRequest, SamplingParams};
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
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let reference: Reference = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/smollm2_reference.json")).unwrap(),
    )
    .unwrap();
    let m = model::load(
        &path,
        &LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
        },
    )
    .expect("run scripts/fetch-model.sh first");
    assert_eq!(m.info.eos_token_ids, vec![2]);
    let mut reqs = Vec::new();
    for p in &reference.prompts {
        assert_eq!(
            m.tokenizer.encode(&p.prompt).unwrap(),
            p.prompt_token_ids,
            "{:?}",
            p.prompt
        );
        let mut cache = KvCache::new(m.model.config().num_hidden_layers);
        let mut input = [SeqInput {
            tokens: &p.prompt_token_ids,
            cache: &mut cache,
            logits: LogitsFor::Last,
            adapter: None,
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
        reqs.push(GenerateRequest {
            prompt_token_ids: p.prompt_token_ids.clone(),
            max_tokens: p.greedy_token_ids.len(),
            sampling: SamplingParams::default(),
            logprobs: None,
            stop_token_ids: m.info.eos_token_ids.clone(),
            adapter: None,
        });
    }
    let outs = generate(&m.model, &m.tokenizer, &reqs, ApplyMode::Unmerged).unwrap();
    for (p, out) in reference.prompts.iter().zip(outs) {
        let mut want = p.greedy_token_ids.clone();
        if want.last() == Some(&2) {
            want.pop();
        }
        assert_eq!(out.token_ids, want, "{:?}", p.prompt);
    }
}

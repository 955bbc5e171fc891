//! The model against HF transformers: logits within 1e-4 in f32 and identical greedy tokens,
//! for every loader; and the packed batch against sequences run one at a time.

use candle_core::{DType, Tensor};
use dora_serve::engine::{generate, AdapterMode, FinishReason, GenerateRequest, SamplingParams};
use dora_serve::model::{KvCache, LoadedModel, LogitsFor, SeqInput};

use crate::util::{expected, expected_logits, load, load_as, max_abs_diff, rounding_tolerance};

/// (fixture to load, reference model in expected.json)
const CASES: [(&str, &str); 4] = [
    ("tiny-llama", "tiny-llama"),
    ("tiny-llama.gguf", "tiny-llama"),
    ("tiny-llama-q8_0.gguf", "tiny-llama-q8_0"),
    ("tiny-llama3", "tiny-llama3"),
];

fn all_logits(m: &LoadedModel, ids: &[u32]) -> Tensor {
    let mut cache = m.model.new_cache();
    let mut input = [SeqInput {
        tokens: ids,
        cache: &mut cache,
        logits: LogitsFor::All,
        adapter: None,
        prompt_len: 0,
    }];
    m.model.forward(&mut input, None).unwrap().pop().unwrap()
}

#[test]
fn tokenizers_match_hf() {
    let exp = expected();
    for (fixture, reference) in CASES {
        let m = load(fixture);
        for p in &exp[reference] {
            let ids = m.tokenizer.encode(&p.prompt).unwrap();
            assert_eq!(
                ids, p.prompt_token_ids,
                "{fixture}: tokens of {:?}",
                p.prompt
            );
            // Byte-level BPE round-trips the text exactly.
            assert_eq!(
                m.tokenizer.decode(&ids, false).unwrap(),
                p.prompt,
                "{fixture}"
            );
        }
    }
}

#[test]
fn logits_match_transformers() {
    let exp = expected();
    for (fixture, reference) in CASES {
        let m = load(fixture);
        for (i, p) in exp[reference].iter().enumerate() {
            let want = expected_logits(reference, i);
            let got = all_logits(&m, &p.prompt_token_ids);
            let keep = want.dim(0).unwrap();
            let got = got.narrow(0, got.dim(0).unwrap() - keep, keep).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d <= 1e-4, "{fixture} prompt {i}: max |Δlogit| = {d}");
        }
    }
}

#[test]
fn greedy_matches_transformers() {
    let exp = expected();
    for (fixture, reference) in CASES {
        let m = load(fixture);
        let reqs: Vec<GenerateRequest> = exp[reference]
            .iter()
            .map(|p| GenerateRequest {
                prompt_token_ids: p.prompt_token_ids.clone(),
                max_tokens: p.greedy_token_ids.len(),
                sampling: SamplingParams::default(),
                logprobs: None,
                stop_token_ids: m.info.eos_token_ids.clone(),
                adapter: None,
            })
            .collect();
        // All prompts as one batch, and each alone: both must equal transformers.
        let batched = generate(&m.model, &m.tokenizer, &reqs, AdapterMode::Unmerged).unwrap();
        for (i, (p, out)) in exp[reference].iter().zip(&batched).enumerate() {
            let alone = generate(&m.model, &m.tokenizer, &reqs[i..=i], AdapterMode::Unmerged)
                .unwrap()
                .pop()
                .unwrap();
            let mut want = p.greedy_token_ids.clone();
            let stopped = want
                .last()
                .is_some_and(|t| m.info.eos_token_ids.contains(t));
            if stopped {
                want.pop();
            }
            assert_eq!(out.token_ids, want, "{fixture} prompt {i} (batched)");
            assert_eq!(alone.token_ids, want, "{fixture} prompt {i} (alone)");
            let reason = if stopped {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            assert_eq!(out.finish_reason, reason, "{fixture} prompt {i}");
        }
    }
}

/// Prompts of different lengths packed into one forward give each sequence's own logits.
#[test]
fn packed_batch_equals_one_at_a_time() {
    let m = load("tiny-llama");
    let exp = expected();
    let prompts: Vec<&Vec<u32>> = exp["tiny-llama"]
        .iter()
        .map(|p| &p.prompt_token_ids)
        .collect();
    let alone: Vec<Tensor> = prompts.iter().map(|ids| all_logits(&m, ids)).collect();
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| m.model.new_cache()).collect();
    let mut inputs: Vec<SeqInput> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(ids, cache)| SeqInput {
            tokens: ids,
            cache,
            logits: LogitsFor::All,
            adapter: None,
            prompt_len: 0,
        })
        .collect();
    let packed = m.model.forward(&mut inputs, None).unwrap();
    for (i, (a, b)) in alone.iter().zip(&packed).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(
            d <= rounding_tolerance(a),
            "prompt {i}: packed differs by {d}"
        );
    }
}

/// A step that mixes a decode token of one sequence with a prefill chunk of another, and a
/// prompt prefilled in chunks, equal the plain full-prompt forward.
#[test]
fn chunked_prefill_and_mixed_steps_match_full_forward() {
    let m = load("tiny-llama3");
    let exp = expected();
    let a = &exp["tiny-llama3"][1].prompt_token_ids;
    let b = &exp["tiny-llama3"][3].prompt_token_ids;
    assert!(a.len() >= 3 && b.len() >= 4);
    let full_a = all_logits(&m, a);
    let full_b = all_logits(&m, b);

    let (mut ca, mut cb) = (m.model.new_cache(), m.model.new_cache());
    // Step 1: all of `a` but its last token, and the first 2 tokens of `b`.
    let split_b = 2;
    let mut step1 = [
        SeqInput {
            tokens: &a[..a.len() - 1],
            cache: &mut ca,
            logits: LogitsFor::All,
            adapter: None,
            prompt_len: 0,
        },
        SeqInput {
            tokens: &b[..split_b],
            cache: &mut cb,
            logits: LogitsFor::All,
            adapter: None,
            prompt_len: 0,
        },
    ];
    let out1 = m.model.forward(&mut step1, None).unwrap();
    // Step 2: `a` decodes its last token while `b` prefills the rest.
    let mut step2 = [
        SeqInput {
            tokens: &a[a.len() - 1..],
            cache: &mut ca,
            logits: LogitsFor::Last,
            adapter: None,
            prompt_len: 0,
        },
        SeqInput {
            tokens: &b[split_b..],
            cache: &mut cb,
            logits: LogitsFor::All,
            adapter: None,
            prompt_len: 0,
        },
    ];
    let out2 = m.model.forward(&mut step2, None).unwrap();
    assert_eq!(ca.len(), a.len());
    assert_eq!(cb.len(), b.len());
    let got_a = Tensor::cat(&[&out1[0], &out2[0]], 0).unwrap();
    let got_b = Tensor::cat(&[&out1[1], &out2[1]], 0).unwrap();
    assert!(max_abs_diff(&got_a, &full_a) <= rounding_tolerance(&full_a));
    assert!(max_abs_diff(&got_b, &full_b) <= rounding_tolerance(&full_b));
}

/// f16 and bf16 serve the same model: close to f32, not exact.
#[test]
fn half_dtypes_load_and_stay_close() {
    let exp = expected();
    let ids = &exp["tiny-llama"][0].prompt_token_ids;
    let f32_logits = all_logits(&load("tiny-llama"), ids);
    for (dtype, tol) in [(DType::F16, 0.05), (DType::BF16, 0.3)] {
        for fixture in ["tiny-llama", "tiny-llama.gguf"] {
            let m = load_as(fixture, dtype);
            let d = max_abs_diff(&all_logits(&m, ids), &f32_logits);
            assert!(d <= tol, "{fixture} {dtype:?}: max |Δlogit| = {d}");
        }
    }
}

#[test]
fn context_limit_is_enforced() {
    let m = load("tiny-llama");
    let ctx = m.model.config().max_context;
    let long = vec![5u32; ctx];
    let err = generate(
        &m.model,
        &m.tokenizer,
        &[GenerateRequest {
            prompt_token_ids: long,
            max_tokens: 4,
            sampling: SamplingParams::default(),
            logprobs: None,
            stop_token_ids: vec![],
            adapter: None,
        }],
        AdapterMode::Unmerged,
    )
    .unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
    // A prompt one short of the context gets exactly one token, finishing on length.
    let out = generate(
        &m.model,
        &m.tokenizer,
        &[GenerateRequest {
            prompt_token_ids: vec![5u32; ctx - 1],
            max_tokens: 100,
            sampling: SamplingParams::default(),
            logprobs: None,
            stop_token_ids: vec![],
            adapter: None,
        }],
        AdapterMode::Unmerged,
    )
    .unwrap()
    .pop()
    .unwrap();
    assert_eq!(out.token_ids.len(), 1);
    assert_eq!(out.finish_reason, FinishReason::Length);
}

//! Shared helpers: fixture paths, loading, and the expected outputs written by
//! `tests/fixtures/generate.py`.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use dora_serve::model::{self, LoadOptions, LoadedModel, LogitsFor, SeqInput};
use dora_serve::ops::{AdapterWeights, MergedWeights};
use serde::Deserialize;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn load(name: &str) -> LoadedModel {
    load_as(name, DType::F32)
}

/// The device the whole-model tests load onto: `DORA_TEST_DEVICE=cuda` (or `metal`) runs
/// them on a GPU (scripts/gpu-check.sh); the CPU otherwise.
pub fn device() -> Device {
    match std::env::var("DORA_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect("DORA_TEST_DEVICE=cuda: no CUDA device"),
        Ok("metal") => Device::new_metal(0).expect("DORA_TEST_DEVICE=metal: no Metal device"),
        _ => Device::Cpu,
    }
}

pub fn load_as(name: &str, dtype: DType) -> LoadedModel {
    let opts = LoadOptions {
        dtype,
        device: device(),
        stored: false,
    };
    model::load(&fixtures().join(name), &opts).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

#[derive(Debug, Deserialize)]
pub struct ExpectedPrompt {
    pub prompt: String,
    pub prompt_token_ids: Vec<u32>,
    pub greedy_token_ids: Vec<u32>,
}

/// `expected.json`: per reference model, per prompt.
pub fn expected() -> HashMap<String, Vec<ExpectedPrompt>> {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

/// transformers' f32 logits of the last positions of prompt `i` of model `name`.
pub fn expected_logits(name: &str, i: usize) -> Tensor {
    let all = candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)
        .expect("expected.safetensors");
    all.get(&format!("{name}.{i}"))
        .unwrap_or_else(|| panic!("no logits for {name}.{i}"))
        .clone()
}

/// What two f32 computations of the same logits may differ by when their matmuls sum in
/// different orders (the decode kernel in 16-lane partial sums, candle's gemm for packed
/// prefills longer than the kernel's row limit): differences of a few units in the last place
/// per matmul, carried through every layer, measured at up to 8 units in the last place of
/// the largest logit on the tiny fixture; this allows 16.
pub fn rounding_tolerance(a: &Tensor) -> f32 {
    (16.0 * f32::EPSILON * max_abs(a)).max(1e-5)
}

/// The largest absolute value in `t`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs(&(a - b).unwrap())
}

/// A fixture adapter's configuration and tensors, to edit into crafted variants.
pub fn fixture_bytes(name: &str) -> (serde_json::Value, HashMap<String, Tensor>) {
    let dir = fixtures().join("adapters").join(name);
    let cfg =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    (cfg, tensors)
}

pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Vec<u8> {
    let f = tempfile::NamedTempFile::new().unwrap();
    candle_core::safetensors::save(tensors, f.path()).unwrap();
    std::fs::read(f.path()).unwrap()
}

/// Logits of the last `keep` positions of `ids`, on `adapter` (merged when `merged` is given).
pub fn logits(
    m: &LoadedModel,
    ids: &[u32],
    adapter: Option<&AdapterWeights>,
    merged: Option<&MergedWeights>,
    keep: usize,
) -> Tensor {
    let mut cache = m.model.new_cache();
    let mut input = [SeqInput {
        tokens: ids,
        cache: &mut cache,
        logits: LogitsFor::All,
        adapter,
        prompt_len: 0,
    }];
    let l = m.model.forward(&mut input, merged).unwrap().pop().unwrap();
    l.narrow(0, ids.len() - keep, keep).unwrap()
}

//! Adapter parsing and validation on arbitrary bytes: never a panic, and whatever validates
//! applies, unmerged and merged, without an error. Input: a little-endian u16 length, that
//! many bytes of adapter_config.json, the rest adapter_model.safetensors (the seeds in
//! `corpus/adapter_load` are the test fixtures written so, by `fuzz/make_seeds.py`).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device};
use dora_serve::model::{self, LoadOptions, LoadedModel, LogitsFor, SeqInput};
use libfuzzer_sys::fuzz_target;

fn base() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-llama");
        let opts = LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            stored: false,
        };
        model::load(Path::new(dir), &opts).expect("the tiny fixture model loads")
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = u16::from_le_bytes([data[0], data[1]]) as usize;
    let rest = &data[2..];
    let (config, weights) = rest.split_at(n.min(rest.len()));
    let m = base();
    let Ok(a) = dora_serve::adapter::load_bytes("fuzz", config, weights, &m.model) else {
        return;
    };
    assert!(!a.info.modules.is_empty(), "an adapter loaded with no modules");
    let ids = [1u32, 5, 9, 3];
    let merged = m.model.merge(&a.weights).expect("a valid adapter merges");
    for merged in [None, Some(&merged)] {
        let mut cache = m.model.new_cache();
        let mut input = [SeqInput {
            tokens: &ids,
            cache: &mut cache,
            logits: LogitsFor::Last,
            adapter: Some(&*a.weights),
            prompt_len: ids.len(),
        }];
        m.model
            .forward(&mut input, merged)
            .expect("a valid adapter applies");
    }
});

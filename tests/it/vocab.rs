//! GGUF tokenizers rebuilt from metadata against HF's own tokenizers, on llama.cpp's tokenizer
//! test files (`models/ggml-vocab-*.gguf` with `.inp` texts and the `.out` ids that HF's
//! tokenizer of the original model gave: code, emoji, CJK, Arabic, whitespace runs, accents).
//! The files come from the llama-cpp-python sdist: `scripts/fetch-model.sh vocab` puts them in
//! `models/vocab/`. Ignored by default like the other real-model tests; `scripts/test.sh` runs
//! them.

use std::path::PathBuf;

fn vocab_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/vocab")
}

/// Every text of `name`'s `.inp` gives the ids of its `.out` line, and `specials` written in a
/// text are each recognised as their one token.
fn check(name: &str, specials: &[&str]) {
    let dir = vocab_dir();
    let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
    assert!(
        gguf.is_file(),
        "{} is missing: run scripts/fetch-model.sh vocab",
        gguf.display()
    );
    let tok = dora_serve::model::load_gguf_tokenizer(&gguf).unwrap();
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let want: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    assert!(
        want.len() >= 40 && texts.len() > want.len(),
        "{name}: test files not as expected"
    );
    let mut bad = Vec::new();
    for (i, (text, want)) in texts.iter().zip(&want).enumerate() {
        let got = tok.encode_plain(text).unwrap();
        if &got != want {
            bad.push(format!("#{i} {text:?}: got {got:?}, HF {want:?}"));
        }
    }
    for sp in specials {
        let id = tok
            .token_id(sp)
            .unwrap_or_else(|| panic!("{name}: no {sp}"));
        let ids = tok.encode_plain(&format!("Hi{sp}there")).unwrap();
        assert!(ids.contains(&id), "{name}: {sp} in text gave {ids:?}");
    }
    assert!(
        bad.is_empty(),
        "{name}: {} of {} texts differ from HF:\n{}",
        bad.len(),
        want.len(),
        bad.join("\n")
    );
}

#[test]
#[ignore]
fn real_model_vocab_llama_spm() {
    check("llama-spm", &["</s>", "<s>"]);
}

#[test]
#[ignore]
fn real_model_vocab_phi3() {
    check("phi-3", &["<|user|>", "<|end|>", "<|endoftext|>"]);
}

#[test]
#[ignore]
fn real_model_vocab_qwen2() {
    check("qwen2", &["<|im_start|>", "<|im_end|>", "<|endoftext|>"]);
}

/// One more sample per vocabulary (Arabic, code, emoji, CJK, whitespace runs and special
/// tokens written in the text) against the ids transformers gives when it builds the
/// tokenizer from the same GGUF file (`scripts/vocab_reference.py`).
#[test]
#[ignore]
fn real_model_vocab_sample_with_arabic_code_and_special_tokens() {
    #[derive(serde::Deserialize)]
    struct Sample {
        text: String,
        ids: Vec<u32>,
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let samples: std::collections::BTreeMap<String, Sample> = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/vocab_reference.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(samples.len(), 3);
    for (name, s) in samples {
        let gguf = vocab_dir().join(format!("ggml-vocab-{name}.gguf"));
        let tok = dora_serve::model::load_gguf_tokenizer(&gguf).unwrap();
        assert_eq!(
            tok.encode_plain(&s.text).unwrap(),
            s.ids,
            "{name}: {:?}",
            s.text
        );
    }
}

//! Bad model inputs give a typed error that names the file and the problem; never a panic.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use dora_serve::model::{self, LoadOptions, ModelError};

use crate::util::fixtures;

fn opts() -> LoadOptions {
    LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        stored: false,
    }
}

fn load_err(path: &Path) -> ModelError {
    match model::load(path, &opts()) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e,
    }
}

/// A writable copy of a fixture folder.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

fn assert_mentions(e: &ModelError, words: &[&str]) {
    let msg = e.to_string();
    for w in words {
        assert!(msg.contains(w), "error {msg:?} should mention {w:?}");
    }
}

#[test]
fn missing_paths_and_files_are_named() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert!(matches!(e, ModelError::MissingFile { .. }));
    assert_mentions(&e, &["/nonexistent/model"]);

    let dir = copy_fixture("tiny-llama");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert_mentions(&load_err(dir.path()), &["tokenizer.json"]);

    let dir = copy_fixture("tiny-llama");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_mentions(&load_err(dir.path()), &["config.json", "missing"]);

    let dir = copy_fixture("tiny-llama");
    std::fs::rename(
        dir.path().join("model.safetensors"),
        dir.path().join("pytorch_model.bin"),
    )
    .unwrap();
    assert_mentions(&load_err(dir.path()), &["pickle", "safetensors"]);

    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("model.txt");
    std::fs::write(&txt, "hello").unwrap();
    assert_mentions(&load_err(&txt), &[".gguf"]);
}

#[test]
fn bad_configs_are_explained() {
    let dir = copy_fixture("tiny-llama");
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let e = load_err(dir.path());
    assert!(matches!(e, ModelError::Json { .. }), "{e}");
    assert_mentions(&e, &["config.json"]);

    let dir = copy_fixture("tiny-llama");
    edit_config(dir.path(), |c| c["model_type"] = "gpt2".into());
    let e = load_err(dir.path());
    assert!(
        matches!(e, ModelError::UnsupportedArchitecture { .. }),
        "{e}"
    );
    assert_mentions(&e, &["gpt2"]);

    let dir = copy_fixture("tiny-llama");
    edit_config(dir.path(), |c| {
        c["rope_parameters"]["rope_type"] = "dynamic".into()
    });
    assert_mentions(&load_err(dir.path()), &["dynamic", "not supported"]);

    let dir = copy_fixture("tiny-llama");
    edit_config(dir.path(), |c| c["num_key_value_heads"] = 3.into());
    assert_mentions(&load_err(dir.path()), &["num_key_value_heads"]);

    let dir = copy_fixture("tiny-llama");
    edit_config(dir.path(), |c| c["hidden_act"] = "gelu".into());
    assert_mentions(&load_err(dir.path()), &["hidden_act"]);
}

#[test]
fn weights_that_disagree_with_the_config_are_refused() {
    let dir = copy_fixture("tiny-llama");
    edit_config(dir.path(), |c| c["intermediate_size"] = 96.into());
    let e = load_err(dir.path());
    assert!(matches!(e, ModelError::Weights { .. }), "{e}");
    assert_mentions(&e, &["mlp", "shape"]);

    let dir = copy_fixture("tiny-llama");
    edit_config(dir.path(), |c| c["tie_word_embeddings"] = false.into());
    assert_mentions(&load_err(dir.path()), &["lm_head"]);
}

#[test]
fn broken_shard_indexes_are_refused() {
    let dir = copy_fixture("tiny-llama3");
    std::fs::remove_file(dir.path().join("model-00003-of-00005.safetensors")).unwrap();
    assert_mentions(&load_err(dir.path()), &["model-00003-of-00005.safetensors"]);

    let dir = copy_fixture("tiny-llama3");
    let p = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("model-00001-of-00005", "../escape");
    std::fs::write(&p, text).unwrap();
    assert_mentions(&load_err(dir.path()), &["not a plain file name"]);
}

fn write_gguf(path: &Path, metadata: &[(&str, Value)], tensors: &[(&str, Tensor)]) {
    let qts: Vec<(&str, QTensor)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                *n,
                QTensor::quantize(t, candle_core::quantized::GgmlDType::F32).unwrap(),
            )
        })
        .collect();
    let qrefs: Vec<(&str, &QTensor)> = qts.iter().map(|(n, q)| (*n, q)).collect();
    let mrefs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &mrefs, &qrefs).unwrap();
}

#[test]
fn bad_gguf_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();

    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(fixtures().join("tiny-llama.gguf")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&truncated);
    assert!(matches!(e, ModelError::Gguf { .. }), "{e}");
    assert_mentions(&e, &["truncated.gguf"]);

    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert_mentions(&load_err(&empty), &["empty.gguf", "GGUF"]);

    let t = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
    let other = dir.path().join("gpt2.gguf");
    write_gguf(
        &other,
        &[("general.architecture", Value::String("gpt2".into()))],
        &[("token_embd.weight", t.clone())],
    );
    assert!(matches!(
        load_err(&other),
        ModelError::UnsupportedArchitecture { .. }
    ));

    // A tensor we do not understand is an error, not something to skip.
    let base = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(4)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.feed_forward_length", Value::U32(4)),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(16)),
        (
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        ),
    ];
    let unknown = dir.path().join("unknown.gguf");
    write_gguf(&unknown, &base, &[("blk.0.mystery.weight", t)]);
    assert_mentions(
        &load_err(&unknown),
        &["blk.0.mystery.weight", "not part of a llama model"],
    );
}

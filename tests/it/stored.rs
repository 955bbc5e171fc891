//! Base weights kept as stored (`--dtype auto`) against the same file dequantised to f32 at
//! load: logits within 1e-4 relative in every kept format and in a mixed file (as Q4_K_M files
//! mix formats), through prefill, packed decode and single-row decode; DoRA and LoRA adapters
//! unmerged, merged and in mixed batches on a quantized base; refusals by name.
//!
//! The files are written here: a random llama wide enough for the k-quants (rows of 256),
//! quantized with candle's quantizer into each format and written with candle's GGUF writer.
//! The f32 reference dequantises the very same blocks, so the two sides differ only in the
//! order of summation.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use dora_serve::adapter::{self, AdapterKind, SynthSpec};
use dora_serve::model::{self, LoadOptions, LoadedModel, LogitsFor, ModelError, SeqInput};
use dora_serve::ops::{AdapterWeights, BaseWeight, MergedWeights, ProjKind};

use crate::util::{fixtures, max_abs, max_abs_diff};

use GgmlDType::*;
const FORMATS: [GgmlDType; 13] = [
    F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K,
];

const HIDDEN: usize = 256;
const FFN: usize = 512;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const LAYERS: usize = 2;

/// Write a random llama (the tiny fixture's tokenizer, wider matrices) to `path`, every matrix
/// in the format `format(i)` gives the `i`-th of them.
fn write_model(path: &Path, format: impl Fn(usize) -> GgmlDType) {
    let mut file = std::fs::File::open(fixtures().join("tiny-llama.gguf")).unwrap();
    let tiny = gguf_file::Content::read(&mut file).unwrap();
    let vocab = tiny.metadata["tokenizer.ggml.tokens"]
        .to_vec()
        .unwrap()
        .len();
    let mut md: Vec<(String, Value)> = tiny
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("llama."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in [
        ("embedding_length", HIDDEN),
        ("feed_forward_length", FFN),
        ("attention.head_count", HEADS),
        ("attention.head_count_kv", KV_HEADS),
        ("block_count", LAYERS),
        ("context_length", 256),
    ] {
        md.push((format!("llama.{k}"), Value::U32(v as u32)));
    }
    md.push((
        "llama.attention.layer_norm_rms_epsilon".into(),
        Value::F32(1e-5),
    ));

    let dev = Device::Cpu;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut matrices = 0;
    let mut matrix = |name: String, rows: usize, cols: usize| {
        let t = Tensor::randn(0f32, 1.0 / (cols as f32).sqrt(), (rows, cols), &dev).unwrap();
        let q = QTensor::quantize(&t, format(matrices)).unwrap();
        matrices += 1;
        tensors.push((name, q));
    };
    matrix("token_embd.weight".into(), vocab, HIDDEN);
    for l in 0..LAYERS {
        matrix(format!("blk.{l}.attn_q.weight"), HIDDEN, HIDDEN);
        matrix(
            format!("blk.{l}.attn_k.weight"),
            KV_HEADS * HEAD_DIM,
            HIDDEN,
        );
        matrix(
            format!("blk.{l}.attn_v.weight"),
            KV_HEADS * HEAD_DIM,
            HIDDEN,
        );
        matrix(format!("blk.{l}.attn_output.weight"), HIDDEN, HIDDEN);
        matrix(format!("blk.{l}.ffn_gate.weight"), FFN, HIDDEN);
        matrix(format!("blk.{l}.ffn_up.weight"), FFN, HIDDEN);
        matrix(format!("blk.{l}.ffn_down.weight"), HIDDEN, FFN);
    }
    matrix("output.weight".into(), vocab, HIDDEN);
    let norm = |name: String| {
        let t = Tensor::rand(0.5f32, 1.5, HIDDEN, &dev).unwrap();
        (name, QTensor::quantize(&t, F32).unwrap())
    };
    tensors.push(norm("output_norm.weight".into()));
    for l in 0..LAYERS {
        tensors.push(norm(format!("blk.{l}.attn_norm.weight")));
        tensors.push(norm(format!("blk.{l}.ffn_norm.weight")));
    }
    let mrefs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let trefs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut out = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut out, &mrefs, &trefs).unwrap();
}

fn load(path: &Path, stored: bool) -> LoadedModel {
    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        stored,
    };
    model::load(path, &opts).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// Each sequence's logits (all positions), run together as one packed step.
fn forward(
    m: &LoadedModel,
    rows: &[(&[u32], Option<&AdapterWeights>)],
    merged: Option<&MergedWeights>,
) -> Vec<Tensor> {
    let mut caches: Vec<_> = rows.iter().map(|_| m.model.new_cache()).collect();
    let mut inputs: Vec<SeqInput> = rows
        .iter()
        .zip(caches.iter_mut())
        .map(|((ids, adapter), cache)| SeqInput {
            tokens: ids,
            cache,
            logits: LogitsFor::All,
            adapter: *adapter,
            prompt_len: 0,
        })
        .collect();
    m.model.forward(&mut inputs, merged).unwrap()
}

/// `got` equals `want` within 1e-4 of `want`'s largest logit.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let diff = max_abs_diff(got, want);
    let tol = 1e-4 * max_abs(want);
    assert!(diff <= tol, "{what}: differs by {diff} (tolerance {tol})");
}

/// Token ids of a prompt longer than the decode kernel's row limit, and two short ones.
fn prompts(vocab: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let long: Vec<u32> = (0..80)
        .map(|i| (i * 37 + 11) as u32 % vocab as u32)
        .collect();
    (long, vec![5, 9, 14, 3], vec![7])
}

fn check_base(path: &Path, what: &str) {
    let (stored, dense) = (load(path, true), load(path, false));
    let vocab = dense.model.config().vocab_size;
    let (long, short, one) = prompts(vocab);
    // Prefill past the row limit (dequantised tiles), a packed batch, one row (fused kernel).
    for rows in [
        vec![(&long[..], None)],
        vec![(&short[..], None), (&one[..], None), (&long[..8], None)],
        vec![(&one[..], None)],
    ] {
        let got = forward(&stored, &rows, None);
        let want = forward(&dense, &rows, None);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_close(&format!("{what}, sequence {i} of {}", rows.len()), g, w);
        }
    }
}

fn write(dir: &Path, name: &str, format: impl Fn(usize) -> GgmlDType) -> PathBuf {
    let path = dir.join(name);
    write_model(&path, format);
    path
}

#[test]
fn every_kept_format_equals_its_dequantised_f32_model() {
    let dir = tempfile::tempdir().unwrap();
    for f in FORMATS {
        let path = write(dir.path(), &format!("{f:?}.gguf"), |_| f);
        let m = load(&path, true);
        let up = m.model.linear(0, ProjKind::Up).unwrap().weight();
        match (f, up) {
            (F32, BaseWeight::Dense(_)) => {}
            (_, BaseWeight::Stored(s)) => {
                assert_eq!(s.dtype(), f);
                assert!(s.is_mapped(), "{f:?}: read in place from the mapped file");
            }
            (_, w) => panic!("{f:?} was loaded as {}", w.format()),
        }
        check_base(&path, &format!("{f:?}"));
    }
}

#[test]
fn a_file_mixing_formats_equals_its_dequantised_f32_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "mixed.gguf", |i| {
        FORMATS[(i * 5 + 3) % FORMATS.len()]
    });
    check_base(&path, "mixed");
}

#[test]
fn adapters_on_a_quantized_base_equal_the_dequantised_model_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "q4k.gguf",
        |i| if i % 3 == 0 { Q6K } else { Q4K },
    );
    let (stored, dense) = (load(&path, true), load(&path, false));
    // Magnitudes are computed from the dequantised rows (as PEFT does on a quantized layer).
    let specs = [
        ("dora", true, ProjKind::SEPARATE.to_vec(), 8),
        (
            "lora",
            false,
            vec![ProjKind::Q, ProjKind::V, ProjKind::Down],
            4,
        ),
    ];
    let mut pairs = Vec::new();
    for (name, dora, targets, rank) in specs {
        let spec = SynthSpec {
            rank,
            alpha: 2.0 * rank as f64,
            targets,
            dora,
            seed: 7,
        };
        let adir = dir.path().join(name);
        adapter::write_random_adapter(&adir, &dense.model, &spec).unwrap();
        let on_stored = adapter::load_dir(&adir, &stored.model).unwrap();
        let on_dense = adapter::load_dir(&adir, &dense.model).unwrap();
        let kind = if dora {
            AdapterKind::Dora
        } else {
            AdapterKind::Lora
        };
        assert_eq!(on_stored.info.kind, kind);
        pairs.push((on_stored, on_dense));
    }
    let (long, short, one) = prompts(dense.model.config().vocab_size);
    let (d, l) = (&pairs[0], &pairs[1]);
    // Unmerged: alone, and in a mixed batch with the base and the other adapter.
    for rows in [
        vec![(&long[..], 0)],
        vec![
            (&short[..], 0),
            (&one[..], 2),
            (&long[..8], 1),
            (&one[..], 0),
        ],
        vec![(&one[..], 0)],
    ] {
        let pick = |p: &(adapter::Adapter, adapter::Adapter), stored: bool| {
            if stored {
                p.0.weights.clone()
            } else {
                p.1.weights.clone()
            }
        };
        let (ws, wd): (Vec<_>, Vec<_>) = rows
            .iter()
            .map(|(_, a)| match a {
                0 => (Some(pick(d, true)), Some(pick(d, false))),
                1 => (Some(pick(l, true)), Some(pick(l, false))),
                _ => (None, None),
            })
            .unzip();
        let rs: Vec<_> = rows
            .iter()
            .zip(&ws)
            .map(|((ids, _), a)| (*ids, a.as_deref()))
            .collect();
        let rd: Vec<_> = rows
            .iter()
            .zip(&wd)
            .map(|((ids, _), a)| (*ids, a.as_deref()))
            .collect();
        let got = forward(&stored, &rs, None);
        let want = forward(&dense, &rd, None);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_close(&format!("unmerged, sequence {i} of {}", rows.len()), g, w);
        }
    }
    // Merged: W' in f32 from the dequantised base, never requantized.
    for (name, p) in [("dora", d), ("lora", l)] {
        let ms = stored.model.merge(&p.0.weights).unwrap();
        let md = dense.model.merge(&p.1.weights).unwrap();
        for rows in [vec![&long[..]], vec![&short[..], &one[..]]] {
            let rs: Vec<_> = rows.iter().map(|ids| (*ids, Some(&*p.0.weights))).collect();
            let rd: Vec<_> = rows.iter().map(|ids| (*ids, Some(&*p.1.weights))).collect();
            let got = forward(&stored, &rs, Some(&ms));
            let want = forward(&dense, &rd, Some(&md));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_close(&format!("{name} merged, sequence {i}"), g, w);
            }
            // And merged equals unmerged on the stored base.
            let unmerged = forward(&stored, &rs, None);
            for (i, (g, w)) in got.iter().zip(&unmerged).enumerate() {
                assert_close(&format!("{name} merged vs unmerged, sequence {i}"), g, w);
            }
        }
    }
}

#[test]
fn a_tensor_of_an_unsupported_type_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "q8k.gguf", |i| if i == 4 { Q8K } else { Q8_0 });
    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        stored: true,
    };
    let Err(err) = model::load(&path, &opts) else {
        panic!("a file with a Q8_K tensor loaded");
    };
    assert!(matches!(err, ModelError::Gguf { .. }), "{err}");
    let msg = err.to_string();
    // Matrix 4 is layer 0's attn_output (after the embedding, q, k and v).
    for word in ["blk.0.attn_output.weight", "Q8_K", "q8k.gguf"] {
        assert!(msg.contains(word), "{msg:?} does not mention {word}");
    }
}

#[test]
fn bf16_safetensors_stay_16_bit_and_equal_their_f32_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-llama");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let bf16: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&bf16, dir.path().join("model.safetensors")).unwrap();
    let (stored, dense) = (load(dir.path(), true), load(dir.path(), false));
    match stored.model.linear(1, ProjKind::Down).unwrap().weight() {
        BaseWeight::Stored(s) => assert_eq!(s.dtype(), BF16),
        w => panic!("bf16 weights were loaded as {}", w.format()),
    }
    let ids = [1u32, 5, 9, 14, 3];
    let got = forward(&stored, &[(&ids[..], None)], None);
    let want = forward(&dense, &[(&ids[..], None)], None);
    assert_close("bf16 folder", &got[0], &want[0]);
}

/// A random r8 DoRA adapter on every separate projection, written to `dir` from `from` and
/// loaded on `on`.
fn random_dora(dir: &Path, from: &LoadedModel, on: &LoadedModel) -> adapter::Adapter {
    let spec = SynthSpec {
        rank: 8,
        alpha: 16.0,
        targets: ProjKind::SEPARATE.to_vec(),
        dora: true,
        seed: 3,
    };
    adapter::write_random_adapter(dir, &from.model, &spec).unwrap();
    adapter::load_dir(dir, &on.model).unwrap()
}

#[test]
fn merged_weights_over_a_stored_base_are_f32_unless_asked_and_never_its_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "q4k.gguf", |_| Q4K);
    let mut stored = load(&path, true);
    let dense = load(&path, false);
    let a = random_dora(&dir.path().join("dora"), &dense, &stored);
    let f32_merged = stored.model.merge(&a.weights).unwrap();
    let w = f32_merged.get(0, ProjKind::Up).unwrap();
    assert_eq!(w.format(), "F32");
    assert!(
        stored.model.set_merged_dtype(Q8_0).is_err(),
        "never requantized"
    );
    stored.model.set_merged_dtype(BF16).unwrap();
    let bf16_merged = stored.model.merge(&a.weights).unwrap();
    assert_eq!(bf16_merged.get(0, ProjKind::Up).unwrap().format(), "BF16");
    assert_eq!(2 * bf16_merged.bytes(), f32_merged.bytes());
    // bf16 rounds every merged weight: close to the exact merge, not equal to it.
    let ids = [1u32, 5, 9, 14, 3];
    let rows = [(&ids[..], Some(&*a.weights))];
    let exact = forward(&stored, &rows, Some(&f32_merged));
    let rounded = forward(&stored, &rows, Some(&bf16_merged));
    let diff = max_abs_diff(&exact[0], &rounded[0]);
    assert!(
        diff > 0.0 && diff < 0.05 * max_abs(&exact[0]),
        "bf16 merge differs by {diff}"
    );
}

/// `--int8-activations` (`Decoder::set_int8_activations`) on every format it covers: packed
/// batches and a prompt past 64 rows move within the rounding's reach of the exact logits and
/// not beyond, with a DoRA adapter unmerged beside the base too; one row stays bit for bit
/// exact (but for the K-quants on AVX2, whose one-row kernel rounds too); turned off,
/// everything is exact again.
#[test]
fn int8_activations_round_every_product_of_several_rows_and_turn_off_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for f in [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4K, Q5K, Q6K] {
        let path = write(dir.path(), &format!("{f:?}.gguf"), |_| f);
        let m = load(&path, true);
        let a = random_dora(&dir.path().join(format!("{f:?}-dora")), &m, &m).weights;
        let a: &AdapterWeights = &a;
        let (long, short, one) = prompts(m.model.config().vocab_size);
        let batch = [(&short[..], None), (&long[..8], Some(a)), (&one[..], None)];
        let exact = forward(&m, &batch, None);
        let (exact_one, exact_long) = (
            forward(&m, &[(&one[..], None)], None),
            forward(&m, &[(&long[..], Some(a))], None),
        );
        // 7 projections × 2 layers, and the output head.
        let n = m.model.set_int8_activations(true);
        if n == 0 {
            eprintln!(
                "{f:?}: the int8 kernel applies to no matrix here (not this format on this CPU, \
                 or weights dequantised at load by --kernels generic)"
            );
            continue;
        }
        assert_eq!(n, 7 * LAYERS + 1, "{f:?}");
        let rounded = forward(&m, &batch, None);
        for (i, (r, e)) in rounded.iter().zip(&exact).enumerate() {
            let (diff, scale) = (max_abs_diff(r, e), max_abs(e));
            assert!(
                diff > 0.0,
                "{f:?} sequence {i}: the int8 kernel did not run"
            );
            assert!(diff < 0.05 * scale, "{f:?} sequence {i}: {diff} of {scale}");
        }
        // One row is rounded only by the one-row int8 kernel: the K-quants, on CPUs with
        // AVX-512 VNNI (and VL) or without AVX-512 (AVX2); with AVX-512 but no VNNI one row
        // stays exact.
        let one_row = forward(&m, &[(&one[..], None)], None);
        let (diff, scale) = (
            max_abs_diff(&one_row[0], &exact_one[0]),
            max_abs(&exact_one[0]),
        );
        let row_kernel = !is_x86_feature_detected!("avx512f")
            || (is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl"));
        if row_kernel && matches!(f, Q4K | Q5K | Q6K) {
            assert!(
                diff > 0.0 && diff < 0.05 * scale,
                "{f:?} one row: {diff} of {scale}"
            );
        } else {
            assert_eq!(diff, 0.0, "{f:?} one row");
        }
        // A prompt past 64 rows: rounded too, 64 rows at a time.
        let long_rows = forward(&m, &[(&long[..], Some(a))], None);
        let (diff, scale) = (
            max_abs_diff(&long_rows[0], &exact_long[0]),
            max_abs(&exact_long[0]),
        );
        assert!(
            diff > 0.0 && diff < 0.05 * scale,
            "{f:?} prefill: {diff} of {scale}"
        );
        m.model.set_int8_activations(false);
        for (i, (g, e)) in forward(&m, &batch, None).iter().zip(&exact).enumerate() {
            assert_eq!(
                max_abs_diff(g, e),
                0.0,
                "{f:?} sequence {i} after turning it off"
            );
        }
    }
}

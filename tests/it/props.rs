//! Property tests: a random adapter of any valid shape (rank, alpha, rsLoRA, DoRA or LoRA, any
//! subset of projections and layers) gives the same outputs merged, unmerged, via the per-row
//! reference path, and via PEFT's formula written out here from the raw tensors.

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{Device, Tensor, D};
use dora_serve::adapter;
use dora_serve::model::{LoadedModel, LogitsFor, SeqInput};
use dora_serve::ops::{Apply, ProjKind, RowGroup};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use serde_json::json;

use crate::util::{load, max_abs_diff, rounding_tolerance};

fn base() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| load("tiny-llama"))
}

#[derive(Debug, Clone)]
struct Shape {
    r: usize,
    alpha: f64,
    rslora: bool,
    dora: bool,
    targets: Vec<ProjKind>,
    layers: Vec<usize>,
    magnitude_key: &'static str,
    seed: u64,
    rows: usize,
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        1usize..=8,
        1u32..=32,
        any::<bool>(),
        any::<bool>(),
        proptest::sample::subsequence(ProjKind::SEPARATE.to_vec(), 1..=7),
        proptest::sample::subsequence(vec![0usize, 1], 1..=2),
        proptest::sample::select(vec![
            "lora_magnitude_vector",
            "lora_magnitude_vector.weight",
            "lora_magnitude_vector.default.weight",
        ]),
        any::<u64>(),
        1usize..=6,
    )
        .prop_map(
            |(r, alpha, rslora, dora, targets, layers, magnitude_key, seed, rows)| Shape {
                r,
                alpha: alpha as f64,
                rslora,
                dora,
                targets,
                layers,
                magnitude_key,
                seed,
                rows,
            },
        )
}

/// Deterministic uniform values in [-amp, amp].
fn noise(seed: &mut u64, n: usize, amp: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

/// The raw tensors of a random adapter, keyed (layer, kind) → (A, B, magnitude).
type Raw = HashMap<(usize, ProjKind), (Tensor, Tensor, Option<Tensor>)>;

fn make(m: &LoadedModel, s: &Shape) -> (Vec<u8>, Vec<u8>, Raw) {
    let mut seed = s.seed;
    let mut tensors = HashMap::new();
    let mut raw = Raw::new();
    for &layer in &s.layers {
        for &kind in &s.targets {
            let lin = m.model.linear(layer, kind).unwrap();
            let (i, o) = (lin.in_dim(), lin.out_dim());
            let a =
                Tensor::from_vec(noise(&mut seed, s.r * i, 0.3), (s.r, i), &Device::Cpu).unwrap();
            let b =
                Tensor::from_vec(noise(&mut seed, o * s.r, 0.3), (o, s.r), &Device::Cpu).unwrap();
            let p = format!(
                "base_model.model.model.layers.{layer}.{}.{}",
                kind.parent(),
                kind.module_name()
            );
            tensors.insert(format!("{p}.lora_A.weight"), a.clone());
            tensors.insert(format!("{p}.lora_B.weight"), b.clone());
            let mag = s.dora.then(|| {
                let v: Vec<f32> = noise(&mut seed, o, 0.5).iter().map(|x| 1.25 + x).collect();
                Tensor::from_vec(v, o, &Device::Cpu).unwrap()
            });
            if let Some(mag) = &mag {
                tensors.insert(format!("{p}.{}", s.magnitude_key), mag.clone());
            }
            raw.insert((layer, kind), (a, b, mag));
        }
    }
    let mut cfg = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": s.r,
        "lora_alpha": s.alpha,
        "use_rslora": s.rslora,
        "use_dora": s.dora,
        "bias": "none",
        "target_modules": s.targets.iter().map(|k| k.module_name()).collect::<Vec<_>>(),
    });
    if s.layers.len() == 1 {
        cfg["layers_to_transform"] = json!(s.layers);
    }
    let f = tempfile::NamedTempFile::new().unwrap();
    candle_core::safetensors::save(&tensors, f.path()).unwrap();
    (
        cfg.to_string().into_bytes(),
        std::fs::read(f.path()).unwrap(),
        raw,
    )
}

/// PEFT's DoRA/LoRA forward from the raw tensors: `x · (m · V/‖V‖)ᵀ`, `V = W0 + s·B·A`.
fn peft_formula(w0: &Tensor, raw: &(Tensor, Tensor, Option<Tensor>), s: f64, x: &Tensor) -> Tensor {
    let (a, b, mag) = raw;
    let v = (w0 + (b.matmul(a).unwrap() * s).unwrap()).unwrap();
    let w = match mag {
        Some(m) => {
            let norm = v
                .sqr()
                .unwrap()
                .sum_keepdim(D::Minus1)
                .unwrap()
                .sqrt()
                .unwrap();
            v.broadcast_div(&norm)
                .unwrap()
                .broadcast_mul(&m.unsqueeze(1).unwrap())
                .unwrap()
        }
        None => v,
    };
    x.matmul(&w.t().unwrap()).unwrap()
}

fn last_logits(m: &LoadedModel, ids: &[u32], a: &adapter::Adapter, merged: bool) -> Tensor {
    let mw = merged.then(|| m.model.merge(&a.weights).unwrap());
    let mut cache = m.model.new_cache();
    let mut input = [SeqInput {
        tokens: ids,
        cache: &mut cache,
        logits: LogitsFor::Last,
        adapter: Some(&a.weights),
        prompt_len: 0,
    }];
    m.model
        .forward(&mut input, mw.as_ref())
        .unwrap()
        .pop()
        .unwrap()
}

/// 48 cases from a fixed seed, so a failure reproduces on every run and machine (the failing
/// shape, its own `seed` included, is printed). `PROPTEST_RNG_SEED=N` explores other cases;
/// a failure found that way reproduces with the same variable.
fn config() -> ProptestConfig {
    let from_env = ProptestConfig::default();
    let rng_seed = match from_env.rng_seed {
        RngSeed::Random => RngSeed::Fixed(0x0d0a_5e7e),
        fixed => fixed,
    };
    ProptestConfig {
        cases: 48,
        failure_persistence: None,
        rng_seed,
        ..from_env
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_valid_adapter_is_exact_merged_unmerged_and_by_formula(s in shape()) {
        let m = base();
        let (cfg, st, raw) = make(m, &s);
        let a = adapter::load_bytes("prop", &cfg, &st, &m.model).unwrap();
        prop_assert_eq!(a.info.modules.len(), s.targets.len() * s.layers.len());
        let scale = if s.rslora { s.alpha / (s.r as f64).sqrt() } else { s.alpha / s.r as f64 };
        let mut seed = s.seed ^ 0x5eed;
        for (&(layer, kind), parts) in &raw {
            let lin = m.model.linear(layer, kind).unwrap();
            let x = Tensor::from_vec(noise(&mut seed, s.rows * lin.in_dim(), 1.0), (s.rows, lin.in_dim()), &Device::Cpu).unwrap();
            let want = peft_formula(&lin.weight().to_f32().unwrap(), parts, scale, &x);
            // Alternate adapter and base rows, as a mixed batch would.
            let per_row: Vec<_> = (0..s.rows).map(|i| (i % 3 != 1).then_some(&*a.weights)).collect();
            let groups: Vec<RowGroup> = per_row.iter().enumerate().map(|(i, w)| RowGroup { start: i, len: 1, adapter: *w }).collect();
            let fast = lin.forward(&x, Apply::Rows(&groups)).unwrap();
            let reference = lin.forward_reference(&x, &per_row).unwrap();
            let base_y = lin.forward(&x, Apply::Base).unwrap();
            let module = a.weights.get(layer, kind).unwrap();
            let merged = x.matmul(&lin.merged_weight(module).unwrap().t().unwrap()).unwrap();
            for (i, adapted) in per_row.iter().enumerate() {
                let row = |t: &Tensor| t.narrow(0, i, 1).unwrap();
                let expect = if adapted.is_some() { row(&want) } else { row(&base_y) };
                let d_fast = max_abs_diff(&row(&fast), &expect);
                let d_ref = max_abs_diff(&row(&reference), &expect);
                prop_assert!(d_fast <= 1e-4, "{kind} layer {layer} row {i}: unmerged differs from PEFT's formula by {d_fast}");
                prop_assert!(d_ref <= 1e-4, "{kind} layer {layer} row {i}: reference differs by {d_ref}");
            }
            let d_merged = max_abs_diff(&merged, &want);
            prop_assert!(d_merged <= 1e-4, "{kind} layer {layer}: merged differs from PEFT's formula by {d_merged}");
        }
        let ids = [1u32, 17, 42, 7, 99];
        let unmerged = last_logits(m, &ids, &a, false);
        let merged = last_logits(m, &ids, &a, true);
        let d = max_abs_diff(&unmerged, &merged);
        let tol = rounding_tolerance(&merged).max(1e-4);
        prop_assert!(d <= tol, "model logits: merged vs unmerged differ by {d} (tolerance {tol})");
    }
}

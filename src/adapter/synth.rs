//! Random PEFT-format adapters for a base model: benchmarks and load tests need many
//! adapters of a chosen rank and targets without training them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::AdapterError;
use crate::ops::{dora_norm, BaseLinears, ProjKind};

/// What to make.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<ProjKind>,
    pub dora: bool,
    pub seed: u64,
}

/// Write `adapter_config.json` and `adapter_model.safetensors` for a random adapter into `dir`
/// (created if needed). `lora_B` is random (not PEFT's zero init) so the adapter changes the
/// output; DoRA magnitudes are the norms of `W0 + s·B·A` moved by a few percent.
pub fn write_random_adapter(
    dir: &Path,
    base: &dyn BaseLinears,
    spec: &SynthSpec,
) -> Result<(), AdapterError> {
    let io = |source| AdapterError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let dev = Device::Cpu;
    let mut rng = spec
        .seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut noise = |shape: (usize, usize), std: f32| -> candle_core::Result<Tensor> {
        // A small LCG keeps the output a function of the seed alone.
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * std * 1.732
            })
            .collect();
        Tensor::from_vec(v, shape, &dev)
    };
    let scale = spec.alpha / spec.rank as f64;
    // On a base with fused projections (Phi-3), q/k/v target its qkv_proj and gate/up its
    // gate_up_proj, as PEFT adapters for it do.
    let mut targets: Vec<ProjKind> = Vec::new();
    for &kind in &spec.targets {
        let kind = match kind {
            ProjKind::Q | ProjKind::K | ProjKind::V if base.linear(0, kind).is_none() => {
                ProjKind::Qkv
            }
            ProjKind::Gate | ProjKind::Up if base.linear(0, kind).is_none() => ProjKind::GateUp,
            k => k,
        };
        if !targets.contains(&kind) {
            targets.push(kind);
        }
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for layer in 0..base.num_layers() {
        for &kind in &targets {
            let Some(lin) = base.linear(layer, kind) else {
                continue;
            };
            let prefix = format!(
                "base_model.model.model.layers.{layer}.{}.{}",
                kind.parent(),
                kind.module_name()
            );
            let a = noise(
                (spec.rank, lin.in_dim()),
                1.0 / (lin.in_dim() as f32).sqrt(),
            )?;
            let b = noise((lin.out_dim(), spec.rank), 0.02)?;
            if spec.dora {
                let n = dora_norm(&lin.weight().to_f32()?.to_device(&dev)?, &a, &b, scale)?;
                let jitter = (noise((1, lin.out_dim()), 0.03)?.squeeze(0)? + 1.0)?;
                tensors.insert(format!("{prefix}.lora_magnitude_vector"), (n * jitter)?);
            }
            tensors.insert(format!("{prefix}.lora_A.weight"), a);
            tensors.insert(format!("{prefix}.lora_B.weight"), b);
        }
    }
    let names: Vec<&str> = targets.iter().map(|k| k.module_name()).collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "use_dora": spec.dora,
        "use_rslora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "target_modules": names,
    });
    let text = serde_json::to_string_pretty(&config).expect("static JSON");
    std::fs::write(dir.join("adapter_config.json"), text).map_err(io)?;
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    Ok(())
}

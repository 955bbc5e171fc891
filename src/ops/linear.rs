//! [`AdaptedLinear`]: the one linear type every projection of the model uses.
//!
//! It holds the base weight and bias and is identified by `(layer, ProjKind)`, the key under
//! which adapter modules attach to it. The adapter paths (unmerged per-row groups, merged
//! weights) hang off this type so that adapters never require a copy of the model.

use std::fmt;

use candle_core::{DType, Result, Tensor};

use super::lora::{AdapterWeights, LoraModule, MergedWeights};
use super::BaseWeight;

/// The projections of a decoder layer an adapter may target, named as in HF module paths:
/// llama's seven, and Phi-3's fused `qkv_proj` and `gate_up_proj` (a model has either the
/// fused or the separate ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProjKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    /// q, k and v in one matrix, rows in that order (Phi-3).
    Qkv,
    /// gate and up in one matrix, gate rows first (Phi-3).
    GateUp,
}

impl ProjKind {
    pub const ALL: [ProjKind; 9] = [
        ProjKind::Q,
        ProjKind::K,
        ProjKind::V,
        ProjKind::O,
        ProjKind::Gate,
        ProjKind::Up,
        ProjKind::Down,
        ProjKind::Qkv,
        ProjKind::GateUp,
    ];

    /// The seven separate projections of a llama-style layer (every family but Phi-3).
    pub const SEPARATE: [ProjKind; 7] = [
        ProjKind::Q,
        ProjKind::K,
        ProjKind::V,
        ProjKind::O,
        ProjKind::Gate,
        ProjKind::Up,
        ProjKind::Down,
    ];

    /// The HF module name, e.g. `q_proj`.
    pub fn module_name(self) -> &'static str {
        match self {
            ProjKind::Q => "q_proj",
            ProjKind::K => "k_proj",
            ProjKind::V => "v_proj",
            ProjKind::O => "o_proj",
            ProjKind::Gate => "gate_proj",
            ProjKind::Up => "up_proj",
            ProjKind::Down => "down_proj",
            ProjKind::Qkv => "qkv_proj",
            ProjKind::GateUp => "gate_up_proj",
        }
    }

    /// The parent module in a llama decoder layer: `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            ProjKind::Q | ProjKind::K | ProjKind::V | ProjKind::O | ProjKind::Qkv => "self_attn",
            ProjKind::Gate | ProjKind::Up | ProjKind::Down | ProjKind::GateUp => "mlp",
        }
    }

    pub fn from_module_name(name: &str) -> Option<ProjKind> {
        ProjKind::ALL.into_iter().find(|p| p.module_name() == name)
    }
}

impl fmt::Display for ProjKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.module_name())
    }
}

/// A run of consecutive rows that share an adapter (or none).
#[derive(Debug, Clone, Copy)]
pub struct RowGroup<'a> {
    pub start: usize,
    pub len: usize,
    pub adapter: Option<&'a AdapterWeights>,
}

/// How adapters apply to the rows of one forward step.
#[derive(Debug, Clone, Copy)]
pub enum Apply<'a> {
    /// The base weights alone.
    Base,
    /// Unmerged: runs of rows, each with its own adapter or none, covering all rows in order.
    Rows(&'a [RowGroup<'a>]),
    /// Merged: one adapter's merged weights serve every row.
    Merged(&'a MergedWeights),
}

/// What an adapter needs to know of the base model: its projections.
pub trait BaseLinears {
    fn num_layers(&self) -> usize;
    fn linear(&self, layer: usize, kind: ProjKind) -> Option<&AdaptedLinear>;
    /// The serving dtype adapter tensors are stored in.
    fn dtype(&self) -> DType;
}

/// A linear projection `y = x·Wᵀ + b` of one decoder layer.
#[derive(Debug, Clone)]
pub struct AdaptedLinear {
    /// The base weight as checkpoints store it, `[out, in]` (each output a dot product over a
    /// contiguous row, the layout the small-row kernels stream): a dense contiguous tensor, or
    /// a matrix kept in its stored format.
    weight: BaseWeight,
    bias: Option<Tensor>,
    layer: usize,
    kind: ProjKind,
}

impl AdaptedLinear {
    /// `weight` is `[out, in]` as checkpoints store it; `bias` is `[out]`.
    pub fn new(
        weight: &Tensor,
        bias: Option<Tensor>,
        layer: usize,
        kind: ProjKind,
    ) -> Result<Self> {
        Self::with_base(BaseWeight::Dense(weight.contiguous()?), bias, layer, kind)
    }

    /// As [`new`](Self::new), with the weight dense or kept in its stored format.
    pub fn with_base(
        weight: BaseWeight,
        bias: Option<Tensor>,
        layer: usize,
        kind: ProjKind,
    ) -> Result<Self> {
        Ok(Self {
            weight,
            bias,
            layer,
            kind,
        })
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }

    /// `x` is `[rows, in]`; returns `[rows, out]`.
    ///
    /// Unmerged, the base matmul runs once for all rows; each adapter group then adds its
    /// low-rank term and, for DoRA, scales by `g` (the bias is added last and never scaled).
    pub fn forward<'a>(&self, x: &Tensor, apply: Apply<'a>) -> Result<Tensor> {
        if let Apply::Merged(m) = apply {
            if let Some(w) = m.get(self.layer, self.kind) {
                return self.add_bias(w.matmul_t(x)?);
            }
        }
        self.finish(x, self.weight.matmul_t(x)?, apply)
    }

    /// [`forward`](Self::forward) for several projections of one input (a layer's q, k and
    /// v; its gate and up): their base products run together
    /// ([`BaseWeight::matmul_t_many`]), each then takes its adapter terms and bias as alone.
    /// The same outputs as one at a time, bit for bit.
    pub fn forward_many<'a>(
        ls: &[&AdaptedLinear],
        x: &Tensor,
        apply: Apply<'a>,
    ) -> Result<Vec<Tensor>> {
        if matches!(apply, Apply::Merged(_)) {
            // Merged weights stand in for some of the bases: one at a time.
            return ls.iter().map(|l| l.forward(x, apply)).collect();
        }
        let weights: Vec<&BaseWeight> = ls.iter().map(|l| &l.weight).collect();
        let bases = BaseWeight::matmul_t_many(&weights, x)?;
        ls.iter()
            .zip(bases)
            .map(|(l, base)| l.finish(x, base, apply))
            .collect()
    }

    /// The output from the base product `base` of `x`: the adapter terms of the rows (for
    /// unmerged apply) and the bias.
    fn finish<'a>(&self, x: &Tensor, base: Tensor, apply: Apply<'a>) -> Result<Tensor> {
        let Apply::Rows(groups) = apply else {
            return self.add_bias(base);
        };
        let (layer, kind) = (self.layer, self.kind);
        let module = |g: &RowGroup<'a>| g.adapter.and_then(|a| a.get(layer, kind));
        if !groups.iter().any(|g| module(g).is_some()) {
            return self.add_bias(base);
        }
        let fused: Vec<(usize, usize, &LoraModule)> = groups
            .iter()
            .filter_map(|g| module(g).map(|m| (g.start, g.len, m)))
            .collect();
        if let Some(y) = super::fused::unmerged(x, &base, &fused)? {
            return self.add_bias(y);
        }
        let mut pieces = Vec::with_capacity(groups.len());
        for g in groups {
            let rows = base.narrow(0, g.start, g.len)?;
            pieces.push(match module(g) {
                None => rows,
                Some(m) => apply_module(m, &rows, &x.narrow(0, g.start, g.len)?)?,
            });
        }
        self.add_bias(Tensor::cat(&pieces, 0)?)
    }

    /// The plain reference for unmerged [`forward`](Self::forward): one row at a time, each
    /// with its own adapter. Slow; kept to test the grouped path against.
    pub fn forward_reference(
        &self,
        x: &Tensor,
        row_adapters: &[Option<&AdapterWeights>],
    ) -> Result<Tensor> {
        let rows = row_adapters
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let xi = x.narrow(0, i, 1)?;
                let base = match &self.weight {
                    BaseWeight::Dense(w) => xi.matmul(&w.t()?)?,
                    BaseWeight::Stored(_) => xi.matmul(&self.weight.to_f32()?.t()?)?,
                };
                let y = match a.and_then(|a| a.get(self.layer, self.kind)) {
                    None => base,
                    Some(m) => apply_module(m, &base, &xi)?,
                };
                self.add_bias(y)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    }

    /// `W' = g ⊙_rows (W0 + s·B·A)`, `[out, in]`, computed in f32: in the serving dtype over
    /// a dense base, in f32 over a stored one (never requantized to the stored format). The
    /// base weight is not touched.
    pub fn merged_weight(&self, m: &LoraModule) -> Result<Tensor> {
        let w0 = match &self.weight {
            BaseWeight::Dense(w) => std::borrow::Cow::Borrowed(w),
            BaseWeight::Stored(_) => std::borrow::Cow::Owned(self.weight.to_f32()?),
        };
        if let Some(w) = super::fused::merged(&w0, m)? {
            return Ok(w);
        }
        self.merged_weight_reference(m)
    }

    /// [`merged_weight`](Self::merged_weight) with tensor ops, on any device: the reference
    /// for the fused CPU path.
    pub fn merged_weight_reference(&self, m: &LoraModule) -> Result<Tensor> {
        let w = (self.weight.to_f32()? + m.delta_weight()?)?;
        let w = match m.g() {
            Some(g) => w.broadcast_mul(&g.to_dtype(DType::F32)?.unsqueeze(1)?)?,
            None => w,
        };
        w.to_dtype(self.weight.dtype())
    }

    /// The base weight, `[out, in]`, as stored.
    pub fn weight(&self) -> &BaseWeight {
        &self.weight
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims().1
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims().0
    }

    pub fn layer(&self) -> usize {
        self.layer
    }

    pub fn kind(&self) -> ProjKind {
        self.kind
    }
}

/// `g ⊙ (base + s·(x·Aᵀ)·Bᵀ)` for one group of rows (`g = 1` for plain LoRA).
fn apply_module(m: &LoraModule, base: &Tensor, x: &Tensor) -> Result<Tensor> {
    let y = (base + m.delta(x)?)?;
    match m.g() {
        Some(g) => y.broadcast_mul(g),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ops::StoredMatrix;
    use candle_core::quantized::GgmlDType;
    use candle_core::Device;

    /// Projections of one input run together exactly as alone: stored q, k and v with a
    /// bias on one, unmerged with DoRA on q, plain LoRA on v, none on k and a base row
    /// between the adapted runs; merged for one of them; and the base alone.
    #[test]
    fn projections_of_one_input_together_equal_each_alone_bit_for_bit() {
        let dev = Device::Cpu;
        let k = 256;
        let stored = |n: usize, dtype: GgmlDType| {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            BaseWeight::Stored(Arc::new(StoredMatrix::quantize(&w, dtype).unwrap()))
        };
        let bias = Tensor::randn(0f32, 1.0, 32, &dev).unwrap();
        let q = AdaptedLinear::with_base(stored(64, GgmlDType::Q4K), None, 0, ProjKind::Q);
        let kp = AdaptedLinear::with_base(stored(32, GgmlDType::Q8_0), Some(bias), 0, ProjKind::K);
        let v = AdaptedLinear::with_base(stored(32, GgmlDType::Q6K), None, 0, ProjKind::V);
        let (q, kp, v) = (q.unwrap(), kp.unwrap(), v.unwrap());
        let module = |n: usize, dora: bool| {
            let a = Tensor::randn(0f32, 0.1, (8, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.1, (n, 8), &dev).unwrap();
            let g = Tensor::rand(0.5f32, 1.5, n, &dev).unwrap();
            LoraModule::new(&a, &b, 2.0, dora.then_some(&g), DType::F32).unwrap()
        };
        let mut adapter = AdapterWeights::new(1, 1);
        adapter.insert(0, ProjKind::Q, module(64, true));
        adapter.insert(0, ProjKind::V, module(32, false));
        let mut merged = MergedWeights::new(1, 1);
        merged.insert(
            0,
            ProjKind::V,
            BaseWeight::Dense(v.weight().to_f32().unwrap()),
        );
        for m in [1, 5, 16] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let groups = [
                RowGroup {
                    start: 0,
                    len: m / 2,
                    adapter: Some(&adapter),
                },
                RowGroup {
                    start: m / 2,
                    len: 1,
                    adapter: None,
                },
                RowGroup {
                    start: m / 2 + 1,
                    len: m - m / 2 - 1,
                    adapter: Some(&adapter),
                },
            ];
            let groups: Vec<RowGroup> = groups.into_iter().filter(|g| g.len > 0).collect();
            for apply in [Apply::Base, Apply::Rows(&groups), Apply::Merged(&merged)] {
                let together = AdaptedLinear::forward_many(&[&q, &kp, &v], &x, apply).unwrap();
                for (l, y) in [&q, &kp, &v].into_iter().zip(&together) {
                    let alone = l.forward(&x, apply).unwrap();
                    let (a, b) = (
                        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    );
                    assert_eq!(a.len(), b.len());
                    assert!(
                        a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{:?} {m} rows, {apply:?}",
                        l.kind()
                    );
                }
            }
        }
    }
}

//! [`AdaptedLinear`]: the one linear type every projection of the model uses.
//!
//! It holds the base weight and bias and is identified by `(layer, ProjKind)`, the key under
//! which adapter modules attach to it. The adapter paths (unmerged per-row groups, merged
//! weights) hang off this type so that adapters never require a copy of the model.

use std::fmt;

use candle_core::{Result, Tensor};

/// The seven llama projections an adapter may target, named as in HF module paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProjKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl ProjKind {
    pub const ALL: [ProjKind; 7] = [
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
        }
    }

    /// The parent module in a llama decoder layer: `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            ProjKind::Q | ProjKind::K | ProjKind::V | ProjKind::O => "self_attn",
            ProjKind::Gate | ProjKind::Up | ProjKind::Down => "mlp",
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

/// A linear projection `y = x·Wᵀ + b` of one decoder layer.
#[derive(Debug, Clone)]
pub struct AdaptedLinear {
    /// The base weight transposed and contiguous, `[in, out]`. candle's gemm runs faster on
    /// this layout than on a transposed view of `[out, in]` at the small row counts of decode.
    weight_t: Tensor,
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
        let weight_t = weight.t()?.contiguous()?;
        Ok(Self {
            weight_t,
            bias,
            layer,
            kind,
        })
    }

    /// `x` is `[rows, in]`; returns `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight_t)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The base weight as `[out, in]` (a transposed view, no copy).
    pub fn weight(&self) -> Result<Tensor> {
        self.weight_t.t()
    }

    pub fn in_dim(&self) -> usize {
        self.weight_t.dims()[0]
    }

    pub fn out_dim(&self) -> usize {
        self.weight_t.dims()[1]
    }

    pub fn layer(&self) -> usize {
        self.layer
    }

    pub fn kind(&self) -> ProjKind {
        self.kind
    }
}

//! Adapter tensors as the linear layer consumes them, and the DoRA math on them.
//!
//! PEFT's definitions (the reference), for base weight `W0` `[out, in]`, `A` `[r, in]`,
//! `B` `[out, r]`, scale `s` and magnitude `m` `[out]`:
//! `n = ‖W0 + s·B·A‖` per output row, `g = m / n`;
//! unmerged `y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b`; merged `W' = g ⊙_rows (W0 + s·B·A)`.
//! Plain LoRA is `g = 1`.

use candle_core::{DType, Result, Tensor, D};

use super::small_matmul::matmul;
use super::ProjKind;

/// One adapted module, ready for the unmerged path: `A` transposed `[in, r]`, `s·Bᵀ` `[r, out]`
/// (the scale folded in at load), and for DoRA the output scale `g` `[out]`.
#[derive(Debug, Clone)]
pub struct LoraModule {
    a_t: Tensor,
    b_t: Tensor,
    g: Option<Tensor>,
    rank: usize,
}

impl LoraModule {
    /// From f32 `a` `[r, in]`, `b` `[out, r]`, `scale`, and `g` `[out]` for DoRA; stored in `dtype`.
    pub fn new(
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        g: Option<&Tensor>,
        dtype: DType,
    ) -> Result<Self> {
        let rank = a.dim(0)?;
        Ok(Self {
            a_t: a.t()?.contiguous()?.to_dtype(dtype)?,
            b_t: (b.t()? * scale)?.contiguous()?.to_dtype(dtype)?,
            g: g.map(|g| g.to_dtype(dtype)).transpose()?,
            rank,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn is_dora(&self) -> bool {
        self.g.is_some()
    }

    /// The DoRA output scale `g = m / ‖W0 + s·B·A‖`, `[out]`.
    pub fn g(&self) -> Option<&Tensor> {
        self.g.as_ref()
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        let n = self.a_t.elem_count()
            + self.b_t.elem_count()
            + self.g.as_ref().map_or(0, |g| g.elem_count());
        n * self.a_t.dtype().size_in_bytes()
    }

    /// `s·(x·Aᵀ)·Bᵀ` for rows `x` `[n, in]`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        matmul(&matmul(x, &self.a_t)?, &self.b_t)
    }

    /// `s·B·A` transposed, `[in, out]`, in f32.
    pub fn delta_weight_t(&self) -> Result<Tensor> {
        self.a_t
            .to_dtype(DType::F32)?
            .matmul(&self.b_t.to_dtype(DType::F32)?)
    }
}

/// `‖W0 + s·B·A‖` per output row without forming `W0 + s·B·A`:
/// `n_i² = ‖W0_i‖² + 2s·B_i·(A·W0_iᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ` (cost `out·in·r`).
/// All f32: `w0_t` `[in, out]`, `a` `[r, in]`, `b` `[out, r]`; returns `[out]`.
pub fn dora_norm(w0_t: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let row_sq = w0_t.sqr()?.sum(0)?; // [out]
    let b_t = b.t()?.contiguous()?; // [r, out]
    let aw = a.matmul(w0_t)?; // [r, out] = A·W0ᵀ
    let cross = (&b_t * &aw)?.sum(0)?;
    let aat = a.matmul(&a.t()?)?; // [r, r]
    let quad = (aat.matmul(&b_t)? * &b_t)?.sum(0)?;
    let sq = ((row_sq + (cross * (2.0 * scale))?)? + (quad * (scale * scale))?)?;
    // Rounding can push a zero norm slightly negative.
    sq.relu()?.sqrt()
}

/// The reference for [`dora_norm`]: form `W0 + s·B·A` and take its row norms. `w0` is `[out, in]`.
pub fn dora_norm_reference(w0: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let v = (w0 + (b.matmul(a)? * scale)?)?;
    v.sqr()?.sum(D::Minus1)?.sqrt()
}

/// An adapter's modules, looked up by `(layer, projection)`.
#[derive(Debug, Clone)]
pub struct AdapterWeights {
    /// Unique per loaded instance: a reloaded adapter gets a new id, so merged weights and
    /// running requests can tell versions apart.
    id: u64,
    modules: Vec<Option<LoraModule>>,
}

fn slot(layer: usize, kind: ProjKind) -> usize {
    layer * ProjKind::ALL.len() + kind as usize
}

impl AdapterWeights {
    pub fn new(id: u64, num_layers: usize) -> Self {
        Self {
            id,
            modules: vec![None; num_layers * ProjKind::ALL.len()],
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn insert(&mut self, layer: usize, kind: ProjKind, module: LoraModule) {
        self.modules[slot(layer, kind)] = Some(module);
    }

    pub fn get(&self, layer: usize, kind: ProjKind) -> Option<&LoraModule> {
        self.modules.get(slot(layer, kind)).and_then(Option::as_ref)
    }

    /// Every adapted module with its `(layer, projection)`.
    pub fn iter(&self) -> impl Iterator<Item = (usize, ProjKind, &LoraModule)> {
        let n = ProjKind::ALL.len();
        self.modules
            .iter()
            .enumerate()
            .filter_map(move |(i, m)| m.as_ref().map(|m| (i / n, ProjKind::ALL[i % n], m)))
    }

    pub fn bytes(&self) -> usize {
        self.iter().map(|(_, _, m)| m.bytes()).sum()
    }
}

/// An adapter merged into the base: `W'ᵀ` `[in, out]` for each module it targets; the other
/// modules keep using the base weights. Lives apart from the base, so several can exist.
#[derive(Debug, Clone)]
pub struct MergedWeights {
    adapter_id: u64,
    weights: Vec<Option<Tensor>>,
}

impl MergedWeights {
    pub fn new(adapter_id: u64, num_layers: usize) -> Self {
        Self {
            adapter_id,
            weights: vec![None; num_layers * ProjKind::ALL.len()],
        }
    }

    /// The [`AdapterWeights::id`] these were merged from.
    pub fn adapter_id(&self) -> u64 {
        self.adapter_id
    }

    pub fn insert(&mut self, layer: usize, kind: ProjKind, weight_t: Tensor) {
        self.weights[slot(layer, kind)] = Some(weight_t);
    }

    pub fn get(&self, layer: usize, kind: ProjKind) -> Option<&Tensor> {
        self.weights.get(slot(layer, kind)).and_then(Option::as_ref)
    }

    pub fn bytes(&self) -> usize {
        self.weights
            .iter()
            .flatten()
            .map(|w| w.elem_count() * w.dtype().size_in_bytes())
            .sum()
    }
}

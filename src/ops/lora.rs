//! Adapter tensors as the linear layer consumes them, and the DoRA math on them.
//!
//! PEFT's definitions (the reference), for base weight `W0` `[out, in]`, `A` `[r, in]`,
//! `B` `[out, r]`, scale `s` and magnitude `m` `[out]`:
//! `n = ‖W0 + s·B·A‖` per output row, `g = m / n`;
//! unmerged `y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b`; merged `W' = g ⊙_rows (W0 + s·B·A)`.
//! Plain LoRA is `g = 1`.

use candle_core::{DType, Result, Tensor, D};

use super::small_matmul::matmul_t;
use super::BaseWeight;
use super::ProjKind;

/// One adapted module, ready for the unmerged path: `A` `[r, in]`, `s·Bᵀ` `[r, out]` (the
/// scale folded in at load; rows of `out` values, which the fused unmerged path adds in
/// contiguous passes), and for DoRA the output scale `g` `[out]`.
#[derive(Debug, Clone)]
pub struct LoraModule {
    a: Tensor,
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
            a: a.contiguous()?.to_dtype(dtype)?,
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
        let n = self.a.elem_count()
            + self.b_t.elem_count()
            + self.g.as_ref().map_or(0, |g| g.elem_count());
        n * self.a.dtype().size_in_bytes()
    }

    /// `s·(x·Aᵀ)·Bᵀ` for rows `x` `[n, in]`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        matmul_t(x, &self.a)?.matmul(&self.b_t)
    }

    /// `s·B·A`, `[out, in]`, in f32.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b_t
            .to_dtype(DType::F32)?
            .t()?
            .matmul(&self.a.to_dtype(DType::F32)?)
    }

    /// `A` `[r, in]`, `s·Bᵀ` `[r, out]` and `g` `[out]` as stored.
    pub(super) fn parts(&self) -> (&Tensor, &Tensor, Option<&Tensor>) {
        (&self.a, &self.b_t, self.g.as_ref())
    }
}

/// `‖W0 + s·B·A‖` per output row, `[out]`, all f32: `w0` `[out, in]`, `a` `[r, in]`, `b`
/// `[out, r]`, through the identity
/// `n_i² = ‖W0_i‖² + 2s·B_i·(A·W0_iᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ`, which never forms `W0 + s·B·A`.
///
/// `A·W0ᵀ` is an `r`-row product, the decode kernel's shape: on the CPU it streams `W0` once
/// in register tiles, and the rest is `O(out·r²)`, summed in f64. criterion `dora_norm` at
/// 576×1536: 0.56 ms at r16 (forming `W0 + s·B·A` a row at a time took 1.32 ms, with tensor
/// ops 3.5 ms); a whole SmolLM2 r16 adapter loads in 134 ms (was 224). Adapter loads run beside decoding,
/// so their cost is decode's loss. [`dora_norm_reference`] forms the matrix as PEFT does.
pub fn dora_norm(w0: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let (out, inp) = w0.dims2()?;
    let (r, inp2) = a.dims2()?;
    if b.dims() != [out, r] || inp != inp2 {
        candle_core::bail!(
            "dora_norm: shapes {:?} {:?} {:?} do not chain",
            w0.dims(),
            a.dims(),
            b.dims()
        );
    }
    if !(super::kernels::fast_on(w0.device()) && [w0, a, b].iter().all(|t| t.dtype() == DType::F32))
    {
        return dora_norm_generic(w0, a, b, scale);
    }
    let a = a.contiguous()?;
    let aw = matmul_t(&a, &w0.contiguous()?)?
        .flatten_all()?
        .to_vec1::<f32>()?; // [r, out]
    let aat = a.matmul(&a.t()?)?.flatten_all()?.to_vec1::<f32>()?; // [r, r]
    let b = b.flatten_all()?.to_vec1::<f32>()?; // [out, r]
    let w0 = w0.contiguous()?;
    let row_sq = match super::cpu::view(&w0) {
        Some(v) => row_squares(v.values(), inp),
        None => row_squares(&w0.flatten_all()?.to_vec1::<f32>()?, inp),
    };
    let mut t = vec![0f32; r];
    let mut norms = Vec::with_capacity(out);
    for (o, bo) in b.chunks_exact(r).enumerate() {
        // t = B_i·(A·Aᵀ) in f32 (vectorised over l), then the two dot products in f64.
        t.fill(0.0);
        for (&bj, m_row) in bo.iter().zip(aat.chunks_exact(r)) {
            for (tl, &m) in t.iter_mut().zip(m_row) {
                *tl += bj * m;
            }
        }
        let (mut cross, mut quad) = (0f64, 0f64);
        for j in 0..r {
            cross += bo[j] as f64 * aw[j * out + o] as f64;
            quad += bo[j] as f64 * t[j] as f64;
        }
        let sq = row_sq[o] as f64 + 2.0 * scale * cross + scale * scale * quad;
        norms.push(sq.max(0.0).sqrt() as f32);
    }
    Tensor::from_vec(norms, out, &candle_core::Device::Cpu)
}

simd_dispatch!(
    /// `Σ_j w[i, j]²` for each row of `w` (`inp` values per row), in 16 partial sums.
    fn row_squares(w: &[f32], inp: usize) -> Vec<f32> = row_squares_plain
);

/// Plain loops, no closures: a closure is compiled as a function of its own, without the
/// target features of the function it sits in, and its `mul_add` became a libm call.
#[inline(always)]
fn row_squares_plain(w: &[f32], inp: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.len() / inp.max(1));
    for row in w.chunks_exact(inp) {
        let mut acc = [0f32; 16];
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            for l in 0..16 {
                acc[l] = c[l].mul_add(c[l], acc[l]);
            }
        }
        let mut sum = 0f32;
        for x in chunks.remainder() {
            sum = x.mul_add(*x, sum);
        }
        for x in acc {
            sum += x;
        }
        out.push(sum);
    }
    out
}

/// The reference for [`dora_norm`]: form `W0 + s·B·A` and take its row norms. `w0` is `[out, in]`.
/// [`dora_norm`] in candle tensor ops only, through the same identity: what other devices
/// and dtypes run (the CPU's f32 path above is row by row).
pub fn dora_norm_generic(w0: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let row_sq = w0.sqr()?.sum(1)?; // [out]
    let wa = w0.matmul(&a.t()?)?; // [out, r] = W0·Aᵀ
    let cross = (b * &wa)?.sum(1)?;
    let aat = a.matmul(&a.t()?)?; // [r, r]
    let quad = (b.matmul(&aat)? * b)?.sum(1)?;
    let sq = ((row_sq + (cross * (2.0 * scale))?)? + (quad * (scale * scale))?)?;
    // Rounding can push a zero norm slightly negative.
    sq.relu()?.sqrt()
}

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

/// An adapter merged into the base: `W'` `[out, in]` for each module it targets; the other
/// modules keep using the base weights. Lives apart from the base, so several can exist.
#[derive(Debug, Clone)]
pub struct MergedWeights {
    adapter_id: u64,
    weights: Vec<Option<BaseWeight>>,
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

    pub fn insert(&mut self, layer: usize, kind: ProjKind, weight: BaseWeight) {
        self.weights[slot(layer, kind)] = Some(weight);
    }

    pub fn get(&self, layer: usize, kind: ProjKind) -> Option<&BaseWeight> {
        self.weights.get(slot(layer, kind)).and_then(Option::as_ref)
    }

    pub fn bytes(&self) -> usize {
        self.weights.iter().flatten().map(BaseWeight::bytes).sum()
    }
}

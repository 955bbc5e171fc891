//! Adapter tensors as the linear layer consumes them, and the DoRA math on them.
//!
//! PEFT's definitions (the reference), for base weight `W0` `[out, in]`, `A` `[r, in]`,
//! `B` `[out, r]`, scale `s` and magnitude `m` `[out]`:
//! `n = ‖W0 + s·B·A‖` per output row, `g = m / n`;
//! unmerged `y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b`; merged `W' = g ⊙_rows (W0 + s·B·A)`.
//! Plain LoRA is `g = 1`.

use candle_core::{DType, Result, Tensor, D};

use super::small_matmul::matmul_t;
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
/// `[out, r]`.
///
/// On the CPU one row of `W0 + s·B·A` at a time is formed in a buffer of `in` floats and its
/// norm taken, on the calling thread: an adapter load runs beside decoding, and candle's
/// parallel elementwise ops over whole `[out, in]` temporaries made loads cost 1–3 s while
/// both cores decoded. Elsewhere the identity
/// `n_i² = ‖W0_i‖² + 2s·B_i·(A·W0_iᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ` (no `[out, in]` temporary).
pub fn dora_norm(w0: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    if w0.device().is_cpu() && [w0, a, b].iter().all(|t| t.dtype() == DType::F32) {
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
        let w0 = w0.flatten_all()?.to_vec1::<f32>()?;
        let a = a.flatten_all()?.to_vec1::<f32>()?;
        let b = b.flatten_all()?.to_vec1::<f32>()?;
        let norms = row_norms(&w0, &a, &b, scale as f32, inp, r);
        return Tensor::from_vec(norms, out, &candle_core::Device::Cpu);
    }
    let row_sq = w0.sqr()?.sum(1)?; // [out]
    let wa = w0.matmul(&a.t()?)?; // [out, r] = W0·Aᵀ
    let cross = (b * &wa)?.sum(1)?;
    let aat = a.matmul(&a.t()?)?; // [r, r]
    let quad = (b.matmul(&aat)? * b)?.sum(1)?;
    let sq = ((row_sq + (cross * (2.0 * scale))?)? + (quad * (scale * scale))?)?;
    // Rounding can push a zero norm slightly negative.
    sq.relu()?.sqrt()
}

fn row_norms(w0: &[f32], a: &[f32], b: &[f32], s: f32, inp: usize, r: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { row_norms_avx512(w0, a, b, s, inp, r) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { row_norms_avx2(w0, a, b, s, inp, r) };
        }
    }
    row_norms_plain(w0, a, b, s, inp, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_norms_avx512(
    w0: &[f32],
    a: &[f32],
    b: &[f32],
    s: f32,
    inp: usize,
    r: usize,
) -> Vec<f32> {
    row_norms_plain(w0, a, b, s, inp, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_norms_avx2(
    w0: &[f32],
    a: &[f32],
    b: &[f32],
    s: f32,
    inp: usize,
    r: usize,
) -> Vec<f32> {
    row_norms_plain(w0, a, b, s, inp, r)
}

/// Plain loops, no closures: a closure is compiled as a function of its own, without the
/// target features of the function it sits in, and its `mul_add` became a libm call.
#[inline(always)]
fn row_norms_plain(w0: &[f32], a: &[f32], b: &[f32], s: f32, inp: usize, r: usize) -> Vec<f32> {
    let mut v = vec![0f32; inp];
    let mut norms = Vec::with_capacity(b.len() / r.max(1));
    for (w_row, b_row) in w0.chunks_exact(inp).zip(b.chunks_exact(r)) {
        v.copy_from_slice(w_row);
        for (&bj, a_row) in b_row.iter().zip(a.chunks_exact(inp)) {
            let c = s * bj;
            for (vi, &ai) in v.iter_mut().zip(a_row) {
                *vi = c.mul_add(ai, *vi);
            }
        }
        // Sixteen partial sums: vectorisable, and closer to a pairwise sum than one chain.
        let mut acc = [0f32; 16];
        let mut chunks = v.chunks_exact(16);
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
        norms.push(sum.sqrt());
    }
    norms
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

/// An adapter merged into the base: `W'` `[out, in]` for each module it targets; the other
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

    pub fn insert(&mut self, layer: usize, kind: ProjKind, weight: Tensor) {
        self.weights[slot(layer, kind)] = Some(weight);
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

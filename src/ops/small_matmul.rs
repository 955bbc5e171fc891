//! `x·W` for the few rows of a decode step, on the CPU.
//!
//! candle's gemm is built for large matrices: at 1–16 rows it runs far below memory bandwidth
//! (DESIGN.md §5), and decode is nothing but such matmuls. This kernel streams the weight once,
//! `[in, out]` row by row, into per-row accumulators held in L1, split over column blocks that
//! run on rayon's threads. Each output is summed over `k` in order, so results equal a plain
//! loop's up to float rounding. Anything it does not cover (other devices, dtypes, layouts,
//! larger row counts) goes to candle's matmul, which stays the reference.

use candle_core::{DType, Result, Storage, Tensor};
use rayon::prelude::*;

/// Up to this many rows the kernel beats candle's gemm on this machine (see the criterion
/// benchmark `small_matmul`).
pub const MAX_ROWS: usize = 16;

/// Columns per task: 8 rows of accumulators stay within L1.
const COL_BLOCK: usize = 256;

/// `x` `[m, k]` times `w_t` `[k, n]`, with the kernel when it applies.
pub fn matmul(x: &Tensor, w_t: &Tensor) -> Result<Tensor> {
    match small_m(x, w_t)? {
        Some(y) => Ok(y),
        None => x.matmul(w_t),
    }
}

fn cpu_f32(t: &Tensor) -> Option<(impl std::ops::Deref<Target = Storage> + '_, usize)> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, _) = layout.contiguous_offsets()?;
    Some((storage, start))
}

fn small_m(x: &Tensor, w_t: &Tensor) -> Result<Option<Tensor>> {
    let (Ok((m, k)), Ok((k2, n))) = (x.dims2(), w_t.dims2()) else {
        return Ok(None);
    };
    if m == 0 || m > MAX_ROWS || k != k2 {
        return Ok(None);
    }
    let (Some((xs, xo)), Some((ws, wo))) = (cpu_f32(x), cpu_f32(w_t)) else {
        return Ok(None);
    };
    let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*xs, &*ws) else {
        return Ok(None);
    };
    let x = &xs.as_slice::<f32>()?[xo..xo + m * k];
    let w = &ws.as_slice::<f32>()?[wo..wo + k * n];
    let mut blocks: Vec<(usize, Vec<f32>)> = (0..n)
        .step_by(COL_BLOCK)
        .map(|c0| (c0, vec![0f32; m * COL_BLOCK.min(n - c0)]))
        .collect();
    let run = |(c0, acc): &mut (usize, Vec<f32>)| {
        let width = acc.len() / m;
        kernel(x, w, m, k, n, *c0, width, acc);
    };
    if blocks.len() > 1 {
        blocks.par_iter_mut().for_each(run);
    } else {
        blocks.iter_mut().for_each(run);
    }
    let mut y = vec![0f32; m * n];
    for (c0, acc) in &blocks {
        let width = acc.len() / m;
        for r in 0..m {
            y[r * n + c0..r * n + c0 + width].copy_from_slice(&acc[r * width..(r + 1) * width]);
        }
    }
    Ok(Some(Tensor::from_vec(
        y,
        (m, n),
        &candle_core::Device::Cpu,
    )?))
}

/// Accumulate `acc[r, j] = Σ_k x[r, k] · w[k, c0 + j]` for `j < width`.
#[allow(clippy::too_many_arguments)]
fn kernel(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    width: usize,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if fma_available() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
            unsafe { kernel_avx2(x, w, m, k, n, c0, width, acc) };
            return;
        }
    }
    kernel_plain(x, w, m, k, n, c0, width, acc)
}

#[cfg(target_arch = "x86_64")]
fn fma_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx2(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    width: usize,
    acc: &mut [f32],
) {
    // The same loop as `kernel_plain`: compiled with AVX2/FMA enabled, `mul_add` over
    // contiguous slices vectorises to fused multiply-adds.
    kernel_plain(x, w, m, k, n, c0, width, acc)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kernel_plain(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    width: usize,
    acc: &mut [f32],
) {
    for kk in 0..k {
        let w_row = &w[kk * n + c0..kk * n + c0 + width];
        for r in 0..m {
            let a = x[r * k + kk];
            let out = &mut acc[r * width..(r + 1) * width];
            for (o, &wv) in out.iter_mut().zip(w_row) {
                *o = a.mul_add(wv, *o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_candle_matmul_for_every_small_shape() {
        for (m, k, n) in [
            (1, 32, 64),
            (3, 64, 700),
            (8, 576, 1536),
            (16, 17, 5),
            (2, 1, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu).unwrap();
            let fast = small_m(&x, &w).unwrap().expect("kernel applies");
            let reference = x.matmul(&w).unwrap();
            let diff = (fast - &reference)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff <= 1e-4 * (k as f32).sqrt(), "{m}x{k}x{n}: {diff}");
        }
    }

    #[test]
    fn falls_back_where_it_does_not_apply() {
        let x = Tensor::randn(0f32, 1.0, (MAX_ROWS + 1, 8), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (8, 4), &Device::Cpu).unwrap();
        assert!(small_m(&x, &w).unwrap().is_none());
        let x16 = x.narrow(0, 0, 2).unwrap().to_dtype(DType::F16).unwrap();
        assert!(small_m(&x16, &w.to_dtype(DType::F16).unwrap())
            .unwrap()
            .is_none());
        // A transposed (non-contiguous) weight view is left to candle too.
        let wt = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu).unwrap();
        assert!(small_m(&x.narrow(0, 0, 2).unwrap(), &wt.t().unwrap())
            .unwrap()
            .is_none());
        assert_eq!(matmul(&x, &w).unwrap().dims(), &[MAX_ROWS + 1, 4]);
    }
}

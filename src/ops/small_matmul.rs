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

/// Up to this many output columns, threads split the inner dimension (each streams one
/// contiguous slab of the weight into its own full-width accumulators, summed at the end);
/// wider outputs (the lm_head) split the columns into one wide block per thread.
const K_SPLIT_MAX_N: usize = 8192;

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

fn ranges(len: usize, parts: usize, align: usize) -> Vec<(usize, usize)> {
    let step = len.div_ceil(parts).div_ceil(align) * align;
    (0..len)
        .step_by(step.max(1))
        .map(|a| (a, (a + step).min(len)))
        .collect()
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
    let threads = rayon::current_num_threads().max(1);
    // Small problems are not worth a thread hand-off.
    let parallel = threads > 1 && k * n >= 1 << 15;
    let y = if !parallel {
        let mut acc = vec![0f32; m * n];
        kernel(x, w, m, k, n, (0, k), (0, n), &mut acc);
        acc
    } else if n <= K_SPLIT_MAX_N {
        let partials: Vec<Vec<f32>> = ranges(k, threads, 4)
            .into_par_iter()
            .map(|kr| {
                let mut acc = vec![0f32; m * n];
                kernel(x, w, m, k, n, kr, (0, n), &mut acc);
                acc
            })
            .collect();
        let mut it = partials.into_iter();
        let mut y = it.next().unwrap_or_else(|| vec![0f32; m * n]);
        for p in it {
            y.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
        }
        y
    } else {
        let blocks: Vec<((usize, usize), Vec<f32>)> = ranges(n, threads, 16)
            .into_par_iter()
            .map(|cr| {
                let mut acc = vec![0f32; m * (cr.1 - cr.0)];
                kernel(x, w, m, k, n, (0, k), cr, &mut acc);
                (cr, acc)
            })
            .collect();
        let mut y = vec![0f32; m * n];
        for ((c0, c1), acc) in blocks {
            let width = c1 - c0;
            for r in 0..m {
                y[r * n + c0..r * n + c1].copy_from_slice(&acc[r * width..(r + 1) * width]);
            }
        }
        y
    };
    Ok(Some(Tensor::from_vec(
        y,
        (m, n),
        &candle_core::Device::Cpu,
    )?))
}

/// Accumulate `acc[r, j] += Σ_{k0 ≤ kk < k1} x[r, kk] · w[kk, c0 + j]` for `c0 + j < c1`.
#[allow(clippy::too_many_arguments)]
fn kernel(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    kr: (usize, usize),
    cr: (usize, usize),
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if fma_available() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
            unsafe { kernel_avx2(x, w, m, k, n, kr, cr, acc) };
            return;
        }
    }
    kernel_plain(x, w, m, k, n, kr, cr, acc)
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
    kr: (usize, usize),
    cr: (usize, usize),
    acc: &mut [f32],
) {
    // The same loop as `kernel_plain`: compiled with AVX2/FMA enabled, `mul_add` over
    // contiguous slices vectorises to fused multiply-adds.
    kernel_plain(x, w, m, k, n, kr, cr, acc)
}

/// Columns per tile when several rows share the weight: their accumulators then stay in L1.
const ROW_TILE_COLS: usize = 512;

/// Four weight rows at a time, so each accumulator is loaded and stored once per four
/// multiply-adds; the weight streams through once, row after row (one row, all columns) or
/// tile by tile (several rows).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kernel_plain(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    kr: (usize, usize),
    cr: (usize, usize),
    acc: &mut [f32],
) {
    let width = cr.1 - cr.0;
    let tile = if m == 1 { width.max(1) } else { ROW_TILE_COLS };
    let mut t0 = cr.0;
    while t0 < cr.1 {
        let t1 = (t0 + tile).min(cr.1);
        tile_kernel(x, w, m, k, n, kr, (t0, t1), acc, width, t0 - cr.0);
        t0 = t1;
    }
}

/// `acc[r * stride + off + j] += Σ_kk x[r, kk] · w[kk, t0 + j]` for the tile `t0..t1`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_kernel(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    kr: (usize, usize),
    (t0, t1): (usize, usize),
    acc: &mut [f32],
    stride: usize,
    off: usize,
) {
    let width = t1 - t0;
    let row = |kk: usize| &w[kk * n + t0..kk * n + t1];
    let mut kk = kr.0;
    while kk + 4 <= kr.1 {
        let (w0, w1, w2, w3) = (row(kk), row(kk + 1), row(kk + 2), row(kk + 3));
        for r in 0..m {
            let xr = &x[r * k + kk..r * k + kk + 4];
            let (a0, a1, a2, a3) = (xr[0], xr[1], xr[2], xr[3]);
            let out = &mut acc[r * stride + off..r * stride + off + width];
            for j in 0..width {
                out[j] = a3.mul_add(
                    w3[j],
                    a2.mul_add(w2[j], a1.mul_add(w1[j], a0.mul_add(w0[j], out[j]))),
                );
            }
        }
        kk += 4;
    }
    while kk < kr.1 {
        let w0 = row(kk);
        for r in 0..m {
            let a0 = x[r * k + kk];
            let out = &mut acc[r * stride + off..r * stride + off + width];
            for (o, &wv) in out.iter_mut().zip(w0) {
                *o = a0.mul_add(wv, *o);
            }
        }
        kk += 1;
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

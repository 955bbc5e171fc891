//! Flash-style causal attention for prefill chunks on the CPU: per query head and block of
//! [`BQ`] query rows, keys in blocks of [`BK`] with an online softmax, windows and soft-caps
//! as [`Scores`] says; parts on the pool.

use candle_core::{Result, Tensor};

use super::{with_views, Scores};
use crate::ops::cpu::Out;

/// Query rows per part of [`prefill`].
pub const BQ: usize = 16;
/// Keys per block of [`prefill`]'s online softmax.
pub const BK: usize = 64;
/// Lanes of [`prefill`]'s reductions (one AVX-512 register of f32).
const LANES: usize = 16;

/// Causal `softmax(q·kᵀ · scale)·v` for a prefill chunk: `q` `[heads, len, hd]` whose row `i`
/// sits at absolute position `pos + i`, over `k`, `v` `[kv_heads, pos + len − key_start, hd]`
/// (rows contiguous, any head stride: the KV cache's views, first row at `sc.key_start`),
/// query head `h` reading kv head `h / (heads / kv_heads)`; row `i` sees keys up to
/// `pos + i`, from the window's start if there is one. Equal to candle's masked softmax and
/// products up to summation order and [`exp`]'s rounding (within 2 ulp of `f32::exp`).
/// `None` where it does not apply (other devices, dtypes, layouts, or head sizes other than
/// 8, 16, 32, 64, 80, 96, 128 and 256).
pub fn prefill(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos: usize,
    sc: &Scores,
) -> Result<Option<Tensor>> {
    let (Ok((nh, len, hd)), Ok((kvh, total, _))) = (q.dims3(), k.dims3()) else {
        return Ok(None);
    };
    if pos < sc.key_start
        || total != pos + len - sc.key_start
        || ![8, 16, 32, 64, 80, 96, 128, 256].contains(&hd)
    {
        return Ok(None);
    }
    let pos_rel = pos - sc.key_start;
    let Some(out) = with_views(q, k, v, |qall, heads_kv| {
        let groups = nh / kvh;
        let blocks = len.div_ceil(BQ);
        // Keys transposed once per call into `[kv_heads, key block, hd, BK]` tiles, zeros past
        // `total`: a key block's scores are `hd` contiguous axpys over one contiguous tile (rows
        // `padded` apart instead thrashed the L1 sets: a power-of-two stride).
        // key block's scores are `hd` contiguous axpys for every part that reads it.
        let padded = total.div_ceil(BK) * BK;
        let mut kt = vec![0f32; kvh * hd * padded];
        for (g, (kg, _)) in heads_kv.iter().enumerate() {
            transpose(
                kg,
                hd,
                total,
                &mut kt[g * hd * padded..(g + 1) * hd * padded],
            );
        }
        let mut out = vec![0f32; nh * len * hd];
        let dst = Out(out.as_mut_ptr());
        // Later query blocks see more keys: hand them out first so the last parts are short.
        let part = |p: usize| {
            let (qb, h) = (blocks - 1 - p / nh, p % nh);
            let (kg, vg) = heads_kv[h / groups];
            let i0 = qb * BQ;
            let rows = BQ.min(len - i0);
            let at = (h * len + i0) * hd;
            // SAFETY: parts write disjoint rows (one head, one query block each) of `out`,
            // which outlives `pool::run`.
            let o = unsafe { dst.slice(at, rows * hd) };
            let keys = pos_rel + i0 + rows;
            let qrows = &qall[at..at + rows * hd];
            let _ = kg;
            let g = h / groups;
            let ktg = &kt[g * hd * padded..(g + 1) * hd * padded];
            let vv = &vg[..keys * hd];
            let rows_at = RowsAt {
                first: pos_rel + i0,
                window: sc.window,
                scale: sc.scale,
                softcap: sc.softcap,
            };
            match hd {
                8 => flash_8(qrows, ktg, vv, &rows_at, o),
                16 => flash_16(qrows, ktg, vv, &rows_at, o),
                32 => flash_32(qrows, ktg, vv, &rows_at, o),
                64 => flash_64(qrows, ktg, vv, &rows_at, o),
                80 => flash_80(qrows, ktg, vv, &rows_at, o),
                96 => flash_96(qrows, ktg, vv, &rows_at, o),
                128 => flash_128(qrows, ktg, vv, &rows_at, o),
                _ => flash_256(qrows, ktg, vv, &rows_at, o),
            }
        };
        crate::ops::pool::run(nh * blocks, &part);
        out
    })?
    else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(
        out,
        (nh, len, hd),
        &candle_core::Device::Cpu,
    )?))
}

macro_rules! flash_for {
    ($($name:ident $plain:ident $hd:literal),*) => {$(
        #[inline(always)]
        fn $plain(
            q: &[f32],
            kt: &[f32],
            v: &[f32],
            at: &RowsAt,
            out: &mut [f32],
        ) {
            flash_part::<$hd>(q, kt, v, at, out)
        }
        simd_dispatch!(
            fn $name(
                q: &[f32],
                kt: &[f32],
                v: &[f32],
                at: &RowsAt,
                out: &mut [f32],
            ) = $plain
        );
    )*};
}
flash_for!(
    flash_8 flash_8_plain 8,
    flash_16 flash_16_plain 16,
    flash_32 flash_32_plain 32,
    flash_64 flash_64_plain 64,
    flash_80 flash_80_plain 80,
    flash_96 flash_96_plain 96,
    flash_128 flash_128_plain 128,
    flash_256 flash_256_plain 256
);

/// Tiles of [`BK`] keys: `kt[(j / BK)·hd·BK + d·BK + j % BK] = k[j·hd + d]` for the `keys`
/// rows of `k`.
fn transpose(k: &[f32], hd: usize, keys: usize, kt: &mut [f32]) {
    for (j, row) in k.chunks_exact(hd).take(keys).enumerate() {
        let tile = &mut kt[(j / BK) * hd * BK + j % BK..];
        for (d, &x) in row.iter().enumerate() {
            tile[d * BK] = x;
        }
    }
}

/// Where a part's query rows sit and how they score: row `i` is at relative position
/// `first + i` (its own key's row), sees keys from `first + i + 1 − window` (or 0), and scores
/// are `q·k · scale`, soft-capped when asked.
pub struct RowsAt {
    first: usize,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
}

/// Query rows that share each key tile and value row in [`flash_part`]: four independent
/// accumulator chains per load (two measured 10.6% of a 512-token SmolLM2 prefill).
const R: usize = 4;

/// One part of [`prefill`]: query rows `q` (`rows × HD`) over the transposed key tiles `kt`
/// (see [`transpose`]; zero past the last key) and the values `v` (`(first + rows) × HD`:
/// every key the last row sees), into `out` (`rows × HD`, zeroed). Plain loops,
/// closure-free, for [`simd_dispatch`]: scores of a key block are one fused axpy per head
/// dimension, the value product one per key into a register-sized accumulator row.
#[inline(always)]
fn flash_part<const HD: usize>(q: &[f32], kt: &[f32], v: &[f32], at: &RowsAt, out: &mut [f32]) {
    let (first, scale) = (at.first, at.scale);
    let rows = out.len() / HD;
    let keys = first + rows;
    // The first key each row sees (a window's start), relative.
    let lo_of = |r: usize| match at.window {
        Some(w) => (first + r + 1).saturating_sub(w),
        None => 0,
    };
    let mut m = [f32::NEG_INFINITY; BQ];
    let mut l = [0f32; BQ];
    // Blocks wholly before the first row's window are seen by no row of the part.
    let mut kb = lo_of(0) / BK * BK;
    while kb < keys {
        let bk = BK.min(keys - kb);
        // Rows in groups of R (the last rows repeated when `rows` is not a multiple): each
        // key tile and value row loaded once feeds R independent accumulator chains. A
        // repeated row computes what its first copy does, from the same state.
        let mut i = 0;
        while i < rows {
            let group: [usize; R] = std::array::from_fn(|r| (i + r).min(rows - 1));
            i += R;
            // Row r sees block entries lo[r]..hi[r]; a row that sees none of this block is
            // left exactly as it was (p = 0 everywhere, correction 1).
            let mut lo = [0usize; R];
            let mut hi = [0usize; R];
            for r in 0..R {
                hi[r] = bk.min((first + group[r] + 1).saturating_sub(kb));
                lo[r] = lo_of(group[r]).saturating_sub(kb).min(hi[r]);
            }
            if (0..R).all(|r| hi[r] == lo[r]) {
                continue;
            }
            let mut s = [[0f32; BK]; R];
            let qs: [&[f32]; R] = std::array::from_fn(|r| &q[group[r] * HD..(group[r] + 1) * HD]);
            scores(&qs, &kt[kb * HD..(kb + BK) * HD], &mut s);
            let mut corr = [1f32; R];
            let mut new_m = [0f32; R];
            let mut new_l = [0f32; R];
            for r in 0..R {
                let (sr, lr, hr) = (&mut s[r], lo[r], hi[r]);
                // Reductions over lanes, so that each loop vectorises (a float reduction in
                // one accumulator cannot be reordered by the compiler).
                for (j, v) in sr.iter_mut().enumerate() {
                    *v = if j >= lr && j < hr {
                        *v * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                if let Some(cap) = at.softcap {
                    for v in sr.iter_mut() {
                        *v = cap * (*v / cap).tanh();
                    }
                }
                let mut lanes = [f32::NEG_INFINITY; LANES];
                for c in 0..BK / LANES {
                    for x in 0..LANES {
                        lanes[x] = lanes[x].max(sr[c * LANES + x]);
                    }
                }
                let mut mx = m[group[r]];
                for x in lanes {
                    mx = mx.max(x);
                }
                for (j, v) in sr.iter_mut().enumerate() {
                    *v = if j >= lr && j < hr { exp(*v - mx) } else { 0.0 };
                }
                let mut lanes = [0f32; LANES];
                for c in 0..BK / LANES {
                    for x in 0..LANES {
                        lanes[x] += sr[c * LANES + x];
                    }
                }
                let sum: f32 = lanes.iter().sum();
                if hr > lr {
                    corr[r] = exp(m[group[r]] - mx);
                    new_m[r] = mx;
                    new_l[r] = l[group[r]] * corr[r] + sum;
                } else {
                    new_m[r] = m[group[r]];
                    new_l[r] = l[group[r]];
                }
            }
            let mut acc = [[0f32; HD]; R];
            for r in 0..R {
                for d in 0..HD {
                    acc[r][d] = out[group[r] * HD + d] * corr[r];
                }
            }
            let n = hi.into_iter().max().unwrap_or(0);
            values(&s, n, &v[kb * HD..(kb + n) * HD], &mut acc);
            for r in 0..R {
                m[group[r]] = new_m[r];
                l[group[r]] = new_l[r];
                out[group[r] * HD..(group[r] + 1) * HD].copy_from_slice(&acc[r]);
            }
        }
        kb += BK;
    }
    for i in 0..rows {
        let inv = 1.0 / l[i];
        for d in 0..HD {
            out[i * HD + d] *= inv;
        }
    }
}

/// The value product of [`R`] rows over `n` keys: `acc[r][d] += Σ_j p[r][j] · v[j·HD + d]`,
/// fused multiply-adds in `j` order.
#[inline(always)]
fn values<const HD: usize>(p: &[[f32; BK]; R], n: usize, v: &[f32], acc: &mut [[f32; HD]; R]) {
    assert!(n <= BK && v.len() == n * HD);
    #[cfg(target_arch = "x86_64")]
    if HD.is_multiple_of(64) && is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, HD is a multiple of 64, and `v` holds n rows of HD.
        unsafe { values_avx512::<HD>(p, n, v, acc) };
        return;
    }
    for j in 0..n {
        let vrow = &v[j * HD..(j + 1) * HD];
        for r in 0..R {
            let pr = p[r][j];
            for d in 0..HD {
                acc[r][d] = pr.mul_add(vrow[d], acc[r][d]);
            }
        }
    }
}

/// [`values`] in 64-column strips with its sixteen accumulators in registers (the plain
/// loop's stayed in memory: a load and a store around every multiply-add).
///
/// # Safety
/// AVX-512F, `HD % 64 == 0`, `n ≤ BK` and `v.len() == n·HD`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn values_avx512<const HD: usize>(
    p: &[[f32; BK]; R],
    n: usize,
    v: &[f32],
    acc: &mut [[f32; HD]; R],
) {
    use std::arch::x86_64::*;
    for c in (0..HD).step_by(64) {
        let mut a = [[_mm512_setzero_ps(); 4]; R];
        for (r, a) in a.iter_mut().enumerate() {
            for (q, a) in a.iter_mut().enumerate() {
                *a = _mm512_loadu_ps(acc[r].as_ptr().add(c + 16 * q));
            }
        }
        for j in 0..n {
            let row = v.as_ptr().add(j * HD + c);
            let vs: [__m512; 4] = std::array::from_fn(|q| _mm512_loadu_ps(row.add(16 * q)));
            for (r, a) in a.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*p[r].get_unchecked(j));
                for (a, v) in a.iter_mut().zip(&vs) {
                    *a = _mm512_fmadd_ps(x, *v, *a);
                }
            }
        }
        for (r, a) in a.iter().enumerate() {
            for (q, a) in a.iter().enumerate() {
                _mm512_storeu_ps(acc[r].as_mut_ptr().add(c + 16 * q), *a);
            }
        }
    }
}

/// Scores of [`R`] query rows against one key tile (`hd` rows of [`BK`] keys):
/// `s[r][j] = Σ_d q_r[d] · tile[d·BK + j]`, fused multiply-adds in `d` order.
#[inline(always)]
fn scores(q: &[&[f32]; R], tile: &[f32], s: &mut [[f32; BK]; R]) {
    let hd = q[0].len();
    assert!(q.iter().all(|q| q.len() == hd) && tile.len() == hd * BK);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, and the tile holds hd rows of BK (asserted above).
        unsafe { scores_avx512(q, tile, s) };
        return;
    }
    for (d, row) in tile.chunks_exact(BK).enumerate() {
        for r in 0..R {
            for j in 0..BK {
                s[r][j] = q[r][d].mul_add(row[j], s[r][j]);
            }
        }
    }
}

/// [`scores`] with its sixteen accumulators held in registers (the compiler kept the plain
/// loop's in memory, a store and a reload per multiply-add).
///
/// # Safety
/// AVX-512F, every `q[r].len() == q[0].len()` and `tile.len() == q[0].len()·BK`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512(q: &[&[f32]; R], tile: &[f32], s: &mut [[f32; BK]; R]) {
    use std::arch::x86_64::*;
    const _: () = assert!(BK == 64);
    let mut a = [[_mm512_setzero_ps(); 4]; R];
    let base = tile.as_ptr();
    for d in 0..q[0].len() {
        let row = base.add(d * BK);
        let ks: [__m512; 4] = std::array::from_fn(|c| _mm512_loadu_ps(row.add(16 * c)));
        for (r, a) in a.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*q[r].get_unchecked(d));
            for (a, k) in a.iter_mut().zip(&ks) {
                *a = _mm512_fmadd_ps(x, *k, *a);
            }
        }
    }
    for (r, a) in a.iter().enumerate() {
        for (c, a) in a.iter().enumerate() {
            _mm512_storeu_ps(s[r].as_mut_ptr().add(16 * c), *a);
        }
    }
}

/// `e^x` in f32 within 2 ulp of `f32::exp` (Cephes' `expf`: `x = n·ln2 + r`, a degree-6
/// polynomial for `e^r`, `2^n` built in the exponent bits), branch-free so that loops of it
/// vectorise. Inputs below −87.3 give ≈1.2e-38 instead of 0 (and −∞ does too); the callers
/// mask those entries themselves.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + f32::from_bits(0x3F00_0002); // Cephes' 5.0000001e-1, as f32
    let y = p * r * r + r + 1.0;
    // 2^n from n's bits: n + 1.5·2²³ holds the integer n in its low mantissa bits (x is
    // clamped, so n is in [-126, 128]). Float adds and integer ops only, which vectorise
    // (`n as i32` saturates lane by lane); a NaN stays NaN through y.
    let e = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    y * f32::from_bits(e.wrapping_add(127) << 23)
}

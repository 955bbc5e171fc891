//! Attention of one new token over a sequence's cached keys and values, on the CPU.
//!
//! A decode step attends each sequence's single query row over its cache: per kv head a
//! `[groups, hd] × [hd, len]` product, a softmax and a `[groups, len] × [len, hd]` product.
//! candle's gemm costs more to set up for these than they cost to compute (7–8% of decode at
//! 8 sequences once the cache became a strided view of a growing buffer), so here they are
//! three loops over the cache rows.
//!
//! A prefill chunk (several query rows, causal) is tiled flash-style ([`prefill`]): per query
//! head and block of [`BQ`] query rows, the keys are read in blocks of [`BK`] with an online
//! softmax (running max and sum, the output rescaled when the max grows), so no `len × total`
//! score matrix is ever formed and keys past a row's position are never read. Parts run on
//! [`super::pool`]. candle's ops (scores, mask, softmax, product) remain the reference and the
//! path of every other device and dtype.

use candle_core::{DType, Result, Storage, Tensor};

use super::cpu::Out;

/// What shapes the scores besides `q·kᵀ`: the scale, Gemma 2's soft-cap, and which keys a
/// query sees (a sliding window over keys whose first row sits at `key_start`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// Scores are `q·kᵀ · scale`.
    pub scale: f32,
    /// Then `cap · tanh(score / cap)`.
    pub softcap: Option<f32>,
    /// Query at position `p` sees keys `p − window + 1 ..= p` (and `0 ..= p` without one).
    pub window: Option<usize>,
    /// Absolute position of the first key row given.
    pub key_start: usize,
}

impl Scores {
    /// Plain causal attention over keys from position 0.
    pub fn causal(scale: f32) -> Self {
        Scores {
            scale,
            softcap: None,
            window: None,
            key_start: 0,
        }
    }

    /// The first key row (relative to `key_start`) the query at absolute position `p` sees.
    #[inline]
    pub fn first_key(&self, p: usize) -> usize {
        match self.window {
            Some(w) => (p + 1).saturating_sub(w).saturating_sub(self.key_start),
            None => 0,
        }
    }

    /// A raw `q·k` made a score.
    #[inline(always)]
    fn score(&self, dot: f32) -> f32 {
        let s = dot * self.scale;
        match self.softcap {
            Some(cap) => cap * (s / cap).tanh(),
            None => s,
        }
    }
}

/// `softmax(q·kᵀ · scale)·v` for `q` `[heads, 1, hd]` and `k`, `v` `[kv_heads, len, hd]` (rows
/// contiguous, any head stride), query head `h` reading kv head `h / (heads / kv_heads)`; the
/// query sits at the last key's position, and sees the keys `sc` allows.
/// `None` where it does not apply (other devices, dtypes or layouts).
pub fn decode(q: &Tensor, k: &Tensor, v: &Tensor, sc: &Scores) -> Result<Option<Tensor>> {
    let (Ok((nh, 1, _)), Ok((kvh, len, hd))) = (q.dims3(), k.dims3()) else {
        return Ok(None);
    };
    let lo = sc.first_key(sc.key_start + len - 1);
    let Some(out) = with_views(q, k, v, |q, heads_kv| {
        let groups = nh / kvh;
        let mut out = vec![0f32; nh * hd];
        let mut scores = vec![0f32; len - lo];
        for (g, &(kg, vg)) in heads_kv.iter().enumerate() {
            let (kg, vg) = (&kg[lo * hd..], &vg[lo * hd..]);
            for h in g * groups..(g + 1) * groups {
                let qh = &q[h * hd..(h + 1) * hd];
                let mut max = f32::NEG_INFINITY;
                for (s, krow) in scores.iter_mut().zip(kg.chunks_exact(hd)) {
                    *s = sc.score(dot(qh, krow));
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let o = &mut out[h * hd..(h + 1) * hd];
                for (&p, vrow) in scores.iter().zip(vg.chunks_exact(hd)) {
                    let p = p / sum;
                    for (oi, &vi) in o.iter_mut().zip(vrow) {
                        *oi += p * vi;
                    }
                }
            }
        }
        out
    })?
    else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(
        out,
        (nh, 1, hd),
        &candle_core::Device::Cpu,
    )?))
}

/// The f32 CPU slices attention reads, handed to `f`: `q`'s rows (`[heads, rows, hd]`, made
/// contiguous) and each kv head's key and value rows (`keys · hd`, from views with contiguous
/// rows and any head stride). `None` where the fast paths do not apply (other devices, dtypes
/// or layouts, shapes that do not match).
fn with_views<R>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    f: impl FnOnce(&[f32], &[(&[f32], &[f32])]) -> R,
) -> Result<Option<R>> {
    let (Ok((nh, rows, hd)), Ok((kvh, keys, hd2))) = (q.dims3(), k.dims3()) else {
        return Ok(None);
    };
    if hd != hd2 || v.dims() != k.dims() || kvh == 0 || nh % kvh != 0 || rows == 0 || keys == 0 {
        return Ok(None);
    }
    if [q, k, v]
        .iter()
        .any(|t| t.dtype() != DType::F32 || !super::kernels::fast_on(t.device()))
    {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
        return Ok(None);
    };
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[1] != hd || kst[2] != 1 || vst[1] != hd || vst[2] != 1 {
        return Ok(None);
    }
    let qall = &qs.as_slice::<f32>()?[ql.start_offset()..ql.start_offset() + nh * rows * hd];
    let (kall, vall) = (ks.as_slice::<f32>()?, vs.as_slice::<f32>()?);
    let mut heads_kv = Vec::with_capacity(kvh);
    for g in 0..kvh {
        let (Some(kg), Some(vg)) = (
            head_rows(kall, kl.start_offset() + g * kst[0], keys * hd),
            head_rows(vall, vl.start_offset() + g * vst[0], keys * hd),
        ) else {
            return Ok(None);
        };
        heads_kv.push((kg, vg));
    }
    Ok(Some(f(qall, &heads_kv)))
}

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
        super::pool::run(nh * blocks, &part);
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
        // Rows in pairs (the last one paired with itself when `rows` is odd): each key
        // tile and value row loaded once feeds two independent accumulator chains.
        let mut i = 0;
        while i < rows {
            let pair = [i, (i + 1).min(rows - 1)];
            i += 2;
            // Row r sees block entries lo[r]..hi[r]; a row that sees none of this block is
            // left exactly as it was (p = 0 everywhere, correction 1).
            let mut lo = [0usize; 2];
            let mut hi = [0usize; 2];
            for r in 0..2 {
                hi[r] = bk.min((first + pair[r] + 1).saturating_sub(kb));
                lo[r] = lo_of(pair[r]).saturating_sub(kb).min(hi[r]);
            }
            if hi[0] == lo[0] && hi[1] == lo[1] {
                continue;
            }
            let mut s = [[0f32; BK]; 2];
            let (q0, q1) = (
                &q[pair[0] * HD..(pair[0] + 1) * HD],
                &q[pair[1] * HD..(pair[1] + 1) * HD],
            );
            scores2(q0, q1, &kt[kb * HD..(kb + BK) * HD], &mut s);
            let mut corr = [1f32; 2];
            let mut new_m = [0f32; 2];
            let mut new_l = [0f32; 2];
            for r in 0..2 {
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
                let mut mx = m[pair[r]];
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
                    corr[r] = exp(m[pair[r]] - mx);
                    new_m[r] = mx;
                    new_l[r] = l[pair[r]] * corr[r] + sum;
                } else {
                    new_m[r] = m[pair[r]];
                    new_l[r] = l[pair[r]];
                }
            }
            let mut acc = [[0f32; HD]; 2];
            for r in 0..2 {
                for d in 0..HD {
                    acc[r][d] = out[pair[r] * HD + d] * corr[r];
                }
            }
            let n = hi[0].max(hi[1]);
            values2(&s, n, &v[kb * HD..(kb + n) * HD], &mut acc);
            for r in 0..2 {
                m[pair[r]] = new_m[r];
                l[pair[r]] = new_l[r];
                out[pair[r] * HD..(pair[r] + 1) * HD].copy_from_slice(&acc[r]);
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

/// The value product of two rows over `n` keys: `acc[r][d] += Σ_j p[r][j] · v[j·HD + d]`,
/// fused multiply-adds in `j` order.
#[inline(always)]
fn values2<const HD: usize>(p: &[[f32; BK]; 2], n: usize, v: &[f32], acc: &mut [[f32; HD]; 2]) {
    assert!(n <= BK && v.len() == n * HD);
    #[cfg(target_arch = "x86_64")]
    if HD.is_multiple_of(64) && is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, HD is a multiple of 64, and `v` holds n rows of HD.
        unsafe { values2_avx512::<HD>(p, n, v, acc) };
        return;
    }
    for j in 0..n {
        let (p0, p1) = (p[0][j], p[1][j]);
        let vrow = &v[j * HD..(j + 1) * HD];
        for d in 0..HD {
            acc[0][d] = p0.mul_add(vrow[d], acc[0][d]);
            acc[1][d] = p1.mul_add(vrow[d], acc[1][d]);
        }
    }
}

/// [`values2`] in 64-column strips with its eight accumulators in registers (the plain
/// loop's stayed in memory: a load and a store around every multiply-add).
///
/// # Safety
/// AVX-512F, `HD % 64 == 0`, `n ≤ BK` and `v.len() == n·HD`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn values2_avx512<const HD: usize>(
    p: &[[f32; BK]; 2],
    n: usize,
    v: &[f32],
    acc: &mut [[f32; HD]; 2],
) {
    use std::arch::x86_64::*;
    let (o0, o1) = (acc[0].as_mut_ptr(), acc[1].as_mut_ptr());
    for c in (0..HD).step_by(64) {
        let (mut a0, mut a1) = (_mm512_loadu_ps(o0.add(c)), _mm512_loadu_ps(o0.add(c + 16)));
        let (mut a2, mut a3) = (
            _mm512_loadu_ps(o0.add(c + 32)),
            _mm512_loadu_ps(o0.add(c + 48)),
        );
        let (mut b0, mut b1) = (_mm512_loadu_ps(o1.add(c)), _mm512_loadu_ps(o1.add(c + 16)));
        let (mut b2, mut b3) = (
            _mm512_loadu_ps(o1.add(c + 32)),
            _mm512_loadu_ps(o1.add(c + 48)),
        );
        for j in 0..n {
            let row = v.as_ptr().add(j * HD + c);
            let (v0, v1) = (_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16)));
            let (v2, v3) = (_mm512_loadu_ps(row.add(32)), _mm512_loadu_ps(row.add(48)));
            let x = _mm512_set1_ps(*p[0].get_unchecked(j));
            let y = _mm512_set1_ps(*p[1].get_unchecked(j));
            a0 = _mm512_fmadd_ps(x, v0, a0);
            a1 = _mm512_fmadd_ps(x, v1, a1);
            a2 = _mm512_fmadd_ps(x, v2, a2);
            a3 = _mm512_fmadd_ps(x, v3, a3);
            b0 = _mm512_fmadd_ps(y, v0, b0);
            b1 = _mm512_fmadd_ps(y, v1, b1);
            b2 = _mm512_fmadd_ps(y, v2, b2);
            b3 = _mm512_fmadd_ps(y, v3, b3);
        }
        _mm512_storeu_ps(o0.add(c), a0);
        _mm512_storeu_ps(o0.add(c + 16), a1);
        _mm512_storeu_ps(o0.add(c + 32), a2);
        _mm512_storeu_ps(o0.add(c + 48), a3);
        _mm512_storeu_ps(o1.add(c), b0);
        _mm512_storeu_ps(o1.add(c + 16), b1);
        _mm512_storeu_ps(o1.add(c + 32), b2);
        _mm512_storeu_ps(o1.add(c + 48), b3);
    }
}

/// Scores of two query rows against one key tile (`hd` rows of [`BK`] keys):
/// `s[r][j] = Σ_d q_r[d] · tile[d·BK + j]`, fused multiply-adds in `d` order.
#[inline(always)]
fn scores2(q0: &[f32], q1: &[f32], tile: &[f32], s: &mut [[f32; BK]; 2]) {
    let hd = q0.len();
    assert!(q1.len() == hd && tile.len() == hd * BK);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, and the tile holds hd rows of BK (asserted above).
        unsafe { scores2_avx512(q0, q1, tile, s) };
        return;
    }
    for (d, row) in tile.chunks_exact(BK).enumerate() {
        for j in 0..BK {
            s[0][j] = q0[d].mul_add(row[j], s[0][j]);
            s[1][j] = q1[d].mul_add(row[j], s[1][j]);
        }
    }
}

/// [`scores2`] with its eight accumulators held in registers (the compiler kept the plain
/// loop's in memory, a store and a reload per multiply-add).
///
/// # Safety
/// AVX-512F, `q1.len() == q0.len()` and `tile.len() == q0.len()·BK`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores2_avx512(q0: &[f32], q1: &[f32], tile: &[f32], s: &mut [[f32; BK]; 2]) {
    use std::arch::x86_64::*;
    const _: () = assert!(BK == 64);
    let z = _mm512_setzero_ps();
    let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
    let (mut b0, mut b1, mut b2, mut b3) = (z, z, z, z);
    let base = tile.as_ptr();
    for d in 0..q0.len() {
        let row = base.add(d * BK);
        let (k0, k1) = (_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16)));
        let (k2, k3) = (_mm512_loadu_ps(row.add(32)), _mm512_loadu_ps(row.add(48)));
        let x = _mm512_set1_ps(*q0.get_unchecked(d));
        let y = _mm512_set1_ps(*q1.get_unchecked(d));
        a0 = _mm512_fmadd_ps(x, k0, a0);
        a1 = _mm512_fmadd_ps(x, k1, a1);
        a2 = _mm512_fmadd_ps(x, k2, a2);
        a3 = _mm512_fmadd_ps(x, k3, a3);
        b0 = _mm512_fmadd_ps(y, k0, b0);
        b1 = _mm512_fmadd_ps(y, k1, b1);
        b2 = _mm512_fmadd_ps(y, k2, b2);
        b3 = _mm512_fmadd_ps(y, k3, b3);
    }
    let (p, r) = (s[0].as_mut_ptr(), s[1].as_mut_ptr());
    _mm512_storeu_ps(p, a0);
    _mm512_storeu_ps(p.add(16), a1);
    _mm512_storeu_ps(p.add(32), a2);
    _mm512_storeu_ps(p.add(48), a3);
    _mm512_storeu_ps(r, b0);
    _mm512_storeu_ps(r.add(16), b1);
    _mm512_storeu_ps(r.add(32), b2);
    _mm512_storeu_ps(r.add(48), b3);
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

/// `len` values of `all` from `at`, or `None` if the layout points outside the storage.
fn head_rows(all: &[f32], at: usize, len: usize) -> Option<&[f32]> {
    all.get(at..at + len)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = 0f32;
    for (x, y) in ac.remainder().iter().zip(bc.remainder()) {
        tail += x * y;
    }
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against candle's ops (as the prefill path computes it), with grouped query heads and
    /// keys and values that are views into larger buffers, as the KV cache returns them.
    #[test]
    fn equals_candle_attention_on_strided_cache_views() {
        let dev = Device::Cpu;
        let (nh, kvh, hd, cap) = (6, 2, 16, 40);
        for len in [1, 7, 33] {
            let q = Tensor::randn(0f32, 1.0, (nh, 1, hd), &dev).unwrap();
            let kb = Tensor::randn(0f32, 1.0, (kvh, cap, hd), &dev).unwrap();
            let vb = Tensor::randn(0f32, 1.0, (kvh, cap, hd), &dev).unwrap();
            let (k, v) = (kb.narrow(1, 0, len).unwrap(), vb.narrow(1, 0, len).unwrap());
            let scale = 1.0 / (hd as f32).sqrt();
            let got = decode(&q, &k, &v, &Scores::causal(scale))
                .unwrap()
                .expect("applies");
            let qg = q.reshape((kvh, nh / kvh, hd)).unwrap();
            let att = (qg.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
            let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
            let want = att.matmul(&v).unwrap().reshape((nh, 1, hd)).unwrap();
            let d = crate::ops::max_abs_diff(&got, &want);
            assert!(d < 1e-5, "len {len}: {d}");
        }
    }

    /// candle's masked attention, as `Decoder::attend` computes it off the fast path.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, pos: usize, scale: f32) -> Tensor {
        reference_with(q, k, v, pos, &Scores::causal(scale))
    }

    /// The same with a window, soft-cap and keys starting at `sc.key_start`: the mask and cap
    /// written out on the full score matrix.
    fn reference_with(q: &Tensor, k: &Tensor, v: &Tensor, pos: usize, sc: &Scores) -> Tensor {
        let (nh, len, hd) = q.dims3().unwrap();
        let (kvh, total, _) = k.dims3().unwrap();
        let groups = nh / kvh;
        let qg = q.reshape((kvh, groups * len, hd)).unwrap();
        let att = (qg.matmul(&k.t().unwrap()).unwrap() * sc.scale as f64).unwrap();
        let att = match sc.softcap {
            Some(cap) => ((att / cap as f64).unwrap().tanh().unwrap() * cap as f64).unwrap(),
            None => att,
        };
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    let (p, kj) = (pos + i, sc.key_start + j);
                    let seen = kj <= p && sc.window.is_none_or(|w| kj + w > p);
                    if seen {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (len, total), q.device()).unwrap();
        let att = att
            .reshape((kvh, groups, len, total))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap()
            .reshape((kvh, groups * len, total))
            .unwrap();
        let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
        att.matmul(&v.contiguous().unwrap())
            .unwrap()
            .reshape((nh, len, hd))
            .unwrap()
    }

    /// Sliding windows (smaller and larger than a key block, with keys that start past 0 as
    /// a windowed cache's views do) and Gemma 2's soft-cap, in prefill and decode, against
    /// the mask and cap written out.
    #[test]
    fn windows_and_softcap_equal_the_written_out_mask() {
        let dev = Device::Cpu;
        let cases = [
            // (heads, kv heads, hd, key_start, pos, len, window, softcap)
            (4, 2, 16, 0, 0, 40, Some(8), None),
            (4, 2, 16, 0, 0, 40, Some(8), Some(5.0)),
            (4, 1, 32, 3, 20, 70, Some(17), None),
            (6, 2, 64, 100, 150, 130, Some(100), Some(50.0)),
            (4, 4, 64, 0, 5, 33, None, Some(2.0)),
            (2, 1, 256, 10, 70, 1, Some(64), None),
            (2, 1, 16, 0, 0, 200, Some(1), None),
        ];
        for (nh, kvh, hd, key_start, pos, len, window, softcap) in cases {
            let total = pos + len - key_start;
            let q = Tensor::randn(0f32, 1.0, (nh, len, hd), &dev).unwrap();
            let k = (Tensor::randn(0f32, 1.0, (kvh, total, hd), &dev).unwrap() * 3.0).unwrap();
            let v = Tensor::randn(0f32, 1.0, (kvh, total, hd), &dev).unwrap();
            let sc = Scores {
                scale: 1.0 / (hd as f32).sqrt(),
                softcap,
                window,
                key_start,
            };
            let want = reference_with(&q, &k, &v, pos, &sc);
            let got = prefill(&q, &k, &v, pos, &sc).unwrap().expect("applies");
            let d = crate::ops::max_abs_diff(&got, &want);
            let case = format!("hd {hd}, keys from {key_start}, pos {pos}, len {len}, window {window:?}, cap {softcap:?}");
            assert!(d < 2e-5, "prefill, {case}: {d}");
            // Decode of the last row alone, over the same keys.
            let q1 = q.narrow(1, len - 1, 1).unwrap();
            let got = decode(&q1, &k, &v, &sc).unwrap().expect("applies");
            let want = want.narrow(1, len - 1, 1).unwrap();
            let d = crate::ops::max_abs_diff(&got, &want);
            assert!(d < 2e-5, "decode, {case}: {d}");
        }
    }

    /// Flash-style prefill against candle's masked attention: odd lengths around the query
    /// and key block sizes, chunks that start mid-sequence (and mid-block), GQA ratios 1, 3
    /// and 4, every supported head size, over strided views of a larger cache buffer.
    #[test]
    fn prefill_equals_masked_attention() {
        let dev = Device::Cpu;
        let cases = [
            // (heads, kv heads, hd, pos, len)
            (4, 4, 64, 0, 1),
            (4, 2, 8, 3, 21),
            (4, 2, 16, 0, 40),
            (4, 4, 64, 0, 2),
            (6, 2, 64, 0, 17),
            (6, 2, 64, 5, 16),
            (8, 2, 64, 63, 65),
            (9, 3, 64, 100, 37),
            (4, 1, 32, 0, 130),
            (4, 2, 80, 31, 33),
            (4, 2, 96, 1, 64),
            (4, 2, 128, 64, 64),
            (2, 1, 256, 7, 29),
            (6, 2, 64, 0, 300),
        ];
        for (nh, kvh, hd, pos, len) in cases {
            let total = pos + len;
            let cap = total + 9;
            let q = Tensor::randn(0f32, 1.0, (nh, len, hd), &dev).unwrap();
            let kb = Tensor::randn(0f32, 1.0, (kvh, cap, hd), &dev).unwrap();
            let vb = Tensor::randn(0f32, 1.0, (kvh, cap, hd), &dev).unwrap();
            // Large logits make the running max move and stress the rescaling.
            let kb = (kb * 3.0).unwrap();
            let (k, v) = (
                kb.narrow(1, 0, total).unwrap(),
                vb.narrow(1, 0, total).unwrap(),
            );
            let scale = 1.0 / (hd as f32).sqrt();
            let got = prefill(&q, &k, &v, pos, &Scores::causal(scale))
                .unwrap()
                .expect("applies");
            let want = reference(&q, &k, &v, pos, scale);
            let d = crate::ops::max_abs_diff(&got, &want);
            assert!(
                d < 2e-5,
                "{nh}/{kvh} heads, hd {hd}, pos {pos}, len {len}: {d}"
            );
        }
    }

    /// Where the fast path does not apply it says so, leaving the caller on candle's ops.
    #[test]
    fn prefill_declines_what_it_does_not_cover() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 4, 48), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 4, 48), DType::F32, &dev).unwrap();
        assert!(
            prefill(&q, &k, &k, 0, &Scores::causal(1.0))
                .unwrap()
                .is_none(),
            "hd 48"
        );
        let q = Tensor::zeros((2, 4, 64), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 5, 64), DType::F32, &dev).unwrap();
        assert!(
            prefill(&q, &k, &k, 0, &Scores::causal(1.0))
                .unwrap()
                .is_none(),
            "total ≠ pos + len"
        );
        let k = Tensor::zeros((1, 4, 64), DType::BF16, &dev).unwrap();
        let q16 = q.to_dtype(DType::BF16).unwrap();
        assert!(
            prefill(&q16, &k, &k, 0, &Scores::causal(1.0))
                .unwrap()
                .is_none(),
            "bf16"
        );
    }

    /// [`exp`] within 2 ulp of `f32::exp` over the range softmax uses, and ≈0 below it.
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x), x.exp());
            let ulp = (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32;
            worst = worst.max(ulp);
            x += 1.0e-3;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert!(exp(f32::NEG_INFINITY) < 1.3e-38);
        assert_eq!(exp(0.0), 1.0);
    }
}

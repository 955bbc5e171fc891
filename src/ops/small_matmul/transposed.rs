//! The transposed tiling: input rows in vector lanes, weight values broadcast. The input rows
//! are packed as panels of `16 / B` rows, each vector holding `B` consecutive input positions
//! of every row of the panel (lane `r·B + p` is row `r`, position `j·B + p`), so each
//! `B`-value run of a weight row, broadcast to every row's lanes, multiplies all of the panel's
//! rows at once (`B = 1`: 16 rows, one position; `B = 2`: 8 rows, two; …). A tile of
//! [`T_OUTPUTS`] outputs reads each panel vector once for all its outputs and each weight value
//! once per panel: one load per multiply-add and no horizontal sums but the `B` lanes of an
//! output at the end; the panels (not every tile's input rows) are what stays in cache. Each
//! lane's sum runs over its positions in order.

use std::arch::x86_64::*;

/// Lanes of a vector.
const LANES: usize = 16;

/// Outputs per tile: accumulators, with the panel vector, in 32 vector registers.
pub(super) const T_OUTPUTS: usize = 24;

/// The positions per row in a vector for `m` rows (fewest rows per panel that hold them,
/// up to 16), if `k` is a whole number of them.
pub(super) fn positions(m: usize, k: usize) -> Option<usize> {
    let b = match m {
        0 | 1 => return None,
        2 => 8,
        3 | 4 => 4,
        5..=8 => 2,
        _ => 1,
    };
    k.is_multiple_of(b).then_some(b)
}

/// `x` `[m, k]` as panels of `16 / b` rows, each `[k / b][16]` (see the module), zero
/// past row `m`.
pub(super) fn pack(x: &[f32], m: usize, k: usize, b: usize) -> Vec<f32> {
    let rows = LANES / b;
    let len = m.div_ceil(rows) * k * rows;
    if b == 1 && is_x86_feature_detected!("avx512f") {
        // Every value is written below, the zeros past row `m` included: no zeroing first
        // (it cost as much as the packing).
        let mut xt: Vec<f32> = Vec::with_capacity(len);
        for p in 0..m.div_ceil(LANES) {
            // SAFETY: the CPU has AVX-512F (checked just above); panel `p` is the `16 * k`
            // values of `xt`'s capacity from `p * 16 * k` on.
            unsafe {
                pack_panel(
                    &x[p * LANES * k..],
                    (m - p * LANES).min(LANES),
                    k,
                    xt.as_mut_ptr().add(p * LANES * k),
                )
            };
        }
        // SAFETY: the panels wrote all `len` values.
        unsafe { xt.set_len(len) };
        return xt;
    }
    let mut xt = vec![0f32; len];
    for (r, row) in x.chunks_exact(k).take(m).enumerate() {
        let panel = &mut xt[r / rows * k * rows..];
        let lane = r % rows * b;
        for (j, vals) in row.chunks_exact(b).enumerate() {
            panel[j * LANES + lane..j * LANES + lane + b].copy_from_slice(vals);
        }
    }
    xt
}

/// The first `rows` (≤ 16) rows of `x` as one panel of one position per vector (zero past
/// them) at `panel`: 16 positions of 16 rows at a time, transposed in registers. Every one of
/// the panel's `16 * k` values is written.
///
/// # Safety
/// The CPU has AVX-512F, and `panel` points to `16 * k` writable values.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn pack_panel(x: &[f32], rows: usize, k: usize, panel: *mut f32) {
    assert!(x.len() >= rows * k && rows <= 16);
    let whole = k / 16 * 16;
    for j in (0..whole).step_by(16) {
        let mut v = [_mm512_setzero_ps(); 16];
        for (r, v) in v.iter_mut().enumerate().take(rows) {
            *v = _mm512_loadu_ps(x.as_ptr().add(r * k + j));
        }
        transpose(&mut v);
        for (c, v) in v.iter().enumerate() {
            _mm512_storeu_ps(panel.add((j + c) * 16), *v);
        }
    }
    for j in whole..k {
        for r in 0..16 {
            *panel.add(j * 16 + r) = if r < rows { x[r * k + j] } else { 0.0 };
        }
    }
}

/// Panels at most (64 rows / 16), for the accumulators of a tile run.
pub(super) const MAX_PANELS: usize = 4;

/// The accumulators a tile run over `m` rows packed with `b` uses: one per panel and output.
pub(super) fn accumulators(m: usize, b: usize) -> usize {
    m.div_ceil(LANES / b) * T_OUTPUTS
}

/// Positions per block where stored weights are dequantised for the tiling: a strip of
/// [`T_OUTPUTS`] rows is dequantised and multiplied `K_BLOCK` positions at a time, from a
/// buffer of rows `K_BLOCK` apart (24 KiB, in L1). The fixed stride also makes every weight
/// address in the tile a constant offset from one pointer; with rows a run-time `k` apart the
/// compiler chains one add per multiply-add (24 dependent adds per position, twice the
/// multiply-adds' own time).
pub(super) const K_BLOCK: usize = 256;

/// Outputs `o0..o1` of all `m` rows from the panels `xt` (see [`pack`], with `b`), reading
/// the weight rows where they are (`k` apart).
///
/// # Safety
/// `xt` holds the panels of `m` rows of `k` values packed with `b` (1, 2, 4 or 8, a
/// divisor of `k`), `w` at least `o1 * k` values, `y` points to `m * ldy` writable values
/// with `o1 <= ldy`, and the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn columns(
    xt: *const f32,
    b: usize,
    m: usize,
    k: usize,
    w: *const f32,
    o0: usize,
    o1: usize,
    y: *mut f32,
    ldy: usize,
) {
    let mut acc = [_mm512_setzero_ps(); MAX_PANELS * T_OUTPUTS];
    let used = accumulators(m, b);
    let mut o = o0;
    while o < o1 {
        let rows = T_OUTPUTS.min(o1 - o);
        acc[..used].fill(_mm512_setzero_ps());
        accumulate(xt, b, m, k, 0, k, w.add(o * k), k, rows, acc.as_mut_ptr());
        finish(acc.as_ptr(), b, m, rows, y.add(o), ldy);
        o += rows;
    }
}

/// Carry on the sums of `rows` (≤ [`T_OUTPUTS`]) outputs over positions `c0..c0 + kb`:
/// `w` holds those positions of the outputs' weight rows, rows `ldw` values apart (either
/// [`K_BLOCK`], which is then folded into the addresses, or `k`), and `acc` one vector per panel and output (`acc[p * rows + o]`),
/// lane `r·b + q` the sum so far of the panel's row `r` over its positions `≡ q (mod b)`.
/// Each lane's sum runs over its positions in order, so blocks taken in order give the sums
/// of one pass.
///
/// # Safety
/// As [`columns`], with `c0 + kb <= k`, `c0` and `kb` multiples of `b`, `kb <= ldw`, `w`
/// at least `rows * ldw` values and `acc` `panels * rows` vectors.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn accumulate(
    xt: *const f32,
    b: usize,
    m: usize,
    k: usize,
    c0: usize,
    kb: usize,
    w: *const f32,
    ldw: usize,
    rows: usize,
    acc: *mut __m512,
) {
    debug_assert!(kb <= ldw && kb.is_multiple_of(b) && c0.is_multiple_of(b));
    macro_rules! go {
        ($b:literal) => {
            if ldw == K_BLOCK {
                accumulate_b::<$b, K_BLOCK>(xt, m, k, c0, kb, w, ldw, rows, acc)
            } else {
                accumulate_b::<$b, 0>(xt, m, k, c0, kb, w, ldw, rows, acc)
            }
        };
    }
    match b {
        1 => go!(1),
        2 => go!(2),
        4 => go!(4),
        8 => go!(8),
        _ => unreachable!("positions per vector {b}"),
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_b<const B: usize, const LDW: usize>(
    xt: *const f32,
    m: usize,
    k: usize,
    c0: usize,
    kb: usize,
    w: *const f32,
    ldw: usize,
    rows: usize,
    acc: *mut __m512,
) {
    debug_assert!(rows <= T_OUTPUTS && (LDW == 0 || LDW == ldw));
    // A stride known at compile time (`LDW`, else 0) in its own copy of the code: passing
    // the constant as a value let the compiler merge both calls into the run-time one.
    let ldw = if LDW > 0 { LDW } else { ldw };
    let rows_per = LANES / B;
    let panels = m.div_ceil(rows_per);
    let mut o = 0;
    while o < rows {
        let width = match rows - o {
            n if n >= T_OUTPUTS => T_OUTPUTS,
            n if n >= 8 => 8,
            _ => 1,
        };
        for p in 0..panels {
            let xp = xt.add(p * k * rows_per + c0 / B * LANES);
            let (wp, ap) = (w.add(o * ldw), acc.add(p * rows + o));
            match width {
                T_OUTPUTS => micro::<T_OUTPUTS, B>(xp, wp, ldw, kb / B, ap),
                8 => micro::<8, B>(xp, wp, ldw, kb / B, ap),
                _ => micro::<1, B>(xp, wp, ldw, kb / B, ap),
            }
        }
        o += width;
    }
}

/// `y[r * ldy + o]` for the `m` rows and `rows` outputs whose sums [`accumulate`] left in
/// `acc`: the `b` lanes of each, added in order.
///
/// # Safety
/// `acc` holds `panels * rows` vectors and `y` points to `m * ldy` writable values with
/// `rows <= ldy`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn finish(
    acc: *const __m512,
    b: usize,
    m: usize,
    rows: usize,
    y: *mut f32,
    ldy: usize,
) {
    match b {
        1 => finish_one(acc, m, rows, y, ldy),
        2 => finish_b::<2>(acc, m, rows, y, ldy),
        4 => finish_b::<4>(acc, m, rows, y, ldy),
        8 => finish_b::<8>(acc, m, rows, y, ldy),
        _ => unreachable!("positions per vector {b}"),
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn finish_b<const B: usize>(
    acc: *const __m512,
    m: usize,
    rows: usize,
    y: *mut f32,
    ldy: usize,
) {
    let rows_per = LANES / B;
    let mut t = [[0f32; LANES]; T_OUTPUTS];
    for p in 0..m.div_ceil(rows_per) {
        let in_panel = (m - p * rows_per).min(rows_per);
        for (o, t) in t.iter_mut().enumerate().take(rows) {
            _mm512_storeu_ps(t.as_mut_ptr(), *acc.add(p * rows + o));
        }
        // Row by row, so that each row's outputs are written side by side.
        for r in 0..in_panel {
            let yr = y.add((p * rows_per + r) * ldy);
            for (o, t) in t.iter().enumerate().take(rows) {
                *yr.add(o) = t[r * B..(r + 1) * B].iter().sum();
            }
        }
    }
}

/// [`finish`] with one position per vector: each panel's vectors (one per output, a lane per
/// row) transposed in registers, 8 outputs at a time, into rows of outputs. Eight at a time
/// keeps the inputs and temporaries in 16 registers (a 16 × 16 transpose spilled to the
/// stack), and a strip of 24 outputs takes three whole groups instead of one and a half.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn finish_one(acc: *const __m512, m: usize, rows: usize, y: *mut f32, ldy: usize) {
    for p in 0..m.div_ceil(LANES) {
        let in_panel = (m - p * LANES).min(LANES);
        let mut o = 0;
        while o < rows {
            let n = (rows - o).min(8);
            let mut v = [_mm512_setzero_ps(); 8];
            for (i, v) in v.iter_mut().enumerate().take(n) {
                *v = *acc.add(p * rows + o + i);
            }
            // Rows r and r + 4 of the panel, side by side (see `rows_of_eight`).
            let pairs = rows_of_eight(&v);
            let low: __mmask16 = (1 << n) - 1;
            let yp = y.add(p * LANES * ldy + o);
            for (j, v) in pairs.iter().enumerate() {
                // Pair j holds row q = 8·(j / 4) + j % 4 in its low half and q + 4 in its
                // high half (stored from 8 values before its start, so only the high lanes
                // are written: masked lanes are neither read nor written).
                let q = 8 * (j / 4) + j % 4;
                if q < in_panel {
                    _mm512_mask_storeu_ps(yp.add(q * ldy), low, *v);
                }
                if q + 4 < in_panel {
                    _mm512_mask_storeu_ps(yp.add((q + 4) * ldy).wrapping_sub(8), low << 8, *v);
                }
            }
            o += n;
        }
    }
}

/// Eight vectors `v[o]` (lane `r`: row `r`, output `o`) as 8 vectors of two rows each:
/// `out[j]` holds the 8 outputs of row `q = 8·(j / 4) + j % 4` in its low half and those of
/// row `q + 4` in its high half. 32 shuffles for 128 values, as the 16 × 16 transpose.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn rows_of_eight(v: &[__m512; 8]) -> [__m512; 8] {
    // Per 128-bit lane L (rows 4L..4L + 4): outputs (2i, 2i + 1) of rows 4L, 4L + 1 (lo) and
    // 4L + 2, 4L + 3 (hi).
    let t: [__m512; 8] = std::array::from_fn(|j| {
        let (a, b) = (v[2 * (j / 2)], v[2 * (j / 2) + 1]);
        if j % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[i] (outputs 0..4) and w[i] (outputs 4..8), per lane L: row 4L + i.
    let rows4 = |t0: __m512, t1: __m512, t2: __m512, t3: __m512| -> [__m512; 4] {
        let pd = _mm512_castps_pd;
        [
            _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t0), pd(t2))),
            _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t0), pd(t2))),
            _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t1), pd(t3))),
            _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t1), pd(t3))),
        ]
    };
    let u = rows4(t[0], t[1], t[2], t[3]);
    let w = rows4(t[4], t[5], t[6], t[7]);
    let mut out = [_mm512_setzero_ps(); 8];
    for i in 0..4 {
        // [u L0, u L1, w L0, w L1] → [u L0, w L0, u L1, w L1]: rows i and 4 + i.
        let a = _mm512_shuffle_f32x4::<0b01_00_01_00>(u[i], w[i]);
        out[i] = _mm512_shuffle_f32x4::<0b11_01_10_00>(a, a);
        // Lanes 2 and 3: rows 8 + i and 12 + i.
        let b = _mm512_shuffle_f32x4::<0b11_10_11_10>(u[i], w[i]);
        out[4 + i] = _mm512_shuffle_f32x4::<0b11_01_10_00>(b, b);
    }
    out
}

/// `v[i]` lane `j` ↔ `v[j]` lane `i`: a 16 × 16 transpose in registers.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn transpose(v: &mut [__m512; LANES]) {
    // Pairs of rows interleaved by 1, then by 2 (as 64-bit pairs), then 128-bit lanes by 4
    // and 8.
    let mut t = [_mm512_setzero_ps(); LANES];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    for i in 0..4 {
        for j in 0..2 {
            let (a, b) = (
                _mm512_castps_pd(t[4 * i + j]),
                _mm512_castps_pd(t[4 * i + j + 2]),
            );
            v[4 * i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            v[4 * i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    }
    for i in 0..2 {
        for j in 0..4 {
            let (a, b) = (v[8 * i + j], v[8 * i + j + 4]);
            t[8 * i + j] = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
            t[8 * i + j + 4] = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
        }
    }
    for j in 0..8 {
        let (a, b) = (t[j], t[j + 8]);
        v[j] = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
        v[j + 8] = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
    }
}

/// `B` consecutive values at `p`, repeated over the 16 lanes (a load, no shuffle).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn broadcast<const B: usize>(p: *const f32) -> __m512 {
    match B {
        1 => _mm512_set1_ps(*p),
        2 => _mm512_castpd_ps(_mm512_set1_pd((p as *const f64).read_unaligned())),
        4 => _mm512_broadcast_f32x4(_mm_loadu_ps(p)),
        _ => _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(p as *const f64))),
    }
}

/// `acc[o] += Σ_j x[j] · w[o, j]` lane by lane, for `RO` outputs over `steps` vectors of one
/// panel (`xt` at the block's first vector, `w` rows `ldw` values apart): the accumulators
/// live in registers for the whole block.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn micro<const RO: usize, const B: usize>(
    xt: *const f32,
    w: *const f32,
    ldw: usize,
    steps: usize,
    acc: *mut __m512,
) {
    let mut a = [_mm512_setzero_ps(); RO];
    for (o, a) in a.iter_mut().enumerate() {
        *a = *acc.add(o);
    }
    for j in 0..steps {
        let (xv, wj) = (_mm512_loadu_ps(xt.add(j * LANES)), w.add(j * B));
        for (o, a) in a.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(xv, broadcast::<B>(wj.add(o * ldw)), *a);
        }
    }
    for (o, a) in a.iter().enumerate() {
        *acc.add(o) = *a;
    }
}

/// As [`accumulate`] with one position per vector (`b = 1`) and weight rows [`K_BLOCK`]
/// apart, for many panels (prefill): a whole strip runs as two halves of 12 outputs over
/// pairs of panels, so each position loads 2 panel vectors and 12 weights for 24
/// multiply-adds, where the single-panel tile loads 1 and 24 (25 loads for 24 multiply-adds
/// kept the two load ports busier than the two multiply-add units). The same products, added
/// in the same order to the same sums.
///
/// # Safety
/// As [`accumulate`] with `b = 1` and `ldw = K_BLOCK`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn accumulate_pairs(
    xt: *const f32,
    m: usize,
    k: usize,
    c0: usize,
    kb: usize,
    w: *const f32,
    rows: usize,
    acc: *mut __m512,
) {
    const HALF: usize = T_OUTPUTS / 2;
    if rows != T_OUTPUTS {
        return accumulate_b::<1, K_BLOCK>(xt, m, k, c0, kb, w, K_BLOCK, rows, acc);
    }
    let panels = m.div_ceil(LANES);
    let panel = k * LANES;
    for o in [0, HALF] {
        let wo = w.add(o * K_BLOCK);
        let mut p = 0;
        while p + 2 <= panels {
            let xp = xt.add(p * panel + c0 * LANES);
            micro_pair::<HALF>(xp, panel, wo, kb, acc.add(p * rows + o), rows);
            p += 2;
        }
        if p < panels {
            let xp = xt.add(p * panel + c0 * LANES);
            micro::<HALF, 1>(xp, wo, K_BLOCK, kb, acc.add(p * rows + o));
        }
    }
}

/// [`micro`] with `B = 1` for two panels at once (the second `dx` values after the first,
/// its accumulators `da` vectors after the first's), weight rows [`K_BLOCK`] apart.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn micro_pair<const RO: usize>(
    xt: *const f32,
    dx: usize,
    w: *const f32,
    steps: usize,
    acc: *mut __m512,
    da: usize,
) {
    let (mut a0, mut a1) = ([_mm512_setzero_ps(); RO], [_mm512_setzero_ps(); RO]);
    for (o, (a0, a1)) in a0.iter_mut().zip(a1.iter_mut()).enumerate() {
        *a0 = *acc.add(o);
        *a1 = *acc.add(da + o);
    }
    for j in 0..steps {
        let x0 = _mm512_loadu_ps(xt.add(j * LANES));
        let x1 = _mm512_loadu_ps(xt.add(dx + j * LANES));
        let wj = w.add(j);
        for (o, (a0, a1)) in a0.iter_mut().zip(a1.iter_mut()).enumerate() {
            let wv = _mm512_set1_ps(*wj.add(o * K_BLOCK));
            *a0 = _mm512_fmadd_ps(x0, wv, *a0);
            *a1 = _mm512_fmadd_ps(x1, wv, *a1);
        }
    }
    for (o, (a0, a1)) in a0.iter().zip(a1.iter()).enumerate() {
        *acc.add(o) = *a0;
        *acc.add(da + o) = *a1;
    }
}

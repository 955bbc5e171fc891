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
    let mut xt = vec![0f32; m.div_ceil(rows) * k * rows];
    for (r, row) in x.chunks_exact(k).take(m).enumerate() {
        let panel = &mut xt[r / rows * k * rows..];
        let lane = r % rows * b;
        for (j, vals) in row.chunks_exact(b).enumerate() {
            panel[j * LANES + lane..j * LANES + lane + b].copy_from_slice(vals);
        }
    }
    xt
}

/// Outputs `o0..o1` of all `m` rows from the panels `xt` (see [`pack`], with `b`).
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
    match b {
        1 => columns_b::<1>(xt, m, k, w, o0, o1, y, ldy),
        2 => columns_b::<2>(xt, m, k, w, o0, o1, y, ldy),
        4 => columns_b::<4>(xt, m, k, w, o0, o1, y, ldy),
        8 => columns_b::<8>(xt, m, k, w, o0, o1, y, ldy),
        _ => unreachable!("positions per vector {b}"),
    }
}

#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn columns_b<const B: usize>(
    xt: *const f32,
    m: usize,
    k: usize,
    w: *const f32,
    o0: usize,
    o1: usize,
    y: *mut f32,
    ldy: usize,
) {
    let rows_per = LANES / B;
    let panels = m.div_ceil(rows_per);
    let mut o = o0;
    while o < o1 {
        let width = match o1 - o {
            n if n >= T_OUTPUTS => T_OUTPUTS,
            n if n >= 8 => 8,
            _ => 1,
        };
        for p in 0..panels {
            let rows = (m - p * rows_per).min(rows_per);
            let xp = xt.add(p * k * rows_per);
            let (wp, yp) = (w.add(o * k), y.add(p * rows_per * ldy + o));
            match width {
                T_OUTPUTS => micro::<T_OUTPUTS, B>(xp, wp, k, yp, ldy, rows),
                8 => micro::<8, B>(xp, wp, k, yp, ldy, rows),
                _ => micro::<1, B>(xp, wp, k, yp, ldy, rows),
            }
        }
        o += width;
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

/// `y[r * ldy + o] = Σ_kk x[r, kk] · w[o, kk]` for `RO` outputs and the panel's first
/// `rows` rows.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn micro<const RO: usize, const B: usize>(
    xt: *const f32,
    w: *const f32,
    k: usize,
    y: *mut f32,
    ldy: usize,
    rows: usize,
) {
    let mut acc = [_mm512_setzero_ps(); RO];
    for j in 0..k / B {
        let xv = _mm512_loadu_ps(xt.add(j * LANES));
        for (o, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(xv, broadcast::<B>(w.add(o * k + j * B)), *a);
        }
    }
    let mut t = [[0f32; LANES]; RO];
    for (o, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(t[o].as_mut_ptr(), *a);
    }
    for r in 0..rows {
        for (o, t) in t.iter().enumerate() {
            *y.add(r * ldy + o) = t[r * B..(r + 1) * B].iter().sum();
        }
    }
}

//! The dot-product tiles: a register tile of `RO` weight rows × `RR` input rows, each output a
//! dot product over a contiguous weight row, reduced across lanes at the end (the module
//! documentation of `small_matmul` describes them). AVX-512 and AVX2 intrinsics, a portable
//! version of the same tiling, and which of them this CPU runs ([`best_isa`]).

/// Rows per register tile at most, and the outputs per tile for a given number of rows: at
/// most 16 accumulators (`RO·RR`), so with the `RO` weight vectors and the input vector they
/// stay in registers (at 24 the compiler spilled accumulators to the stack every step).
pub(super) const MAX_RR: usize = 8;

pub(super) const fn tile_outputs(rr: usize) -> usize {
    match rr {
        1 | 2 => 8,
        3 => 5,
        4 => 4,
        5 | 6 => 3,
        _ => 2,
    }
}

/// Rows per register tile at most on AVX2, and its outputs per tile: AVX2 has 16 vector
/// registers, which must hold the `RO·RR` accumulators, the `RO` weight vectors and an input
/// vector. (AVX-512's shapes, up to 16 accumulators, spilled there.) Each output's sum is the
/// same whatever the tile's shape: lane by lane over its positions in order, then the lanes.
pub(super) const MAX_RR_AVX2: usize = 4;

pub(super) const fn tile_outputs_avx2(rr: usize) -> usize {
    match rr {
        1 => 7,
        2 => 5,
        _ => 3,
    }
}

/// The loops shared by every implementation: output tiles of `RO` (chosen from the first row
/// block, so a tile's weights stay in L1 while every row block uses them), row blocks of up to
/// `$max_rr` rows, and one-output tiles for what is left over; `$outputs(rr)` is `RO` for
/// `rr` rows.
macro_rules! tile_loops {
    ($micro:ident, $outputs:ident, $max_rr:expr, $x:expr, $m:expr, $k:expr, $w:expr, $o0:expr, $o1:expr, $y:expr, $ldy:expr) => {{
        let (x, m, k, w, o0, o1, y, ldy) = ($x, $m, $k, $w, $o0, $o1, $y, $ldy);
        let ro = $outputs(m.min($max_rr));
        let mut o = o0;
        while o < o1 {
            let width = if o + ro <= o1 { ro } else { 1 };
            let mut r = 0;
            while r < m {
                let rr = (m - r).min($max_rr);
                let (xp, wp, yp) = (x.add(r * k), w.add(o * k), y.add(r * ldy + o));
                macro_rules! rows {
                    ($ro:literal) => {
                        match rr {
                            1 => $micro::<$ro, 1>(xp, wp, k, yp, ldy),
                            2 => $micro::<$ro, 2>(xp, wp, k, yp, ldy),
                            3 => $micro::<$ro, 3>(xp, wp, k, yp, ldy),
                            4 => $micro::<$ro, 4>(xp, wp, k, yp, ldy),
                            5 => $micro::<$ro, 5>(xp, wp, k, yp, ldy),
                            6 => $micro::<$ro, 6>(xp, wp, k, yp, ldy),
                            7 => $micro::<$ro, 7>(xp, wp, k, yp, ldy),
                            _ => $micro::<$ro, 8>(xp, wp, k, yp, ldy),
                        }
                    };
                }
                match width {
                    8 => rows!(8),
                    7 => rows!(7),
                    5 => rows!(5),
                    4 => rows!(4),
                    3 => rows!(3),
                    2 => rows!(2),
                    _ => rows!(1),
                }
                r += rr;
            }
            o += width;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::{tile_outputs, MAX_RR};
    use std::arch::x86_64::*;

    /// How many tiles ahead of the one being computed the weight is prefetched, into L2
    /// (`_MM_HINT_T1`). Tried: T0 one tile ahead, T1 two and four ahead; the differences were
    /// within this machine's run-to-run noise, T0 into L1 looked worst.
    const PREFETCH_TILES: usize = 4;

    /// See [`super::columns`].
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(in crate::ops::small_matmul) unsafe fn columns(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        o0: usize,
        o1: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        tile_loops!(micro, tile_outputs, MAX_RR, x, m, k, w, o0, o1, y, ldy)
    }

    /// `y[r * ldy + o] = x[r, ..] · w[o, ..]` for `RO` outputs and `RR` rows, 16 lanes at a
    /// time; the last partial vector is read with a mask, never past the rows' ends.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // indexing two arrays by the same tile coordinates
    unsafe fn micro<const RO: usize, const RR: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); RR]; RO];
        // The tile's rows are one contiguous block and the next tiles follow it: fetch the
        // block `PREFETCH_TILES` ahead, `RO` lines per step, spread over this tile's steps.
        let ahead = w.wrapping_add(PREFETCH_TILES * RO * k) as *const i8;
        let mut kk = 0;
        while kk + 16 <= k {
            for o in 0..RO {
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add((kk / 16 * RO + o) * 64));
            }
            let mut wv = [_mm512_setzero_ps(); RO];
            for (o, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(w.add(o * k + kk));
            }
            for r in 0..RR {
                let xv = _mm512_loadu_ps(x.add(r * k + kk));
                for o in 0..RO {
                    acc[o][r] = _mm512_fmadd_ps(wv[o], xv, acc[o][r]);
                }
            }
            kk += 16;
        }
        if kk < k {
            let mask: __mmask16 = ((1u32 << (k - kk)) - 1) as u16;
            let mut wv = [_mm512_setzero_ps(); RO];
            for (o, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, w.add(o * k + kk));
            }
            for r in 0..RR {
                let xv = _mm512_maskz_loadu_ps(mask, x.add(r * k + kk));
                for o in 0..RO {
                    acc[o][r] = _mm512_fmadd_ps(wv[o], xv, acc[o][r]);
                }
            }
        }
        for (o, acc) in acc.iter().enumerate() {
            for (r, a) in acc.iter().enumerate() {
                *y.add(r * ldy + o) = _mm512_reduce_add_ps(*a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::{tile_outputs_avx2, MAX_RR_AVX2};
    use std::arch::x86_64::*;

    /// See [`super::columns`], with AVX2's tile shapes.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(in crate::ops::small_matmul) unsafe fn columns(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        o0: usize,
        o1: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        tile_loops!(
            micro,
            tile_outputs_avx2,
            MAX_RR_AVX2,
            x,
            m,
            k,
            w,
            o0,
            o1,
            y,
            ldy
        )
    }

    /// The portable tile's arithmetic, operation for operation (so its sums bit for bit):
    /// 8 lanes, each a multiply-add chain over its positions, then the lanes added in order and
    /// the tail's positions multiply-added one by one. Each position's `RO` weight vectors are
    /// loaded once into registers for all `RR` rows.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // indexing two arrays by the same tile coordinates
    unsafe fn micro<const RO: usize, const RR: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); RR]; RO];
        let mut kk = 0;
        while kk + 8 <= k {
            let mut wv = [_mm256_setzero_ps(); RO];
            for (o, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(w.add(o * k + kk));
            }
            for r in 0..RR {
                let xv = _mm256_loadu_ps(x.add(r * k + kk));
                for o in 0..RO {
                    acc[o][r] = _mm256_fmadd_ps(wv[o], xv, acc[o][r]);
                }
            }
            kk += 8;
        }
        for o in 0..RO {
            for r in 0..RR {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[o][r]);
                let mut s = lanes.iter().sum::<f32>();
                for t in kk..k {
                    s = (*w.add(o * k + t)).mul_add(*x.add(r * k + t), s);
                }
                *y.add(r * ldy + o) = s;
            }
        }
    }
}

/// The same tiling in plain Rust over 8-lane arrays, which the compiler turns into the vector
/// instructions of whatever it is compiled for.
pub(super) mod portable {
    use super::{tile_outputs, MAX_RR};

    const L: usize = 8;

    /// See [`super::columns`].
    #[allow(clippy::too_many_arguments)]
    pub(in crate::ops::small_matmul) unsafe fn columns(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        o0: usize,
        o1: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        tile_loops!(micro, tile_outputs, MAX_RR, x, m, k, w, o0, o1, y, ldy)
    }

    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // indexing two arrays by the same tile coordinates
    unsafe fn micro<const RO: usize, const RR: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut acc = [[[0f32; L]; RR]; RO];
        let mut kk = 0;
        while kk + L <= k {
            for r in 0..RR {
                let xv = &*(x.add(r * k + kk) as *const [f32; L]);
                for (o, acc) in acc.iter_mut().enumerate() {
                    let wv = &*(w.add(o * k + kk) as *const [f32; L]);
                    for l in 0..L {
                        acc[r][l] = wv[l].mul_add(xv[l], acc[r][l]);
                    }
                }
            }
            kk += L;
        }
        for (o, acc) in acc.iter().enumerate() {
            for (r, a) in acc.iter().enumerate() {
                let mut s = a.iter().sum::<f32>();
                for t in kk..k {
                    s = (*w.add(o * k + t)).mul_add(*x.add(r * k + t), s);
                }
                *y.add(r * ldy + o) = s;
            }
        }
    }
}

/// Which implementation of the tile runs (tests force each one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Isa {
    pub(super) fn is_avx2(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self == Isa::Avx2;
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// Outputs per dot-product tile of `m` rows on `isa`.
pub(super) fn tile_width(isa: Isa, m: usize) -> usize {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => tile_outputs_avx2(m.min(MAX_RR_AVX2)),
        _ => tile_outputs(m.min(MAX_RR)),
    }
}

/// The best tile implementation this CPU runs.
pub(super) fn best_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            if is_x86_feature_detected!("avx512f") {
                Isa::Avx512
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Isa::Avx2
            } else {
                Isa::Portable
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Isa::Portable
}

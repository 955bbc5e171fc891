//! The int8 kernel for products of several rows on CPUs without AVX-512 VNNI (AVX2, FMA,
//! F16C): the VNNI kernel's tiling (`super`), with input rows in the lanes of 256-bit vectors
//! (a panel's 16 rows as two halves of 8) and a weight's 4 bytes broadcast to every row, over
//! the formats whose bytes `u` stay below 64 (all the VNNI kernel takes but Q8_0, whose
//! `u = q + 128` would saturate the pairs below).
//!
//! Without VNNI's `vpdpbusd` a step of 4 positions is `vpmaddubsw` (pairs of byte products,
//! exact in `i16`: `2 · 63 · 127 < 2^15`) into 16-bit sums that add several steps before one
//! `vpmaddwd` widens them to 32 bits: 8 steps for 4-bit values (`8 · 2 · 15 · 127 < 2^15`), 4
//! for 5-bit, 2 for Q6_K's 6 bits. Per 32 positions and 8 rows of a Q4_K weight that is 8
//! byte multiplies, 7 adds and one widening against the exact path's 32 f32 multiply-adds.
//! The integer sums are exact and each subblock's becomes `da·(a·Σ u·q) − b·(da·Σ q)` in f32
//! as in the VNNI kernel, so the products are the same rounded inputs times the dequantised
//! weights, up to summation order (the same test checks both).

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

use super::super::super::cpu::Out;
use super::super::super::stored::StoredMatrix;
use super::{Packed, CHUNK, QBLOCK, SUBS};

/// Outputs per tile: a 16-bit, a 32-bit and an f32 sum each in registers (16 of them).
const T: usize = 4;

/// Whether this kernel multiplies `w`: a format whose bytes stay below 64, on a CPU with AVX2,
/// FMA and F16C.
pub(super) fn applies(w: &StoredMatrix) -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let avx2 = *AVX2.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    });
    avx2 && steps(w.dtype()).is_some() && w.cols().is_multiple_of(QBLOCK)
}

/// Steps of 4 positions whose byte products a 16-bit sum holds: `2 · u_max · 127` each.
fn steps(dtype: GgmlDType) -> Option<usize> {
    use GgmlDType::*;
    match dtype {
        Q4K | Q4_0 | Q4_1 => Some(8),
        Q5K | Q5_0 | Q5_1 => Some(4),
        Q6K => Some(2),
        _ => None,
    }
}

/// Outputs `o0..o1` of all `m` rows (packed one row per lane), a strip of [`T`] outputs at a
/// time.
///
/// # Safety
/// [`applies`] to `w`, `pk` packed from `m` rows with one row per lane (`g` 1); `y` points to
/// `m * ldy` values of which no one else writes columns `o0..o1` meanwhile.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn part(
    pk: &Packed,
    m: usize,
    w: &StoredMatrix,
    o0: usize,
    o1: usize,
    y: Out,
    ldy: usize,
) {
    debug_assert_eq!(pk.g, 1);
    let mut u = [0u8; T * CHUNK];
    let (mut a, mut b) = ([0f32; T * SUBS], [0f32; T * SUBS]);
    // `[panel][half][T]`.
    let mut acc = [_mm256_setzero_ps(); super::super::transposed::MAX_PANELS * 2 * T];
    let steps = steps(w.dtype());
    let mut o = o0;
    while o < o1 {
        let rows = T.min(o1 - o);
        acc.fill(_mm256_setzero_ps());
        let next = T.min(o1 - o - rows);
        super::strip(
            w,
            o,
            rows,
            next,
            &mut u,
            &mut a,
            &mut b,
            |c0, c1, u, a, b| {
                let acc = acc.as_mut_ptr();
                // SAFETY: as this function's; the strip's bytes and factors are unpacked.
                unsafe {
                    match (pk.sub, steps) {
                        (32, Some(8)) => tile::<32, 8>(pk, m, c0, c1 - c0, u, a, b, acc),
                        (32, Some(4)) => tile::<32, 4>(pk, m, c0, c1 - c0, u, a, b, acc),
                        (16, Some(2)) => tile::<16, 2>(pk, m, c0, c1 - c0, u, a, b, acc),
                        (s, n) => unreachable!("subblocks of {s}, {n:?} steps"),
                    }
                }
            },
        );
        // Lane `l` of half `h`'s sum of output `i` is row `8h + l`'s.
        for h in 0..m.div_ceil(8) {
            for i in 0..rows {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[h * T + i]);
                for (l, v) in lanes[..(m - 8 * h).min(8)].iter().enumerate() {
                    *y.add((8 * h + l) * ldy + o + i).0 = *v;
                }
            }
        }
        o += rows;
    }
}

/// Carry on the sums `acc` (`[panel][half][T]`) over positions `c0..c0 + kb` of the strip
/// whose bytes `u` (`[T][CHUNK]`, from position `c0`) and subblock factors `a`, `b`
/// (`[T][SUBS]`) are unpacked, `STEPS` steps of 4 positions per 16-bit sum.
///
/// # Safety
/// As [`part`]; `kb` a multiple of `SUB`, `SUB` as `pk.sub`, `STEPS` at most [`steps`] of the
/// weight's format and a divisor of `SUB / 4`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const SUB: usize, const STEPS: usize>(
    pk: &Packed,
    m: usize,
    c0: usize,
    kb: usize,
    u: *const u8,
    a: *const f32,
    b: *const f32,
    acc: *mut __m256,
) {
    let (nq, nsub) = (pk.k / QBLOCK, pk.k / SUB);
    let ones = _mm256_set1_epi16(1);
    for half in 0..m.div_ceil(8) {
        let (p, h) = (half / 2, half % 2);
        let acc = acc.add(half * T);
        let mut f = [_mm256_setzero_ps(); T];
        for (o, f) in f.iter_mut().enumerate() {
            *f = *acc.add(o);
        }
        // The panel's 64 bytes per step hold rows 0-7 then 8-15.
        let q = pk.q.as_ptr().add(p * pk.k * 16 + 32 * h);
        let da = pk.da.as_ptr().add(p * nq * 16 + 8 * h);
        let dbs = pk.dbs.as_ptr().add(p * nsub * 16 + 8 * h);
        for s in 0..kb / SUB {
            let at = s * SUB;
            let mut sum = [_mm256_setzero_si256(); T];
            for t0 in (0..SUB / 4).step_by(STEPS) {
                let mut pairs = [_mm256_setzero_si256(); T];
                for t in t0..t0 + STEPS {
                    let pos = at + 4 * t;
                    let xv = _mm256_loadu_si256(q.add((c0 + pos) / 4 * 64).cast());
                    for (o, pairs) in pairs.iter_mut().enumerate() {
                        let wv = _mm256_set1_epi32(
                            u.add(o * CHUNK + pos).cast::<i32>().read_unaligned(),
                        );
                        *pairs = _mm256_add_epi16(*pairs, _mm256_maddubs_epi16(wv, xv));
                    }
                }
                for (sum, pairs) in sum.iter_mut().zip(&pairs) {
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(*pairs, ones));
                }
            }
            let d = _mm256_loadu_ps(da.add((c0 + at) / QBLOCK * 16));
            let ds = _mm256_loadu_ps(dbs.add((c0 + at) / SUB * 16));
            for (o, (f, sum)) in f.iter_mut().zip(&sum).enumerate() {
                let v = _mm256_mul_ps(_mm256_cvtepi32_ps(*sum), d);
                *f = _mm256_fmadd_ps(v, _mm256_set1_ps(*a.add(o * SUBS + s)), *f);
                *f = _mm256_fnmadd_ps(ds, _mm256_set1_ps(*b.add(o * SUBS + s)), *f);
            }
        }
        for (o, f) in f.iter().enumerate() {
            *acc.add(o) = *f;
        }
    }
}

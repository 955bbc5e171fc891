//! One input row against Q4_K, Q5_K and Q6_K rows on AVX-512: decode at one sequence over a
//! Q4_K_M or Q5_K_M file, where these formats hold nearly every weight.
//!
//! Dequantising each value in registers and multiplying it (`table.rs`, `q6k.rs`) kept the
//! vector shuffle port busy: a widen and a table permute per 16 values, plus the broadcasts
//! that build each sub-block's table. Two cores reached ~25 G values/s in cache and 12.5 GB/s
//! from memory, so decode waited on arithmetic, not on memory (a plain read of the same bytes
//! runs at 22–24 GB/s). Here each sub-block is summed first and scaled once, as the formats
//! define the value (`value = d·sc·q − dmin·m` for Q4_K and Q5_K, `d·sc·(q − 32)` for Q6_K):
//!
//! `x · row = Σ_sub (d·sc) · Σ q·x − Σ_sub (dmin·m) · Σ x`
//!
//! - **Values in 32-bit lanes without widening.** 64 bytes of packed values are read as 16
//!   lanes of 4 bytes; each shift by a multiple of 4 bits puts one 4-bit value of every lane
//!   in its low bits, and a permute of `[0, 1, …, 15]` (which reads only those 4 bits) turns it
//!   into a float. A Q6_K value's two high bits come the same way from a second table,
//!   `[-32, -16, 0, 16]` repeated, which also subtracts its 32; a Q5_K value's fifth bit from
//!   `[0, 16]` repeated.
//! - **The input row is permuted once per product** to the order those lanes take (a shift
//!   gives every fourth value), with each Q4_K or Q5_K sub-block's `−Σ x` beside it. So the
//!   matrix's rows are read once, in order, and `x` costs one pass per call.
//!
//! Two cores now reach ~40 G values/s in cache and ~17 GB/s from memory, Q4_K and Q6_K alike.
//!
//! **Exactness.** The values are the format's own, exactly: `q`, `q − 32`, `d·sc` and
//! `dmin·m` are the very numbers candle's dequantisation multiplies (`d·sc` and `dmin·m`
//! are rounded to f32 as there). What moves is where the products round: candle rounds each
//! dequantised value and then its product with `x`; here `q·x` rounds and the sub-block's
//! sum is scaled. Both are the exact real dot product plus rounding of the same order as a
//! change of summation order; the tests bound both against an f64 reference.

use std::arch::x86_64::*;
use std::cell::RefCell;

// `iota`: `[0, 1, …, 15]`, the float of a lane's low 4 bits by permute.
use super::table::iota;
use super::Rows;

thread_local! {
    /// The permuted input row (and, for Q4_K and Q5_K, the sub-block sums), reused across
    /// calls.
    static INPUT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `x` in the order the Q4_K and Q5_K kernel reads each 256-value block, then 16 values per block:
/// 8 zeros and `−Σ x` of each 32-value sub-block.
///
/// Per half `h` of a block (its 64 bytes of `qs`, sub-blocks `4h..4h + 4`), nibble `n` (low
/// or high) and byte `t` of each lane: lane `l` holds byte `4·(l mod 8) + t` of group
/// `2h + l/8`, so its value is `64·(2h + l/8) + 32n + 4·(l mod 8) + t`.
fn q4_k_input(x: &[f32], out: &mut Vec<f32>) {
    let blocks = x.len() / 256;
    out.clear();
    out.resize(x.len() + 16 * blocks, 0.0);
    let (values, sums) = out.split_at_mut(x.len());
    for (bl, (xb, pb)) in x
        .chunks_exact(256)
        .zip(values.chunks_exact_mut(256))
        .enumerate()
    {
        let mut i = 0;
        for h in 0..2 {
            for n in 0..2 {
                for t in 0..4 {
                    for l in 0..16 {
                        pb[i] = xb[64 * (2 * h + l / 8) + 32 * n + 4 * (l % 8) + t];
                        i += 1;
                    }
                }
            }
        }
        for j in 0..8 {
            sums[16 * bl + 8 + j] = -xb[32 * j..32 * j + 32].iter().sum::<f32>();
        }
    }
}

/// `d·sc_j` in lanes 0..8 and `dmin·m_j` in lanes 8..16 of a Q4_K block (`d: f16, dmin: f16,
/// scales: [u8; 12]`), each the f32 product that `super::q4_k` forms.
#[target_feature(enable = "avx512f,f16c")]
#[inline]
pub(super) unsafe fn q4_k_scales(b: *const u8) -> __m512 {
    let word = |i: usize| (b.add(i) as *const u32).read_unaligned();
    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(word(0) as i32));
    let (sc, mn) = super::scales_mins_k4(std::slice::from_raw_parts(b.add(4), 12));
    let v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(mn as i64, sc as i64)));
    let d_then_min = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    _mm512_mul_ps(
        _mm512_permutexvar_ps(d_then_min, _mm512_castps128_ps512(dm)),
        v,
    )
}

/// `y[i] = x · rows.row(i)` over Q4_K rows.
///
/// # Safety
/// The CPU has AVX-512F and F16C.
#[target_feature(enable = "avx512f,f16c")]
pub(super) unsafe fn q4_k(rows: &Rows, x: &[f32], y: &mut [f32]) {
    k4_or_k5::<false>(rows, x, y)
}

/// `y[i] = x · rows.row(i)` over Q5_K rows (`d: f16, dmin: f16, scales: [u8; 12], qh: [u8;
/// 32], qs: [u8; 128]`): Q4_K's values with a fifth bit each from `qh`, worth 16.
///
/// # Safety
/// The CPU has AVX-512F and F16C.
#[target_feature(enable = "avx512f,f16c")]
pub(super) unsafe fn q5_k(rows: &Rows, x: &[f32], y: &mut [f32]) {
    k4_or_k5::<true>(rows, x, y)
}

/// [`q4_k`], or [`q5_k`] when `FIVE`.
#[target_feature(enable = "avx512f,f16c")]
#[inline]
unsafe fn k4_or_k5<const FIVE: bool>(rows: &Rows, x: &[f32], y: &mut [f32]) {
    let (block, qs_at) = if FIVE { (176, 48) } else { (144, 16) };
    assert_eq!(rows.row_bytes / block * 256, x.len());
    INPUT.with(|input| {
        let mut input = input.borrow_mut();
        q4_k_input(x, &mut input);
        let (xp, sums) = input.split_at(x.len());
        let io = iota();
        // A Q5_K value's fifth bit, by permute of the lane's low bit.
        let sixteen = _mm512_setr_ps(
            0., 16., 0., 16., 0., 16., 0., 16., 0., 16., 0., 16., 0., 16., 0., 16.,
        );
        // Per lane, how far `qh` shifts to bring a Q5_K value's fifth bit down: byte t of
        // the lane, bit 2·group + n, the group being 2h (lanes 0..8) or 2h + 1 (8..16), as
        // `super::q5_k` reads it.
        let qh_shift = |h: i32, n: i32, t: i32| {
            let a = 8 * t + 4 * h + n;
            let b = a + 2;
            _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
        };
        // The scale of each lane, per half and nibble: sub-blocks (4h + n, 4h + 2 + n).
        let lane_scale = [
            _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
            _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3),
            _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
            _mm512_setr_epi32(5, 5, 5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7, 7, 7, 7),
        ];
        for (i, out) in y.iter_mut().enumerate() {
            let row = rows.row(i);
            let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for (bi, b) in row.chunks_exact(block).enumerate() {
                super::prefetch_ahead(b);
                let sm = q4_k_scales(b.as_ptr());
                // − Σ_j dmin·m_j · Σ x_j (lanes 0..8 multiply zeros).
                acc0 = _mm512_fmadd_ps(sm, _mm512_loadu_ps(sums.as_ptr().add(16 * bi)), acc0);
                let qh = if FIVE {
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(b.as_ptr().add(16).cast()))
                } else {
                    _mm512_setzero_si512()
                };
                let xb = xp.as_ptr().add(256 * bi);
                for h in 0..2 {
                    let v = _mm512_loadu_si512(b.as_ptr().add(qs_at + 64 * h) as *const _);
                    let x = xb.add(128 * h);
                    // Value (n, t) of every lane: nibble n of byte t.
                    let q = |n: i32, t: i32| {
                        let shift = _mm_cvtsi32_si128(8 * t + 4 * n);
                        let low = _mm512_permutexvar_ps(_mm512_srl_epi32(v, shift), io);
                        if FIVE {
                            let bit = _mm512_srlv_epi32(qh, qh_shift(h as i32, n, t));
                            _mm512_add_ps(low, _mm512_permutexvar_ps(bit, sixteen))
                        } else {
                            low
                        }
                    };
                    let xv = |j: usize| _mm512_loadu_ps(x.add(16 * j));
                    let mut lo = _mm512_mul_ps(q(0, 0), xv(0));
                    lo = _mm512_fmadd_ps(q(0, 1), xv(1), lo);
                    lo = _mm512_fmadd_ps(q(0, 2), xv(2), lo);
                    lo = _mm512_fmadd_ps(q(0, 3), xv(3), lo);
                    let mut hi = _mm512_mul_ps(q(1, 0), xv(4));
                    hi = _mm512_fmadd_ps(q(1, 1), xv(5), hi);
                    hi = _mm512_fmadd_ps(q(1, 2), xv(6), hi);
                    hi = _mm512_fmadd_ps(q(1, 3), xv(7), hi);
                    let scale = |j: usize| _mm512_permutexvar_ps(lane_scale[j], sm);
                    acc0 = _mm512_fmadd_ps(lo, scale(2 * h), acc0);
                    acc1 = _mm512_fmadd_ps(hi, scale(2 * h + 1), acc1);
                }
            }
            *out = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        }
    })
}

/// `x` in the order the Q6_K kernel reads each 256-value block: per half `h` (64 bytes of
/// `ql`, 32 of `qh`), nibble `n` and byte `t` of each lane, lane `l` holds value
/// `128h + 64n + 32·(l/8) + 4·(l mod 8) + t`.
fn q6_k_input(x: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.resize(x.len(), 0.0);
    for (xb, pb) in x.chunks_exact(256).zip(out.chunks_exact_mut(256)) {
        let mut i = 0;
        for h in 0..2 {
            for n in 0..2 {
                for t in 0..4 {
                    for l in 0..16 {
                        pb[i] = xb[128 * h + 64 * n + 32 * (l / 8) + 4 * (l % 8) + t];
                        i += 1;
                    }
                }
            }
        }
    }
}

/// `y[i] = x · rows.row(i)` over Q6_K rows (`ql: [u8; 128], qh: [u8; 64], scales: [i8; 16],
/// d: f16` per 256 values).
///
/// # Safety
/// The CPU has AVX-512F and F16C.
#[target_feature(enable = "avx512f,f16c")]
pub(super) unsafe fn q6_k(rows: &Rows, x: &[f32], y: &mut [f32]) {
    assert_eq!(rows.row_bytes / 210 * 256, x.len());
    INPUT.with(|input| {
        let mut input = input.borrow_mut();
        q6_k_input(x, &mut input);
        let xp = input.as_slice();
        let io = iota();
        // The two high bits' contribution, minus 32, by their value (the permute reads the
        // low 4 bits of a lane: the table repeats every 4).
        let high = _mm512_setr_ps(
            -32., -16., 0., 16., -32., -16., 0., 16., -32., -16., 0., 16., -32., -16., 0., 16.,
        );
        // Per lane, how far `qh` shifts to bring the value's two bits down: byte t, bits 4n
        // (values 64n + l of the half) or 4n + 2 (values 64n + 32 + l), as `super::q6_k`.
        let qh_shift = |t: i32, n: i32| {
            let a = 8 * t + 4 * n;
            let b = a + 2;
            _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
        };
        let qh_shifts = [
            qh_shift(0, 0),
            qh_shift(1, 0),
            qh_shift(2, 0),
            qh_shift(3, 0),
            qh_shift(0, 1),
            qh_shift(1, 1),
            qh_shift(2, 1),
            qh_shift(3, 1),
        ];
        // The scale of each lane, per half and nibble: 16-value sub-blocks 8h + 4n + l/4.
        let lane_scale = |s: i32| {
            _mm512_setr_epi32(
                s,
                s,
                s,
                s,
                s + 1,
                s + 1,
                s + 1,
                s + 1,
                s + 2,
                s + 2,
                s + 2,
                s + 2,
                s + 3,
                s + 3,
                s + 3,
                s + 3,
            )
        };
        let lane_scales = [lane_scale(0), lane_scale(4), lane_scale(8), lane_scale(12)];
        for (i, out) in y.iter_mut().enumerate() {
            let row = rows.row(i);
            let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for (bi, b) in row.chunks_exact(210).enumerate() {
                super::prefetch_ahead(b);
                let p = b.as_ptr();
                let d = _mm_cvtph_ps(_mm_cvtsi32_si128(
                    (p.add(208) as *const u16).read_unaligned() as i32,
                ));
                let sc =
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(192).cast())));
                // `d·sc` per 16-value sub-block, the f32 product `super::q6_k` forms.
                let sc = _mm512_mul_ps(_mm512_broadcastss_ps(d), sc);
                let xb = xp.as_ptr().add(256 * bi);
                for h in 0..2 {
                    let ql = _mm512_loadu_si512(p.add(64 * h) as *const _);
                    let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(128 + 32 * h).cast()));
                    let x = xb.add(128 * h);
                    // Value j (n = j / 4, t = j % 4) of every lane, minus 32, as a float.
                    let q = |j: usize| {
                        let shift = _mm_cvtsi32_si128((8 * (j % 4) + 4 * (j / 4)) as i32);
                        let low = _mm512_permutexvar_ps(_mm512_srl_epi32(ql, shift), io);
                        let top = _mm512_permutexvar_ps(_mm512_srlv_epi32(qh, qh_shifts[j]), high);
                        _mm512_add_ps(low, top)
                    };
                    let xv = |j: usize| _mm512_loadu_ps(x.add(16 * j));
                    let mut s0 = _mm512_mul_ps(q(0), xv(0));
                    s0 = _mm512_fmadd_ps(q(1), xv(1), s0);
                    s0 = _mm512_fmadd_ps(q(2), xv(2), s0);
                    s0 = _mm512_fmadd_ps(q(3), xv(3), s0);
                    let mut s1 = _mm512_mul_ps(q(4), xv(4));
                    s1 = _mm512_fmadd_ps(q(5), xv(5), s1);
                    s1 = _mm512_fmadd_ps(q(6), xv(6), s1);
                    s1 = _mm512_fmadd_ps(q(7), xv(7), s1);
                    let scale = |j: usize| _mm512_permutexvar_ps(lane_scales[j], sc);
                    acc0 = _mm512_fmadd_ps(s0, scale(2 * h), acc0);
                    acc1 = _mm512_fmadd_ps(s1, scale(2 * h + 1), acc1);
                }
            }
            *out = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        }
    })
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    fn has_features() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c")
    }

    #[test]
    fn q4_k_rows_are_the_dequantised_dot_up_to_rounding() {
        if has_features() {
            super::super::assert_dot_is_the_dequantised_one(GgmlDType::Q4K, super::q4_k);
        }
    }

    #[test]
    fn q5_k_rows_are_the_dequantised_dot_up_to_rounding() {
        if has_features() {
            super::super::assert_dot_is_the_dequantised_one(GgmlDType::Q5K, super::q5_k);
        }
    }

    #[test]
    fn q6_k_rows_are_the_dequantised_dot_up_to_rounding() {
        if has_features() {
            super::super::assert_dot_is_the_dequantised_one(GgmlDType::Q6K, super::q6_k);
        }
    }
}

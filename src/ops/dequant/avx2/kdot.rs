//! One input row against Q4_K, Q5_K and Q6_K rows on AVX2 (decode at one sequence over a
//! Q4_K_M or Q5_K_M file, where these formats hold nearly every weight), each sub-block summed
//! before it is scaled, as `../kdot.rs` does on AVX-512:
//!
//! `x · row = Σ_sub (d·sc) · Σ q·x − Σ_sub (dmin·m) · Σ x`
//!
//! The bit-exact kernels (`kernels!`' `*_dot`) dequantise every value first: a multiply(-add)
//! per 8 values more, and the scales broadcast per sub-block kept the compiler spilling
//! (Q4_K 10 G values/s from memory on two Zen 3 cores, Q6_K 12.5, where Q8_0's kernel reads
//! 19). Here a value is made by one byte shuffle (the [split order](super::split_x), as the
//! bit-exact kernels) and one conversion, multiplied by `x` straight away, and each
//! 32-value (Q4_K) or 16-value (Q6_K, half a vector each) sum takes its scale once.
//!
//! **Exactness** as `../kdot.rs`: `q` (or `q − 32`), `d·sc` and `dmin·m` are the format's
//! own numbers, the f32 products candle's dequantisation forms; `q·x` rounds where candle
//! rounds the dequantised value and its product. Both are the exact dot product up to
//! rounding of a change of summation order; the tests bound both against an f64 reference.
//! The kernels for several rows keep candle's values bit for bit.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::super::{prefetch_ahead, scales_mins_k4, Rows};
use super::{factor, hsum8, lanes, split_into};

thread_local! {
    /// `x` in split order (and, for Q4_K and Q5_K, each sub-block's `Σ x` after it), reused
    /// across calls.
    static INPUT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `Σ_a lanes(q, a) · x[8a..8a + 8]` lane by lane: one 32-value sub-block's products in
/// split order, in two chains.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn products<const SIGNED: bool>(q: __m256i, x: *const f32) -> __m256 {
    let xv = |a: usize| _mm256_loadu_ps(x.add(8 * a));
    let mut t0 = _mm256_mul_ps(lanes::<true, SIGNED>(q, 0), xv(0));
    let mut t1 = _mm256_mul_ps(lanes::<true, SIGNED>(q, 1), xv(1));
    t0 = _mm256_fmadd_ps(lanes::<true, SIGNED>(q, 2), xv(2), t0);
    t1 = _mm256_fmadd_ps(lanes::<true, SIGNED>(q, 3), xv(3), t1);
    _mm256_add_ps(t0, t1)
}

/// Eight bytes as f32 lanes, unsigned or signed.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bytes8<const SIGNED: bool>(v: u64) -> __m256 {
    let b = _mm_cvtsi64_si128(v as i64);
    _mm256_cvtepi32_ps(if SIGNED {
        _mm256_cvtepi8_epi32(b)
    } else {
        _mm256_cvtepu8_epi32(b)
    })
}

/// `y[i] = x · rows.row(i)` over Q4_K rows (`d: f16, dmin: f16, scales: [u8; 12], qs: [u8;
/// 128]`).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_k(rows: &Rows, x: &[f32], y: &mut [f32]) {
    k4_or_k5::<false>(rows, x, y)
}

/// `y[i] = x · rows.row(i)` over Q5_K rows (`d: f16, dmin: f16, scales: [u8; 12], qh: [u8;
/// 32], qs: [u8; 128]`): Q4_K's values with a fifth bit each from `qh`, worth 16.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q5_k(rows: &Rows, x: &[f32], y: &mut [f32]) {
    k4_or_k5::<true>(rows, x, y)
}

/// [`q4_k`], or [`q5_k`] when `FIVE`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k4_or_k5<const FIVE: bool>(rows: &Rows, x: &[f32], y: &mut [f32]) {
    let (block, qs_at) = if FIVE { (176, 48) } else { (144, 16) };
    assert_eq!(rows.row_bytes / block * 256, x.len());
    INPUT.with(|input| {
        let mut input = input.borrow_mut();
        let blocks = x.len() / 256;
        input.clear();
        input.resize(x.len() + 8 * blocks, 0.0);
        let (xs, sums) = input.split_at_mut(x.len());
        split_into(x, xs);
        for (s, c) in sums.iter_mut().zip(x.chunks_exact(32)) {
            *s = c.iter().sum();
        }
        let (xs, sums) = (&*xs, &*sums);
        let low4 = _mm256_set1_epi8(0x0F);
        for (i, out) in y.iter_mut().enumerate() {
            let row = rows.row(i);
            let (mut acc0, mut acc1, mut mins) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            for (bi, b) in row.chunks_exact(block).enumerate() {
                prefetch_ahead(b);
                let p = b.as_ptr();
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                let (d, dmin) = (
                    _mm256_broadcastss_ps(dm),
                    _mm256_broadcastss_ps(_mm_movehdup_ps(dm)),
                );
                let (sc, mn) = scales_mins_k4(&b[4..16]);
                // `d·sc_j` and `dmin·m_j` in lane j, the products candle forms.
                let scales = _mm256_mul_ps(d, bytes8::<false>(sc));
                let m = _mm256_mul_ps(dmin, bytes8::<false>(mn));
                mins = _mm256_fmadd_ps(m, _mm256_loadu_ps(sums.as_ptr().add(8 * bi)), mins);
                let xb = xs.as_ptr().add(256 * bi);
                let qh = if FIVE {
                    _mm256_loadu_si256(p.add(16) as *const __m256i)
                } else {
                    _mm256_setzero_si256()
                };
                for g in 0..4 {
                    let q = _mm256_loadu_si256(p.add(qs_at + 32 * g) as *const __m256i);
                    let mut lo = _mm256_and_si256(q, low4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
                    if FIVE {
                        lo = _mm256_or_si256(lo, super::kblocks::fifth_bit(qh, 2 * g));
                        hi = _mm256_or_si256(hi, super::kblocks::fifth_bit(qh, 2 * g + 1));
                    }
                    let scale =
                        |j: usize| _mm256_permutevar8x32_ps(scales, _mm256_set1_epi32(j as i32));
                    let (t0, t1) = (
                        products::<false>(lo, xb.add(64 * g)),
                        products::<false>(hi, xb.add(64 * g + 32)),
                    );
                    acc0 = _mm256_fmadd_ps(t0, scale(2 * g), acc0);
                    acc1 = _mm256_fmadd_ps(t1, scale(2 * g + 1), acc1);
                }
            }
            *out = hsum8(_mm256_sub_ps(_mm256_add_ps(acc0, acc1), mins));
        }
    })
}

/// `y[i] = x · rows.row(i)` over Q6_K rows (`ql: [u8; 128], qh: [u8; 64], scales: [i8; 16],
/// d: f16` per 256 values).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q6_k(rows: &Rows, x: &[f32], y: &mut [f32]) {
    assert_eq!(rows.row_bytes / 210 * 256, x.len());
    INPUT.with(|input| {
        let mut input = input.borrow_mut();
        input.clear();
        input.resize(x.len(), 0.0);
        split_into(x, &mut input);
        let xs = input.as_slice();
        // Split order puts values 0–15 of a 32 in each vector's low half and 16–31 in its
        // high half: scales 2j and 2j + 1 of 8.
        let pair = |j: i32| {
            let (a, b) = (2 * j, 2 * j + 1);
            _mm256_setr_epi32(a, a, a, a, b, b, b, b)
        };
        let pairs = [pair(0), pair(1), pair(2), pair(3)];
        for (i, out) in y.iter_mut().enumerate() {
            let row = rows.row(i);
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for (bi, b) in row.chunks_exact(210).enumerate() {
                prefetch_ahead(b);
                let p = b.as_ptr();
                let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(
                    (p.add(208) as *const u16).read_unaligned() as i32,
                )));
                let xb = xs.as_ptr().add(256 * bi);
                for h in 0..2 {
                    // `d·sc` of the half's 8 sub-blocks of 16, the products candle forms.
                    let sc = (p.add(192 + 8 * h) as *const u64).read_unaligned();
                    let scales = _mm256_mul_ps(d, bytes8::<true>(sc));
                    let quarters = super::kblocks::q6_k_quarters(b.try_into().expect("a block"), h);
                    for (j, q) in quarters.iter().enumerate() {
                        let t = products::<true>(*q, xb.add(128 * h + 32 * j));
                        let scale = _mm256_permutevar8x32_ps(scales, pairs[j]);
                        if j % 2 == 0 {
                            acc0 = _mm256_fmadd_ps(t, scale, acc0);
                        } else {
                            acc1 = _mm256_fmadd_ps(t, scale, acc1);
                        }
                    }
                }
            }
            // Signed split-order lanes carry their value times 2^24 (exact: a power of two).
            *out = hsum8(_mm256_add_ps(acc0, acc1)) / factor(true, true);
        }
    })
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    #[test]
    fn q4_k_rows_are_the_dequantised_dot_up_to_rounding() {
        if super::super::available() {
            super::super::super::assert_dot_is_the_dequantised_one(GgmlDType::Q4K, super::q4_k);
        }
    }

    #[test]
    fn q5_k_rows_are_the_dequantised_dot_up_to_rounding() {
        if super::super::available() {
            super::super::super::assert_dot_is_the_dequantised_one(GgmlDType::Q5K, super::q5_k);
        }
    }

    #[test]
    fn q6_k_rows_are_the_dequantised_dot_up_to_rounding() {
        if super::super::available() {
            super::super::super::assert_dot_is_the_dequantised_one(GgmlDType::Q6K, super::q6_k);
        }
    }
}

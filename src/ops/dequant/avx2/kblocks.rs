//! The k-quants' blocks on AVX2 (Q4_K, Q5_K, Q6_K): each block's values made in registers,
//! candle's bit for bit, for `kernels!` (strips and 2–8 rows), and the pieces that the one-row
//! kernels (`kdot.rs`) share with them.

use std::arch::x86_64::*;

use super::super::{f16_to_f32, scales_mins_k4};
use super::{factor, half, lanes};

/// A Q4_K block's 256 values, `d·sc · q − dmin·m` (a product, then a difference, as the
/// portable formula), given to `f` as 8 groups of 4 vectors of 8, each 32 values in
/// [`lanes`]' order. `d·sc` (an f16 times 6 bits) and its product by `q` (4 bits) are exact,
/// so one multiply-subtract rounds as the product-then-difference does.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q4_k_block<const SPLIT: bool>(
    b: &[u8; 144],
    f: impl FnMut(usize, [__m256; 4]),
) {
    k4_or_k5_block::<SPLIT, false>(b, f)
}

/// A Q5_K block's 256 values, `d·sc · (q + 16·h) − dmin·m`: [`q4_k_block`]'s, each nibble
/// with its fifth bit from `qh` ([`fifth_bit`]). `q + 16·h` has 5 bits, so the product is
/// still exact.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q5_k_block<const SPLIT: bool>(
    b: &[u8; 176],
    f: impl FnMut(usize, [__m256; 4]),
) {
    k4_or_k5_block::<SPLIT, true>(b, f)
}

/// [`q4_k_block`] (`b` 144 bytes), or [`q5_k_block`] when `FIVE` (176: `qh` at 16, `qs` at
/// 48 instead of 16).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k4_or_k5_block<const SPLIT: bool, const FIVE: bool>(
    b: &[u8],
    mut f: impl FnMut(usize, [__m256; 4]),
) {
    let qs_at = if FIVE { 48 } else { 16 };
    assert_eq!(b.len(), qs_at + 128);
    let (d, min) = (half(b, 0), half(b, 2));
    let (sc, mn) = scales_mins_k4(&b[4..16]);
    let low4 = _mm256_set1_epi8(0x0F);
    let qh = if FIVE {
        _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i)
    } else {
        _mm256_setzero_si256()
    };
    for g in 0..4 {
        let q = _mm256_loadu_si256(b.as_ptr().add(qs_at + 32 * g) as *const __m256i);
        let halves = [
            _mm256_and_si256(q, low4),
            _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4),
        ];
        for (s, nib) in halves.iter().enumerate() {
            let j = 2 * g + s;
            let nib = if FIVE {
                _mm256_or_si256(*nib, fifth_bit(qh, j))
            } else {
                *nib
            };
            let (d1, m1) = (
                _mm256_mul_ps(d, _mm256_set1_ps((sc >> (8 * j)) as u8 as f32)),
                _mm256_mul_ps(min, _mm256_set1_ps((mn >> (8 * j)) as u8 as f32)),
            );
            f(
                j,
                std::array::from_fn(|a| _mm256_fmsub_ps(lanes::<SPLIT, false>(nib, a), d1, m1)),
            );
        }
    }
}

/// 16 in byte `l` where bit `j` of `qh`'s byte `l` is set, else 0: the fifth bit of a Q5_K
/// block's sub-block `j` (value `32j + l`), moved to bit 4 by a 16-bit shift (bits crossing
/// into the other byte land below bit 4 or above it, and the mask drops them).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn fifth_bit(qh: __m256i, j: usize) -> __m256i {
    let moved = if j <= 4 {
        _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - j as i32))
    } else {
        _mm256_srl_epi16(qh, _mm_cvtsi32_si128(j as i32 - 4))
    };
    _mm256_and_si256(moved, _mm256_set1_epi8(0x10))
}

/// Half `h` of a Q6_K block as four vectors of 32 signed bytes `q − 32`: quarter `j` holds
/// values `128h + 32j + l` in byte `l`, from the low (`j` 0, 1) or high (2, 3) nibbles of
/// `ql[64h + l]` (`j` even) or `ql[64h + 32 + l]` (odd), with bits `2j, 2j + 1` of
/// `qh[32h + l]` on top.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q6_k_quarters(b: &[u8; 210], h: usize) -> [__m256i; 4] {
    let (low4, two, bias) = (
        _mm256_set1_epi8(0x0F),
        _mm256_set1_epi8(0x03),
        _mm256_set1_epi8(32),
    );
    let ql0 = _mm256_loadu_si256(b.as_ptr().add(64 * h) as *const __m256i);
    let ql1 = _mm256_loadu_si256(b.as_ptr().add(64 * h + 32) as *const __m256i);
    let qh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * h) as *const __m256i);
    let top =
        |shift: __m128i| _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srl_epi16(qh, shift), two));
    [
        _mm256_or_si256(_mm256_and_si256(ql0, low4), top(_mm_cvtsi32_si128(0))),
        _mm256_or_si256(_mm256_and_si256(ql1, low4), top(_mm_cvtsi32_si128(2))),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4),
            top(_mm_cvtsi32_si128(4)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
            top(_mm_cvtsi32_si128(6)),
        ),
    ]
    .map(|q| _mm256_sub_epi8(q, bias))
}

/// A Q6_K block's 256 values, `(d · sc) · (q − 32)` as the portable formula, given to `f` as 8
/// groups of 4 vectors of 8 in order: in each half of the block, values `l`, `l + 32`,
/// `l + 64` and `l + 96` take the low and high nibbles of `ql[l]` and `ql[l + 32]`, with two
/// bits of `qh[l]` each on top.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q6_k_block<const SPLIT: bool>(
    b: &[u8; 210],
    mut f: impl FnMut(usize, [__m256; 4]),
) {
    let d = f16_to_f32(u16::from_le_bytes([b[208], b[209]]));
    for h in 0..2 {
        for (j, q) in q6_k_quarters(b, h).iter().enumerate() {
            let q = *q;
            // Values 32·j + 0..16 (the low halves) take scale 2·j, values 32·j + 16..32 scale
            // 2·j + 1; `d·sc` is rounded as the portable formula rounds it, then scaled by
            // the values' factor (exact).
            let sc = |k: usize| {
                _mm_set1_ps(d * (b[192 + 8 * h + 2 * j + k] as i8) as f32 / factor(SPLIT, true))
            };
            // Split order: each vector's low half takes the first 16 values' scale, its high
            // half the last 16's; in order, vectors 0 and 1 the first, 2 and 3 the last.
            let (s0, s1) = if SPLIT {
                let s = _mm256_setr_m128(sc(0), sc(1));
                (s, s)
            } else {
                (
                    _mm256_setr_m128(sc(0), sc(0)),
                    _mm256_setr_m128(sc(1), sc(1)),
                )
            };
            f(
                4 * h + j,
                std::array::from_fn(|a| {
                    _mm256_mul_ps(lanes::<SPLIT, true>(q, a), if a < 2 { s0 } else { s1 })
                }),
            );
        }
    }
}

//! AVX-512 dequantisation of the 4- and 5-bit formats by table lookup: a block's 4-bit value
//! `q` can only map to 16 floats per scale (a 5-bit one to 32), so each scale's results are
//! computed once, with the very operations of the scalar formula (`d1 · q − m1` for Q4_K: a
//! product, then a difference, never fused), and every value is then one permute (`vpermps`,
//! which reads the low 4 bits of each index, or `vpermt2ps` over two vectors for 5 bits)
//! instead of a widen, a conversion, a product and a difference. The values are bit for bit
//! those of [`super`]'s formulas, and so candle's.

use std::arch::x86_64::*;

use super::half_at;

/// `[0, 1, …, 15]`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn iota() -> __m512 {
    _mm512_setr_ps(
        0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
    )
}

/// The 16 bytes at `p`, each widened to a 32-bit lane.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn bytes16(p: *const u8) -> __m512i {
    _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
}

/// Q4_0 blocks (`d: f16, qs: [u8; 16]`) into 32 values each: `(q − 8) · d`.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q4_0(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len() / 18 * 32, out.len());
    let minus8 = _mm512_sub_ps(iota(), _mm512_set1_ps(8.0));
    for (b, y) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
        let t = _mm512_mul_ps(minus8, _mm512_set1_ps(half_at(b, 0)));
        let q = bytes16(b.as_ptr().add(2));
        _mm512_storeu_ps(y.as_mut_ptr(), _mm512_permutexvar_ps(q, t));
        _mm512_storeu_ps(
            y.as_mut_ptr().add(16),
            _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t),
        );
    }
}

/// Q4_1 blocks (`d: f16, m: f16, qs: [u8; 16]`) into 32 values each: `q · d + m`.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q4_1(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len() / 20 * 32, out.len());
    for (b, y) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
        let (d, m) = (half_at(b, 0), half_at(b, 2));
        let t = _mm512_add_ps(_mm512_mul_ps(iota(), _mm512_set1_ps(d)), _mm512_set1_ps(m));
        let q = bytes16(b.as_ptr().add(4));
        _mm512_storeu_ps(y.as_mut_ptr(), _mm512_permutexvar_ps(q, t));
        _mm512_storeu_ps(
            y.as_mut_ptr().add(16),
            _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t),
        );
    }
}

/// The 5-bit indices of a Q5_0/Q5_1 block's 32 values: low nibbles (values 0..16) and high
/// nibbles (16..32) of `qs`, each with its fifth bit from `qh` (bit `j` for value `j`) as bit 4.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn q5_indices(qs: *const u8, qh: u32) -> (__m512i, __m512i) {
    let q = bytes16(qs);
    let bit = _mm512_sllv_epi32(
        _mm512_set1_epi32(1),
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
    );
    let sixteen = _mm512_set1_epi32(16);
    let lo = _mm512_and_si512(q, _mm512_set1_epi32(0xF));
    let hi = _mm512_srli_epi32(q, 4);
    let qh_lo = _mm512_set1_epi32(qh as i32);
    let qh_hi = _mm512_set1_epi32((qh >> 16) as i32);
    (
        _mm512_mask_or_epi32(lo, _mm512_test_epi32_mask(qh_lo, bit), lo, sixteen),
        _mm512_mask_or_epi32(hi, _mm512_test_epi32_mask(qh_hi, bit), hi, sixteen),
    )
}

/// Q5_0 blocks (`d: f16, qh: [u8; 4], qs: [u8; 16]`) into 32 values each: `(q − 16) · d`,
/// from a 32-entry table (two vectors, `vpermt2ps`).
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q5_0(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len() / 22 * 32, out.len());
    let (below, above) = (_mm512_sub_ps(iota(), _mm512_set1_ps(16.0)), iota());
    for (b, y) in bytes.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
        let d = _mm512_set1_ps(half_at(b, 0));
        let (t0, t1) = (_mm512_mul_ps(below, d), _mm512_mul_ps(above, d));
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let (i0, i1) = q5_indices(b.as_ptr().add(6), qh);
        _mm512_storeu_ps(y.as_mut_ptr(), _mm512_permutex2var_ps(t0, i0, t1));
        _mm512_storeu_ps(y.as_mut_ptr().add(16), _mm512_permutex2var_ps(t0, i1, t1));
    }
}

/// Q5_1 blocks (`d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]`) into 32 values each:
/// `q · d + m`, from a 32-entry table.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q5_1(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len() / 24 * 32, out.len());
    let (below, above) = (iota(), _mm512_add_ps(iota(), _mm512_set1_ps(16.0)));
    for (b, y) in bytes.chunks_exact(24).zip(out.chunks_exact_mut(32)) {
        let (d, m) = (_mm512_set1_ps(half_at(b, 0)), _mm512_set1_ps(half_at(b, 2)));
        let t0 = _mm512_add_ps(_mm512_mul_ps(below, d), m);
        let t1 = _mm512_add_ps(_mm512_mul_ps(above, d), m);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let (i0, i1) = q5_indices(b.as_ptr().add(8), qh);
        _mm512_storeu_ps(y.as_mut_ptr(), _mm512_permutex2var_ps(t0, i0, t1));
        _mm512_storeu_ps(y.as_mut_ptr().add(16), _mm512_permutex2var_ps(t0, i1, t1));
    }
}

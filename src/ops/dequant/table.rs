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
unsafe fn iota() -> __m512 {
    _mm512_setr_ps(
        0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
    )
}

/// The 16 bytes at `p`, each widened to a 32-bit lane.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bytes16(p: *const u8) -> __m512i {
    _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
}

/// `d·sc_j` and `dmin·m_j` for a Q4_K block's 8 sub-blocks, as `q4_k` computes them.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn q4_k_scales(d: f32, min: f32, scales: &[u8; 12]) -> ([f32; 8], [f32; 8]) {
    let (sc, mn) = super::scales_mins_k4(scales);
    let v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(mn as i64, sc as i64)));
    let dm = _mm512_setr_ps(
        d, d, d, d, d, d, d, d, min, min, min, min, min, min, min, min,
    );
    let mut both = [0f32; 16];
    _mm512_storeu_ps(both.as_mut_ptr(), _mm512_mul_ps(dm, v));
    let (mut ds, mut ms) = ([0f32; 8], [0f32; 8]);
    ds.copy_from_slice(&both[..8]);
    ms.copy_from_slice(&both[8..]);
    (ds, ms)
}

/// The (low, high) tables of Q4_K sub-blocks `2g` and `2g + 1`: `d·sc·q − dmin·m` for q in
/// 0..16, as `q4_k` computes them, from [`q4_k_scales`].
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn q4_k_tables(ds: &[f32; 8], ms: &[f32; 8], g: usize) -> (__m512, __m512) {
    let table = |j: usize| {
        _mm512_sub_ps(
            _mm512_mul_ps(_mm512_set1_ps(ds[j]), iota()),
            _mm512_set1_ps(ms[j]),
        )
    };
    (table(2 * g), table(2 * g + 1))
}

/// Q4_K blocks (`d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`) into 256 values each.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q4_k(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len() / 144 * 256, out.len());
    for (b, y) in bytes.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
        let (d, min) = (half_at(b, 0), half_at(b, 2));
        let scales: &[u8; 12] = b[4..16].try_into().unwrap();
        let (ds, ms) = q4_k_scales(d, min, scales);
        for g in 0..4 {
            let (lo, hi) = q4_k_tables(&ds, &ms, g);
            for h in 0..2 {
                let q = bytes16(b.as_ptr().add(16 + 32 * g + 16 * h));
                let y = y.as_mut_ptr().add(64 * g + 16 * h);
                _mm512_storeu_ps(y, _mm512_permutexvar_ps(q, lo));
                _mm512_storeu_ps(
                    y.add(32),
                    _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), hi),
                );
            }
        }
    }
}

/// Q5_K blocks (`d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`) into
/// 256 values each: Q4_K's with a fifth bit per value (bit `2g` of `qh[l]` for value
/// `64g + l`, bit `2g + 1` for `64g + 32 + l`), from 32-entry tables (`vpermt2ps`) of
/// `d·sc·q − dmin·m` for q in 0..32, as `super::q5_k` computes each value.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q5_k(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len() / 176 * 256, out.len());
    let sixteen = _mm512_set1_ps(16.0);
    let (nibble, one) = (_mm512_set1_epi32(0xF), _mm512_set1_epi32(1));
    for (b, y) in bytes.chunks_exact(176).zip(out.chunks_exact_mut(256)) {
        let (d, min) = (half_at(b, 0), half_at(b, 2));
        let scales: &[u8; 12] = b[4..16].try_into().unwrap();
        let (ds, ms) = q4_k_scales(d, min, scales);
        // Values 0..16 and 16..32 of sub-block j's table.
        let tables = |j: usize| {
            let (s, m) = (_mm512_set1_ps(ds[j]), _mm512_set1_ps(ms[j]));
            (
                _mm512_sub_ps(_mm512_mul_ps(s, iota()), m),
                _mm512_sub_ps(_mm512_mul_ps(s, _mm512_add_ps(iota(), sixteen)), m),
            )
        };
        for g in 0..4 {
            let ((lo0, lo1), (hi0, hi1)) = (tables(2 * g), tables(2 * g + 1));
            for h in 0..2 {
                let q = bytes16(b.as_ptr().add(48 + 32 * g + 16 * h));
                let qh = bytes16(b.as_ptr().add(16 + 16 * h));
                let bit = |j: usize| {
                    let v = _mm512_srl_epi32(qh, _mm_cvtsi32_si128(j as i32));
                    _mm512_slli_epi32(_mm512_and_si512(v, one), 4)
                };
                let lo = _mm512_or_si512(_mm512_and_si512(q, nibble), bit(2 * g));
                let hi = _mm512_or_si512(_mm512_srli_epi32(q, 4), bit(2 * g + 1));
                let y = y.as_mut_ptr().add(64 * g + 16 * h);
                _mm512_storeu_ps(y, _mm512_permutex2var_ps(lo0, lo, lo1));
                _mm512_storeu_ps(y.add(32), _mm512_permutex2var_ps(hi0, hi, hi1));
            }
        }
    }
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

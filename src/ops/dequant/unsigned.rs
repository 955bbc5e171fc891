//! Blocks as small unsigned integers for the int8 kernels (`small_matmul/int8/`): every
//! value of a block is `a · u − b`, with `u` a byte (`0..=255`) and `a`, `b` one pair per
//! subblock (the positions that share a scale). Q4_K: `u` the 4-bit value, `a = d·scale`,
//! `b = dmin·min` (candle's own `d1·q − m1`, so `a·u − b` is its dequantised value bit for
//! bit); Q5_K: the same with `u` the 5-bit value; Q6_K: `u` the 6-bit value, `a = d·scale`,
//! `b = 32·a`; Q8_0: `u = q + 128`, `a = d`, `b = 128·d`; Q4_0, Q4_1, Q5_0, Q5_1: `u` the 4- or
//! 5-bit value, `a = d`, `b` the centre times `d`, or minus the min. The bytes come out in
//! position order: stored by [`unpack`] (the VNNI kernel), or a K-quant block's 32 positions
//! at a time in registers (`*_bytes`, the AVX2 one-row kernel, which reads the block directly).

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

/// The f16 at `b[at..at + 2]` as f32, by F16C's conversion (exact; the AVX2 kernels'
/// [`half`](super::avx2::half)).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn half(b: &[u8], at: usize) -> f32 {
    _mm256_cvtss_f32(super::avx2::half(b, at))
}

/// Positions that share `a` and `b`: a Q6_K scale covers 16, a Q4_K or Q5_K scale or a Q8_0
/// block 32.
pub fn subblock(dtype: GgmlDType) -> Option<usize> {
    match dtype {
        GgmlDType::Q4K
        | GgmlDType::Q5K
        | GgmlDType::Q8_0
        | GgmlDType::Q4_0
        | GgmlDType::Q4_1
        | GgmlDType::Q5_0
        | GgmlDType::Q5_1 => Some(32),
        GgmlDType::Q6K => Some(16),
        _ => None,
    }
}

/// The blocks in `bytes` (whole blocks of `dtype`, one of [`subblock`]'s) as bytes at `u`
/// (one per position) and one `a`, `b` per subblock.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (every CPU the int8 kernels run on); `u` has room for
/// every position of the blocks, `a` and `b` for one value per subblock.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn unpack(dtype: GgmlDType, bytes: &[u8], u: *mut u8, a: *mut f32, b: *mut f32) {
    match dtype {
        GgmlDType::Q4K => k4s::<144>(bytes, u, a, b),
        GgmlDType::Q5K => k4s::<176>(bytes, u, a, b),
        GgmlDType::Q6K => {
            for (i, blk) in bytes.chunks_exact(210).enumerate() {
                q6_k(
                    blk.try_into().unwrap(),
                    u.add(256 * i),
                    a.add(16 * i),
                    b.add(16 * i),
                );
            }
        }
        GgmlDType::Q8_0 => {
            let flip = _mm256_set1_epi8(-128);
            for (i, blk) in bytes.chunks_exact(34).enumerate() {
                let d = half(blk, 0);
                *a.add(i) = d;
                *b.add(i) = 128.0 * d;
                let q = _mm256_loadu_si256(blk.as_ptr().add(2).cast());
                _mm256_storeu_si256(u.add(32 * i).cast(), _mm256_xor_si256(q, flip));
            }
        }
        GgmlDType::Q4_0 => small::<18, false, false>(bytes, u, a, b),
        GgmlDType::Q4_1 => small::<20, true, false>(bytes, u, a, b),
        GgmlDType::Q5_0 => small::<22, false, true>(bytes, u, a, b),
        GgmlDType::Q5_1 => small::<24, true, true>(bytes, u, a, b),
        _ => unreachable!("no unsigned form for {dtype:?}"),
    }
}

/// The 32-position formats of `B` bytes: `d: f16`, then `m: f16` (`MIN`: Q4_1, Q5_1), then
/// `qh: u32`, bit `j` the fifth bit of position `j` (`HIGH`: Q5_0, Q5_1), then `qs: [u8; 16]`,
/// positions 0..16 in the low nibbles. Without a min the values are centred: `b = 8·d` (Q4_0)
/// or `16·d` (Q5_0); with one, `b = −m`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn small<const B: usize, const MIN: bool, const HIGH: bool>(
    bytes: &[u8],
    u: *mut u8,
    a: *mut f32,
    b: *mut f32,
) {
    let low = _mm_set1_epi8(0x0F);
    for (i, blk) in bytes.chunks_exact(B).enumerate() {
        let d = half(blk, 0);
        *a.add(i) = d;
        *b.add(i) = match (MIN, HIGH) {
            (true, _) => -half(blk, 2),
            (false, false) => 8.0 * d,
            (false, true) => 16.0 * d,
        };
        let q = _mm_loadu_si128(blk.as_ptr().add(B - 16).cast());
        let mut v = _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16::<4>(q), low),
            _mm_and_si128(q, low),
        );
        if HIGH {
            let at = if MIN { 4 } else { 2 };
            let qh = u32::from_le_bytes(blk[at..at + 4].try_into().unwrap());
            v = _mm256_or_si256(v, _mm256_and_si256(bits(qh), _mm256_set1_epi8(0x10)));
        }
        _mm256_storeu_si256(u.add(32 * i).cast(), v);
    }
}

/// Bit `j` of `qh` as byte `j` of the vector: all ones where set, zero where not.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bits(qh: u32) -> __m256i {
    // Byte j takes byte j / 8 of `qh`, then keeps only its bit j % 8.
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), spread);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit)
}

/// Every Q4_K or Q5_K block of `bytes` (see [`k4`]).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4s<const B: usize>(bytes: &[u8], u: *mut u8, a: *mut f32, b: *mut f32) {
    for (i, blk) in bytes.chunks_exact(B).enumerate() {
        k4::<B>(
            blk.try_into().unwrap(),
            u.add(256 * i),
            a.add(8 * i),
            b.add(8 * i),
        );
    }
}

/// Q4_K (`B = 144`: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`) or Q5_K (`B = 176`,
/// `qh: [u8; 32]` before `qs`).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4<const B: usize>(blk: &[u8; B], u: *mut u8, a: *mut f32, b: *mut f32) {
    let (sa, sb) = k_scales(blk);
    _mm256_storeu_ps(a, sa);
    _mm256_storeu_ps(b, sb);
    k_bytes(blk, |j, v| _mm256_storeu_si256(u.add(32 * j).cast(), v));
}

/// A Q4_K (`B = 144`) or Q5_K (`B = 176`) block's bytes: [`q4_k_bytes`] or [`q5_k_bytes`].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn k_bytes<const B: usize>(blk: &[u8; B], f: impl FnMut(usize, __m256i)) {
    match B {
        144 => q4_k_bytes(blk[..].try_into().unwrap(), f),
        176 => q5_k_bytes(blk[..].try_into().unwrap(), f),
        _ => unreachable!("Q4_K or Q5_K blocks"),
    }
}

/// Q6_K: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k(blk: &[u8; 210], u: *mut u8, a: *mut f32, b: *mut f32) {
    for (h, s) in q6_k_scales(blk).into_iter().enumerate() {
        _mm256_storeu_ps(a.add(8 * h), s);
        _mm256_storeu_ps(b.add(8 * h), _mm256_mul_ps(_mm256_set1_ps(32.0), s));
    }
    q6_k_bytes(blk, |j, v| _mm256_storeu_si256(u.add(32 * j).cast(), v));
}

/// `a = d·scale` and `b = dmin·min` for the 8 subblocks of a Q4_K or Q5_K block (`d: f16,
/// dmin: f16, scales: [u8; 12]` first), the 6-bit values out of 12 bytes at once (as
/// `scale_min_k4`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn k_scales(blk: &[u8]) -> (__m256, __m256) {
    let (d, min) = (half(blk, 0), half(blk, 2));
    let (sc, mn) = super::scales_mins_k4(&blk[4..16]);
    let bytes = |v: u64| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi64x(0, v as i64)));
    (
        _mm256_mul_ps(_mm256_set1_ps(d), bytes(sc)),
        _mm256_mul_ps(_mm256_set1_ps(min), bytes(mn)),
    )
}

/// A Q4_K block's bytes `u` (the 4-bit values), 32 positions (one subblock) at a time:
/// `f(j, u)` for positions `32j..32j + 32`, `j` in order. Each 32 bytes of `qs` hold 64
/// positions, the first 32 in the low nibbles.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn q4_k_bytes(blk: &[u8; 144], mut f: impl FnMut(usize, __m256i)) {
    let low = _mm256_set1_epi8(0x0F);
    for g in 0..4 {
        let q = _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * g).cast());
        f(2 * g, _mm256_and_si256(q, low));
        f(2 * g + 1, _mm256_and_si256(_mm256_srli_epi16::<4>(q), low));
    }
}

/// A Q5_K block's bytes `u` (the 5-bit values), as [`q4_k_bytes`]: Q4_K's layout with each
/// position's fifth bit in `qh` (bit `2g` of byte `l` for position `64g + l`, bit `2g + 1`
/// for `64g + 32 + l`), as candle's `to_float` reads it.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn q5_k_bytes(blk: &[u8; 176], mut f: impl FnMut(usize, __m256i)) {
    let low = _mm256_set1_epi8(0x0F);
    let sixteen = _mm256_set1_epi8(16);
    let qh = _mm256_loadu_si256(blk.as_ptr().add(16).cast());
    // Bit j of every qh byte, as 16 or 0.
    let fifth = |j: u32| {
        let bit = _mm256_set1_epi8(1 << j);
        _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), sixteen)
    };
    for g in 0..4 {
        let q = _mm256_loadu_si256(blk.as_ptr().add(48 + 32 * g).cast());
        let lo = _mm256_or_si256(_mm256_and_si256(q, low), fifth(2 * g as u32));
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low);
        f(2 * g, lo);
        f(2 * g + 1, _mm256_or_si256(hi, fifth(2 * g as u32 + 1)));
    }
}

/// `a = d·scale` of a Q6_K block's 16 subblocks (of 16 positions), 8 a vector (its
/// `b = 32·a`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn q6_k_scales(blk: &[u8; 210]) -> [__m256; 2] {
    let d = _mm256_set1_ps(half(blk, 208));
    [0, 1].map(|h| {
        let sc = _mm_loadl_epi64(blk.as_ptr().add(192 + 8 * h).cast());
        _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)))
    })
}

/// A Q6_K block's bytes `u` (the 6-bit values), as [`q4_k_bytes`]: each half of 128
/// positions takes its low 4 bits from 64 bytes of `ql` (low nibbles, then high) and its high
/// 2 bits from 32 bytes of `qh` (2 bits per quarter).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn q6_k_bytes(blk: &[u8; 210], mut f: impl FnMut(usize, __m256i)) {
    let (low, two) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
    let p = blk.as_ptr();
    for h in 0..2 {
        let ql0 = _mm256_loadu_si256(p.add(64 * h).cast());
        let ql1 = _mm256_loadu_si256(p.add(64 * h + 32).cast());
        let qh = _mm256_loadu_si256(p.add(128 + 32 * h).cast());
        // The high 2 bits of quarter q are bits 2q..2q + 2 of `qh`, moved to bits 4..6.
        let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, two));
        let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_slli_epi16::<2>(two)));
        let h2 = _mm256_and_si256(qh, _mm256_slli_epi16::<4>(two));
        let h3 = _mm256_srli_epi16::<2>(_mm256_and_si256(qh, _mm256_slli_epi16::<6>(two)));
        f(4 * h, _mm256_or_si256(_mm256_and_si256(ql0, low), h0));
        f(4 * h + 1, _mm256_or_si256(_mm256_and_si256(ql1, low), h1));
        let hi0 = _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low);
        f(4 * h + 2, _mm256_or_si256(hi0, h2));
        let hi1 = _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low);
        f(4 * h + 3, _mm256_or_si256(hi1, h3));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// `a · u − b` is the dequantised value: bit for bit where candle also scales and then
    /// adds the min (Q4_K, Q5_K, Q4_1, Q5_1), within an f32 rounding of it where the offset is taken
    /// out after the scale.
    #[test]
    fn unsigned_values_rebuild_the_dequantised_block() {
        if !super::super::avx2::available() {
            return;
        }
        use GgmlDType::*;
        for dtype in [Q4K, Q5K, Q6K, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1] {
            let sub = subblock(dtype).unwrap();
            let n = 512;
            let t = Tensor::randn(0f32, 1.0, (1, n), &Device::Cpu).unwrap();
            let t = (t.clone() * t.abs().unwrap().exp().unwrap()).unwrap();
            let q = QTensor::quantize(&t, dtype).unwrap();
            let bytes = q.data().unwrap();
            let dq = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let (mut u, mut a, mut b) = (vec![0u8; n], vec![0f32; n / sub], vec![0f32; n / sub]);
            // SAFETY: AVX2, FMA and F16C checked above; room for every position and subblock.
            unsafe {
                unpack(
                    dtype,
                    &bytes,
                    u.as_mut_ptr(),
                    a.as_mut_ptr(),
                    b.as_mut_ptr(),
                )
            };
            for i in 0..n {
                let v = a[i / sub] * u[i] as f32 - b[i / sub];
                let tol = if matches!(dtype, Q4K | Q5K | Q4_1 | Q5_1) {
                    0.0
                } else {
                    2.0 * f32::EPSILON * (a[i / sub] * u[i] as f32).abs().max(b[i / sub].abs())
                };
                assert!(
                    (v - dq[i]).abs() <= tol,
                    "{dtype:?} at {i}: {v} vs {}",
                    dq[i]
                );
            }
        }
    }
}

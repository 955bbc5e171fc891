//! Q5_0 on AVX2 without AVX-512: the format that holds most of a Q4_K_M file whose rows are
//! not a whole number of 256-value k-quant blocks (SmolLM2's 576), written with intrinsics.
//!
//! The compiler's version of the portable formula built each value's fifth bit with a
//! variable shift per lane; perf on an AMD EPYC (Zen 3) put a one-sequence decode of such a
//! file at a third of llama.cpp's speed, nearly all of it in those blocks. Here the fifth bits
//! of a block become bytes with one shuffle, an or and a compare (each byte of `qh` spread to
//! eight lanes, each lane testing its own bit), joined to the 4-bit values in byte lanes, less
//! 16, then widened, converted and multiplied by `d`. Integer steps are exact and the product
//! is candle's `(q − 16) as f32 · d`, so the values are candle's bit for bit; the dot product
//! adds them up in the portable kernel's order (two 16-lane accumulators, one per half of a
//! block), so its sums are the portable kernel's bit for bit too.

use std::arch::x86_64::*;

use super::{f16_to_f32, hsum, prefetch_ahead, Rows};

/// Whether the CPU has what these kernels need.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// A Q5_0 block's 32 values, `(q − 16) · d`, as four vectors of 8 (values 0–7, 8–15, 16–23,
/// 24–31).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn q5_0_block(b: &[u8; 22]) -> [__m256; 4] {
    let d = _mm256_set1_ps(f16_to_f32(u16::from_le_bytes([b[0], b[1]])));
    let qh = i32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = _mm_loadu_si128(b.as_ptr().add(6) as *const __m128i);
    let low4 = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(qs, low4);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), low4);
    // Value j's four bits: byte j of [lo, hi].
    let nibbles = _mm256_set_m128i(hi, lo);
    // Value j's fifth bit is bit j of qh: byte j takes byte j / 8 of qh, is or-ed with every
    // bit but j % 8, and is all ones exactly when that bit is set.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1));
    let fifth = _mm256_and_si256(set, _mm256_set1_epi8(0x10));
    let q = _mm256_sub_epi8(_mm256_or_si256(nibbles, fifth), _mm256_set1_epi8(16));
    let (q0, q1) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
    [
        times(q0, d),
        times(_mm_srli_si128::<8>(q0), d),
        times(q1, d),
        times(_mm_srli_si128::<8>(q1), d),
    ]
}

/// The low 8 bytes of `q` as signed integers, converted and multiplied by `d`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn times(q: __m128i, d: __m256) -> __m256 {
    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d)
}

/// Q5_0 blocks in `bytes` dequantised into `out`, bit for bit candle's values.
///
/// # Safety
/// [`available`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn q5_0(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len() / 22 * 32, out.len());
    for (b, y) in bytes.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
        let v = q5_0_block(b.try_into().expect("whole blocks"));
        for (i, v) in v.iter().enumerate() {
            _mm256_storeu_ps(y.as_mut_ptr().add(8 * i), *v);
        }
    }
}

/// `y[i] = x · rows.row(i)` for Q5_0 rows, summed exactly as the portable `dot_rows`.
///
/// # Safety
/// [`available`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn q5_0_dot(rows: &Rows, x: &[f32], y: &mut [f32]) {
    assert_eq!(rows.row_bytes / 22 * 32, x.len());
    for (i, out) in y.iter_mut().enumerate() {
        let row = rows.row(i);
        // The portable kernel's two 16-lane accumulators, as two vectors each: values 0–15 of
        // each block into the first, 16–31 into the second.
        let mut acc = [_mm256_setzero_ps(); 4];
        for (b, xs) in row.chunks_exact(22).zip(x.chunks_exact(32)) {
            prefetch_ahead(b);
            let v = q5_0_block(b.try_into().expect("whole blocks"));
            for (j, v) in v.iter().enumerate() {
                acc[j] = _mm256_fmadd_ps(*v, _mm256_loadu_ps(xs.as_ptr().add(8 * j)), acc[j]);
            }
        }
        let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
        _mm256_storeu_ps(a.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(a.as_mut_ptr().add(8), acc[1]);
        _mm256_storeu_ps(b.as_mut_ptr(), acc[2]);
        _mm256_storeu_ps(b.as_mut_ptr().add(8), acc[3]);
        *out = hsum(&a, &b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Values and one-row products of every kind of Q5_0 block (random weights at scales from
    /// 1e-3 to 1e2, so every fifth-bit pattern occurs) equal the portable kernels' bit for bit.
    #[test]
    fn q5_0_equals_the_portable_kernels_bit_for_bit() {
        if !available() {
            return;
        }
        let dev = Device::Cpu;
        let (rows, k) = (9, 672);
        let t = Tensor::randn(0f32, 1.0, (rows, k), &dev)
            .unwrap()
            .broadcast_mul(&Tensor::rand(1e-3f32, 100.0, (rows, 1), &dev).unwrap())
            .unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q5_0).unwrap();
        let bytes = q.data().unwrap();
        let (mut ours, mut portable) = (vec![f32::NAN; rows * k], vec![f32::NAN; rows * k]);
        // SAFETY: checked above.
        unsafe { q5_0(&bytes, &mut ours) };
        assert!(super::super::plain(GgmlDType::Q5_0, &bytes, &mut portable));
        let candle = q
            .dequantize(&dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            ours.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            candle.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(ours, portable);
        let x = Tensor::randn(0f32, 1.0, k, &dev)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let map = [3u32, 8, 0, 5, 1];
        let sel = Rows {
            bytes: &bytes,
            row_bytes: k / 32 * 22,
            map: Some(&map),
        };
        let (mut got, mut want) = (vec![f32::NAN; map.len()], vec![f32::NAN; map.len()]);
        // SAFETY: checked above.
        unsafe { q5_0_dot(&sel, &x, &mut got) };
        assert!(super::super::dot_plain(
            GgmlDType::Q5_0,
            &sel,
            &x,
            &mut want
        ));
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}

//! Q6_K on AVX-512 (`ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16` per 256 values),
//! the k-quant that Q4_K_M and Q5_K_M files keep for their attention values, half their MLP
//! down projections and often the output. A 6-bit value under a 16-value scale can give 64
//! floats, too many for a table: each 16 values are unpacked in byte lanes (a nibble of `ql`
//! and two bits of `qh`, minus 32), widened, converted, and multiplied by `d·sc`, the scalar
//! formula's own operations (`(d · sc) · q`), so the values are candle's bit for bit. Products
//! of several rows dequantise through this; one row's dot takes `kdot.rs`.

use std::arch::x86_64::*;

use half::f16;

/// The 16 values `l0..l0 + 16` of 32-value group `g` (0..4) of half `h` (0..2) of a block:
/// value `128h + 32g + l`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn values16(b: *const u8, d: f32, h: usize, g: usize, l0: usize) -> __m512 {
    let ql = _mm_loadu_si128(b.add(64 * h + 32 * (g & 1) + l0) as *const __m128i);
    let qh = _mm_loadu_si128(b.add(128 + 32 * h + l0) as *const __m128i);
    let lo4 = _mm_set1_epi8(0x0F);
    let low = if g < 2 {
        _mm_and_si128(ql, lo4)
    } else {
        _mm_and_si128(_mm_srli_epi16(ql, 4), lo4)
    };
    // Bits 2g, 2g + 1 of qh as bits 4, 5.
    let high = _mm_and_si128(
        match g {
            0 => _mm_slli_epi16(qh, 4),
            1 => _mm_slli_epi16(qh, 2),
            2 => qh,
            _ => _mm_srli_epi16(qh, 2),
        },
        _mm_set1_epi8(0x30),
    );
    let q = _mm_sub_epi8(_mm_or_si128(low, high), _mm_set1_epi8(32));
    let sc = *b.add(192 + 8 * h + l0 / 16 + 2 * g) as i8;
    let s = _mm512_set1_ps(d * sc as f32);
    _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)))
}

/// Q6_K blocks into 256 values each, as candle's `to_float`.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q6_k(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len() / 210 * 256, out.len());
    for (b, y) in bytes.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
        let d = f16::from_le_bytes([b[208], b[209]]).to_f32();
        for h in 0..2 {
            for g in 0..4 {
                for l0 in [0, 16] {
                    let v = values16(b.as_ptr(), d, h, g, l0);
                    _mm512_storeu_ps(y.as_mut_ptr().add(128 * h + 32 * g + l0), v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    #[test]
    fn q6_k_values_equal_candles_bit_for_bit() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let t = Tensor::randn(0f32, 1.0, (5, 1024), &Device::Cpu)
            .unwrap()
            .broadcast_mul(&Tensor::rand(0.01f32, 100.0, (5, 1), &Device::Cpu).unwrap())
            .unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q6K).unwrap();
        let bytes = q.data().unwrap();
        let mut values = vec![0f32; bytes.len() / 210 * 256];
        // SAFETY: the CPU has AVX-512F, checked above.
        unsafe { super::q6_k(&bytes, &mut values) };
        let reference = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        let reference = reference.to_vec1::<f32>().unwrap();
        assert!(values
            .iter()
            .zip(&reference)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

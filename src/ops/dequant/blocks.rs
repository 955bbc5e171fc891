//! The block formulas of each GGUF format, written as candle's `to_float` computes them
//! (a product then a sum, never a fused multiply-add, so every value rounds as candle's
//! does), over fixed-size arrays that the compiler vectorises for whatever its caller is
//! compiled for; and the f16 conversion every format's scales go through.

#[inline(always)]
pub(super) fn half_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// The f32 of the f16 with bits `h`, exactly `half`'s `to_f32` (NaNs quieted, as both its
/// F16C and its software paths do), in plain integer and float operations that inline into
/// the vectorised callers. `half` converts by calling a function chosen at run time (F16C's
/// instruction is not compiled into code built without it): on AVX2, where each Q5_0 or Q8_0
/// block of a one-row product made that call, the call took every accumulator to the stack
/// and back.
///
/// The 15 bits of magnitude, shifted to an f32's place, are the value scaled by 2^-112
/// (a subnormal f16 becomes an f32 subnormal): the product by 2^112 is exact.
#[inline(always)]
pub(super) fn f16_to_f32(h: u16) -> f32 {
    let (sign, mag) = (((h & 0x8000) as u32) << 16, (h & 0x7fff) as u32);
    if mag >= 0x7c00 {
        // Infinity, or NaN with its payload and the quiet bit.
        let quiet = if mag > 0x7c00 { 0x0040_0000 } else { 0 };
        return f32::from_bits(sign | 0x7f80_0000 | quiet | ((mag & 0x3ff) << 13));
    }
    f32::from_bits(sign | (f32::from_bits(mag << 13) * f32::from_bits(0x7780_0000)).to_bits())
}

#[inline(always)]
pub(super) fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = half_at(b, 0);
    let qs: &[u8; 16] = b[2..].try_into().unwrap();
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i16 - 8) as f32 * d;
    }
    for j in 0..16 {
        y[j + 16] = ((qs[j] >> 4) as i16 - 8) as f32 * d;
    }
}

#[inline(always)]
pub(super) fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qs: &[u8; 16] = b[4..].try_into().unwrap();
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
    }
    for j in 0..16 {
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

#[inline(always)]
pub(super) fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs: &[u8; 16] = b[6..].try_into().unwrap();
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = (((qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

#[inline(always)]
pub(super) fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs: &[u8; 16] = b[8..].try_into().unwrap();
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = ((qs[j] & 0x0F) | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) | h1) as f32 * d + m;
    }
}

#[inline(always)]
pub(super) fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = half_at(b, 0);
    let qs: &[u8; 32] = b[2..].try_into().unwrap();
    for j in 0..32 {
        y[j] = (qs[j] as i8) as f32 * d;
    }
}

/// Scale and min `j` (0..8) of a Q4_K/Q5_K block's 12 packed 6-bit values.
#[inline(always)]
pub(super) fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// A Q4_K/Q5_K block's 12 packed scale bytes as 8 scales (bytes of the first word) and 8
/// mins (of the second), 6 bits each: [`scale_min_k4`] for every sub-block at once.
#[inline(always)]
pub(super) fn scales_mins_k4(scales: &[u8]) -> (u64, u64) {
    let w = |i: usize| u32::from_le_bytes(scales[4 * i..4 * i + 4].try_into().unwrap());
    let (s0, s1, s2) = (w(0), w(1), w(2));
    let (six, four, two) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let sc = (s0 & six) as u64 | (((s2 & four) | ((s0 >> 6) & two) << 4) as u64) << 32;
    let mn = (s1 & six) as u64 | ((((s2 >> 4) & four) | ((s1 >> 6) & two) << 4) as u64) << 32;
    (sc, mn)
}

/// Q4_K: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`.
#[inline(always)]
pub(super) fn q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let (d, min) = (half_at(b, 0), half_at(b, 2));
    let scales: &[u8; 12] = b[4..16].try_into().unwrap();
    for g in 0..4 {
        let q: &[u8; 32] = b[16 + 32 * g..16 + 32 * (g + 1)].try_into().unwrap();
        let (sc, m) = scale_min_k4(2 * g, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * g + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let y: &mut [f32; 64] = (&mut y[64 * g..64 * (g + 1)]).try_into().unwrap();
        // Two loops of 32 rather than one writing both halves: each vectorises whole.
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
        }
        for l in 0..32 {
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`.
#[inline(always)]
pub(super) fn q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let (d, min) = (half_at(b, 0), half_at(b, 2));
    let scales: &[u8; 12] = b[4..16].try_into().unwrap();
    let qh: &[u8; 32] = b[16..48].try_into().unwrap();
    for g in 0..4 {
        let ql: &[u8; 32] = b[48 + 32 * g..48 + 32 * (g + 1)].try_into().unwrap();
        let (sc, m) = scale_min_k4(2 * g, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * g + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
        let y: &mut [f32; 64] = (&mut y[64 * g..64 * (g + 1)]).try_into().unwrap();
        for l in 0..32 {
            let add1 = if qh[l] & u1 != 0 { 16f32 } else { 0f32 };
            y[l] = d1 * ((ql[l] & 0xF) as f32 + add1) - m1;
        }
        for l in 0..32 {
            let add2 = if qh[l] & u2 != 0 { 16f32 } else { 0f32 };
            y[l + 32] = d2 * ((ql[l] >> 4) as f32 + add2) - m2;
        }
    }
}

/// Q6_K: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`.
#[inline(always)]
pub(super) fn q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let d = half_at(b, 208);
    for h in 0..2 {
        let ql: &[u8; 64] = b[64 * h..64 * (h + 1)].try_into().unwrap();
        let qh: &[u8; 32] = b[128 + 32 * h..128 + 32 * (h + 1)].try_into().unwrap();
        let sc: &[u8; 8] = b[192 + 8 * h..192 + 8 * (h + 1)].try_into().unwrap();
        let y: &mut [f32; 128] = (&mut y[128 * h..128 * (h + 1)]).try_into().unwrap();
        for half in 0..2 {
            let s1 = d * (sc[half] as i8) as f32;
            let s2 = d * (sc[half + 2] as i8) as f32;
            let s3 = d * (sc[half + 4] as i8) as f32;
            let s4 = d * (sc[half + 6] as i8) as f32;
            let ls = 16 * half..16 * (half + 1);
            for l in ls.clone() {
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                y[l] = s1 * q1 as f32;
            }
            for l in ls.clone() {
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                y[l + 32] = s2 * q2 as f32;
            }
            for l in ls.clone() {
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                y[l + 64] = s3 * q3 as f32;
            }
            for l in ls {
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                y[l + 96] = s4 * q4 as f32;
            }
        }
    }
}

/// Every one of the 65,536 f16 bit patterns converts to `half`'s f32, bit for bit (NaNs
/// included: both quiet them and keep their payloads).
#[test]
fn f16_conversion_equals_half_for_every_bit_pattern() {
    for h in 0..=u16::MAX {
        let (ours, theirs) = (f16_to_f32(h), half::f16::from_bits(h).to_f32());
        assert_eq!(ours.to_bits(), theirs.to_bits(), "f16 bits {h:#06x}");
    }
}

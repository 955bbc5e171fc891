//! Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K on AVX2 without AVX-512 (AMD's Zen 2 and
//! 3, most desktop CPUs), written with intrinsics: the formats of Q8_0, Q4_K_M and Q5_K_M
//! files, including the Q5_0 (Q5_1) that a Q4_K_M (Q5_K_M) file holds where rows are not
//! whole 256-value k-quant blocks (SmolLM2's 576). (Q5_K and Q5_1 took the portable kernels
//! until they were measured at a third of Q4_K's speed at 1–4 rows; 8192×8192, two Zen 3
//! cores, 1 row: Q5_K 4.1 → 14 G values/s, Q5_1 5.4 → 13.4.)
//! Each block's values are made in registers and are candle's bit for bit: integer steps are
//! exact and each product (and difference) is the portable formula's own. The one-row dot
//! products of Q4_0, Q4_1, Q5_0 and Q8_0 add them in the portable kernel's order and sum its
//! accumulators as it does, so they equal its products bit for bit too (the tests check
//! both). One row of Q4_K, Q5_K or Q6_K takes `kdot.rs`, which sums each sub-block before
//! scaling it, as the AVX-512 kernels do: the exact dot product up to rounding, 1.7× (Q4_K)
//! and 1.2× (Q6_K) the bit-exact kernels' speed.
//!
//! Measured on an AMD EPYC (Zen 3), where the portable versions compiled for AVX2 ran a
//! one-sequence decode of SmolLM2 Q4_K_M at a third of llama.cpp's speed:
//! - Q5_0: the compiler built each value's fifth bit with a variable shift per lane. Here a
//!   block's fifth bits become bytes with one shuffle, an and and a compare (each byte of `qh`
//!   spread to eight lanes, each lane testing its own bit), joined to the nibbles in byte
//!   lanes, less 16, then converted and multiplied by `d`.
//! - Q4_K and Q6_K: the compiler left the block formulas partly scalar. Here 32 bytes of
//!   nibbles (and for Q6_K two bits of `qh` each) are split in byte lanes, converted and
//!   scaled.
//! - The one-row products of Q4_0, Q4_1 and Q5_0 (and `kdot.rs`) take the block's values in a
//!   [split order](split_x): each vector's lanes take bytes from within one 128-bit half, by
//!   one byte shuffle, where the natural order needs a widening across halves and more
//!   shuffles. They take `x` in the same order and put the accumulators back before summing,
//!   so every lane adds the same products in the same order. SmolLM2 Q4_1 at one sequence
//!   went from 63 to 79 tok/s; a Q5_0 block costs 18% less. Dequantisation into strips keeps
//!   the natural order (block functions take the order as `SPLIT`).
//! - Products of 2–8 input rows ([`dot_rows_many`]) dequantise each block in registers once
//!   for all rows instead of into a strip that the tiles read back. They read the input rows
//!   interleaved, a tile of weight rows a pass of positions at a time (`many.rs`).
//! - The accumulators' sum runs in registers ([`sum`]), not as a call over arrays.
//! - A block's f16 scale is converted by F16C ([`half`]), not by integer steps: that was ~15
//!   of a Q8_0 or Q5_0 block's ~50 instructions (Q4_K_M at one sequence 43 → 49 tok/s).

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

use super::{prefetch_ahead, prefetch_block, Rows};
use kblocks::{q4_k_block, q5_k_block, q6_k_block};
pub(super) use many::dot_rows_many;
use many::{PASS, TILE};

mod kblocks;
mod kdot;
mod many;

/// Whether the CPU has what these kernels need.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The f16 at `b[at..at + 2]` as f32 in all eight lanes, by F16C's conversion: exact, as
/// [`f16_to_f32`] (the tests compare both), in 2 instructions where the integer one takes ~15
/// per block (a third of a Q8_0 block's instructions).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn half(b: &[u8], at: usize) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([b[at], b[at + 1]])))
}

/// The 8 lanes' sum (for the kernels here and the int8 one-row kernel).
#[target_feature(enable = "avx2")]
#[inline]
pub(in crate::ops) unsafe fn hsum8(v: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let y = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(y, _mm_shuffle_ps::<1>(y, y)))
}

/// `dtype`'s blocks in `bytes` dequantised into `out` where this module has the format and
/// the CPU what it needs; `false` (nothing written) where not.
pub(super) fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
    if !available() {
        return false;
    }
    // SAFETY (each): the CPU has what these kernels need, checked just above.
    match dtype {
        GgmlDType::Q4_0 => unsafe { q4_0(bytes, out) },
        GgmlDType::Q4_1 => unsafe { q4_1(bytes, out) },
        GgmlDType::Q5_0 => unsafe { q5_0(bytes, out) },
        GgmlDType::Q5_1 => unsafe { q5_1(bytes, out) },
        GgmlDType::Q8_0 => unsafe { q8_0(bytes, out) },
        GgmlDType::Q4K => unsafe { q4_k(bytes, out) },
        GgmlDType::Q5K => unsafe { q5_k(bytes, out) },
        GgmlDType::Q6K => unsafe { q6_k(bytes, out) },
        _ => return false,
    }
    true
}

/// `y[i] = x · rows.row(i)` where this module has `dtype` and the CPU what it needs;
/// `false` (nothing written) where not.
pub(super) fn dot_rows(dtype: GgmlDType, rows: &Rows, x: &[f32], y: &mut [f32]) -> bool {
    if !available() {
        return false;
    }
    // SAFETY (each): the CPU has what these kernels need, checked just above.
    match dtype {
        GgmlDType::Q4_0 => unsafe { q4_0_dot(rows, x, y) },
        GgmlDType::Q4_1 => unsafe { q4_1_dot(rows, x, y) },
        GgmlDType::Q5_0 => unsafe { q5_0_dot(rows, x, y) },
        GgmlDType::Q5_1 => unsafe { q5_1_dot(rows, x, y) },
        GgmlDType::Q8_0 => unsafe { q8_0_dot(rows, x, y) },
        GgmlDType::Q4K => unsafe { kdot::q4_k(rows, x, y) },
        GgmlDType::Q5K => unsafe { kdot::q5_k(rows, x, y) },
        GgmlDType::Q6K => unsafe { kdot::q6_k(rows, x, y) },
        _ => return false,
    }
    true
}

/// Values 0–15 of a 32-value block in the low half (byte `j` from byte `j`'s low nibble) and
/// 16–31 in the high half (from the high nibbles): the 16 bytes at `p` in both halves, the
/// high half shifted by 4.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
    _mm256_and_si256(
        _mm256_srlv_epi32(both, _mm256_set_epi32(4, 4, 4, 4, 0, 0, 0, 0)),
        _mm256_set1_epi8(0x0F),
    )
}

/// Byte-shuffle controls for [`lanes`] in split order: `[top][a]` puts byte `4a + i` of each
/// 128-bit half in 32-bit lane `i` of that half, as the lane's top byte (`top` 1) or its low
/// byte (0), the other bytes zero.
const PICK: [[[i8; 32]; 4]; 2] = {
    let mut p = [[[-1i8; 32]; 4]; 2];
    let mut a = 0;
    while a < 4 {
        let mut i = 0;
        while i < 8 {
            let byte = (4 * a + i % 4) as i8;
            p[0][a][4 * i] = byte;
            p[1][a][4 * i + 3] = byte;
            i += 1;
        }
        a += 1;
    }
    p
};

/// Vector `a` of a 32-value block's bytes `q` (values 0–15 in the low half, 16–31 in the
/// high half), signed or not, converted to f32:
/// - `SPLIT`: in [split order](split_x), by one byte shuffle: each lane takes its byte as
///   its low byte (unsigned) or its top byte (signed, so the value comes times 2^24: see
///   [`factor`]);
/// - else values `8a..8a + 8` in order, widened from the half that holds them.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn lanes<const SPLIT: bool, const SIGNED: bool>(q: __m256i, a: usize) -> __m256 {
    let i = if SPLIT {
        let pick = _mm256_loadu_si256(PICK[SIGNED as usize][a].as_ptr() as *const __m256i);
        _mm256_shuffle_epi8(q, pick)
    } else {
        let half = if a < 2 {
            _mm256_castsi256_si128(q)
        } else {
            _mm256_extracti128_si256::<1>(q)
        };
        let part = if a % 2 == 1 {
            _mm_srli_si128::<8>(half)
        } else {
            half
        };
        if SIGNED {
            _mm256_cvtepi8_epi32(part)
        } else {
            _mm256_cvtepu8_epi32(part)
        }
    };
    _mm256_cvtepi32_ps(i)
}

/// The power of two that [`lanes`] values carry: 2^24 for signed values in split order, else 1.
const fn factor(split: bool, signed: bool) -> f32 {
    if split && signed {
        16_777_216.0
    } else {
        1.0
    }
}

/// A block of signed byte values `q` (values 0–15 in the low half, 16–31 in the high half)
/// made `q · d` as four vectors ([`lanes`]' order): a split-order value comes as `q · 2^24`
/// and is multiplied by `d · 2^-24`, both exact, so each product is `q · d`'s own rounding
/// (at most 16 significant bits: exact), zero's sign included.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scaled<const SPLIT: bool>(q: __m256i, d: __m256, out: &mut [__m256; 4]) {
    let d = _mm256_mul_ps(d, _mm256_set1_ps(1.0 / factor(SPLIT, true)));
    for (a, v) in out.iter_mut().enumerate() {
        *v = _mm256_mul_ps(lanes::<SPLIT, true>(q, a), d);
    }
}

/// A Q5_0 block's 32 values, `(q − 16) · d`, in [`lanes`]' order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q5_0_block<const SPLIT: bool>(b: &[u8; 22], mut f: impl FnMut(usize, [__m256; 4])) {
    let mut out = [_mm256_setzero_ps(); 4];
    let d = half(b, 0);
    // `q − 16` is the nibble less 16 where the fifth bit is clear.
    let set = fifth_bits([b[2], b[3], b[4], b[5]]);
    let q = _mm256_sub_epi8(
        nibbles(b.as_ptr().add(6)),
        _mm256_andnot_si256(set, _mm256_set1_epi8(0x10)),
    );
    scaled::<SPLIT>(q, d, &mut out);
    f(0, out);
}

/// All ones in byte `j` where bit `j` of `qh` (a Q5_0 or Q5_1 block's fifth bits, value `j`'s)
/// is set, else zero: byte `j` takes byte `j / 8` of `qh` and keeps bit `j % 8`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn fifth_bits(qh: [u8; 4]) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(i32::from_le_bytes(qh)),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
}

/// A Q5_1 block's 32 values, `q · d + m` (`q` the nibble with its fifth bit, worth 16), in
/// [`lanes`]' order. `q · d` is exact (at most 16 significant bits), so one multiply-add
/// rounds as the portable product-then-sum does.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q5_1_block<const SPLIT: bool>(b: &[u8; 24], mut f: impl FnMut(usize, [__m256; 4])) {
    let mut out = [_mm256_setzero_ps(); 4];
    let set = fifth_bits([b[4], b[5], b[6], b[7]]);
    let q = _mm256_or_si256(
        nibbles(b.as_ptr().add(8)),
        _mm256_and_si256(set, _mm256_set1_epi8(0x10)),
    );
    let (d, m) = (half(b, 0), half(b, 2));
    for (a, v) in out.iter_mut().enumerate() {
        *v = _mm256_fmadd_ps(lanes::<SPLIT, false>(q, a), d, m);
    }
    f(0, out);
}

/// A Q4_0 block's 32 values, `(q − 8) · d`, in [`lanes`]' order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q4_0_block<const SPLIT: bool>(b: &[u8; 18], mut f: impl FnMut(usize, [__m256; 4])) {
    let mut out = [_mm256_setzero_ps(); 4];
    let q = _mm256_sub_epi8(nibbles(b.as_ptr().add(2)), _mm256_set1_epi8(8));
    scaled::<SPLIT>(q, half(b, 0), &mut out);
    f(0, out);
}

/// A Q4_1 block's 32 values, `q · d + m`, in [`lanes`]' order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q4_1_block<const SPLIT: bool>(b: &[u8; 20], mut f: impl FnMut(usize, [__m256; 4])) {
    let mut out = [_mm256_setzero_ps(); 4];
    // `q · d` is exact (at most 15 significant bits), so one multiply-add rounds as the
    // portable product-then-sum does, zero's sign included.
    let (q, d, m) = (nibbles(b.as_ptr().add(4)), half(b, 0), half(b, 2));
    for (a, v) in out.iter_mut().enumerate() {
        *v = _mm256_fmadd_ps(lanes::<SPLIT, false>(q, a), d, m);
    }
    f(0, out);
}

/// For a format with a block function above: `$deq`, its blocks in `bytes` dequantised into
/// `out` (candle's values bit for bit), and `$dot`, `y[i] = x · rows.row(i)` summed exactly
/// as the portable `dot_rows` (values 0–15 of every 32 into one 16-lane accumulator, 16–31
/// into the other, here two vectors each; the lanes added as `hsum` adds them: [`sum`]).
/// `$deq` takes the block function's values in order (`::<false>`). With `$split`, `$dot`
/// takes them in [split order](split_x), multiplies them by `x` in that order and puts its
/// accumulators' lanes back in the natural order before summing them ([`unsplit`]): every
/// lane adds the same products in the same order as in the natural order. (Storing split
/// values' halves where they go made the dequantisation for several rows 7–10% slower.)
macro_rules! kernels {
    ($deq:ident, $many:ident, $block:ident, $b:literal, $vectors:literal, $split:literal $(, $dot:ident)?) => {
        /// See [`kernels`].
        ///
        /// # Safety
        /// [`available`].
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn $deq(bytes: &[u8], out: &mut [f32]) {
            assert_eq!(bytes.len() / $b * (8 * $vectors), out.len());
            for (b, y) in bytes
                .chunks_exact($b)
                .zip(out.chunks_exact_mut(8 * $vectors))
            {
                $block::<false>(b.try_into().expect("whole blocks"), |g, vs| {
                    for (t, v) in vs.iter().enumerate() {
                        _mm256_storeu_ps(y.as_mut_ptr().add(8 * (4 * g + t)), *v);
                    }
                });
            }
        }

        $(
        /// See [`kernels`].
        ///
        /// # Safety
        /// [`available`].
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn $dot(rows: &Rows, x: &[f32], y: &mut [f32]) {
            assert_eq!(rows.row_bytes / $b * (8 * $vectors), x.len());
            let split;
            let x = if $split {
                split = split_x(x);
                &split[..]
            } else {
                x
            };
            for (i, out) in y.iter_mut().enumerate() {
                let row = rows.row(i);
                let mut acc = [_mm256_setzero_ps(); 4];
                for (b, xs) in row.chunks_exact($b).zip(x.chunks_exact(8 * $vectors)) {
                    prefetch_ahead(b);
                    // Vector j of the block into accumulator j % 4: a group's 4 vectors into
                    // the 4 accumulators, which stay in registers. (Indexed by `j % 4` in a
                    // loop over a K-quant's 32 vectors, they went to the stack, and each
                    // multiply-add waited on the last one's store.)
                    $block::<$split>(b.try_into().expect("whole blocks"), |g, vs| {
                        for (t, (v, acc)) in vs.iter().zip(&mut acc).enumerate() {
                            let xv = _mm256_loadu_ps(xs.as_ptr().add(8 * (4 * g + t)));
                            *acc = _mm256_fmadd_ps(*v, xv, *acc);
                        }
                    });
                }
                *out = sum(&if $split { unsplit(&acc) } else { acc });
            }
        }
        )?

        /// See [`kernels`]: `M` input rows, [interleaved](super::Interleaved) in `x`, as
        /// [`dot_rows_many`] multiplies them.
        ///
        /// # Safety
        /// [`available`], and `y` takes writes at `r * ldy + i` for `r < M`, `i < n`.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn $many<const M: usize>(
            rows: &Rows,
            n: usize,
            x: &[f32],
            y: *mut f32,
            ldy: usize,
        ) {
            let k = rows.row_bytes / $b * (8 * $vectors);
            assert_eq!(x.len(), M * k);
            // Blocks of positions per pass over a tile of weight rows.
            let per_pass = (PASS / (8 * $vectors)).max(1);
            let blocks = k / (8 * $vectors);
            let mut i0 = 0;
            while i0 < n {
                let tile = TILE.min(n - i0);
                let mut accs = [[_mm256_setzero_ps(); M]; TILE];
                let mut c0 = 0;
                while c0 < blocks {
                    let c1 = (c0 + per_pass).min(blocks);
                    for (i, carried) in accs[..tile].iter_mut().enumerate() {
                        // In registers for the pass.
                        let mut acc = *carried;
                        let row = &rows.row(i0 + i)[c0 * $b..c1 * $b];
                        // The same blocks of the next tile's row, else the next bytes of
                        // this one.
                        let next = i0 + i + TILE;
                        let next = (next < n).then(|| rows.row(next)[c0 * $b..].as_ptr());
                        for (c, b) in row.chunks_exact($b).enumerate() {
                            match next {
                                Some(p) => prefetch_block(p.add(c * $b), $b),
                                None => prefetch_ahead(b),
                            }
                            let at = x.as_ptr().add((c0 + c) * 8 * $vectors * M);
                            $block::<false>(b.try_into().expect("whole blocks"), |g, vs| {
                                for (t, v) in vs.iter().enumerate() {
                                    for (r, acc) in acc.iter_mut().enumerate() {
                                        let xv = _mm256_loadu_ps(at.add((g * M + r) * 32 + 8 * t));
                                        *acc = _mm256_fmadd_ps(*v, xv, *acc);
                                    }
                                }
                            });
                        }
                        *carried = acc;
                    }
                    c0 = c1;
                }
                for (i, acc) in accs[..tile].iter().enumerate() {
                    for (r, acc) in acc.iter().enumerate() {
                        let mut lanes = [0f32; 8];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), *acc);
                        *y.add(r * ldy + i0 + i) = lanes.iter().sum::<f32>();
                    }
                }
                i0 += tile;
            }
        }
    };
}

/// `x` in the split order of 32-value blocks, in which [`lanes`] gives them: vector
/// `a` of a block holds values `4a..4a + 4` in its low half and `16 + 4a..16 + 4a + 4` in its
/// high half. There a byte shuffle within each half puts each value in its lane; the natural
/// order (values `8a..8a + 8`) takes a widening across halves and, for three of the four
/// vectors, one or two shuffles more.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn split_x(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    split_into(x, &mut out);
    out
}

/// [`split_x`] into `out` (as long as `x`).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn split_into(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    for (b, o) in x.chunks_exact(32).zip(out.chunks_exact_mut(32)) {
        for a in 0..4 {
            let v = _mm256_set_m128(
                _mm_loadu_ps(b.as_ptr().add(16 + 4 * a)),
                _mm_loadu_ps(b.as_ptr().add(4 * a)),
            );
            _mm256_storeu_ps(o.as_mut_ptr().add(8 * a), v);
        }
    }
}

/// Accumulators of split-order products back in the natural order: lane `i` of the low half
/// of vector `a` holds value `4a + i`'s sum, which the natural kernel keeps in vector
/// `a / 2`, lane `4·(a % 2) + i`; the high halves are values 16–31, vectors 2 and 3.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn unsplit(acc: &[__m256; 4]) -> [__m256; 4] {
    [
        _mm256_permute2f128_ps::<0x20>(acc[0], acc[1]),
        _mm256_permute2f128_ps::<0x20>(acc[2], acc[3]),
        _mm256_permute2f128_ps::<0x31>(acc[0], acc[1]),
        _mm256_permute2f128_ps::<0x31>(acc[2], acc[3]),
    ]
}

/// `hsum(a, b)` of the portable kernel's two 16-lane accumulators held as `[a, b]` in
/// two vectors each: the same additions in the same association (lanes paired, then halves
/// folded, then `(v0 + v2) + (v1 + v3)`), in vector registers instead of a call over arrays
/// (`hsum` was ~9% of a one-sequence Q8_0 step).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn sum(acc: &[__m256; 4]) -> f32 {
    // v[l] = a[l] + b[l], then v[l] += v[l + 8].
    let w = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
    // v[l] += v[l + 4].
    let x = _mm_add_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps::<1>(w));
    // (v0 + v2) and (v1 + v3), then their sum.
    let y = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(y, _mm_shuffle_ps::<1>(y, y)))
}

/// A Q8_0 block's 32 values, `q · d`, as four vectors of 8.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8_0_block<const SPLIT: bool>(b: &[u8; 34], mut f: impl FnMut(usize, [__m256; 4])) {
    let mut out = [_mm256_setzero_ps(); 4];
    const { assert!(!SPLIT, "Q8_0 blocks come in order only") };
    let d = half(b, 0);
    for (i, v) in out.iter_mut().enumerate() {
        let q = _mm_loadl_epi64(b.as_ptr().add(2 + 8 * i) as *const __m128i);
        *v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    }
    f(0, out);
}

kernels!(q5_0, q5_0_many, q5_0_block, 22, 4, true, q5_0_dot);
kernels!(q5_1, q5_1_many, q5_1_block, 24, 4, true, q5_1_dot);
kernels!(q8_0, q8_0_many, q8_0_block, 34, 4, false, q8_0_dot);
kernels!(q4_0, q4_0_many, q4_0_block, 18, 4, true, q4_0_dot);
kernels!(q4_1, q4_1_many, q4_1_block, 20, 4, true, q4_1_dot);
// One row of Q4_K, Q5_K or Q6_K takes `kdot.rs`, which scales each sub-block's sum.
kernels!(q4_k, q4_k_many, q4_k_block, 144, 32, true);
kernels!(q5_k, q5_k_many, q5_k_block, 176, 32, true);
kernels!(q6_k, q6_k_many, q6_k_block, 210, 32, true);

#[cfg(test)]
mod tests;

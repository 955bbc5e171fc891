//! AVX-512 dequantisation of Q4_K, Q5_K, Q6_K and Q8_0 blocks, bit for bit candle's values,
//! written for throughput: decode at 8–16 sequences dequantises every weight once per step and
//! spends as long doing it as multiplying, so each operation counts.
//!
//! Blocks go in chunks of [`CHUNK`]. A first pass works out every block's scales as f32 (the
//! very products the scalar formulas form) into memory; the second makes the values, taking
//! each scale by a broadcast load. A broadcast from memory costs a load, where the same value
//! shuffled out of a register costs one or two shuffles on the port that the permutes and
//! multiply-adds need (the compiler turned the table code's per-sub-block broadcasts into
//! such shuffles, among the hottest instructions of its profile). A strip may also prefetch,
//! block by block as it goes, the bytes a fixed distance on (the tiles' next block of
//! positions, or the next strip), so that the requests do not queue up in one burst.
//!
//! - Q4_K and Q5_K: per sub-block, the table of the 16 (32) values its scale can give, by
//!   the scalar formula's own operations (`d·sc · q − dmin·m`, a product then a difference),
//!   then one permute per 16 values (as `table.rs`).
//! - Q6_K: the six-bit values of 64 weights at a time are assembled in byte lanes (a nibble of
//!   `ql`, two bits of `qh`, minus 32), then each 16 are widened, converted and multiplied by
//!   their `d·sc`: `(d · sc) · q`, candle's product.
//! - Q8_0: each block's `d` is broadcast from memory and converted, and each 16 values are
//!   widened, converted and multiplied by it: `q · d`. (Gathering a chunk's 16 `d`s to convert
//!   them at once measured slower: the values then wait on the gather.)

use std::arch::x86_64::*;

use super::table::{bytes16, iota};
use super::Rows;
use candle_core::quantized::GgmlDType;

/// Blocks whose scales are worked out together, ahead of their values.
const CHUNK: usize = 16;

/// Whether the CPU has what these kernels need.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("f16c")
}

/// Bytes `b0..b1` (whole blocks) of the rows `rows.row(i)`, `i` in `0..n`, dequantised into
/// `out`, row `i` from `out.add(i * ld)` on, each block's bytes `ahead` bytes on prefetched
/// meanwhile (none for 0); `false` (nothing written) for other formats.
///
/// # Safety
/// [`available`], and `out` holds `n` rows of the values of `b1 - b0` bytes, `ld` apart.
#[target_feature(enable = "avx512f,avx512bw,f16c")]
pub(super) unsafe fn cols(
    dtype: GgmlDType,
    rows: &Rows,
    n: usize,
    (b0, b1): (usize, usize),
    out: *mut f32,
    ld: usize,
    ahead: usize,
) -> bool {
    let blocks = Blocks {
        rows,
        n,
        b0,
        b1,
        out,
        ld,
        ahead,
    };
    match dtype {
        GgmlDType::Q4K => blocks.each_chunk::<144, 256>(|c| k4_or_k5::<false>(c)),
        GgmlDType::Q5K => blocks.each_chunk::<176, 256>(|c| k4_or_k5::<true>(c)),
        GgmlDType::Q6K => blocks.each_chunk::<210, 256>(|c| q6_k(c)),
        GgmlDType::Q8_0 => blocks.each_chunk::<34, 32>(|c| q8_0(c)),
        _ => return false,
    }
    true
}

/// The blocks of a strip: bytes `b0..b1` of each of `n` rows, and where their values go.
struct Blocks<'a, 'b> {
    rows: &'a Rows<'b>,
    n: usize,
    b0: usize,
    b1: usize,
    out: *mut f32,
    ld: usize,
    ahead: usize,
}

/// Up to [`CHUNK`] blocks: where each one's bytes are, and where its values go; and how far
/// on the bytes to prefetch are (0: none).
struct Chunk {
    ahead: usize,
    len: usize,
    src: [*const u8; CHUNK],
    dst: [*mut f32; CHUNK],
}

impl Blocks<'_, '_> {
    /// `f` over the blocks, [`CHUNK`] at a time, in order (`SIZE`-byte blocks of `VALUES`
    /// values).
    #[inline(always)]
    unsafe fn each_chunk<const SIZE: usize, const VALUES: usize>(&self, mut f: impl FnMut(&Chunk)) {
        let per_row = (self.b1 - self.b0) / SIZE;
        let mut c = Chunk {
            ahead: self.ahead,
            len: 0,
            src: [std::ptr::null(); CHUNK],
            dst: [std::ptr::null_mut(); CHUNK],
        };
        // The count in a local (the chunk's own field, written back each block, made a
        // dependency chain through memory).
        let mut len = 0;
        for i in 0..self.n {
            let row = self.rows.row(i)[self.b0..self.b1].as_ptr();
            let out = self.out.add(i * self.ld);
            for j in 0..per_row {
                c.src[len] = row.add(j * SIZE);
                c.dst[len] = out.add(j * VALUES);
                len += 1;
                if len == CHUNK {
                    c.len = len;
                    f(&c);
                    len = 0;
                }
            }
        }
        if len > 0 {
            c.len = len;
            f(&c);
        }
    }
}

impl Chunk {
    /// Prefetch the `size` bytes [`ahead`](Chunk::ahead) of `b` (every line of them).
    #[inline(always)]
    fn prefetch(&self, b: *const u8, size: usize) {
        if self.ahead > 0 && size <= 64 {
            // The line of its last byte: every line of a run of such blocks holds a block's
            // last byte, so one prefetch a block covers them all.
            super::prefetch(b.wrapping_add(self.ahead + size - 1));
        } else if self.ahead > 0 {
            let p = b.wrapping_add(self.ahead);
            let mut at = 0;
            while at < size {
                super::prefetch(p.wrapping_add(at));
                at += 64;
            }
            // The last byte's line, where `at` stepped past it.
            if (p as usize + size - 1) / 64 != (p as usize + at - 64) / 64 {
                super::prefetch(p.wrapping_add(size - 1));
            }
        }
    }
}

/// Q4_K (`d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`) or, when `FIVE`, Q5_K (the
/// same with `qh: [u8; 32]` before `qs`: a fifth bit per value, bit `2g` of `qh[l]` for value
/// `64g + l`, bit `2g + 1` for `64g + 32 + l`).
#[target_feature(enable = "avx512f,avx512bw,f16c")]
#[inline]
unsafe fn k4_or_k5<const FIVE: bool>(c: &Chunk) {
    // Lanes 0..8: d·sc of sub-blocks 0..8; lanes 8..16: dmin·m.
    let mut scales = [[0f32; 16]; CHUNK];
    for (s, &b) in scales.iter_mut().zip(&c.src).take(c.len) {
        _mm512_storeu_ps(s.as_mut_ptr(), super::kdot::q4_k_scales(b));
    }
    let (io, sixteen) = (iota(), _mm512_set1_ps(16.0));
    let (nibble, one) = (_mm512_set1_epi32(0xF), _mm512_set1_epi32(1));
    for ((&b, &y), s) in c.src.iter().zip(&c.dst).zip(&scales).take(c.len) {
        c.prefetch(b, if FIVE { 176 } else { 144 });
        let s = s.as_ptr();
        // `d·sc · q − dmin·m` of sub-block j for q in 0..16 (and 16..32).
        let table = |j: usize, q: __m512| {
            _mm512_sub_ps(
                _mm512_mul_ps(_mm512_set1_ps(*s.add(j)), q),
                _mm512_set1_ps(*s.add(8 + j)),
            )
        };
        for g in 0..4 {
            let (lo, hi) = (table(2 * g, io), table(2 * g + 1, io));
            if FIVE {
                let (lo1, hi1) = (
                    table(2 * g, _mm512_add_ps(io, sixteen)),
                    table(2 * g + 1, _mm512_add_ps(io, sixteen)),
                );
                for h in 0..2 {
                    let q = bytes16(b.add(48 + 32 * g + 16 * h));
                    let qh = bytes16(b.add(16 + 16 * h));
                    let bit = |j: u32| {
                        let v = _mm512_srl_epi32(qh, _mm_cvtsi32_si128(j as i32));
                        _mm512_slli_epi32::<4>(_mm512_and_si512(v, one))
                    };
                    let l = _mm512_or_si512(_mm512_and_si512(q, nibble), bit(2 * g as u32));
                    let u = _mm512_or_si512(_mm512_srli_epi32::<4>(q), bit(2 * g as u32 + 1));
                    let y = y.add(64 * g + 16 * h);
                    _mm512_storeu_ps(y, _mm512_permutex2var_ps(lo, l, lo1));
                    _mm512_storeu_ps(y.add(32), _mm512_permutex2var_ps(hi, u, hi1));
                }
            } else {
                for h in 0..2 {
                    let q = bytes16(b.add(16 + 32 * g + 16 * h));
                    let y = y.add(64 * g + 16 * h);
                    _mm512_storeu_ps(y, _mm512_permutexvar_ps(q, lo));
                    _mm512_storeu_ps(
                        y.add(32),
                        _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(q), hi),
                    );
                }
            }
        }
    }
}

/// Q6_K (`ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`): value `128h + 32g + l`
/// (`h` 0..2, `g` 0..4, `l` 0..32) is a nibble of `ql[64h + 32(g & 1) + l]` (the low one for
/// `g < 2`) with bits `2g, 2g + 1` of `qh[32h + l]` above it, minus 32, times `d · sc[8h + 2g
/// + l / 16]`: so the 16 values from `16p` on take scale `p`.
#[target_feature(enable = "avx512f,avx512bw,f16c")]
#[inline]
unsafe fn q6_k(c: &Chunk) {
    // d·sc of each 16 values.
    let mut scales = [[0f32; 16]; CHUNK];
    for (s, &b) in scales.iter_mut().zip(&c.src).take(c.len) {
        let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
            b.add(192) as *const __m128i
        )));
        let d = _mm_cvtph_ps(_mm_cvtsi32_si128(
            (b.add(208) as *const u16).read_unaligned() as i32,
        ));
        _mm512_storeu_ps(s.as_mut_ptr(), _mm512_mul_ps(_mm512_broadcastss_ps(d), sc));
    }
    let (low4, two_bits, minus) = (
        _mm512_set1_epi8(0x0F),
        _mm512_set1_epi8(0x30),
        _mm512_set1_epi8(32),
    );
    // Per 16-bit lane, how far `qh` moves to bring group g's two bits to bits 4 and 5: groups
    // 0 and 1 (low nibbles, first and second 32 bytes) left by 4 and 2; groups 2 and 3 right
    // by 0 and 2. Bits from the neighbouring byte land outside bits 4–5.
    let (left, right) = (
        _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(2)),
        _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2)),
    );
    let mut q = [0i8; 256];
    for ((&b, &y), s) in c.src.iter().zip(&c.dst).zip(&scales).take(c.len) {
        c.prefetch(b, 210);
        let s = s.as_ptr();
        for h in 0..2 {
            let ql = _mm512_loadu_si512(b.add(64 * h) as *const _);
            let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(128 + 32 * h) as *const _));
            // (ql & 0x0F) | (bits & 0x30), minus 32: ternary-logic 0xEA is (A & B) | C.
            let six = |nib: __m512i, bits: __m512i| {
                let v =
                    _mm512_ternarylogic_epi32::<0xEA>(nib, low4, _mm512_and_si512(bits, two_bits));
                _mm512_sub_epi8(v, minus)
            };
            let g01 = six(ql, _mm512_sllv_epi16(qh, left));
            let g23 = six(_mm512_srli_epi16::<4>(ql), _mm512_srlv_epi16(qh, right));
            _mm512_storeu_si512(q.as_mut_ptr().add(128 * h) as *mut _, g01);
            _mm512_storeu_si512(q.as_mut_ptr().add(128 * h + 64) as *mut _, g23);
        }
        for p in 0..16 {
            let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                q.as_ptr().add(16 * p) as *const __m128i,
            )));
            _mm512_storeu_ps(y.add(16 * p), _mm512_mul_ps(_mm512_set1_ps(*s.add(p)), v));
        }
    }
}

/// Q8_0 (`d: f16, qs: [i8; 32]`): `q · d`.
#[target_feature(enable = "avx512f,avx512bw,f16c")]
#[inline]
unsafe fn q8_0(c: &Chunk) {
    for (&b, &y) in c.src.iter().zip(&c.dst).take(c.len) {
        c.prefetch(b, 34);
        // `d` in every lane: a broadcast load of its 16 bits, converted.
        let d = _mm512_cvtph_ps(_mm256_set1_epi16((b as *const i16).read_unaligned()));
        for p in 0..2 {
            let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                b.add(2 + 16 * p) as *const __m128i
            )));
            _mm512_storeu_ps(y.add(16 * p), _mm512_mul_ps(v, d));
        }
    }
}

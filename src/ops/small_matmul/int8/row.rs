//! Opt-in int8 activations for one-row products on CPUs without AVX-512 (AVX2, FMA, F16C):
//! one-sequence decode steps over the K-quants (Q4_K, Q5_K, Q6_K), whose exact one-row
//! kernels (`dequant/avx2`) spend more instructions per block than reading its bytes costs.
//! Products of several rows keep the exact kernels there (each block's dequantisation is
//! shared by every row, and AVX2 has no VNNI to make int8 multiply-adds cheaper than f32
//! ones), and so do the 32-position formats (their exact kernels were as fast: see
//! [`applies`]).
//!
//! The input row is rounded once per product as the VNNI kernel rounds its rows
//! ([`quantize_row`]). Each weight row is unpacked, [`CHUNK`] positions at a time, into bytes
//! `u` with `value = a·u − b` per subblock (`dequant/unsigned.rs`, the VNNI kernel's
//! unpacking). `vpmaddubsw` + `vpmaddwd` sum `u·q` over 32 positions in exact 32-bit integers
//! (pairs of byte products stay within `i16`: `u ≤ 63`, `|q| ≤ 127`). In f32 each 32-position
//! sum is then scaled by `a·dx` and the subblock's `b · dx · Σq` taken off.

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

use super::super::super::dequant::unsigned;
use super::super::super::stored::StoredMatrix;
use super::QBLOCK;

/// Weight positions unpacked at a time, per row (a K-quant block is 256): [`R`] rows' bytes
/// stay in L1.
const CHUNK: usize = 2048;

/// Weight rows multiplied together: each has its own accumulator (4 chains of multiply-adds
/// in flight, where one row at a time waits on each add), and they share the input's loads.
const R: usize = 4;

/// Whether the one-row kernel multiplies `w` on this CPU: a K-quant, AVX2, FMA and F16C.
pub(in super::super) fn applies(w: &StoredMatrix) -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let avx2 = *AVX2.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    });
    // The K-quants only: the exact one-row kernels of the 32-position formats were as fast or
    // faster (1 sequence, interleaved rounds: SmolLM2 Q8_0 80 vs 69 tok/s, 1B-shaped Q4_1 15
    // vs 11, SmolLM2 Q4_K_M's Q5_0 even), those of the K-quants slower (1B-shaped Q4_K_M 8.3
    // vs 12).
    let format = matches!(w.dtype(), GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
    avx2 && format && w.cols().is_multiple_of(QBLOCK)
}

/// Whether a one-row product over `w` takes this kernel: its int8 activations are on and the
/// kernel [`applies`] (on CPUs without AVX-512: the caller's choice).
pub(in super::super) fn takes(w: &StoredMatrix) -> bool {
    w.int8_activations() && applies(w)
}

/// An input row rounded to int8, as the kernel reads it.
pub(in super::super) struct Row {
    /// The rounded values.
    q: Vec<i8>,
    /// Each [`QBLOCK`]'s scale.
    d: Vec<f32>,
    /// The scale of each 16 positions' block.
    d16: Vec<f32>,
    /// Per 16 positions, their block's scale times the sum of their `q`.
    dsum16: Vec<f32>,
    /// Per 32 positions, the same.
    dsum32: Vec<f32>,
}

/// `x` rounded to int8 in blocks of [`QBLOCK`] (see [`quantize_row`]).
///
/// # Panics
/// Unless the CPU has AVX2 and `x`'s length is a multiple of [`QBLOCK`].
pub(in super::super) fn quantize(x: &[f32]) -> Row {
    let k = x.len();
    let mut row = Row {
        q: vec![0; k],
        d: vec![0.0; k / QBLOCK],
        d16: Vec::with_capacity(k / 16),
        dsum16: Vec::with_capacity(k / 16),
        dsum32: Vec::with_capacity(k / 32),
    };
    quantize_row(x, &mut row.q, &mut row.d);
    for (b, q) in row.q.chunks_exact(QBLOCK).enumerate() {
        let sum = |q: &[i8]| q.iter().map(|&v| i32::from(v)).sum::<i32>();
        let (s0, s1) = (sum(&q[..16]), sum(&q[16..]));
        let d = row.d[b];
        row.d16.extend([d, d]);
        row.dsum16.extend([d * s0 as f32, d * s1 as f32]);
        row.dsum32.push(d * (s0 + s1) as f32);
    }
    row
}

/// One row rounded to int8 in blocks of [`QBLOCK`]: `q = round(x / d)` (ties to even),
/// `d = max|x| / 127` (0 for a block of zeros). Both int8 kernels round with it.
///
/// # Panics
/// Unless the CPU has AVX2 and `x.len() == q.len() == d.len() * QBLOCK`.
pub(super) fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    assert!(x.len() == q.len() && x.len() == d.len() * QBLOCK);
    assert!(is_x86_feature_detected!("avx2"));
    // SAFETY: AVX2 and the lengths checked just above.
    unsafe { quantize_row_avx2(x, q, d) }
}

#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    for (b, d) in d.iter_mut().enumerate() {
        let p = x.as_ptr().add(b * QBLOCK);
        let v = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(p.add(i)));
        let m = v.iter().fold(_mm256_setzero_ps(), |m, &v| {
            _mm256_max_ps(m, _mm256_and_ps(v, abs))
        });
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        *d = amax / 127.0;
        let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        // The default rounding (to nearest, ties to even); |x · inv| ≤ 127 by construction.
        let i = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)));
        // Packing goes within 128-bit halves: 0-3 8-11 16-19 24-27 | 4-7 12-15 20-23 28-31.
        let w = _mm256_packs_epi32(i[0], i[1]);
        let z = _mm256_packs_epi32(i[2], i[3]);
        let bytes = _mm256_packs_epi16(w, z);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let bytes = _mm256_permutevar8x32_epi32(bytes, order);
        _mm256_storeu_si256(q.as_mut_ptr().add(b * QBLOCK).cast(), bytes);
    }
}

/// `y[i] = x · (row o0 + i of w)` with `x` rounded to int8 (`x` from [`quantize`] of an input
/// of `w.cols()` values).
///
/// # Panics
/// Unless [`applies`] to `w`, `x` has `w.cols()` positions and `o0 + y.len() <= w.rows()`.
pub(in super::super) fn dot_rows(w: &StoredMatrix, x: &Row, o0: usize, y: &mut [f32]) {
    assert!(applies(w) && x.q.len() == w.cols() && o0 + y.len() <= w.rows());
    let chunk = CHUNK.min(w.cols());
    let mut buf = Buffers {
        u: vec![0; R * chunk],
        s: vec![0.0; R * chunk / 16],
        b: vec![0.0; chunk / 16],
    };
    let mut o = 0;
    // SAFETY (each): `applies` checked AVX2, FMA and F16C; the shapes just above.
    while o + R <= y.len() {
        unsafe { rows::<R>(w, x, o0 + o, &mut y[o..o + R], &mut buf) };
        o += R;
    }
    let (y, o1) = (&mut y[o..], o0 + o);
    match y.len() {
        0 => {}
        1 => unsafe { rows::<1>(w, x, o1, y, &mut buf) },
        2 => unsafe { rows::<2>(w, x, o1, y, &mut buf) },
        3 => unsafe { rows::<3>(w, x, o1, y, &mut buf) },
        _ => unreachable!(),
    }
}

/// Room for [`R`] rows' chunks (of `chunk` positions) unpacked.
struct Buffers {
    /// `[R][chunk]`: the bytes.
    u: Vec<u8>,
    /// `[R][chunk / 16]`: per subblock, `a`, then `a · dx`.
    s: Vec<f32>,
    /// `[chunk / 16]`: one row's `b` per subblock.
    b: Vec<f32>,
}

/// `N` weight rows from `o`, [`CHUNK`] positions at a time: each row's chunk unpacked, its
/// subblocks' scales times the input's, then the integer sums of every 32 positions scaled and
/// added.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `y.len() == N`, `x` as long as `w`'s rows, `o + N <= w.rows()`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows<const N: usize>(
    w: &StoredMatrix,
    x: &Row,
    o: usize,
    y: &mut [f32],
    buf: &mut Buffers,
) {
    let (k, dtype) = (w.cols(), w.dtype());
    let sub = unsigned::subblock(dtype).expect("applies");
    let (dx, dsum) = if sub == 16 {
        (&x.d16, &x.dsum16)
    } else {
        (&x.d, &x.dsum32)
    };
    let chunk = buf.b.len() * 16;
    let (u, s, b) = (&mut buf.u, &mut buf.s, &mut buf.b);
    let (us, ss) = (chunk, chunk / 16);
    let mut acc = [_mm256_setzero_ps(); N];
    // `Σ b · dx · Σq` per row: 8 subblocks a lane, the rest one at a time.
    let (mut offv, mut off) = ([_mm256_setzero_ps(); N], [0f32; N]);
    let ones = _mm256_set1_epi16(1);
    let mut c0 = 0;
    while c0 < k {
        let c1 = (c0 + chunk).min(k);
        let subs = (c1 - c0) / sub;
        let (dx, dsum) = (
            &dx[c0 / sub..c0 / sub + subs],
            &dsum[c0 / sub..c0 / sub + subs],
        );
        // The next rows' chunk travels from memory while this one is multiplied (it stays
        // within the run: its last group asks for rows past the run's outputs, a hint only).
        w.prefetch_cols(o + N, N, c0, c1);
        for r in 0..N {
            let bytes = w.row_blocks(o + r, c0, c1);
            let (ur, sr) = (u.as_mut_ptr().add(r * us), s.as_mut_ptr().add(r * ss));
            unsigned::unpack(dtype, bytes, ur, sr, b.as_mut_ptr());
            let eights = subs / 8 * 8;
            for i in (0..eights).step_by(8) {
                let (bv, dv) = (b.as_ptr().add(i), dsum.as_ptr().add(i));
                offv[r] = _mm256_fmadd_ps(_mm256_loadu_ps(bv), _mm256_loadu_ps(dv), offv[r]);
            }
            for (b, ds) in b[eights..subs].iter().zip(&dsum[eights..]) {
                off[r] += b * ds;
            }
            let sr = &mut s[r * ss..(r + 1) * ss];
            for (s, dx) in sr[..subs].iter_mut().zip(dx) {
                *s *= dx;
            }
        }
        let q = x.q.as_ptr().add(c0);
        for j in 0..(c1 - c0) / 32 {
            let xv = _mm256_loadu_si256(q.add(32 * j).cast());
            for (r, acc) in acc.iter_mut().enumerate() {
                let wv = _mm256_loadu_si256(u.as_ptr().add(r * us + 32 * j).cast());
                let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones));
                // Lanes 0-3 hold positions 0-15, lanes 4-7 16-31: with 16-position
                // subblocks each half has its own scale.
                let scale = if sub == 16 {
                    let at = s.as_ptr().add(r * ss + 2 * j);
                    _mm256_set_m128(_mm_broadcast_ss(&*at.add(1)), _mm_broadcast_ss(&*at))
                } else {
                    _mm256_broadcast_ss(&*s.as_ptr().add(r * ss + j))
                };
                *acc = _mm256_fmadd_ps(sum, scale, *acc);
            }
        }
        c0 = c1;
    }
    for r in 0..N {
        y[r] = hsum(acc[r]) - (hsum(offv[r]) + off[r]);
    }
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{check, shapes, FORMATS};
    use super::*;
    use candle_core::{Device, Tensor};

    /// As the VNNI kernel's test: the rounded input times the dequantised weights, up to
    /// summation order, for the K-quants and the one-row shapes (and each row of the others);
    /// the other formats are not taken.
    #[test]
    fn one_row_int8_products_are_the_rounded_input_times_the_weights() {
        if !(is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        {
            return;
        }
        for dtype in FORMATS {
            let zeros = Tensor::zeros((1, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
            let w = StoredMatrix::quantize(&zeros, dtype).unwrap();
            let k_quant = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
            assert_eq!(applies(&w), k_quant, "{dtype:?}");
            if !k_quant {
                continue;
            }
            // Rows longer than a chunk, and one chunk exactly.
            let long = [(1, CHUNK + 9 * 256, 7), (1, CHUNK, 5)];
            for (m, k, n) in shapes(dtype).into_iter().chain(long) {
                check(dtype, (m, k, n), |x, m, w| {
                    let mut y = vec![0f32; m * n];
                    for (x, y) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
                        // Outputs from a row past the first, as a thread's run starts.
                        let (a, b) = y.split_at_mut(n / 3);
                        let x = quantize(x);
                        dot_rows(w, &x, 0, a);
                        dot_rows(w, &x, n / 3, b);
                    }
                    y
                });
            }
        }
    }
}

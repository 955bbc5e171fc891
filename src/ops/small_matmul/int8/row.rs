//! Opt-in int8 activations for products of 1 to [`MAX_ROWS`] rows on CPUs without AVX-512
//! (AVX2, FMA, F16C): decode steps of 1-4 sequences over the K-quants (Q4_K, Q5_K, Q6_K),
//! whose exact kernels (`dequant/avx2`) spend more instructions per block than reading its
//! bytes costs. The 32-position formats keep their exact kernels at 1-4 rows (at one row
//! they were as fast: see [`applies`]); from 5 rows every format but Q8_0 takes the tiling
//! of `avx2.rs`.
//!
//! With AVX-512 VNNI (and VL) the same kernel takes one-row products (one-sequence decode),
//! each 32 positions summed by one `vpdpbusd` on 256-bit vectors; 2+ rows take the VNNI
//! tiling there. On AMD Zen 4, whose 512-bit operations take two passes, the exact one-row
//! kernels (`dequant/kdot.rs`, ~3 operations per 16 weights) were bound by arithmetic and read
//! 17-21 GB/s of the 31 GB/s that two cores read: the 1B-shaped Q4_K_M at one sequence made
//! 24.0 tok/s exact and 29.5 with this kernel (3 interleaved rounds; llama.cpp ~45). Summing
//! with `vpdpbusd` or with `vpmaddubsw` + `vpmaddwd` measured the same there (39-48 G weights
//! a second each, 11008×4096 Q4_K rows, interleaved): the unpacking and scales bound it.
//!
//! Each input row is rounded once per product as the VNNI kernel rounds its rows
//! ([`quantize_row`]). Each weight row is then read once, a block at a time, straight from its
//! stored bytes: each 32 positions' values become bytes `u` in a register (once for all the
//! input rows), with
//! `value = a·u − b` per subblock (`dequant/unsigned.rs`'s `*_bytes`, which the VNNI kernel's
//! unpacking also uses). `vpmaddubsw` + `vpmaddwd` sum `u·q` over 32 positions in exact 32-bit
//! integers (pairs of byte products stay within `i16`: `u ≤ 63`, `|q| ≤ 127`). In f32 each
//! subblock's sum is then scaled by `a·dx` and its `b · dx · Σq` taken off.
//!
//! An earlier version unpacked 4 rows' bytes into buffers, 2048 positions at a time, and then
//! multiplied them: the 1B-shaped Q4_K_M decoded at 15 tok/s at one sequence against this
//! kernel's 28 (3 interleaved rounds; llama.cpp 22). At 2 and 4 sequences this kernel made
//! 26-33 and 37-41 tok/s where the tiling (rows in lanes, 2 or 4 of each vector's 8 used)
//! made 11-13 and 22 (2 rounds; llama.cpp 24-26, 30-33); at 6 and 8 the tiling was a little
//! faster (30/31 vs 28/28, 36/34 vs 34/34), hence 4.

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

use super::super::super::dequant::{hsum8, prefetch_ahead, unsigned};
use super::super::super::stored::StoredMatrix;
use super::QBLOCK;

/// How this CPU sums a subblock's byte products: AVX2's `vpmaddubsw` + `vpmaddwd`, or AVX-512
/// VNNI's `vpdpbusd` (one instruction) on its 256-bit vectors.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cpu {
    /// Neither: the kernel does not run here.
    None,
    /// AVX2, FMA and F16C, and no AVX-512.
    Avx2,
    /// AVX-512 with VNNI and VL (and AVX2, FMA, F16C).
    Vnni,
}

/// AVX2, FMA and F16C: what either way of summing needs besides VNNI.
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The formats the kernel multiplies.
fn k_quant(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K)
}

fn cpu() -> Cpu {
    static CPU: std::sync::OnceLock<Cpu> = std::sync::OnceLock::new();
    *CPU.get_or_init(|| {
        let avx2 = has_avx2();
        let avx512 = is_x86_feature_detected!("avx512f");
        let vnni = is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
        if avx2 && avx512 && vnni {
            Cpu::Vnni
        } else if avx2 && !avx512 {
            Cpu::Avx2
        } else {
            // AVX-512 without VNNI: the exact one-row kernels (`dequant/kdot.rs`) keep the row.
            Cpu::None
        }
    })
}

/// Whether the one-row kernel multiplies `w` on this CPU: a K-quant, on a CPU with AVX-512
/// VNNI, or with AVX2, FMA and F16C and no AVX-512.
pub(in super::super) fn applies(w: &StoredMatrix) -> bool {
    // The K-quants only: the exact one-row kernels of the 32-position formats were as fast or
    // faster (AVX2, 1 sequence, interleaved rounds: SmolLM2 Q8_0 80 vs 69 tok/s, 1B-shaped
    // Q4_1 15 vs 11, SmolLM2 Q4_K_M's Q5_0 even), those of the K-quants slower (1B-shaped
    // Q4_K_M 12.9 exact vs 30.3 with this kernel).
    cpu() != Cpu::None && k_quant(w.dtype()) && w.cols().is_multiple_of(QBLOCK)
}

/// Whether a one-row product over `w` takes this kernel: its int8 activations are on and the
/// kernel [`applies`].
pub(in super::super) fn takes(w: &StoredMatrix) -> bool {
    w.int8_activations() && applies(w)
}

/// Whether products of 2 to [`MAX_ROWS`] rows take this kernel on this CPU (where it
/// applies): on AVX2 without AVX-512; with VNNI they take the VNNI tiling (`int8/mod.rs`).
pub(in super::super) fn takes_several() -> bool {
    cpu() == Cpu::Avx2
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
    assert!(o0 + y.len() <= w.rows());
    // SAFETY: `y` has room for outputs `0..y.len()` of the one row.
    unsafe { dot_rows_many(w, std::slice::from_ref(x), o0, y.len(), y.as_mut_ptr(), 0) }
}

/// Rows `xs` (each from [`quantize`], at most [`MAX_ROWS`]) times rows `o0..o0 + n` of `w`:
/// row `r`'s product with weight row `o0 + i` at `y[r * ldy + i]`. Each weight block's bytes
/// are made once for all the rows.
///
/// # Safety
/// `y` takes writes at `r * ldy + i` for `r < xs.len()`, `i < n`.
///
/// # Panics
/// Unless [`applies`] to `w`, 1 to [`MAX_ROWS`] rows of `w.cols()` positions, and
/// `o0 + n <= w.rows()`.
pub(in super::super) unsafe fn dot_rows_many(
    w: &StoredMatrix,
    xs: &[Row],
    o0: usize,
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    assert!(applies(w));
    dot_rows_on(cpu(), w, xs, o0, n, y, ldy)
}

/// [`dot_rows_many`] with the sums of `on` (for the tests: both where the CPU has VNNI).
///
/// # Safety
/// As [`dot_rows_many`].
///
/// # Panics
/// As [`dot_rows_many`], and unless the CPU has what `on` needs.
unsafe fn dot_rows_on(
    on: Cpu,
    w: &StoredMatrix,
    xs: &[Row],
    o0: usize,
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    let k = w.cols();
    assert!(k_quant(w.dtype()) && k.is_multiple_of(QBLOCK) && o0 + n <= w.rows());
    assert!((1..=MAX_ROWS).contains(&xs.len()) && xs.iter().all(|x| x.q.len() == k));
    assert!(has_avx2() && (on == Cpu::Avx2 || (on == Cpu::Vnni && cpu() == Cpu::Vnni)));
    macro_rules! rows {
        ($m:literal) => {{
            let xs: &[Row; $m] = xs.try_into().unwrap();
            // SAFETY (each): the CPU's features checked just above; the caller, `y`.
            if on == Cpu::Vnni {
                rows_vnni(w, xs, o0, n, y, ldy)
            } else {
                rows_avx2(w, xs, o0, n, y, ldy)
            }
        }};
    }
    match xs.len() {
        1 => rows!(1),
        2 => rows!(2),
        3 => rows!(3),
        4 => rows!(4),
        m => unreachable!("{m} rows"),
    }
}

/// The most rows [`dot_rows_many`] takes at once: each row's sums, offsets and scales stay in
/// registers.
pub(in super::super) const MAX_ROWS: usize = 4;

/// Lanes 0-3 of `s`'s lane `2m`, lanes 4-7 of its lane `2m + 1`, for `m` 0..4: the scales of
/// a 32-position vector's two 16-position subblocks.
const PAIRS: [[i32; 8]; 4] = [
    [0, 0, 0, 0, 1, 1, 1, 1],
    [2, 2, 2, 2, 3, 3, 3, 3],
    [4, 4, 4, 4, 5, 5, 5, 5],
    [6, 6, 6, 6, 7, 7, 7, 7],
];

/// `Σ u·q` over 32 positions as 8 exact 32-bit sums in f32, lanes 0-3 positions 0-15, lanes
/// 4-7 16-31: by `vpdpbusd` (`VNNI`), else `vpmaddubsw` + `vpmaddwd` (`u ≤ 63` and
/// `|q| ≤ 127`: the pairs of byte products stay within `i16`). Both sums are exact.
#[inline(always)]
unsafe fn sums<const VNNI: bool>(u: __m256i, q: *const i8) -> __m256 {
    let q = _mm256_loadu_si256(q.cast());
    let s = if VNNI {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, q)
    } else {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1))
    };
    _mm256_cvtepi32_ps(s)
}

/// The row kernels, compiled once per way of summing: `$features` for every function, so
/// that the closures inside (which take their function's features) and the intrinsics they
/// call are inlined. (An `#[inline(always)]` body without features of its own, called from
/// two feature-enabled wrappers, left its closures as calls: ~20 a block.)
macro_rules! row_kernels {
    ($features:literal, $vnni:literal, $rows:ident, $k_row:ident, $q6_k_row:ident) => {
        /// Rows `o0..o0 + n` of `w` times each of `xs` (see [`dot_rows_many`]).
        #[target_feature(enable = $features)]
        unsafe fn $rows<const M: usize>(
            w: &StoredMatrix,
            xs: &[Row; M],
            o0: usize,
            n: usize,
            y: *mut f32,
            ldy: usize,
        ) {
            let k = w.cols();
            for i in 0..n {
                let bytes = w.row_blocks(o0 + i, 0, k);
                let sums = match w.dtype() {
                    GgmlDType::Q4K => $k_row::<144, M>(bytes, xs),
                    GgmlDType::Q5K => $k_row::<176, M>(bytes, xs),
                    GgmlDType::Q6K => $q6_k_row::<M>(bytes, xs),
                    _ => unreachable!("applies"),
                };
                for (r, v) in sums.iter().enumerate() {
                    *y.add(r * ldy + i) = *v;
                }
            }
        }

        /// A Q4_K (blocks of `B = 144` bytes) or Q5_K (176) row times each of `xs`: per subblock the
        /// integer sums scaled by `a · dx`, less `b · dx · Σq`.
        #[target_feature(enable = $features)]
        unsafe fn $k_row<const B: usize, const M: usize>(bytes: &[u8], xs: &[Row; M]) -> [f32; M] {
            // One chain of multiply-adds per row (two for one row: even and odd subblocks), and the
            // offsets.
            let mut even = [_mm256_setzero_ps(); M];
            let mut odd = [_mm256_setzero_ps(); M];
            let mut off = [_mm256_setzero_ps(); M];
            for (i, blk) in bytes.chunks_exact(B).enumerate() {
                prefetch_ahead(blk);
                let blk: &[u8; B] = blk.try_into().unwrap();
                let (a, b) = unsigned::k_scales(blk);
                let mut s = [_mm256_setzero_ps(); M];
                for (r, x) in xs.iter().enumerate() {
                    let dsum = _mm256_loadu_ps(x.dsum32.as_ptr().add(8 * i));
                    off[r] = _mm256_fmadd_ps(b, dsum, off[r]);
                    s[r] = _mm256_mul_ps(a, _mm256_loadu_ps(x.d.as_ptr().add(8 * i)));
                }
                let mut f = |j: usize, u| {
                    let pick = _mm256_set1_epi32(j as i32);
                    for (r, x) in xs.iter().enumerate() {
                        let scale = _mm256_permutevar8x32_ps(s[r], pick);
                        let acc = if M > 1 || j.is_multiple_of(2) {
                            &mut even[r]
                        } else {
                            &mut odd[r]
                        };
                        let q = x.q.as_ptr().add(256 * i + 32 * j);
                        *acc = _mm256_fmadd_ps(sums::<$vnni>(u, q), scale, *acc);
                    }
                };
                unsigned::k_bytes(blk, &mut f);
            }
            std::array::from_fn(|r| hsum8(_mm256_add_ps(even[r], odd[r])) - hsum8(off[r]))
        }

        /// A Q6_K row times each of `xs`: per 16-position subblock the integer sums scaled by
        /// `a · dx`, less `32a · dx · Σq`.
        #[target_feature(enable = $features)]
        unsafe fn $q6_k_row<const M: usize>(bytes: &[u8], xs: &[Row; M]) -> [f32; M] {
            let mut even = [_mm256_setzero_ps(); M];
            let mut odd = [_mm256_setzero_ps(); M];
            let mut off = [_mm256_setzero_ps(); M];
            let pairs = PAIRS.map(|p| _mm256_loadu_si256(p.as_ptr().cast()));
            let thirty_two = _mm256_set1_ps(32.0);
            for (i, blk) in bytes.chunks_exact(210).enumerate() {
                prefetch_ahead(blk);
                let blk: &[u8; 210] = blk.try_into().unwrap();
                let s = unsigned::q6_k_scales(blk);
                let b = s.map(|s| _mm256_mul_ps(thirty_two, s));
                let mut sx = [[_mm256_setzero_ps(); 2]; M];
                for (r, x) in xs.iter().enumerate() {
                    for h in 0..2 {
                        let at = 16 * i + 8 * h;
                        let dsum = _mm256_loadu_ps(x.dsum16.as_ptr().add(at));
                        off[r] = _mm256_fmadd_ps(b[h], dsum, off[r]);
                        sx[r][h] = _mm256_mul_ps(s[h], _mm256_loadu_ps(x.d16.as_ptr().add(at)));
                    }
                }
                unsigned::q6_k_bytes(blk, |j, u| {
                    for (r, x) in xs.iter().enumerate() {
                        let scale = _mm256_permutevar8x32_ps(sx[r][j / 4], pairs[j % 4]);
                        let acc = if M > 1 || j.is_multiple_of(2) {
                            &mut even[r]
                        } else {
                            &mut odd[r]
                        };
                        let q = x.q.as_ptr().add(256 * i + 32 * j);
                        *acc = _mm256_fmadd_ps(sums::<$vnni>(u, q), scale, *acc);
                    }
                });
            }
            std::array::from_fn(|r| hsum8(_mm256_add_ps(even[r], odd[r])) - hsum8(off[r]))
        }
    };
}

row_kernels!("avx2,fma,f16c", false, rows_avx2, k_row_avx2, q6_k_row_avx2);
row_kernels!(
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    true,
    rows_vnni,
    k_row_vnni,
    q6_k_row_vnni
);

#[cfg(test)]
mod tests {
    use super::super::tests::{check, shapes, FORMATS};
    use super::*;
    use candle_core::{Device, Tensor};

    /// As the VNNI kernel's test: the rounded input times the dequantised weights, up to
    /// summation order, for the K-quants: one row at a time (shapes of an odd number of rows
    /// from 5), else in groups of up to [`MAX_ROWS`] (1 to 4 rows); the other formats are not
    /// taken.
    #[test]
    fn one_row_int8_products_are_the_rounded_input_times_the_weights() {
        if !has_avx2() {
            return;
        }
        // Each way of summing the CPU has (AVX2's everywhere, VNNI's where it is), whichever
        // `dot_rows_many` takes here.
        let ons: &[Cpu] = if cpu() == Cpu::Vnni {
            &[Cpu::Avx2, Cpu::Vnni]
        } else {
            &[Cpu::Avx2]
        };
        for dtype in FORMATS {
            let zeros = Tensor::zeros((1, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
            let w = StoredMatrix::quantize(&zeros, dtype).unwrap();
            let k_quant = k_quant(dtype);
            assert_eq!(applies(&w), k_quant && cpu() != Cpu::None, "{dtype:?}");
            if !k_quant {
                continue;
            }
            // Long rows (the 1B-shaped model's MLP has 8192 positions).
            let long = [(1, 8192 + 9 * 256, 7), (1, 2048, 5)];
            let few = [(2, 2048, 5), (3, 768, 9), (4, 8192 + 256, 6)];
            for &on in ons {
                for (m, k, n) in shapes(dtype).into_iter().chain(long).chain(few) {
                    check(dtype, (m, k, n), |x, m, w| {
                        let mut y = vec![0f32; m * n];
                        // Groups of up to `MAX_ROWS` rows (one at a time once), their outputs
                        // from a row past the first too, as a thread's run starts.
                        let group = if m % 2 == 1 && m > 3 { 1 } else { MAX_ROWS };
                        for (g, x) in x.chunks(group * k).enumerate() {
                            let xs: Vec<Row> = x.chunks_exact(k).map(quantize).collect();
                            let y = &mut y[g * group * n..];
                            let p = y.as_mut_ptr();
                            let ldy = if xs.len() == 1 { 0 } else { n };
                            // SAFETY: `y` holds `xs.len()` rows of `n` outputs.
                            unsafe {
                                dot_rows_on(on, w, &xs, 0, n / 3, p, ldy);
                                dot_rows_on(on, w, &xs, n / 3, n - n / 3, p.add(n / 3), ldy);
                            }
                        }
                        y
                    });
                }
            }
            // The public entry points, where the kernel runs here.
            if cpu() != Cpu::None {
                let (m, k, n) = (1, 2048, 5);
                check(dtype, (m, k, n), |x, _, w| {
                    let mut y = vec![0f32; n];
                    dot_rows(w, &quantize(x), 0, &mut y);
                    y
                });
            }
        }
    }
}

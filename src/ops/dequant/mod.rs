//! Fast dequantisation of the GGUF block formats that decode reads most (Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16, F16), bit for bit equal to candle's `to_float`.
//!
//! candle's `to_float` is written for any target and compiled for the baseline one (SSE2), so
//! it dequantises a Q4_K row at a fraction of the speed decode needs: a decode step dequantises
//! every weight once. These are the same formulas, operation for operation (a product then a
//! sum, never a fused multiply-add, so every value rounds as candle's does), written over
//! fixed-size arrays that the compiler vectorises (`blocks.rs`), and compiled for AVX-512 or
//! AVX2 when the CPU has them (`simd_dispatch!`). On AVX2 without AVX-512, Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0, Q4_K, Q5_K and Q6_K take `avx2/`'s intrinsics instead, values bit for bit the
//! portable ones (and one-row dots too, but the k-quants': below). On AVX-512 the formats of Q4_K_M, Q5_K_M and Q8_0 files
//! (Q4_K, Q5_K, Q6_K, Q8_0) take `strip.rs`, which also dequantises a strip of rows' blocks in
//! one call for the tiles ([`dequantize_cols`]): scales worked out ahead for a chunk of
//! blocks, tables of the 16 (or 32) values a k-quant scale can give and one permute per 16
//! weights, Q6_K assembled 64 values at a time in byte lanes. Q4_0, Q4_1, Q5_0 and Q5_1 take
//! `table.rs`'s tables. The block layouts are llama.cpp's (`ggml-common.h`); tests compare
//! every format against candle's `to_float` for equality.
//!
//! One input row against Q4_K, Q5_K or Q6_K rows (decode at one sequence) takes `kdot.rs`
//! (on AVX2: `avx2/kdot.rs`), which sums each sub-block before scaling it: the
//! exact dot product up to rounding, not bit for bit the dequantised values' (its
//! documentation says how, and its tests bound it).

use candle_core::quantized::GgmlDType;

/// Dequantise whole blocks of `dtype` in `bytes` into `out`; `false` (nothing written) when
/// there is no fast path for `dtype`.
pub(super) fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
    if dequantize_ahead(dtype, bytes, out, 0) {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY (each): the CPU has AVX-512F, checked just above.
        match dtype {
            GgmlDType::Q4_0 => unsafe { table::q4_0(bytes, out) },
            GgmlDType::Q4_1 => unsafe { table::q4_1(bytes, out) },
            GgmlDType::Q5_0 => unsafe { table::q5_0(bytes, out) },
            GgmlDType::Q5_1 => unsafe { table::q5_1(bytes, out) },
            _ => return dispatch(dtype, bytes, out),
        }
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::dequantize(dtype, bytes, out) {
        return true;
    }
    dispatch(dtype, bytes, out)
}

/// [`dequantize`], prefetching the bytes `ahead` bytes after each block as it goes, where
/// the format has a strip path (`strip.rs`); `false` (nothing written) where it has not.
pub(super) fn dequantize_ahead(
    dtype: GgmlDType,
    bytes: &[u8],
    out: &mut [f32],
    ahead: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if strip::available() {
        let row = Rows {
            bytes,
            row_bytes: bytes.len(),
            map: None,
        };
        assert_eq!(
            bytes.len() / dtype.type_size() * dtype.block_size(),
            out.len()
        );
        // SAFETY: the CPU has what `strip` needs, and `out` holds the values of `bytes`.
        return unsafe {
            strip::cols(dtype, &row, 1, (0, bytes.len()), out.as_mut_ptr(), 0, ahead)
        };
    }
    let _ = (dtype, bytes, out, ahead);
    false
}

mod blocks;
use blocks::{f16_to_f32, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0};
// For the x86-64 kernels beside this module, which read the same fields.
#[cfg(target_arch = "x86_64")]
use blocks::{half_at, scales_mins_k4};
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
pub(super) use avx2::hsum8;
#[cfg(target_arch = "x86_64")]
mod strip;
#[cfg(target_arch = "x86_64")]
mod table;
#[cfg(target_arch = "x86_64")]
pub(super) mod unsigned;

simd_dispatch!(
    fn dispatch(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool = plain
);

/// Each `$b`-byte block of `bytes` into `$n` values of `out`, by `$f` (a macro rather than a
/// function taking `$f`, so that `$f` is inlined into the vectorised caller for certain).
macro_rules! blocks {
    ($bytes:expr, $out:expr, $b:literal, $n:literal, $f:ident) => {{
        let (bytes, out): (&[u8], &mut [f32]) = ($bytes, $out);
        assert_eq!(bytes.len() / $b * $n, out.len());
        for (b, y) in bytes.chunks_exact($b).zip(out.chunks_exact_mut($n)) {
            $f(
                b.try_into().expect("whole blocks"),
                y.try_into().expect("whole blocks"),
            );
        }
    }};
}

#[inline(always)]
fn plain(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
    use GgmlDType::*;
    match dtype {
        Q4_0 => blocks!(bytes, out, 18, 32, q4_0),
        Q4_1 => blocks!(bytes, out, 20, 32, q4_1),
        Q5_0 => blocks!(bytes, out, 22, 32, q5_0),
        Q5_1 => blocks!(bytes, out, 24, 32, q5_1),
        Q8_0 => blocks!(bytes, out, 34, 32, q8_0),
        Q4K => blocks!(bytes, out, 144, 256, q4_k),
        Q5K => blocks!(bytes, out, 176, 256, q5_k),
        Q6K => blocks!(bytes, out, 210, 256, q6_k),
        BF16 => {
            assert_eq!(bytes.len(), 2 * out.len());
            for (b, y) in bytes.chunks_exact(2).zip(out.iter_mut()) {
                // The high half of an f32's bits.
                *y = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        F16 => {
            assert_eq!(bytes.len(), 2 * out.len());
            for (b, y) in bytes.chunks_exact(2).zip(out.iter_mut()) {
                *y = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        _ => return false,
    }
    true
}

/// The weight rows a one-row product reads: row `i` of the product is stored row
/// `map[i]`, or `i` when there is no map, each `row_bytes` long in `bytes`.
pub(super) struct Rows<'a> {
    pub bytes: &'a [u8],
    pub row_bytes: usize,
    pub map: Option<&'a [u32]>,
}

impl Rows<'_> {
    #[inline(always)]
    fn row(&self, i: usize) -> &[u8] {
        let s = self.map.map_or(i, |m| m[i] as usize);
        &self.bytes[s * self.row_bytes..(s + 1) * self.row_bytes]
    }
}

/// `y[i] = x · rows.row(i)` for `y.len()` rows: one input row against stored weight rows,
/// each block dequantised into registers and multiplied straight away (decode at one
/// sequence: nothing to share a dequantised block with). `false` (nothing written) when
/// there is no fast path for `dtype`.
pub(super) fn dot_rows(dtype: GgmlDType, rows: &Rows, x: &[f32], y: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K)
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("f16c")
    {
        // SAFETY (each): the CPU has AVX-512F and F16C, checked just above.
        match dtype {
            GgmlDType::Q4K => unsafe { kdot::q4_k(rows, x, y) },
            GgmlDType::Q5K => unsafe { kdot::q5_k(rows, x, y) },
            _ => unsafe { kdot::q6_k(rows, x, y) },
        }
        return true;
    }
    // (With AVX-512, the formats `kdot` does not take keep the portable dot compiled for it.)
    #[cfg(target_arch = "x86_64")]
    if !is_x86_feature_detected!("avx512f") && avx2::dot_rows(dtype, rows, x, y) {
        return true;
    }
    dot_dispatch(dtype, rows, x, y)
}

/// Input rows as [`dot_rows_many`] reads them: `m` rows of `k` positions (`k` a multiple of
/// 32) as `[k / 32][m][32]`, positions `32c..32c + 32` of row `r` at `(c·m + r)·32`. Rows `k`
/// apart (8 or 32 KiB) fell in the same few L1 sets and evicted each other (`avx2/many.rs`
/// has the figures). Built once per product, for every weight and thread run that takes it.
pub(super) struct Interleaved {
    values: Vec<f32>,
    m: usize,
}

impl Interleaved {
    /// `x` (`[m, k]`) interleaved, for 2 to [`MANY_ROWS`] rows and `k` a multiple of 32; `None`
    /// for other shapes, which [`dot_rows_many`] does not take.
    pub(super) fn new(x: &[f32], m: usize) -> Option<Self> {
        if !(2..=MANY_ROWS).contains(&m) || !x.len().is_multiple_of(32 * m) {
            return None;
        }
        let k = x.len() / m;
        let mut values = Vec::with_capacity(x.len());
        for c in 0..k / 32 {
            for r in 0..m {
                values.extend_from_slice(&x[r * k + 32 * c..r * k + 32 * c + 32]);
            }
        }
        Some(Self { values, m })
    }

    /// Positions per row.
    pub(super) fn cols(&self) -> usize {
        self.values.len() / self.m
    }
}

/// Input rows that [`dot_rows_many`] takes at most: one accumulator each, with the block's
/// vector and the input's in AVX2's 16 registers.
pub(super) const MANY_ROWS: usize = 8;

/// `y[r * ldy + i] = x[r] · rows.row(i)` for the rows of `x`, `i < n`, each block dequantised
/// into registers once for all rows, with the decode tiles' sums bit for bit
/// (`avx2::dot_rows_many`): on CPUs with AVX2 but not AVX-512, where the dequantised strip
/// and its reads cost a third more instructions than the products. `false` (nothing
/// written) elsewhere.
///
/// # Safety
/// `y` takes writes at `r * ldy + i` for each row `r` of `x`, `i < n`.
pub(super) unsafe fn dot_rows_many(
    dtype: GgmlDType,
    rows: &Rows,
    n: usize,
    x: &Interleaved,
    y: *mut f32,
    ldy: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if !is_x86_feature_detected!("avx512f") {
        return avx2::dot_rows_many(dtype, rows, n, &x.values, x.m, y, ldy);
    }
    let _ = (dtype, rows, n, x, y, ldy);
    false
}

/// Columns `c0..c1` (on the format's block boundaries) of the rows `rows.row(i)`, `i` in
/// `0..n`, dequantised into `out`, row `i` from `out[i * ld]` on, bit for bit as
/// [`dequantize`]: a strip of a tile's weight rows in one call, each row's blocks dequantised
/// where they lie (a call per row and block cost as much as the k-quant blocks' own work).
/// Each block's bytes `ahead` bytes further on are prefetched meanwhile (none for 0). `false`
/// (nothing written) when there is no such path for `dtype`.
pub(super) fn dequantize_cols(
    dtype: GgmlDType,
    rows: &Rows,
    n: usize,
    (c0, c1): (usize, usize),
    out: &mut [f32],
    ld: usize,
    ahead: usize,
) -> bool {
    let block = dtype.block_size();
    assert!(c0 <= c1 && c1 - c0 <= ld && c0.is_multiple_of(block) && c1.is_multiple_of(block));
    assert!(n == 0 || out.len() >= (n - 1) * ld + (c1 - c0));
    #[cfg(target_arch = "x86_64")]
    if strip::available() {
        let bytes = (
            c0 / block * dtype.type_size(),
            c1 / block * dtype.type_size(),
        );
        // SAFETY: the CPU has what `strip` needs (checked just above), and `out` holds the
        // `n` rows of `c1 - c0` values `ld` apart (asserted above).
        if unsafe { strip::cols(dtype, rows, n, bytes, out.as_mut_ptr(), ld, ahead) } {
            return true;
        }
    }
    let _ = (rows, n, out, ahead);
    false
}

#[cfg(target_arch = "x86_64")]
mod kdot;

simd_dispatch!(
    fn dot_dispatch(dtype: GgmlDType, rows: &Rows, x: &[f32], y: &mut [f32]) -> bool = dot_plain
);

/// [`dot_rows`] for one format: `$f` dequantises a `$b`-byte block into `$n` values. Two
/// accumulators (alternate 16-value slices), so consecutive multiply-adds do not wait on each
/// other.
macro_rules! dot_blocks {
    ($rows:expr, $x:expr, $y:expr, $b:literal, $n:literal, $f:ident) => {{
        let (rows, x, y): (&Rows, &[f32], &mut [f32]) = ($rows, $x, $y);
        assert_eq!(rows.row_bytes / $b * $n, x.len());
        for (i, out) in y.iter_mut().enumerate() {
            let row = rows.row(i);
            let (mut acc0, mut acc1) = ([0f32; 16], [0f32; 16]);
            for (b, xs) in row.chunks_exact($b).zip(x.chunks_exact($n)) {
                prefetch_ahead(b);
                let mut v = [0f32; $n];
                $f(b.try_into().expect("whole blocks"), &mut v);
                for c in 0..$n / 32 {
                    let (v, xs) = (&v[32 * c..32 * c + 32], &xs[32 * c..32 * c + 32]);
                    for l in 0..16 {
                        acc0[l] = v[l].mul_add(xs[l], acc0[l]);
                    }
                    for l in 0..16 {
                        acc1[l] = v[16 + l].mul_add(xs[16 + l], acc1[l]);
                    }
                }
            }
            *out = hsum(&acc0, &acc1);
        }
    }};
}

/// `Σ a + Σ b` as a tree (lanes paired, then halves folded); a plain in-order sum of 32
/// values is 32 dependent scalar additions, a fifth of a 576-value row's time. Not inlined:
/// inlined, it kept the compiler from vectorising the loops that fill `a` and `b`.
#[inline(never)]
fn hsum(a: &[f32; 16], b: &[f32; 16]) -> f32 {
    let mut v = [0f32; 16];
    for l in 0..16 {
        v[l] = a[l] + b[l];
    }
    for l in 0..8 {
        v[l] += v[l + 8];
    }
    for l in 0..4 {
        v[l] += v[l + 4];
    }
    (v[0] + v[2]) + (v[1] + v[3])
}

/// How far ahead of the block being multiplied the weight bytes are prefetched (into L2).
const PREFETCH_BYTES: usize = 2048;

/// The bytes of `block` [`PREFETCH_BYTES`] further on: one prefetch for blocks up to a line
/// (consecutive blocks reach every line), every line of longer ones. One prefetch per block
/// left lines of the k-quants unfetched (a Q4_K block spans 2.25 lines, a Q6_K 3.3): the 1B
/// Q4_K_M at one sequence went 15.7 → 17.6 tok/s with every line (3 interleaved rounds);
/// Q8_0 lost ~3% when its 34-byte blocks were given two.
#[inline(always)]
pub(super) fn prefetch_ahead(block: &[u8]) {
    prefetch_block(block.as_ptr().wrapping_add(PREFETCH_BYTES), block.len());
}

/// Prefetches the `len` bytes from `p`: one prefetch for up to a line, every line of more
/// (see [`prefetch_ahead`]).
#[inline(always)]
pub(super) fn prefetch_block(p: *const u8, len: usize) {
    if len <= 64 {
        prefetch(p);
        return;
    }
    // Each line from the first byte's to the last byte's.
    let first = p as usize & !63;
    let last = (p as usize + len - 1) & !63;
    let mut line = first;
    while line <= last {
        prefetch(p.wrapping_add(line.wrapping_sub(p as usize)));
        line += 64;
    }
}

#[inline(always)]
pub(super) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[inline(always)]
fn dot_plain(dtype: GgmlDType, rows: &Rows, x: &[f32], y: &mut [f32]) -> bool {
    use GgmlDType::*;
    match dtype {
        Q4_0 => dot_blocks!(rows, x, y, 18, 32, q4_0),
        Q4_1 => dot_blocks!(rows, x, y, 20, 32, q4_1),
        Q5_0 => dot_blocks!(rows, x, y, 22, 32, q5_0),
        Q5_1 => dot_blocks!(rows, x, y, 24, 32, q5_1),
        Q8_0 => dot_blocks!(rows, x, y, 34, 32, q8_0),
        Q4K => dot_blocks!(rows, x, y, 144, 256, q4_k),
        Q5K => dot_blocks!(rows, x, y, 176, 256, q5_k),
        Q6K => dot_blocks!(rows, x, y, 210, 256, q6_k),
        _ => return false,
    }
    true
}

/// For the fast dots' tests: `fast` over rows of very different magnitudes (every scale's
/// sign and size), read through a row map, against inputs with outliers, is the exact dot
/// product of the format's values (summed in f64 from the block's own fields) within
/// rounding: 64 f32 epsilons of `Σ |term|`, where a term is each product the format's
/// formula adds (`d·sc·q·x` and `dmin·m·x` for Q4_K). A value or input misplaced by the
/// kernel is off by a whole term, far past that. The portable fused dot meets the same bound,
/// and both are that close to candle's dequantised values' dot.
#[cfg(all(test, target_arch = "x86_64"))]
fn assert_dot_is_the_dequantised_one(dtype: GgmlDType, fast: unsafe fn(&Rows, &[f32], &mut [f32])) {
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    let dev = Device::Cpu;
    let (rows, k) = (7, 768);
    let t = Tensor::randn(0f32, 1.0, (rows, k), &dev)
        .unwrap()
        .broadcast_mul(&Tensor::rand(0.01f32, 100.0, (rows, 1), &dev).unwrap())
        .unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let bytes = q.data().unwrap();
    let values = q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
    let mut x = Tensor::randn(0f32, 1.0, k, &dev)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for at in [3, 100, 511, 700] {
        x[at] *= 60.0;
    }
    let row_bytes = k / dtype.block_size() * dtype.type_size();
    let map = [4u32, 0, 6, 2, 5, 1, 3];
    let sel = Rows {
        bytes: &bytes,
        row_bytes,
        map: Some(&map),
    };
    let (mut got, mut plain) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
    // SAFETY: the callers check that the CPU has what `fast` needs.
    unsafe { fast(&sel, &x, &mut got) };
    assert!(dot_plain(dtype, &sel, &x, &mut plain));
    for (i, &r) in map.iter().enumerate() {
        let row = &bytes[r as usize * row_bytes..(r as usize + 1) * row_bytes];
        let (exact, size) = exact_dot(dtype, row, &x);
        let dequantised: f64 = values[r as usize]
            .iter()
            .zip(&x)
            .map(|(&w, &x)| w as f64 * x as f64)
            .sum();
        let tol = 64.0 * f32::EPSILON as f64 / 2.0 * size;
        for (what, v) in [("fast", got[i]), ("portable", plain[i])] {
            let (e, d) = ((v as f64 - exact).abs(), (v as f64 - dequantised).abs());
            assert!(
                e <= tol && d <= 2.0 * tol,
                "{dtype:?} {what} row {r}: {v} vs exact {exact} (off {e}), dequantised \
                 {dequantised} (off {d}), tolerance {tol}"
            );
        }
    }
}

/// The dot product of `x` with one row of `dtype` in f64 from its blocks' fields, and
/// `Σ |term|` (see [`assert_dot_is_the_dequantised_one`]); `d·sc` and `dmin·m` are the f32
/// products every path uses.
#[cfg(all(test, target_arch = "x86_64"))]
fn exact_dot(dtype: GgmlDType, row: &[u8], x: &[f32]) -> (f64, f64) {
    let (mut sum, mut size) = (0f64, 0f64);
    let mut add = |scale: f32, q: i32, offset: f32, x: f32| {
        let (a, b) = (scale as f64 * q as f64 * x as f64, offset as f64 * x as f64);
        sum += a - b;
        size += a.abs() + b.abs();
    };
    match dtype {
        GgmlDType::Q4K | GgmlDType::Q5K => {
            // Q5_K is Q4_K's layout with `qh: [u8; 32]` before `qs`: bit j of byte l is the
            // fifth bit of sub-block j's value l.
            let five = dtype == GgmlDType::Q5K;
            let (block, qs) = if five { (176, 48) } else { (144, 16) };
            for (b, xs) in row.chunks_exact(block).zip(x.chunks_exact(256)) {
                let (d, min) = (half_at(b, 0), half_at(b, 2));
                let scales: &[u8; 12] = b[4..16].try_into().unwrap();
                for j in 0..8 {
                    let (sc, m) = blocks::scale_min_k4(j, scales);
                    for l in 0..32 {
                        let byte = b[qs + 32 * (j / 2) + l];
                        let low = if j % 2 == 0 { byte & 0xF } else { byte >> 4 };
                        let fifth = if five { (b[16 + l] >> j) & 1 } else { 0 };
                        let q = (low | fifth << 4) as i32;
                        add(d * sc as f32, q, min * m as f32, xs[32 * j + l]);
                    }
                }
            }
        }
        GgmlDType::Q6K => {
            for (b, xs) in row.chunks_exact(210).zip(x.chunks_exact(256)) {
                let d = half_at(b, 208);
                for (v, &x) in xs.iter().enumerate() {
                    let (h, g, l) = (v / 128, v % 128 / 32, v % 32);
                    let ql = b[64 * h + 32 * (g % 2) + l];
                    let low = if g < 2 { ql & 0xF } else { ql >> 4 };
                    let top = (b[128 + 32 * h + l] >> (2 * g)) & 3;
                    let sc = b[192 + 8 * h + 2 * g + l / 16] as i8;
                    let q = (low | top << 4) as i32 - 32;
                    add(d * sc as f32, q, 0.0, x);
                }
            }
        }
        _ => unimplemented!("{dtype:?}"),
    }
    (sum, size)
}

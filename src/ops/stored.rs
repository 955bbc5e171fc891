//! Base weights kept in the format they are stored in: GGUF block formats (Q4_K, Q8_0, …) and
//! 16-bit floats stay as they are in memory (memory-mapped from the file where the layout
//! allows), and are dequantised row by row, on the fly, by the matmul that reads them.
//!
//! A [`StoredMatrix`] is one such weight (what a [`super::BaseWeight`] holds when it is not a
//! dense tensor), with its row access, dequantisation and prefetching. Dequantisation is
//! candle's (`GgmlType::to_float`, the same code that dequantised whole files before), so a
//! stored matrix's rows are bit for bit the rows of the dequantised tensor, and every product
//! over them equals the f32 product on the dequantised weights up to summation order.

use std::sync::Arc;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Result, Tensor};
use half::{bf16, f16};

/// The bytes a [`StoredMatrix`] reads: a range of a memory-mapped file, or its own copy.
#[derive(Debug)]
enum Bytes {
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
    },
    /// `u32` words so that every block type (alignment ≤ 4) may be read from it in place.
    Owned { words: Vec<u32>, len: usize },
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, start, len } => &map[*start..*start + *len],
            Bytes::Owned { words, len } => {
                // SAFETY: `words` holds at least `len` initialised bytes.
                unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), *len) }
            }
        }
    }

    fn owned(bytes: &[u8]) -> Self {
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        // SAFETY: `words` has room for `bytes.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                words.as_mut_ptr().cast::<u8>(),
                bytes.len(),
            )
        };
        Bytes::Owned {
            words,
            len: bytes.len(),
        }
    }
}

/// The formats a base weight may be kept in (GGUF's names).
pub fn supported(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        dtype,
        F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

/// The name llama.cpp gives a format (`Q4_K`, `Q8_0`, `BF16`, …).
pub fn format_name(dtype: GgmlDType) -> &'static str {
    use GgmlDType::*;
    match dtype {
        F32 => "F32",
        F16 => "F16",
        BF16 => "BF16",
        Q4_0 => "Q4_0",
        Q4_1 => "Q4_1",
        Q5_0 => "Q5_0",
        Q5_1 => "Q5_1",
        Q8_0 => "Q8_0",
        Q8_1 => "Q8_1",
        Q2K => "Q2_K",
        Q3K => "Q3_K",
        Q4K => "Q4_K",
        Q5K => "Q5_K",
        Q6K => "Q6_K",
        Q8K => "Q8_K",
    }
}

/// A `[rows, cols]` matrix in a GGUF block format, row-major, each row a whole number of blocks.
#[derive(Debug)]
pub struct StoredMatrix {
    bytes: Bytes,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// Logical row `r` is stored row `row_map[r]` (llama.cpp stores Q and K rows permuted).
    row_map: Option<Vec<u32>>,
    /// Whether products of several rows round their input rows to int8
    /// (`--int8-activations`; see [`set_int8_activations`](Self::set_int8_activations)).
    int8: std::sync::atomic::AtomicBool,
}

impl StoredMatrix {
    /// `rows × cols` values of `dtype` at `map[start..]`; checked against the map's length.
    pub fn mapped(
        map: Arc<memmap2::Mmap>,
        start: usize,
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
    ) -> std::result::Result<Self, String> {
        let row_bytes = Self::row_bytes_of(dtype, cols)?;
        let len = rows * row_bytes;
        if start.checked_add(len).is_none_or(|end| end > map.len()) {
            return Err(format!(
                "its data ({len} bytes at offset {start}) runs past the end of the file ({} bytes)",
                map.len()
            ));
        }
        let bytes = if (map.as_ptr() as usize + start).is_multiple_of(4) {
            Bytes::Mapped { map, start, len }
        } else {
            // Not aligned for in-place reads of every block type (GGUF aligns tensor data to
            // 32 bytes by default, so this is rare): keep a copy.
            Bytes::owned(&map[start..start + len])
        };
        Ok(Self {
            bytes,
            dtype,
            rows,
            cols,
            row_bytes,
            row_map: None,
            int8: Default::default(),
        })
    }

    /// A copy of `bytes`, `rows × cols` values of `dtype`.
    pub fn from_bytes(
        bytes: &[u8],
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
    ) -> std::result::Result<Self, String> {
        let row_bytes = Self::row_bytes_of(dtype, cols)?;
        if bytes.len() != rows * row_bytes {
            return Err(format!(
                "{} bytes for {rows}×{cols} {}: expected {}",
                bytes.len(),
                format_name(dtype),
                rows * row_bytes
            ));
        }
        Ok(Self {
            bytes: Bytes::owned(bytes),
            dtype,
            rows,
            cols,
            row_bytes,
            row_map: None,
            int8: Default::default(),
        })
    }

    /// `t` (`[rows, cols]`, any float dtype) quantized to `dtype` with candle's quantizer.
    pub fn quantize(t: &Tensor, dtype: GgmlDType) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        let q = candle_core::quantized::QTensor::quantize(&t.to_dtype(DType::F32)?, dtype)?;
        Self::from_bytes(&q.data()?, dtype, rows, cols).map_err(candle_core::Error::msg)
    }

    fn row_bytes_of(dtype: GgmlDType, cols: usize) -> std::result::Result<usize, String> {
        if !supported(dtype) {
            return Err(format!(
                "type {} is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, \
                 Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)",
                format_name(dtype)
            ));
        }
        let block = dtype.block_size();
        if !cols.is_multiple_of(block) {
            return Err(format!(
                "its rows of {cols} values are not whole blocks of {block} ({})",
                format_name(dtype)
            ));
        }
        Ok(cols / block * dtype.type_size())
    }

    /// Read logical row `r` from stored row `row_map[r]`: a permutation of `0..rows`.
    pub fn with_row_map(mut self, row_map: Vec<u32>) -> std::result::Result<Self, String> {
        let mut seen = vec![false; self.rows];
        if row_map.len() != self.rows
            || !row_map.iter().all(|&r| {
                (r as usize) < self.rows && !std::mem::replace(&mut seen[r as usize], true)
            })
        {
            return Err(format!("row map is not a permutation of 0..{}", self.rows));
        }
        self.row_map = Some(row_map);
        Ok(self)
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of the stored values (what the matrix occupies once its pages are resident).
    pub fn storage_bytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    /// Whether the values are read from a memory-mapped file (rather than an owned copy).
    pub fn is_mapped(&self) -> bool {
        matches!(self.bytes, Bytes::Mapped { .. })
    }

    #[inline]
    fn stored_row(&self, r: usize) -> &[u8] {
        let s = match &self.row_map {
            Some(map) => map[r] as usize,
            None => r,
        };
        &self.bytes.as_slice()[s * self.row_bytes..(s + 1) * self.row_bytes]
    }

    /// Round the input rows of products over this matrix to int8 where an int8 kernel
    /// applies (its formats; 2 or more rows with AVX-512 VNNI; one row over the K-quants with
    /// AVX-512 VNNI or on CPUs with AVX2 and no AVX-512; the CLI's `--int8-activations`).
    /// Faster, and not exact: the README gives the logit error it measured.
    pub fn set_int8_activations(&self, on: bool) {
        self.int8.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// As [`set_int8_activations`](Self::set_int8_activations) set it (off at load).
    pub fn int8_activations(&self) -> bool {
        self.int8.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The stored bytes of columns `c0..c1` of logical row `r` (`c0` and `c1` on the format's
    /// block boundaries, or `c1` the row's end).
    #[inline]
    pub(super) fn row_blocks(&self, r: usize, c0: usize, c1: usize) -> &[u8] {
        let (block, size) = (self.dtype.block_size(), self.dtype.type_size());
        debug_assert!(c0.is_multiple_of(block) && c1.is_multiple_of(block) && c1 <= self.cols);
        &self.stored_row(r)[c0 / block * size..c1 / block * size]
    }

    /// Logical rows `r0..r0 + n` dequantised into `out` (`n × cols` values).
    pub fn dequantize_rows(&self, r0: usize, n: usize, out: &mut [f32]) {
        assert!(r0 + n <= self.rows && out.len() == n * self.cols);
        if self.row_map.is_none() {
            let bytes = &self.bytes.as_slice()[r0 * self.row_bytes..(r0 + n) * self.row_bytes];
            dequantize(self.dtype, bytes, out);
            return;
        }
        for (i, row) in out.chunks_exact_mut(self.cols).enumerate() {
            dequantize(self.dtype, self.stored_row(r0 + i), row);
        }
    }

    /// [`dequantize_rows`](Self::dequantize_rows), prefetching the `ahead` rows after them
    /// meanwhile, a piece of them with each piece of the rows dequantised (prefetched all at
    /// once, they wait on each other for the core's few line-fill buffers).
    pub(super) fn dequantize_rows_ahead(&self, r0: usize, n: usize, out: &mut [f32], ahead: usize) {
        let ahead = ahead.min(self.rows - (r0 + n).min(self.rows));
        if self.row_map.is_some() || ahead == 0 {
            self.dequantize_rows(r0, n, out);
            self.prefetch_rows(r0 + n, ahead);
            return;
        }
        assert!(r0 + n <= self.rows && out.len() == n * self.cols);
        let rb = self.row_bytes;
        let all = self.bytes.as_slice();
        let (bytes, next) = (
            &all[r0 * rb..(r0 + n) * rb],
            &all[(r0 + n) * rb..(r0 + n + ahead) * rb],
        );
        // The strip formats prefetch block by block as they go, at the next rows' distance.
        if super::dequant::dequantize_ahead(self.dtype, bytes, out, bytes.len()) {
            return;
        }
        // Others: pieces of whole blocks, about 1 KiB (4 KiB measured no better than none).
        let (size, values) = (self.dtype.type_size(), self.dtype.block_size());
        let blocks = (1024 / size).max(1);
        let pieces = bytes.len().div_ceil(blocks * size);
        let per_piece = next.len().div_ceil(pieces);
        for (i, (b, y)) in bytes
            .chunks(blocks * size)
            .zip(out.chunks_mut(blocks * values))
            .enumerate()
        {
            let to = ((i + 1) * per_piece).min(next.len());
            for at in (i * per_piece..to).step_by(64) {
                super::dequant::prefetch(next[at..].as_ptr());
            }
            dequantize(self.dtype, b, y);
        }
    }

    /// Columns `c0..c1` of logical rows `r0..r0 + n` dequantised into `out`, row `i` from
    /// `out[i * ld]` on: a block of columns for a tile that keeps its dequantised weights in
    /// L1. `c0` and `c1` fall on the format's block boundaries (or `c1` is the row's end).
    /// With `ahead` (a multiple of the block size; 0 for none), the same columns `ahead`
    /// positions further on are prefetched meanwhile, as
    /// [`prefetch_cols`](Self::prefetch_cols) would.
    pub(super) fn dequantize_cols(
        &self,
        r0: usize,
        n: usize,
        (c0, c1): (usize, usize),
        out: &mut [f32],
        ld: usize,
        ahead: usize,
    ) {
        let block = self.dtype.block_size();
        assert!(r0 + n <= self.rows && c0 < c1 && c1 <= self.cols && c1 - c0 <= ld);
        assert!(c0.is_multiple_of(block) && c1.is_multiple_of(block));
        assert!(out.len() >= (n - 1) * ld + (c1 - c0) && ahead.is_multiple_of(block));
        let rows = self.rows_from(r0, n);
        let ahead_bytes = ahead / block * self.dtype.type_size();
        if super::dequant::dequantize_cols(self.dtype, &rows, n, (c0, c1), out, ld, ahead_bytes) {
            return;
        }
        for i in 0..n {
            let row = &mut out[i * ld..i * ld + (c1 - c0)];
            dequantize(self.dtype, self.row_blocks(r0 + i, c0, c1), row);
        }
        if ahead > 0 {
            self.prefetch_cols(r0, n, c0 + ahead, c1 + ahead);
        }
    }

    /// Ask for logical rows `r0..r0 + n` to be brought into the L2 cache (a hint: nothing is
    /// read, and rows past the end are ignored), so that dequantising them next waits less on
    /// memory.
    pub(super) fn prefetch_rows(&self, r0: usize, n: usize) {
        self.prefetch_cols(r0, n, 0, self.cols);
    }

    /// Ask for columns `c0..c1` of logical rows `r0..r0 + n` to be brought into the L2 cache
    /// (a hint, as [`prefetch_rows`](Self::prefetch_rows); block boundaries as in
    /// [`dequantize_cols`](Self::dequantize_cols); nothing past a row's end or the last row).
    pub(super) fn prefetch_cols(&self, r0: usize, n: usize, c0: usize, c1: usize) {
        let block = self.dtype.block_size();
        let (b0, b1) = (
            c0.min(self.cols) / block * self.dtype.type_size(),
            c1.min(self.cols) / block * self.dtype.type_size(),
        );
        for r in r0..(r0 + n).min(self.rows) {
            let row = &self.stored_row(r)[b0..b1];
            for at in (0..row.len()).step_by(64) {
                super::dequant::prefetch(row[at..].as_ptr());
            }
        }
    }

    /// `y[i] = x · (logical row r0 + i)` for `y.len()` rows, fused (one input row); `false`
    /// when the format has no fused path (then nothing was written).
    pub(super) fn dot_rows(&self, r0: usize, x: &[f32], y: &mut [f32]) -> bool {
        let n = y.len();
        assert!(r0 + n <= self.rows && x.len() == self.cols);
        super::dequant::dot_rows(self.dtype, &self.rows_from(r0, n), x, y)
    }

    /// `y[r * ldy + i] = x[r] · (logical row r0 + i)` for the rows of `x` and `n` weight
    /// rows, fused; `false` where there is no such path (then nothing was written).
    ///
    /// # Safety
    /// `y` takes writes at `r * ldy + i` for each row `r` of `x`, `i < n`.
    pub(super) unsafe fn dot_rows_many(
        &self,
        r0: usize,
        n: usize,
        x: &super::dequant::Interleaved,
        y: *mut f32,
        ldy: usize,
    ) -> bool {
        assert!(r0 + n <= self.rows && x.cols() == self.cols && n <= ldy);
        super::dequant::dot_rows_many(self.dtype, &self.rows_from(r0, n), n, x, y, ldy)
    }

    /// Logical rows `r0..r0 + n` as the dequantisation kernels read them.
    fn rows_from(&self, r0: usize, n: usize) -> super::dequant::Rows<'_> {
        let bytes = self.bytes.as_slice();
        match &self.row_map {
            None => super::dequant::Rows {
                bytes: &bytes[r0 * self.row_bytes..(r0 + n) * self.row_bytes],
                row_bytes: self.row_bytes,
                map: None,
            },
            Some(map) => super::dequant::Rows {
                bytes,
                row_bytes: self.row_bytes,
                map: Some(&map[r0..r0 + n]),
            },
        }
    }

    /// The whole matrix dequantised: `[rows, cols]` f32 on the CPU.
    pub fn dequantize_all(&self) -> Result<Tensor> {
        let (rows, cols) = (self.rows, self.cols);
        let mut out = vec![0f32; rows * cols];
        const ROWS: usize = 64;
        let dst = super::cpu::Out(out.as_mut_ptr());
        super::pool::run(rows.div_ceil(ROWS), &|part| {
            let (r0, r1) = (part * ROWS, ((part + 1) * ROWS).min(rows));
            // SAFETY: `out` has `rows * cols` values; each part writes its own rows.
            let dst = unsafe { dst.slice(r0 * cols, (r1 - r0) * cols) };
            self.dequantize_rows(r0, r1 - r0, dst);
        });
        Tensor::from_vec(out, (rows, cols), &Device::Cpu)
    }
}

/// Dequantise whole blocks of `dtype` in `bytes` into `out`: with the fast paths of
/// [`super::dequant`] where there is one (equal to candle's values bit for bit), else with
/// candle's `to_float`.
fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    if !super::dequant::dequantize(dtype, bytes, out) {
        candle_dequantize(dtype, bytes, out)
    }
}

/// Dequantise whole blocks of `dtype` in `bytes` into `out`, with candle's `to_float`.
pub(super) fn candle_dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    fn blocks<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
        let size = std::mem::size_of::<T>();
        assert!(
            bytes.len().is_multiple_of(size)
                && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        );
        // SAFETY: the length is a whole number of `T`, the pointer is aligned for `T` (both
        // checked just above), and every block type is plain old data (any bytes are a value).
        let xs =
            unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) };
        T::to_float(xs, out)
    }
    use GgmlDType::*;
    match dtype {
        F32 => blocks::<f32>(bytes, out),
        F16 => blocks::<f16>(bytes, out),
        BF16 => blocks::<bf16>(bytes, out),
        Q4_0 => blocks::<BlockQ4_0>(bytes, out),
        Q4_1 => blocks::<BlockQ4_1>(bytes, out),
        Q5_0 => blocks::<BlockQ5_0>(bytes, out),
        Q5_1 => blocks::<BlockQ5_1>(bytes, out),
        Q8_0 => blocks::<BlockQ8_0>(bytes, out),
        Q2K => blocks::<BlockQ2K>(bytes, out),
        Q3K => blocks::<BlockQ3K>(bytes, out),
        Q4K => blocks::<BlockQ4K>(bytes, out),
        Q5K => blocks::<BlockQ5K>(bytes, out),
        Q6K => blocks::<BlockQ6K>(bytes, out),
        Q8_1 | Q8K => unreachable!("refused when the matrix was built"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_equal_candles_dequantisation_in_every_format() {
        let dev = Device::Cpu;
        use GgmlDType::*;
        for dtype in [
            F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K,
        ] {
            let t = Tensor::randn(0f32, 1.0, (5, 512), &dev).unwrap();
            let q = candle_core::quantized::QTensor::quantize(&t, dtype).unwrap();
            let want = q.dequantize(&dev).unwrap();
            let m = StoredMatrix::quantize(&t, dtype).unwrap();
            let got = m.dequantize_all().unwrap();
            let diff = (want - got).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{dtype:?}");
        }
    }

    #[test]
    fn fast_dequantisation_equals_candles_bit_for_bit() {
        let dev = Device::Cpu;
        use GgmlDType::*;
        // 3 × 672: rows of 21 blocks of 32, so that groups of blocks end part-way.
        for (dtype, cols) in [F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q5K, Q6K]
            .into_iter()
            .map(|d| (d, 1024))
            .chain([(Q5_0, 672), (Q4_0, 672), (Q8_0, 672)])
        {
            // Values over several magnitudes, so scales, mins and high bits all vary.
            let t = Tensor::randn(0f32, 1.0, (3, cols), &dev)
                .unwrap()
                .broadcast_mul(&Tensor::rand(0.01f32, 100.0, (3, 1), &dev).unwrap())
                .unwrap();
            let m = StoredMatrix::quantize(&t, dtype).unwrap();
            let bytes = m.bytes.as_slice();
            let mut fast = vec![0f32; 3 * cols];
            let mut slow = vec![1f32; 3 * cols];
            assert!(
                super::super::dequant::dequantize(dtype, bytes, &mut fast),
                "{dtype:?}"
            );
            candle_dequantize(dtype, bytes, &mut slow);
            let same = fast
                .iter()
                .zip(&slow)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{dtype:?}");
        }
        assert!(!super::super::dequant::dequantize(
            Q2K,
            &[0; 84],
            &mut [0f32; 256]
        ));
    }

    #[test]
    fn strips_of_columns_equal_candles_values_bit_for_bit() {
        // What the tiles dequantise: a block of columns of consecutive logical rows (read
        // through a row map), into rows `ld` apart. Strips longer than a chunk of blocks and
        // shorter, column ranges at and past the first block, and the gaps between the
        // strip's rows left as they were.
        let dev = Device::Cpu;
        use GgmlDType::*;
        for dtype in [Q8_0, Q4K, Q5K, Q6K, Q4_0, F16] {
            let (rows, cols) = (37, 1024);
            let t = Tensor::randn(0f32, 1.0, (rows, cols), &dev)
                .unwrap()
                .broadcast_mul(&Tensor::rand(0.01f32, 100.0, (rows, 1), &dev).unwrap())
                .unwrap();
            let map: Vec<u32> = (0..rows as u32).rev().collect();
            let m = StoredMatrix::quantize(&t, dtype)
                .unwrap()
                .with_row_map(map)
                .unwrap();
            // candle's values, logical row r being stored row rows - 1 - r.
            let q = candle_core::quantized::QTensor::quantize(&t, dtype).unwrap();
            let mut all = q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
            all.reverse();
            for (c0, c1) in [(0, 256), (256, 1024), (512, 768), (0, 1024)] {
                for (r0, n) in [(0, rows), (5, 20), (36, 1)] {
                    let ld = c1 - c0 + 16;
                    let mut out = vec![f32::NAN; n * ld];
                    m.dequantize_cols(r0, n, (c0, c1), &mut out, ld, 256);
                    for (i, row) in out.chunks(ld).enumerate() {
                        let want = &all[r0 + i][c0..c1];
                        let same = row[..c1 - c0]
                            .iter()
                            .zip(want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{dtype:?} rows {r0}+{n} cols {c0}..{c1}: row {i}");
                        assert!(row[c1 - c0..].iter().all(|v| v.is_nan()));
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_map_reorders_rows_and_must_be_a_permutation() {
        let dev = Device::Cpu;
        let t = Tensor::randn(0f32, 1.0, (4, 64), &dev).unwrap();
        let m = StoredMatrix::quantize(&t, GgmlDType::Q8_0).unwrap();
        let plain = m.dequantize_all().unwrap();
        let m = m.with_row_map(vec![2, 0, 3, 1]).unwrap();
        let mapped = m.dequantize_all().unwrap();
        for (logical, stored) in [(0, 2), (1, 0), (2, 3), (3, 1)] {
            let a = mapped.get(logical).unwrap().to_vec1::<f32>().unwrap();
            let b = plain.get(stored).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a, b);
        }
        let m = StoredMatrix::quantize(&t, GgmlDType::Q8_0).unwrap();
        assert!(m.with_row_map(vec![0, 0, 1, 2]).is_err());
    }

    #[test]
    fn refuses_partial_blocks_and_unsupported_types() {
        let err = StoredMatrix::from_bytes(&[0; 34], GgmlDType::Q8_0, 1, 48).unwrap_err();
        assert!(err.contains("not whole blocks of 32"), "{err}");
        let err = StoredMatrix::from_bytes(&[0; 292], GgmlDType::Q8K, 1, 256).unwrap_err();
        assert!(err.contains("Q8_K is not supported"), "{err}");
    }
}

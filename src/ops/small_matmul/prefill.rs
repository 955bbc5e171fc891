//! Prefill: `x·Wᵀ` for more rows than the decode tiles take ([`super::MAX_ROWS`]), by the
//! same transposed tiling (`transposed.rs`), blocked for the caches the way GotoBLAS blocks a
//! GEMM:
//!
//! - the input rows go in groups of up to [`GROUP_ROWS`], packed as 16-row panels;
//! - each thread takes a run of outputs, in groups of [`GROUP_OUTPUTS`], whose partial sums
//!   (one vector per panel and output, 384 KiB) stay in L2 for the whole row length;
//! - the row length goes in blocks of [`K_BLOCK`] positions: for each block, each strip of 24
//!   outputs has its weights dequantised (or, dense, copied) once into an L1 buffer whose
//!   rows are `K_BLOCK` apart, and the tile runs it against every panel of the group, two
//!   panels at a time (`transposed::accumulate_pairs`); the next strip's weight bytes are
//!   prefetched a few rows at a time between runs of panels;
//! - the packed input's buffer stays with the calling thread for the next product (as large
//!   as the largest input so far: 16 MiB for a 512-token chunk into rows of 8192), and the
//!   output is written once, by the register transposes of `finish`.
//!
//! Measured through HTTP on a 512-token SmolLM2 F32 prompt (interleaved rounds): 0.91 s with
//! candle's gemm, 0.86 s with this blocking, 0.76 s with panel pairs and the transposes.
//! So each weight is dequantised once per row group, every multiply-add is the tile's (one
//! broadcast load each, the panel vector shared by 24 outputs), and each lane (one input row)
//! sums its positions in order, block after block: every output is the sum the decode tiling
//! computes for a row in a panel of 16, bit for bit, whatever the number of rows. On this
//! CPU it replaces candle's gemm, which runs its 256-bit kernel (its AVX-512 kernels need a
//! nightly compiler): 65% of a 512-token prefill of SmolLM2 F32 was that kernel.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::super::cpu::Out;
use super::super::stored::StoredMatrix;
use super::transposed::{self, K_BLOCK, T_OUTPUTS};

/// Input rows per group (32 panels): the group's block of `K_BLOCK` positions (512 KiB) stays
/// in L2 while every strip of the outputs' group runs over it.
const GROUP_ROWS: usize = 512;

/// Outputs per group (8 strips): their partial sums for a row group (`GROUP_ROWS ×
/// GROUP_OUTPUTS` values, 384 KiB) stay in L2 from the first block of positions to the last.
const GROUP_OUTPUTS: usize = 8 * T_OUTPUTS;

/// The weight matrix `[n, k]` of a prefill product, as the model holds it.
#[derive(Clone, Copy)]
pub(super) enum Weights<'a> {
    /// f32, row-major.
    Dense(&'a [f32], usize, usize),
    /// In its stored format, dequantised block by block.
    Stored(&'a StoredMatrix),
}

impl Weights<'_> {
    fn dims(&self) -> (usize, usize) {
        match self {
            Weights::Dense(_, n, k) => (*n, *k),
            Weights::Stored(w) => (w.rows(), w.cols()),
        }
    }

    /// Columns `c0..c1` of rows `o..o + rows` into `buf`, rows `K_BLOCK` apart.
    fn load(&self, o: usize, rows: usize, (c0, c1): (usize, usize), buf: &mut [f32]) {
        match self {
            Weights::Dense(w, _, k) => {
                for (i, dst) in buf.chunks_exact_mut(K_BLOCK).take(rows).enumerate() {
                    let src = &w[(o + i) * k + c0..(o + i) * k + c1];
                    dst[..c1 - c0].copy_from_slice(src);
                }
            }
            Weights::Stored(w) => w.dequantize_cols(o, rows, (c0, c1), buf, K_BLOCK, 0),
        }
    }

    /// A hint to bring columns `c0..c1` of rows `o..o + rows` towards the core.
    fn prefetch(&self, o: usize, rows: usize, c0: usize, c1: usize) {
        match self {
            Weights::Dense(w, n, k) => {
                let (c0, c1) = (c0.min(*k), c1.min(*k));
                for r in o..(o + rows).min(*n) {
                    for c in (c0..c1).step_by(16) {
                        super::super::dequant::prefetch(w[r * k + c..].as_ptr().cast());
                    }
                }
            }
            Weights::Stored(w) => w.prefetch_cols(o, rows, c0, c1),
        }
    }
}

/// Panels multiplied between two batches of prefetches (see `part_of`).
const PANELS_PER_RUN: usize = 4;

thread_local! {
    static BUFFERS: RefCell<(Vec<f32>, Vec<__m512>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `x` `[m, k]` times `w` `[n, k]` transposed: `[m, n]`, row-major.
///
/// # Safety
/// The CPU has AVX-512F, and `x` holds `m * k` values with `k` the weight's row length.
pub(super) unsafe fn matmul(x: &[f32], m: usize, w: Weights<'_>) -> Vec<f32> {
    let (n, k) = w.dims();
    debug_assert!(x.len() == m * k && k > 0);
    PANELS.with(|xt| {
        let mut xt = xt.borrow_mut();
        pack(x, m, k, &mut xt);
        let mut y = Vec::<f32>::with_capacity(m * n);
        let out = Out(y.as_mut_ptr());
        let threads = rayon::current_num_threads().max(1);
        // Each thread one run of whole strips (it reads only those weight rows); row groups
        // make more parts where the rows are many.
        let chunk = n.div_ceil(threads).div_ceil(T_OUTPUTS) * T_OUTPUTS;
        let (chunks, groups) = (n.div_ceil(chunk), m.div_ceil(GROUP_ROWS));
        let xt = &xt[..];
        super::super::pool::run(chunks * groups, &|part| {
            let (c, g) = (part % chunks, part / chunks);
            let (o0, o1) = (c * chunk, ((c + 1) * chunk).min(n));
            let (r0, r1) = (g * GROUP_ROWS, ((g + 1) * GROUP_ROWS).min(m));
            BUFFERS.with(|b| {
                let (buf, partial) = &mut *b.borrow_mut();
                // SAFETY: `xt` packs the `m` rows (see `pack`), the part alone writes rows
                // `r0..r1` of columns `o0..o1` of the `[m, n]` output, and the CPU has
                // AVX-512F.
                unsafe { part_of(xt, k, (r0, r1), w, (o0, o1), buf, partial, out, n) };
            });
        });
        // SAFETY: the parts wrote every row of every column (`finish` writes all the rows
        // of its panels); f32 has no invalid values.
        unsafe { y.set_len(m * n) };
        y
    })
}

thread_local! {
    /// The packed input of the calling thread's last product, kept for the next one.
    static PANELS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `x` as 16-row panels `[k][16]` (zero past row `m`) into `xt`, a panel per part on the
/// pool's threads.
fn pack(x: &[f32], m: usize, k: usize, xt: &mut Vec<f32>) {
    let panels = m.div_ceil(16);
    if xt.len() < panels * 16 * k {
        xt.resize(panels * 16 * k, 0.0);
    }
    let dst = Out(xt.as_mut_ptr());
    super::super::pool::run(panels, &|p| {
        let rows = (m - p * 16).min(16);
        // SAFETY: panel `p` is `16 * k` values of `xt`, written by this part alone; rows
        // `p * 16..p * 16 + rows` are in `x`; the CPU has AVX-512F (the caller's contract).
        unsafe { transposed::pack_panel(&x[p * 16 * k..], rows, k, dst.add(p * 16 * k).0) };
    });
}

/// Rows `r0..r1` (a multiple of 16 from `r0`) of outputs `o0..o1`.
///
/// # Safety
/// As [`matmul`]; `y` points to the `[m, ldy]` output, of which no one else writes rows
/// `r0..r1` of columns `o0..o1` meanwhile.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn part_of(
    xt: &[f32],
    k: usize,
    (r0, r1): (usize, usize),
    w: Weights<'_>,
    (o0, o1): (usize, usize),
    buf: &mut Vec<f32>,
    partial: &mut Vec<__m512>,
    y: Out,
    ldy: usize,
) {
    let (m, panels) = (r1 - r0, (r1 - r0).div_ceil(16));
    let xg = xt.as_ptr().add(r0 * k);
    if buf.len() < T_OUTPUTS * K_BLOCK {
        buf.resize(T_OUTPUTS * K_BLOCK, 0.0);
    }
    // One region of `panels × 24` vectors per strip; a narrower last strip uses the start
    // of its region (`transposed::accumulate` indexes `p * rows + o`).
    let per_strip = panels * T_OUTPUTS;
    let need = GROUP_OUTPUTS / T_OUTPUTS * per_strip;
    if partial.len() < need {
        partial.resize(need, _mm512_setzero_ps());
    }
    let mut g0 = o0;
    while g0 < o1 {
        let g1 = (g0 + GROUP_OUTPUTS).min(o1);
        let strips = (g1 - g0).div_ceil(T_OUTPUTS);
        partial[..strips * per_strip].fill(_mm512_setzero_ps());
        let mut c0 = 0;
        while c0 < k {
            let c1 = (c0 + K_BLOCK).min(k);
            for s in 0..strips {
                let o = g0 + s * T_OUTPUTS;
                let rows = T_OUTPUTS.min(g1 - o);
                w.load(o, rows, (c0, c1), buf);
                // What the next strip dequantises (after the last: the first at the next
                // block, or the next group's at the first), fetched a few rows at a time
                // between runs of panels, so the requests stay spread over the strip's
                // multiply-adds rather than queueing all at once.
                let (next, end, cols) = if s + 1 < strips {
                    (o + T_OUTPUTS, g1, (c0, c1))
                } else if c1 < k {
                    (g0, g1, (c1, c1 + K_BLOCK))
                } else {
                    (g1, o1, (0, K_BLOCK))
                };
                let next_rows = T_OUTPUTS.min(end.saturating_sub(next));
                let runs = panels.div_ceil(PANELS_PER_RUN);
                let per_run = next_rows.div_ceil(runs);
                for run in 0..runs {
                    let p0 = run * PANELS_PER_RUN;
                    let in_run = (m - p0 * 16).min(PANELS_PER_RUN * 16);
                    transposed::accumulate_pairs(
                        xg.add(p0 * 16 * k),
                        in_run,
                        k,
                        c0,
                        c1 - c0,
                        buf.as_ptr(),
                        rows,
                        partial.as_mut_ptr().add(s * per_strip + p0 * rows),
                    );
                    let r = (run * per_run).min(next_rows);
                    w.prefetch(next + r, per_run.min(next_rows - r), cols.0, cols.1);
                }
            }
            c0 = c1;
        }
        for s in 0..strips {
            let o = g0 + s * T_OUTPUTS;
            let rows = T_OUTPUTS.min(g1 - o);
            let acc = partial.as_ptr().add(s * per_strip);
            transposed::finish(acc, 1, m, rows, y.add(r0 * ldy + o).0, ldy);
        }
        g0 = g1;
    }
}

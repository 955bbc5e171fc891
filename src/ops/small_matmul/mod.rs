//! `x·Wᵀ` for the few rows of a decode step, on the CPU.
//!
//! candle's gemm is built for large matrices: at 1–16 rows it runs far below memory bandwidth
//! (DESIGN.md §5), and decode is nothing but such matmuls. This kernel keeps the weight as
//! checkpoints store it, `[out, in]`, so every output is a dot product over a contiguous row.
//! A register tile of `RO` weight rows × `RR` input rows loads each weight vector once for all
//! `RR` rows and each input vector once for all `RO` outputs; the weight streams through once
//! per step in `RO` sequential runs (what hardware prefetchers follow best). Output columns are
//! split over the threads of [`super::pool`], which write disjoint columns, so no partial sums are combined.
//! On x86-64 the tile is written with intrinsics, its shape fitted to the registers: AVX-512's
//! 32 hold up to 16 accumulators, AVX2's 16 up to 12 (`dot.rs`); elsewhere a portable version
//! of the same tiling is compiled for the best vector extension present. For more rows, AVX-512 runs a transposed tiling instead
//! (`transposed.rs`: input rows in vector lanes, weights broadcast). Prefill (more than
//! [`MAX_ROWS`] rows) runs that tiling too on AVX-512, blocked for the caches (`prefill.rs`).
//! Anything the kernels do not cover (other devices, dtypes, layouts; prefill without
//! AVX-512) goes to candle's matmul, which stays the reference.

use candle_core::{Result, Tensor};

use super::cpu::{view, Out};
use super::dequant::Interleaved;
use super::stored::StoredMatrix;
use dot::{best_isa, tile_width, Isa};
#[cfg(target_arch = "x86_64")]
use transposed::T_OUTPUTS;
#[cfg(not(target_arch = "x86_64"))]
const T_OUTPUTS: usize = 1;

mod dot;
#[cfg(target_arch = "x86_64")]
mod int8;
#[cfg(target_arch = "x86_64")]
mod prefill;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod transposed;

/// Up to this many rows the decode tiles run (576×1536: 0.97 vs 1.13 ms for candle's gemm at
/// 64 rows, 4.0 vs 2.9 ms at 256; criterion benchmark `small_matmul`); longer prefill chunks
/// go to the prefill tiling, or candle's gemm without AVX-512.
pub const MAX_ROWS: usize = 64;

/// Below this many weight elements a thread hand-off costs more than it saves.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// `x` `[m, k]` times `w` `[n, k]` transposed: `[m, n]`, with the kernel when it applies.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if let Some(y) = small_m(x, w, None)? {
        return Ok(y);
    }
    if let Some(y) = large_m(x, w)? {
        return Ok(y);
    }
    x.matmul(&w.t()?)
}

/// More rows than [`MAX_ROWS`] on AVX-512: the blocked transposed tiling (`prefill.rs`).
fn large_m(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(target_arch = "x86_64")]
    {
        let (Ok((m, k)), Ok((n, k2))) = (x.dims2(), w.dims2()) else {
            return Ok(None);
        };
        if m <= MAX_ROWS || k != k2 || k == 0 || n == 0 || best_isa() != Isa::Avx512 {
            return Ok(None);
        }
        let (Some(xv), Some(wv)) = (view(x), view(w)) else {
            return Ok(None);
        };
        let w = prefill::Weights::Dense(wv.values(), n, k);
        // SAFETY: the CPU has AVX-512F, and `x` holds `m * k` values.
        let y = unsafe { prefill::matmul(xv.values(), m, w) };
        Ok(Some(Tensor::from_vec(
            y,
            (m, n),
            &candle_core::Device::Cpu,
        )?))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, w);
        Ok(None)
    }
}

/// Whether an int8 kernel multiplies `w` here when its int8 activations are on: AVX-512 VNNI
/// (products of 2+ rows, and one-row products over the K-quants) or, without AVX-512, AVX2
/// (one-row products), and their formats.
pub fn int8_applies(w: &StoredMatrix) -> bool {
    #[cfg(target_arch = "x86_64")]
    return int8::applies(w) || int8::row::applies(w);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = w;
        false
    }
}

/// `x` `[m, k]` (f32) times the stored `w` `[n, k]` transposed: `[m, n]` f32.
///
/// Up to [`MAX_ROWS`] rows, each thread dequantises a strip of its outputs' weight rows at a
/// time into a small buffer (it stays in L2) and runs the register tile over it, so the
/// weight is read from memory once, in its stored size, and every product is the f32 kernel's
/// on the dequantised rows. Longer inputs (prefill) take the blocked tiling of `prefill.rs` on
/// AVX-512 (blocks of the weight dequantised into L1, once per group of 512 rows), elsewhere
/// dequantised tiles of rows through candle's gemm. Inputs the kernel cannot read (other
/// devices, dtypes) are converted.
pub fn matmul_t_stored(x: &Tensor, w: &StoredMatrix) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    if k != w.cols() {
        candle_core::bail!(
            "matmul_t_stored: x is [{m}, {k}] but the weight is [{}, {}]",
            w.rows(),
            w.cols()
        );
    }
    let x = cpu_f32(x)?;
    if m == 0 {
        return Tensor::zeros(
            (0, w.rows()),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        );
    }
    #[cfg(target_arch = "x86_64")]
    if takes_int8(m, w) {
        let xv = view(&x).expect("a contiguous f32 CPU tensor");
        let y = int8::matmul_groups(xv.values(), w);
        return Tensor::from_vec(y, (m, w.rows()), &candle_core::Device::Cpu);
    }
    if m > MAX_ROWS {
        #[cfg(target_arch = "x86_64")]
        if best_isa() == Isa::Avx512 {
            let xv = view(&x).expect("a contiguous f32 CPU tensor");
            // SAFETY: the CPU has AVX-512F, and `x` holds `m * k` values.
            let y = unsafe { prefill::matmul(xv.values(), m, prefill::Weights::Stored(w)) };
            return Tensor::from_vec(y, (m, w.rows()), &candle_core::Device::Cpu);
        }
        return prefill_stored(&x, w);
    }
    let xv = view(&x).expect("a contiguous f32 CPU tensor");
    Ok(small_m_stored(xv.values(), m, w, best_isa()))
}

/// [`matmul_t_stored`] for several weights of one input (a layer's q, k and v; its gate
/// and up): the input is packed once and every product runs as one job of the thread pool,
/// so the threads meet once rather than once per weight (a decode step of SmolLM2 ran ~210
/// jobs of ~100 µs, and each cost ~10 µs of packing and waiting). Each product is
/// [`matmul_t_stored`]'s, bit for bit; inputs the one-job path does not take (prefill,
/// int8 activations, rows of another length) run one weight at a time.
pub fn matmul_t_stored_many(x: &Tensor, ws: &[&StoredMatrix]) -> Result<Vec<Tensor>> {
    let (m, k) = x.dims2()?;
    let one_job = |w: &&StoredMatrix| w.cols() == k && !takes_int8(m, w);
    if m == 0 || m > MAX_ROWS || !ws.iter().all(one_job) {
        return ws.iter().map(|w| matmul_t_stored(x, w)).collect();
    }
    let x = cpu_f32(x)?;
    let xv = view(&x).expect("a contiguous f32 CPU tensor");
    Ok(small_m_stored_many(
        xv.values(),
        m,
        ws,
        best_isa(),
        BLOCKED_MIN_K,
    ))
}

/// `x` as the kernels read it: on the CPU, f32, contiguous (as it is, when it is already).
fn cpu_f32(x: &Tensor) -> Result<Tensor> {
    x.to_device(&candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .contiguous()
}

/// Whether `m` input rows against `w` take the int8 kernel ([`matmul_t_stored`]'s choice,
/// which [`matmul_t_stored_many`] follows so that its products stay the same).
fn takes_int8(m: usize, w: &StoredMatrix) -> bool {
    #[cfg(target_arch = "x86_64")]
    return w.int8_activations() && int8::takes(m, w);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, w);
        false
    }
}

// The accumulators of a tile run hold every panel of the most rows the kernel takes.
#[cfg(target_arch = "x86_64")]
const _: () = assert!(transposed::MAX_PANELS * 16 >= MAX_ROWS);

/// Weight values dequantised per strip, at most (the strip stays in L2 while the tile reads it).
const STRIP_VALUES: usize = 1 << 12;

/// Outputs per thread for an `[n, k]` weight: one run per thread, a multiple of `multiple`
/// (a tile's outputs), or all `n` in one where a hand-off costs more than it saves.
fn thread_chunk(n: usize, k: usize, multiple: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    if threads > 1 && k * n >= PARALLEL_MIN_ELEMS {
        n.div_ceil(threads).div_ceil(multiple) * multiple
    } else {
        n
    }
}

/// From this row length on, the transposed tiling reads stored weights in blocks of
/// positions ([`blocked`]). Measured with `generate --batch` at 16 sequences: the 1B-shaped
/// Q4_K_M (k = 2048, 8192) 41.6 → 53.0 tok/s (8 sequences 34 → 38); SmolLM2 (k = 576, 1536)
/// lost 6% in F32 and Q8_0, so shorter rows keep whole-strip dequantisation.
const BLOCKED_MIN_K: usize = 2048;

/// How many blocks of positions ahead [`blocked`] prefetches the weight bytes. 1B-shaped
/// model, `generate --batch`, 3 interleaved rounds, tok/s (Q4_K_M at 16 sequences, Q8_0 at 8):
/// none 52.9 / 40.0, 1 block 61.7 / 46.7, 2 61.2 / 44.9, 4 57.8 / 41.5, 8 54.3 / 37.5.
const PREFETCH_BLOCKS: usize = 1;

fn small_m_stored(x: &[f32], m: usize, w: &StoredMatrix, isa: Isa) -> Tensor {
    small_m_stored_with(x, m, w, isa, BLOCKED_MIN_K)
}

/// [`small_m_stored`], reading stored weights in blocks of positions from rows of
/// `blocked_min_k` values on (tests compare both ways).
fn small_m_stored_with(
    x: &[f32],
    m: usize,
    w: &StoredMatrix,
    isa: Isa,
    blocked_min_k: usize,
) -> Tensor {
    let mut y = small_m_stored_many(x, m, &[w], isa, blocked_min_k);
    y.pop().expect("one product")
}

/// `x` `[m, k]` times each of `ws` (all `[_, k]`) transposed, as one job: each weight's
/// outputs split into runs as [`thread_chunk`] splits them, and the threads take runs of
/// every weight as they come.
fn small_m_stored_many(
    x: &[f32],
    m: usize,
    ws: &[&StoredMatrix],
    isa: Isa,
    blocked_min_k: usize,
) -> Vec<Tensor> {
    let k = ws[0].cols();
    debug_assert!(ws.iter().all(|w| w.cols() == k));
    let xt = panels(isa, x, m, k);
    // One row (up to `int8::row::MAX_ROWS` on AVX2) rounded to int8 once for every weight that
    // takes the one-row int8 kernel.
    #[cfg(target_arch = "x86_64")]
    let rows_ok = m == 1 || (m <= int8::row::MAX_ROWS && int8::row::takes_several());
    #[cfg(target_arch = "x86_64")]
    let xq = (rows_ok && ws.iter().any(|w| int8::row::takes(w))).then(|| {
        x.chunks_exact(k)
            .map(int8::row::quantize)
            .collect::<Vec<_>>()
    });
    // 2–8 rows, on AVX2, interleaved once for every weight and run that takes them.
    let xi = isa.is_avx2().then(|| Interleaved::new(x, m)).flatten();
    let ro = if xt.is_some() {
        T_OUTPUTS
    } else {
        tile_width(isa, m)
    };
    // A whole number of tiles per strip, so only a chunk's last strip may end in a tail.
    let strip = ro * (STRIP_VALUES / (ro * k)).max(1);
    // Every output is written by the kernels, through `outs`: no zeroing first (it cost a
    // few percent of a SmolLM2 step), except for one row, which `dot_rows` takes as a slice.
    let mut ys: Vec<Vec<f32>> = ws
        .iter()
        .map(|w| {
            if m == 1 {
                vec![0f32; w.rows()]
            } else {
                Vec::with_capacity(m * w.rows())
            }
        })
        .collect();
    let outs: Vec<Out> = ys.iter_mut().map(|y| Out(y.as_mut_ptr())).collect();
    // (weight, first output, end) of every run.
    let mut runs = Vec::new();
    for (i, w) in ws.iter().enumerate() {
        let n = w.rows();
        let chunk = thread_chunk(n, k, ro);
        runs.extend((0..n.div_ceil(chunk)).map(|c| (i, c * chunk, ((c + 1) * chunk).min(n))));
    }
    super::pool::run(runs.len(), &|r| {
        let (i, o0, o1) = runs[r];
        let (w, out, n) = (ws[i], outs[i], ws[i].rows());
        STRIP.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < strip * k {
                buf.resize(strip * k, 0.0);
            }
            #[cfg(target_arch = "x86_64")]
            if let (Some((xt, b)), true) = (&xt, k >= blocked_min_k) {
                // SAFETY: `xt` is `x` packed with `b`, and the run alone writes
                // columns `o0..o1` of weight `i`'s `[m, n]` output.
                unsafe { blocked(xt, *b, m, w, o0, o1, &mut buf, out, n) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if let (Some(xq), true, true) = (&xq, m > 1, int8::row::takes(w)) {
                // SAFETY: this run alone writes columns `o0..o1` of weight `i`'s `[m, n]`
                // output, rows `n` apart.
                unsafe { int8::row::dot_rows_many(w, xq, o0, o1 - o0, out.add(o0).0, n) };
                return;
            }
            if m == 1 {
                // SAFETY: this run alone writes outputs `o0..o1` of the single row.
                let y = unsafe { out.slice(o0, o1 - o0) };
                #[cfg(target_arch = "x86_64")]
                if let (Some(xq), true) = (&xq, int8::row::takes(w)) {
                    int8::row::dot_rows(w, &xq[0], o0, y);
                    return;
                }
                if w.dot_rows(o0, x, y) {
                    return;
                }
            } else if let Some(xi) = &xi {
                // The AVX2 tiles' sums with each block dequantised in registers for all rows.
                // SAFETY: this run alone writes columns `o0..o1` of weight `i`'s `[m, n]`
                // output, rows `n` apart.
                if unsafe { w.dot_rows_many(o0, o1 - o0, xi, out.add(o0).0, n) } {
                    return;
                }
            }
            let mut o = o0;
            while o < o1 {
                let rows = strip.min(o1 - o);
                let wv = &mut buf[..rows * k];
                // The next strip's bytes travel from memory while this one is dequantised and
                // multiplied.
                let ahead = strip.min(o1 - o - rows);
                w.dequantize_rows_ahead(o, rows, wv, ahead);
                // SAFETY: `x` is `[m, k]`, `wv` is `[rows, k]`, and the output pointer is
                // shifted to column `o` of the `[m, n]` buffer with `o + rows <= n`: this call
                // writes columns `o..o + rows`, which no other strip or run writes.
                unsafe {
                    columns(
                        isa,
                        xt.as_ref().map(|(p, b)| (p.as_slice(), *b)),
                        x,
                        m,
                        k,
                        wv,
                        0,
                        rows,
                        out.add(o),
                        n,
                    )
                };
                o += rows;
            }
        });
    });
    ys.into_iter()
        .zip(ws)
        .map(|(mut y, w)| {
            // SAFETY: the job wrote all `m * n` outputs of every weight (each run its columns
            // of all `m` rows), and has returned.
            unsafe { y.set_len(m * w.rows()) };
            Tensor::from_vec(y, (m, w.rows()), &candle_core::Device::Cpu).expect("m × n values")
        })
        .collect()
}

/// Outputs `o0..o1` of all `m` rows by the transposed tiling over stored weights, a strip of
/// [`T_OUTPUTS`] rows at a time, each dequantised and multiplied
/// [`K_BLOCK`](transposed::K_BLOCK) positions at a time into `buf`.
///
/// # Safety
/// `xt` holds `x` packed with `b` by [`panels`], and `y` points to `m * ldy` writable values
/// with `o1 <= ldy`, of which no one else writes columns `o0..o1` meanwhile.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn blocked(
    xt: &[f32],
    b: usize,
    m: usize,
    w: &StoredMatrix,
    o0: usize,
    o1: usize,
    buf: &mut Vec<f32>,
    y: Out,
    ldy: usize,
) {
    use std::arch::x86_64::_mm512_setzero_ps;
    use transposed::K_BLOCK;
    let k = w.cols();
    // Block boundaries fall on the format's blocks: K_BLOCK is a multiple of every GGUF
    // block size.
    debug_assert!(K_BLOCK.is_multiple_of(w.dtype().block_size()));
    if buf.len() < T_OUTPUTS * K_BLOCK {
        buf.resize(T_OUTPUTS * K_BLOCK, 0.0);
    }
    let mut acc = [_mm512_setzero_ps(); transposed::MAX_PANELS * T_OUTPUTS];
    let used = transposed::accumulators(m, b);
    let mut o = o0;
    while o < o1 {
        let rows = T_OUTPUTS.min(o1 - o);
        acc[..used].fill(_mm512_setzero_ps());
        let mut c0 = 0;
        while c0 < k {
            let c1 = (c0 + K_BLOCK).min(k);
            // The strip's rows lie apart in memory: a later block of each is fetched while this
            // one is dequantised, and past the rows' end, the next strip's first blocks.
            let ahead = PREFETCH_BLOCKS * K_BLOCK;
            let ahead = if c0 + ahead < k { ahead } else { 0 };
            w.dequantize_cols(o, rows, (c0, c1), buf, K_BLOCK, ahead);
            if ahead == 0 && o + rows < o1 {
                let (next, after) = (c0 + PREFETCH_BLOCKS * K_BLOCK - k, o + rows);
                let rows = T_OUTPUTS.min(o1 - after);
                w.prefetch_cols(after, rows, next, (next + K_BLOCK).min(k));
            }
            transposed::accumulate(
                xt.as_ptr(),
                b,
                m,
                k,
                c0,
                c1 - c0,
                buf.as_ptr(),
                K_BLOCK,
                rows,
                acc.as_mut_ptr(),
            );
            c0 = c1;
        }
        transposed::finish(acc.as_ptr(), b, m, rows, y.add(o).0, ldy);
        o += rows;
    }
}

thread_local! {
    static STRIP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Prefill: tiles of dequantised rows (at most [`PREFILL_TILE_VALUES`]) through candle's gemm.
fn prefill_stored(x: &Tensor, w: &StoredMatrix) -> Result<Tensor> {
    let (n, k) = (w.rows(), w.cols());
    let tile = (PREFILL_TILE_VALUES / k).clamp(1, n);
    let mut parts = Vec::with_capacity(n.div_ceil(tile));
    let mut buf = vec![0f32; tile * k];
    let mut o = 0;
    while o < n {
        let rows = tile.min(n - o);
        let wv = &mut buf[..rows * k];
        const ROWS: usize = 16;
        let dst = Out(wv.as_mut_ptr());
        super::pool::run(rows.div_ceil(ROWS), &|part| {
            let (r0, r1) = (part * ROWS, ((part + 1) * ROWS).min(rows));
            // SAFETY: `wv` has `rows * k` values; each part writes its own rows.
            let dst = unsafe { dst.slice(r0 * k, (r1 - r0) * k) };
            w.dequantize_rows(o + r0, r1 - r0, dst);
        });
        let t = Tensor::from_slice(wv, (rows, k), &candle_core::Device::Cpu)?;
        parts.push(x.matmul(&t.t()?)?);
        o += rows;
    }
    Tensor::cat(&parts, 1)
}

/// Weight values dequantised per prefill tile, at most (8 MiB of f32).
const PREFILL_TILE_VALUES: usize = 1 << 21;

fn small_m(x: &Tensor, w: &Tensor, isa: Option<Isa>) -> Result<Option<Tensor>> {
    let (Ok((m, k)), Ok((n, k2))) = (x.dims2(), w.dims2()) else {
        return Ok(None);
    };
    if m == 0 || m > MAX_ROWS || k != k2 || k == 0 {
        return Ok(None);
    }
    let (Some(xv), Some(wv)) = (view(x), view(w)) else {
        return Ok(None);
    };
    let (x, w) = (xv.values(), wv.values());
    let isa = isa.unwrap_or_else(best_isa);
    let xt = panels(isa, x, m, k);
    let xt = xt.as_ref().map(|(p, b)| (p.as_slice(), *b));
    let mut y = vec![0f32; m * n];
    let out = Out(y.as_mut_ptr());
    let threads = rayon::current_num_threads().max(1);
    if threads > 1 && k * n >= PARALLEL_MIN_ELEMS {
        // One chunk per thread, a multiple of 8 outputs: each thread streams one contiguous
        // run of the weight, which the prefetchers follow best (2 or 4 chunks per thread
        // measured 5–20% slower decode at 1 sequence on SmolLM2).
        let chunk = n.div_ceil(threads).div_ceil(8) * 8;
        super::pool::run(n.div_ceil(chunk), &|c| {
            let (o0, o1) = (c * chunk, ((c + 1) * chunk).min(n));
            // SAFETY: `x` is `[m, k]`, `w` is `[n, k]`, `out` has `m * n` elements and this
            // call writes only columns `o0..o1`, which no other chunk writes.
            unsafe { columns(isa, xt, x, m, k, w, o0, o1, out, n) };
        });
    } else {
        // SAFETY: as above, one chunk covering every column.
        unsafe { columns(isa, xt, x, m, k, w, 0, n, out, n) };
    }
    Ok(Some(Tensor::from_vec(
        y,
        (m, n),
        &candle_core::Device::Cpu,
    )?))
}

/// From this many rows on, AVX-512 runs the transposed tiling (`transposed`); from 5 rows on,
/// also where the input rows hold at least [`TRANSPOSED_MIN_X`] values (64 KiB: past L1, so
/// the dot tiles would re-read them from L2 for every 2 outputs). Measured with `generate
/// --batch`: SmolLM2 Q8_0 at 16 sequences 290 → 325 tok/s (16-row panels); at 8 sequences
/// SmolLM2 (k ≤ 1536) lost 5–10% with 8-row panels, and the 1B-shaped Q4_K_M (k = 2048, 8192)
/// gained 26 → 32; at 2 and 4 rows SmolLM2 lost 10–20%.
const TRANSPOSED_MIN_ROWS: usize = 9;
const TRANSPOSED_MIN_X: usize = 16384;

/// Rows shorter than this keep the dot tiles whatever the row count. The transposed tiling
/// was measured on rows of 576 values and more; below 256 a matrix costs next to nothing
/// either way, and the dot tiles sum each output in an order that does not depend on how many
/// rows share the step. (A row's sums do depend on it once the transposed tiling runs: on the
/// 32-wide test model that moved a logprob by 2.4e-5 between a cold and a prefix-cached run,
/// past the 1e-5 the prefix cache promises.)
const TRANSPOSED_MIN_K: usize = 256;

/// `x` packed for the transposed tiling, with its positions per vector, where that runs.
fn panels(isa: Isa, x: &[f32], m: usize, k: usize) -> Option<(Vec<f32>, usize)> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        if k < TRANSPOSED_MIN_K || (m < TRANSPOSED_MIN_ROWS && (m < 5 || m * k < TRANSPOSED_MIN_X))
        {
            return None;
        }
        let b = transposed::positions(m, k)?;
        return Some((transposed::pack(x, m, k, b), b));
    }
    let _ = (isa, x, m, k);
    None
}

/// Outputs `o0..o1` of all `m` rows: `y[r, o] = Σ_kk x[r, kk] · w[o, kk]`, by the
/// transposed tiling over the panels `xt` (`x` packed by [`panels`], with its positions per
/// vector) where there are some, else by the dot-product tiles.
///
/// # Safety
/// `x` holds `m * k` values, `w` at least `o1 * k`, `y` points to `m * ldy` writable values
/// with `o1 <= ldy`.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    isa: Isa,
    xt: Option<(&[f32], usize)>,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    o0: usize,
    o1: usize,
    y: Out,
    ldy: usize,
) {
    debug_assert!(x.len() >= m * k && w.len() >= o1 * k);
    #[cfg(target_arch = "x86_64")]
    if let Some((xt, b)) = xt {
        debug_assert!(isa == Isa::Avx512 && k.is_multiple_of(b));
        return transposed::columns(xt.as_ptr(), b, m, k, w.as_ptr(), o0, o1, y.0, ldy);
    }
    let _ = xt;
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => dot::avx512::columns(x.as_ptr(), m, k, w.as_ptr(), o0, o1, y.0, ldy),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => dot::avx2::columns(x.as_ptr(), m, k, w.as_ptr(), o0, o1, y.0, ldy),
        Isa::Portable => dot::portable::columns(x.as_ptr(), m, k, w.as_ptr(), o0, o1, y.0, ldy),
    }
}

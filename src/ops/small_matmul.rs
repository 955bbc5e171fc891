//! `x·Wᵀ` for the few rows of a decode step, on the CPU.
//!
//! candle's gemm is built for large matrices: at 1–16 rows it runs far below memory bandwidth
//! (DESIGN.md §5), and decode is nothing but such matmuls. This kernel keeps the weight as
//! checkpoints store it, `[out, in]`, so every output is a dot product over a contiguous row.
//! A register tile of `RO` weight rows × `RR` input rows loads each weight vector once for all
//! `RR` rows and each input vector once for all `RO` outputs; the weight streams through once
//! per step in `RO` sequential runs (what hardware prefetchers follow best). Output columns are
//! split over the threads of [`super::pool`], which write disjoint columns, so no partial sums are combined.
//! On x86-64 with AVX-512 the tile is written with intrinsics (32 vector registers hold up to
//! 24 accumulators); elsewhere a portable version of the same tiling is compiled for the best
//! vector extension present. Anything the kernel does not cover (other devices, dtypes,
//! layouts, more rows) goes to candle's matmul, which stays the reference.

use candle_core::{Result, Tensor};

use super::cpu::{view, Out};
use super::stored::StoredMatrix;
#[cfg(target_arch = "x86_64")]
use avx512_t::T_OUTPUTS;
#[cfg(not(target_arch = "x86_64"))]
const T_OUTPUTS: usize = 1;

/// Up to this many rows the kernel beats candle's gemm on this machine (576×1536: 0.97 vs
/// 1.13 ms at 64 rows, 4.0 vs 2.9 ms at 256; criterion benchmark `small_matmul`); longer
/// prefill chunks go to candle.
pub const MAX_ROWS: usize = 64;

/// Below this many weight elements a thread hand-off costs more than it saves.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// `x` `[m, k]` times `w` `[n, k]` transposed: `[m, n]`, with the kernel when it applies.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    match small_m(x, w, None)? {
        Some(y) => Ok(y),
        None => x.matmul(&w.t()?),
    }
}

/// `x` `[m, k]` (f32) times the stored `w` `[n, k]` transposed: `[m, n]` f32.
///
/// Up to [`MAX_ROWS`] rows, each thread dequantises a strip of its outputs' weight rows at a
/// time into a small buffer (it stays in L2) and runs the register tile over it, so the
/// weight is read from memory once, in its stored size, and every product is the f32 kernel's
/// on the dequantised rows. Longer inputs (prefill) dequantise tiles of rows and hand them to
/// candle's gemm. Inputs the kernel cannot read (other devices, dtypes) are converted.
pub fn matmul_t_stored(x: &Tensor, w: &StoredMatrix) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    if k != w.cols() {
        candle_core::bail!(
            "matmul_t_stored: x is [{m}, {k}] but the weight is [{}, {}]",
            w.rows(),
            w.cols()
        );
    }
    let x = x
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .contiguous()?;
    if m == 0 {
        return Tensor::zeros(
            (0, w.rows()),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        );
    }
    if m > MAX_ROWS {
        return prefill_stored(&x, w);
    }
    let xv = view(&x).expect("a contiguous f32 CPU tensor");
    Ok(small_m_stored(xv.values(), m, w, best_isa()))
}

/// Weight values dequantised per strip, at most (the strip stays in L2 while the tile reads it).
const STRIP_VALUES: usize = 1 << 12;

fn small_m_stored(x: &[f32], m: usize, w: &StoredMatrix, isa: Isa) -> Tensor {
    let (n, k) = (w.rows(), w.cols());
    let xt = panels(isa, x, m, k);
    let prefetch = xt.is_none();
    let ro = if xt.is_some() {
        T_OUTPUTS
    } else {
        tile_outputs(m.min(MAX_RR))
    };
    // A whole number of tiles per strip, so only a chunk's last strip may end in a tail.
    let strip = ro * (STRIP_VALUES / (ro * k)).max(1);
    let mut y = vec![0f32; m * n];
    let out = Out(y.as_mut_ptr());
    let threads = rayon::current_num_threads().max(1);
    let chunk = if threads > 1 && k * n >= PARALLEL_MIN_ELEMS {
        n.div_ceil(threads).div_ceil(ro) * ro
    } else {
        n
    };
    super::pool::run(n.div_ceil(chunk), &|c| {
        let (o0, o1) = (c * chunk, ((c + 1) * chunk).min(n));
        STRIP.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < strip * k {
                buf.resize(strip * k, 0.0);
            }
            if m == 1 {
                // SAFETY: this chunk alone writes outputs `o0..o1` of the single row.
                let y = unsafe { out.slice(o0, o1 - o0) };
                if w.dot_rows(o0, x, y) {
                    return;
                }
            }
            let mut o = o0;
            while o < o1 {
                let rows = strip.min(o1 - o);
                let wv = &mut buf[..rows * k];
                w.dequantize_rows(o, rows, wv);
                // The next strip's bytes travel from memory while this one is multiplied.
                if prefetch {
                    w.prefetch_rows(o + rows, strip.min(o1 - o - rows));
                }
                // SAFETY: `x` is `[m, k]`, `wv` is `[rows, k]`, and the output pointer is
                // shifted to column `o` of the `[m, n]` buffer with `o + rows <= n`: this call
                // writes columns `o..o + rows`, which no other strip or chunk writes.
                unsafe {
                    columns_any(
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
    Tensor::from_vec(y, (m, n), &candle_core::Device::Cpu).expect("m × n values")
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

/// Which implementation of the tile runs (tests force each one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

fn best_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            if is_x86_feature_detected!("avx512f") {
                Isa::Avx512
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Isa::Avx2
            } else {
                Isa::Portable
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Isa::Portable
}

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
            unsafe { columns_any(isa, xt, x, m, k, w, o0, o1, out, n) };
        });
    } else {
        // SAFETY: as above, one chunk covering every column.
        unsafe { columns_any(isa, xt, x, m, k, w, 0, n, out, n) };
    }
    Ok(Some(Tensor::from_vec(
        y,
        (m, n),
        &candle_core::Device::Cpu,
    )?))
}

/// From this many rows on, AVX-512 runs the transposed tiling (`avx512_t`); from 5 rows on,
/// also where the input rows hold at least [`TRANSPOSED_MIN_X`] values (64 KiB: past L1, so
/// the dot tiles would re-read them from L2 for every 2 outputs). Measured with `generate
/// --batch`: SmolLM2 Q8_0 at 16 sequences 290 → 325 tok/s (16-row panels); at 8 sequences
/// SmolLM2 (k ≤ 1536) lost 5–10% with 8-row panels, and the 1B-shaped Q4_K_M (k = 2048, 8192)
/// gained 26 → 32; at 2 and 4 rows SmolLM2 lost 10–20%.
const TRANSPOSED_MIN_ROWS: usize = 9;
const TRANSPOSED_MIN_X: usize = 16384;

/// `x` packed for the transposed tiling, with its positions per vector, where that runs.
fn panels(isa: Isa, x: &[f32], m: usize, k: usize) -> Option<(Vec<f32>, usize)> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        if m < TRANSPOSED_MIN_ROWS && (m < 5 || m * k < TRANSPOSED_MIN_X) {
            return None;
        }
        let b = avx512_t::positions(m, k)?;
        return Some((avx512_t::pack(x, m, k, b), b));
    }
    let _ = (isa, x, m, k);
    None
}

/// [`columns`], or the transposed tiling over the panels `xt` where there are some.
///
/// # Safety
/// As [`columns`]; `xt`, if given, holds `x` packed by [`pack`].
#[allow(clippy::too_many_arguments)]
unsafe fn columns_any(
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
    #[cfg(target_arch = "x86_64")]
    if let Some((xt, b)) = xt {
        debug_assert!(isa == Isa::Avx512 && k.is_multiple_of(b));
        return avx512_t::columns(xt.as_ptr(), b, m, k, w.as_ptr(), o0, o1, y.0, ldy);
    }
    let _ = xt;
    columns(isa, x, m, k, w, o0, o1, y, ldy)
}

/// Outputs `o0..o1` of all `m` rows: `y[r, o] = Σ_kk x[r, kk] · w[o, kk]`.
///
/// # Safety
/// `x` holds `m * k` values, `w` at least `o1 * k`, `y` points to `m * ldy` writable values
/// with `o1 <= ldy`.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    isa: Isa,
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
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::columns(x.as_ptr(), m, k, w.as_ptr(), o0, o1, y.0, ldy),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => portable::columns_avx2(x.as_ptr(), m, k, w.as_ptr(), o0, o1, y.0, ldy),
        Isa::Portable => portable::columns(x.as_ptr(), m, k, w.as_ptr(), o0, o1, y.0, ldy),
    }
}

/// Rows per register tile at most, and the outputs per tile for a given number of rows: at
/// most 16 accumulators (`RO·RR`), so with the `RO` weight vectors and the input vector they
/// stay in registers (at 24 the compiler spilled accumulators to the stack every step).
const MAX_RR: usize = 8;

const fn tile_outputs(rr: usize) -> usize {
    match rr {
        1 | 2 => 8,
        3 => 5,
        4 => 4,
        5 | 6 => 3,
        _ => 2,
    }
}

/// The loops shared by both implementations: output tiles of `RO` (chosen from the first row
/// block, so a tile's weights stay in L1 while every row block uses them), row blocks of up to
/// [`MAX_RR`] rows, and one-output tiles for what is left over.
macro_rules! tile_loops {
    ($micro:ident, $x:expr, $m:expr, $k:expr, $w:expr, $o0:expr, $o1:expr, $y:expr, $ldy:expr) => {{
        let (x, m, k, w, o0, o1, y, ldy) = ($x, $m, $k, $w, $o0, $o1, $y, $ldy);
        let ro = tile_outputs(m.min(MAX_RR));
        let mut o = o0;
        while o < o1 {
            let width = if o + ro <= o1 { ro } else { 1 };
            let mut r = 0;
            while r < m {
                let rr = (m - r).min(MAX_RR);
                let (xp, wp, yp) = (x.add(r * k), w.add(o * k), y.add(r * ldy + o));
                macro_rules! rows {
                    ($ro:literal) => {
                        match rr {
                            1 => $micro::<$ro, 1>(xp, wp, k, yp, ldy),
                            2 => $micro::<$ro, 2>(xp, wp, k, yp, ldy),
                            3 => $micro::<$ro, 3>(xp, wp, k, yp, ldy),
                            4 => $micro::<$ro, 4>(xp, wp, k, yp, ldy),
                            5 => $micro::<$ro, 5>(xp, wp, k, yp, ldy),
                            6 => $micro::<$ro, 6>(xp, wp, k, yp, ldy),
                            7 => $micro::<$ro, 7>(xp, wp, k, yp, ldy),
                            _ => $micro::<$ro, 8>(xp, wp, k, yp, ldy),
                        }
                    };
                }
                match width {
                    8 => rows!(8),
                    5 => rows!(5),
                    4 => rows!(4),
                    3 => rows!(3),
                    2 => rows!(2),
                    _ => rows!(1),
                }
                r += rr;
            }
            o += width;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{tile_outputs, MAX_RR};
    use std::arch::x86_64::*;

    /// How many tiles ahead of the one being computed the weight is prefetched, into L2
    /// (`_MM_HINT_T1`). Tried: T0 one tile ahead, T1 two and four ahead; the differences were
    /// within this machine's run-to-run noise, T0 into L1 looked worst.
    const PREFETCH_TILES: usize = 4;

    /// See [`super::columns`].
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn columns(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        o0: usize,
        o1: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        tile_loops!(micro, x, m, k, w, o0, o1, y, ldy)
    }

    /// `y[r * ldy + o] = x[r, ..] · w[o, ..]` for `RO` outputs and `RR` rows, 16 lanes at a
    /// time; the last partial vector is read with a mask, never past the rows' ends.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // indexing two arrays by the same tile coordinates
    unsafe fn micro<const RO: usize, const RR: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); RR]; RO];
        // The tile's rows are one contiguous block and the next tiles follow it: fetch the
        // block `PREFETCH_TILES` ahead, `RO` lines per step, spread over this tile's steps.
        let ahead = w.wrapping_add(PREFETCH_TILES * RO * k) as *const i8;
        let mut kk = 0;
        while kk + 16 <= k {
            for o in 0..RO {
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add((kk / 16 * RO + o) * 64));
            }
            let mut wv = [_mm512_setzero_ps(); RO];
            for (o, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(w.add(o * k + kk));
            }
            for r in 0..RR {
                let xv = _mm512_loadu_ps(x.add(r * k + kk));
                for o in 0..RO {
                    acc[o][r] = _mm512_fmadd_ps(wv[o], xv, acc[o][r]);
                }
            }
            kk += 16;
        }
        if kk < k {
            let mask: __mmask16 = ((1u32 << (k - kk)) - 1) as u16;
            let mut wv = [_mm512_setzero_ps(); RO];
            for (o, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, w.add(o * k + kk));
            }
            for r in 0..RR {
                let xv = _mm512_maskz_loadu_ps(mask, x.add(r * k + kk));
                for o in 0..RO {
                    acc[o][r] = _mm512_fmadd_ps(wv[o], xv, acc[o][r]);
                }
            }
        }
        for (o, acc) in acc.iter().enumerate() {
            for (r, a) in acc.iter().enumerate() {
                *y.add(r * ldy + o) = _mm512_reduce_add_ps(*a);
            }
        }
    }
}

/// The transposed tiling: input rows in vector lanes, weight values broadcast. The input rows
/// are packed as panels of `16 / B` rows, each vector holding `B` consecutive input positions
/// of every row of the panel (lane `r·B + p` is row `r`, position `j·B + p`), so each
/// `B`-value run of a weight row, broadcast to every row's lanes, multiplies all of the panel's
/// rows at once (`B = 1`: 16 rows, one position; `B = 2`: 8 rows, two; …). A tile of
/// [`T_OUTPUTS`] outputs reads each panel vector once for all its outputs and each weight value
/// once per panel: one load per multiply-add and no horizontal sums but the `B` lanes of an
/// output at the end; the panels (not every tile's input rows) are what stays in cache. Each
/// lane's sum runs over its positions in order.
#[cfg(target_arch = "x86_64")]
mod avx512_t {
    use std::arch::x86_64::*;

    /// Lanes of a vector.
    const LANES: usize = 16;

    /// Outputs per tile: accumulators, with the panel vector, in 32 vector registers.
    pub(super) const T_OUTPUTS: usize = 24;

    /// The positions per row in a vector for `m` rows (fewest rows per panel that hold them,
    /// up to 16), if `k` is a whole number of them.
    pub(super) fn positions(m: usize, k: usize) -> Option<usize> {
        let b = match m {
            0 | 1 => return None,
            2 => 8,
            3 | 4 => 4,
            5..=8 => 2,
            _ => 1,
        };
        k.is_multiple_of(b).then_some(b)
    }

    /// `x` `[m, k]` as panels of `16 / b` rows, each `[k / b][16]` (see the module), zero
    /// past row `m`.
    pub(super) fn pack(x: &[f32], m: usize, k: usize, b: usize) -> Vec<f32> {
        let rows = LANES / b;
        let mut xt = vec![0f32; m.div_ceil(rows) * k * rows];
        for (r, row) in x.chunks_exact(k).take(m).enumerate() {
            let panel = &mut xt[r / rows * k * rows..];
            let lane = r % rows * b;
            for (j, vals) in row.chunks_exact(b).enumerate() {
                panel[j * LANES + lane..j * LANES + lane + b].copy_from_slice(vals);
            }
        }
        xt
    }

    /// Outputs `o0..o1` of all `m` rows from the panels `xt` (see [`pack`], with `b`).
    ///
    /// # Safety
    /// `xt` holds the panels of `m` rows of `k` values packed with `b` (1, 2, 4 or 8, a
    /// divisor of `k`), `w` at least `o1 * k` values, `y` points to `m * ldy` writable values
    /// with `o1 <= ldy`, and the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn columns(
        xt: *const f32,
        b: usize,
        m: usize,
        k: usize,
        w: *const f32,
        o0: usize,
        o1: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        match b {
            1 => columns_b::<1>(xt, m, k, w, o0, o1, y, ldy),
            2 => columns_b::<2>(xt, m, k, w, o0, o1, y, ldy),
            4 => columns_b::<4>(xt, m, k, w, o0, o1, y, ldy),
            8 => columns_b::<8>(xt, m, k, w, o0, o1, y, ldy),
            _ => unreachable!("positions per vector {b}"),
        }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn columns_b<const B: usize>(
        xt: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        o0: usize,
        o1: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let rows_per = LANES / B;
        let panels = m.div_ceil(rows_per);
        let mut o = o0;
        while o < o1 {
            let width = match o1 - o {
                n if n >= T_OUTPUTS => T_OUTPUTS,
                n if n >= 8 => 8,
                _ => 1,
            };
            for p in 0..panels {
                let rows = (m - p * rows_per).min(rows_per);
                let xp = xt.add(p * k * rows_per);
                let (wp, yp) = (w.add(o * k), y.add(p * rows_per * ldy + o));
                match width {
                    T_OUTPUTS => micro::<T_OUTPUTS, B>(xp, wp, k, yp, ldy, rows),
                    8 => micro::<8, B>(xp, wp, k, yp, ldy, rows),
                    _ => micro::<1, B>(xp, wp, k, yp, ldy, rows),
                }
            }
            o += width;
        }
    }

    /// `B` consecutive values at `p`, repeated over the 16 lanes (a load, no shuffle).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn broadcast<const B: usize>(p: *const f32) -> __m512 {
        match B {
            1 => _mm512_set1_ps(*p),
            2 => _mm512_castpd_ps(_mm512_set1_pd((p as *const f64).read_unaligned())),
            4 => _mm512_broadcast_f32x4(_mm_loadu_ps(p)),
            _ => _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(p as *const f64))),
        }
    }

    /// `y[r * ldy + o] = Σ_kk x[r, kk] · w[o, kk]` for `RO` outputs and the panel's first
    /// `rows` rows.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn micro<const RO: usize, const B: usize>(
        xt: *const f32,
        w: *const f32,
        k: usize,
        y: *mut f32,
        ldy: usize,
        rows: usize,
    ) {
        let mut acc = [_mm512_setzero_ps(); RO];
        for j in 0..k / B {
            let xv = _mm512_loadu_ps(xt.add(j * LANES));
            for (o, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(xv, broadcast::<B>(w.add(o * k + j * B)), *a);
            }
        }
        let mut t = [[0f32; LANES]; RO];
        for (o, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(t[o].as_mut_ptr(), *a);
        }
        for r in 0..rows {
            for (o, t) in t.iter().enumerate() {
                *y.add(r * ldy + o) = t[r * B..(r + 1) * B].iter().sum();
            }
        }
    }
}

/// The same tiling in plain Rust over 8-lane arrays, which the compiler turns into the vector
/// instructions of whatever it is compiled for.
mod portable {
    use super::{tile_outputs, MAX_RR};

    const L: usize = 8;

    /// See [`super::columns`]; compiled with AVX2 and FMA enabled.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn columns_avx2(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        o0: usize,
        o1: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        tile_loops!(micro, x, m, k, w, o0, o1, y, ldy)
    }

    /// See [`super::columns`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn columns(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        o0: usize,
        o1: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        tile_loops!(micro, x, m, k, w, o0, o1, y, ldy)
    }

    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // indexing two arrays by the same tile coordinates
    unsafe fn micro<const RO: usize, const RR: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut acc = [[[0f32; L]; RR]; RO];
        let mut kk = 0;
        while kk + L <= k {
            for r in 0..RR {
                let xv = &*(x.add(r * k + kk) as *const [f32; L]);
                for (o, acc) in acc.iter_mut().enumerate() {
                    let wv = &*(w.add(o * k + kk) as *const [f32; L]);
                    for l in 0..L {
                        acc[r][l] = wv[l].mul_add(xv[l], acc[r][l]);
                    }
                }
            }
            kk += L;
        }
        for (o, acc) in acc.iter().enumerate() {
            for (r, a) in acc.iter().enumerate() {
                let mut s = a.iter().sum::<f32>();
                for t in kk..k {
                    s = (*w.add(o * k + t)).mul_add(*x.add(r * k + t), s);
                }
                *y.add(r * ldy + o) = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    #[test]
    fn equals_candle_matmul_for_every_small_shape_and_isa() {
        let mut shapes = vec![(8, 576, 1536), (1, 1536, 576), (16, 576, 4100)];
        // Every row count (each row-block split) with k around the vector width and output
        // counts that leave every kind of tail.
        for m in 1..=MAX_ROWS {
            for (k, n) in [(1, 1), (15, 7), (16, 9), (17, 25), (33, 13), (70, 50)] {
                shapes.push((m, k, n));
            }
        }
        for isa in isas() {
            for &(m, k, n) in &shapes {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
                let fast = small_m(&x, &w, Some(isa)).unwrap().expect("kernel applies");
                let reference = x.matmul(&w.t().unwrap()).unwrap();
                let diff = crate::ops::max_abs_diff(&fast, &reference);
                assert!(
                    diff <= 1e-4 * (k as f32).sqrt(),
                    "{isa:?} {m}x{k}x{n}: {diff}"
                );
            }
        }
    }

    /// The transposed tiling at every panel shape (1, 2, 4 and 8 positions per row in a
    /// vector), every row count up to two panels and output counts with every tile tail, not
    /// only the shapes the row-count rule picks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transposed_panels_of_every_shape_equal_candle_matmul() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        for b in [1, 2, 4, 8] {
            for m in 1..=2 * 16 / b + 1 {
                for (k, n) in [(8, 1), (24, 9), (72, 33), (576, 50)] {
                    let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
                    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let xt = avx512_t::pack(&xv, m, k, b);
                    let mut y = vec![f32::NAN; m * n];
                    // SAFETY: AVX-512F checked above; `xt` packs `m` rows with `b`, a divisor
                    // of `k`; `w` is `[n, k]` and `y` `[m, n]`.
                    unsafe {
                        avx512_t::columns(
                            xt.as_ptr(),
                            b,
                            m,
                            k,
                            wv.as_ptr(),
                            0,
                            n,
                            y.as_mut_ptr(),
                            n,
                        )
                    };
                    let got = Tensor::from_vec(y, (m, n), &Device::Cpu).unwrap();
                    let reference = x.matmul(&w.t().unwrap()).unwrap();
                    let diff = crate::ops::max_abs_diff(&got, &reference);
                    assert!(
                        diff <= 1e-4 * (k as f32).sqrt(),
                        "b {b} {m}x{k}x{n}: {diff}"
                    );
                }
            }
        }
        assert_eq!(avx512_t::positions(8, 2048), Some(2));
        assert_eq!(avx512_t::positions(8, 2047), None);
        assert_eq!(avx512_t::positions(16, 7), Some(1));
    }

    #[test]
    fn stored_formats_equal_dequantise_then_matmul_for_1_to_64_rows_and_every_isa() {
        use candle_core::quantized::GgmlDType::*;
        let dev = Device::Cpu;
        for dtype in [
            F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K,
        ] {
            let block = dtype.block_size();
            // Output counts that leave every kind of tile tail; for the float formats (blocks
            // of one value) odd k as well.
            let ks: Vec<usize> = if block == 1 {
                vec![17, 70, 256]
            } else {
                vec![block, 3 * block]
            };
            for k in ks {
                for n in [1, 7, 13, 50] {
                    let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                    let q = StoredMatrix::quantize(&w, dtype).unwrap();
                    let deq = q.dequantize_all().unwrap();
                    for m in (1..=MAX_ROWS).filter(|m| *m <= 9 || m % 7 == 0 || *m == MAX_ROWS) {
                        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                        let reference = x.matmul(&deq.t().unwrap()).unwrap();
                        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        for isa in isas() {
                            let fast = small_m_stored(&xv, m, &q, isa);
                            let diff = crate::ops::max_abs_diff(&fast, &reference);
                            assert!(
                                diff <= 1e-5 * (k as f32).sqrt() * 4.0,
                                "{dtype:?} {isa:?} {m}x{k}x{n}: {diff}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn stored_prefill_tiles_equal_dequantise_then_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (300, 512), &dev).unwrap();
        let q = StoredMatrix::quantize(&w, candle_core::quantized::GgmlDType::Q4K).unwrap();
        let x = Tensor::randn(0f32, 1.0, (MAX_ROWS + 3, 512), &dev).unwrap();
        let reference = x.matmul(&q.dequantize_all().unwrap().t().unwrap()).unwrap();
        let got = matmul_t_stored(&x, &q).unwrap();
        assert!(crate::ops::max_abs_diff(&got, &reference) < 1e-3);
        // Tiles smaller than the matrix: the same numbers, column block by column block.
        let tiled = prefill_stored(&x, &q).unwrap();
        assert_eq!(tiled.dims(), &[MAX_ROWS + 3, 300]);
    }

    #[test]
    fn reads_an_offset_view_and_not_past_it() {
        // A weight that is a contiguous slice of a larger tensor: the kernel must use its
        // offset and stop at its end.
        let big = Tensor::randn(0f32, 1.0, (10, 17), &Device::Cpu).unwrap();
        let w = big.narrow(0, 3, 5).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 17), &Device::Cpu).unwrap();
        for isa in isas() {
            let fast = small_m(&x, &w, Some(isa)).unwrap().unwrap();
            let reference = x.matmul(&w.t().unwrap()).unwrap();
            let diff = crate::ops::max_abs_diff(&fast, &reference);
            assert!(diff < 1e-4, "{isa:?}: {diff}");
        }
    }

    #[test]
    fn falls_back_where_it_does_not_apply() {
        let x = Tensor::randn(0f32, 1.0, (MAX_ROWS + 1, 8), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu).unwrap();
        assert!(small_m(&x, &w, None).unwrap().is_none());
        let x16 = x.narrow(0, 0, 2).unwrap().to_dtype(DType::F16).unwrap();
        assert!(small_m(&x16, &w.to_dtype(DType::F16).unwrap(), None)
            .unwrap()
            .is_none());
        // A transposed (non-contiguous) weight view is left to candle too.
        let wt = Tensor::randn(0f32, 1.0, (8, 4), &Device::Cpu).unwrap();
        assert!(small_m(&x.narrow(0, 0, 2).unwrap(), &wt.t().unwrap(), None)
            .unwrap()
            .is_none());
        assert_eq!(matmul_t(&x, &w).unwrap().dims(), &[MAX_ROWS + 1, 4]);
        assert_eq!(
            matmul_t(&x.narrow(0, 0, 2).unwrap(), &wt.t().unwrap())
                .unwrap()
                .dims(),
            &[2, 4]
        );
    }
}

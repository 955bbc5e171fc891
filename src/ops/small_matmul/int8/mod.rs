//! Opt-in int8 activations (`--int8-activations`): the matmuls of 2 or more rows (decode
//! steps of several sequences, and prompts in groups of [`MAX_ROWS`](super::MAX_ROWS) rows)
//! over Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K weights with the input rows
//! quantized to int8, multiplied by AVX-512 VNNI's `vpdpbusd` (64 byte products summed into
//! 16 lanes per instruction, where the exact path's multiply-add does 16), as llama.cpp
//! multiplies these formats on the CPU. Without VNNI (AVX2) the same tiling runs from 5 rows
//! in `avx2.rs`, and `row.rs` takes 1-4 rows of the K-quants. Not exact: each
//! input value is rounded to one of 255 steps of its 32-position block (`d = max|x| / 127`),
//! an error of at most `d / 2` per value. The README states what that does to the logits.
//!
//! Layout as the transposed tiling's (`transposed.rs`): input rows in vector lanes, panels of
//! `16 / g` rows, lane `r·g + j` row `r`'s bytes `4j..4j + 4` of each step of `4g` positions,
//! and a weight's `4g` bytes broadcast to every row. Weights are unpacked, a strip of [`T`]
//! outputs and [`CHUNK`] positions at a time, into bytes `u` with `value = a·u − b` per
//! subblock (`dequant/unsigned.rs`). A subblock's integer sums `Σ u·q` (exact) then become
//! `da·(a·Σ u·q) − b·(da·Σ q)` in f32, with `da` the block's input scale.

use std::arch::x86_64::*;

use super::super::cpu::Out;
use super::super::dequant::unsigned;
use super::super::stored::StoredMatrix;
use super::transposed::{self, MAX_PANELS};
use super::BLOCKED_MIN_K;
use row::quantize_row;

mod avx2;
pub(super) mod row;

/// From this many rows on the VNNI kernel runs; one row keeps the exact kernel, which is as
/// fast: it waits on reading the weights either way. `generate --batch`, tok/s exact vs int8
/// at one row: 1B-shaped Q4_K_M 17.6 vs 17.0 and 7B-shaped 2.85 vs 2.7 with a kernel that
/// put positions in the lanes (removed), SmolLM2 Q8_0 108 vs 78 with this tiling.
pub(super) const MIN_ROWS: usize = 2;

/// From this many rows on the AVX2 tiling runs (below it `row.rs` for the K-quants, the exact
/// kernels for the rest): at 8 rows of the 1B-shaped Q4_K_M 48 tok/s against the exact 26, at
/// 16 54-62 against 31 (llama.cpp 50-55), 2 interleaved rounds each.
pub(super) const AVX2_MIN_ROWS: usize = 5;

/// Input positions per int8 scale (llama.cpp's Q8_0 block).
const QBLOCK: usize = 32;

/// Outputs per tile: an integer and an f32 accumulator each, with room for the operands.
const T: usize = 8;

/// Weight positions unpacked at a time, for a strip of [`T`] outputs (2 KiB of bytes).
const CHUNK: usize = 256;

/// Subblocks per [`CHUNK`], at most (Q6_K's 16 positions each).
const SUBS: usize = CHUNK / 16;

/// Whether an int8 kernel multiplies products of several rows over `w`: the VNNI kernel's
/// formats on a CPU with it, else [`avx2`]'s.
pub(super) fn applies(w: &StoredMatrix) -> bool {
    vnni(w) || avx2::applies(w)
}

/// Whether `m` rows over `w` take an int8 kernel (when its int8 activations are on).
pub(super) fn takes(m: usize, w: &StoredMatrix) -> bool {
    if vnni(w) {
        m >= MIN_ROWS
    } else {
        m >= AVX2_MIN_ROWS && avx2::applies(w)
    }
}

/// Whether the VNNI kernel multiplies `w`: a format it unpacks, on a CPU with AVX-512 VNNI
/// (and BW, VL).
fn vnni(w: &StoredMatrix) -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let vnni = *VNNI.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("f16c")
    });
    vnni && unsigned::subblock(w.dtype()).is_some() && w.cols().is_multiple_of(QBLOCK)
}

/// The input rows, quantized and packed for the tiling (see the module).
struct Packed {
    /// Steps of `4g` positions per vector; `16 / g` rows per panel.
    g: usize,
    k: usize,
    /// Positions per weight subblock (16 or 32), what `dbs` sums over.
    sub: usize,
    panels: usize,
    /// `[panel][k / 4g][64]` bytes.
    q: Vec<i8>,
    /// `[panel][k / QBLOCK][16]`: each lane's row's scale of the block.
    da: Vec<f32>,
    /// `[panel][k / sub][16]`: the scale times the sum of the lane's bytes in the subblock.
    dbs: Vec<f32>,
}

/// Steps of 4 positions per vector lane group: the fewest rows per panel that hold `m`, and
/// no more positions per step than a subblock has.
fn groups(m: usize, sub: usize) -> usize {
    let g = match m {
        0..=2 => 8,
        3..=4 => 4,
        5..=8 => 2,
        _ => 1,
    };
    g.min(sub / 4)
}

/// `x` `[m, k]` rounded to int8, `d = max|x| / 127` per 32 positions, and packed with steps
/// of `4g` positions.
fn pack(x: &[f32], m: usize, k: usize, sub: usize, g: usize) -> Packed {
    let (rows, step) = (16 / g, 4 * g);
    let panels = m.div_ceil(rows);
    let (nq, nsub) = (k / QBLOCK, k / sub);
    let mut p = Packed {
        g,
        k,
        sub,
        panels,
        q: vec![0; panels * k * 16 / g],
        da: vec![0.0; panels * nq * 16],
        dbs: vec![0.0; panels * nsub * 16],
    };
    let mut q = vec![0i8; k];
    let mut d = vec![0f32; nq];
    for r in 0..m {
        quantize_row(&x[r * k..(r + 1) * k], &mut q, &mut d);
        let (panel, lane0) = (r / rows, r % rows * g);
        let pq = &mut p.q[panel * k * 16 / g..(panel + 1) * k * 16 / g];
        for (c, four) in q.chunks_exact(4).enumerate() {
            let (t, j) = (4 * c / step, c % g);
            let at = t * 64 + (lane0 + j) * 4;
            pq[at..at + 4].copy_from_slice(four);
        }
        for (b, &d) in d.iter().enumerate() {
            let at = (panel * nq + b) * 16 + lane0;
            p.da[at..at + g].fill(d);
        }
        for (s, part) in q.chunks_exact(sub).enumerate() {
            let mut sums = [0i32; 8];
            for (c, four) in part.chunks_exact(4).enumerate() {
                sums[c % g] += four.iter().map(|&v| v as i32).sum::<i32>();
            }
            let at = (panel * nsub + s) * 16 + lane0;
            let d = d[s * sub / QBLOCK];
            for (dbs, sum) in p.dbs[at..at + g].iter_mut().zip(sums) {
                *dbs = d * sum as f32;
            }
        }
    }
    p
}

/// `x` `[m, k]` (any `m`) times `w` transposed, with `x` quantized to int8, in groups of
/// [`MAX_ROWS`](super::MAX_ROWS) rows (prompts), each its own rows of the output: `[m, n]`.
/// Against the exact prefill tiling, TTFT at 512 tokens through HTTP (3 interleaved rounds):
/// 1B-shaped Q4_K_M 3.93 -> 2.83 s, SmolLM2 Q4_K_M 0.63 -> 0.53 s.
pub(super) fn matmul_groups(x: &[f32], w: &StoredMatrix) -> Vec<f32> {
    let k = w.cols();
    let mut y = Vec::with_capacity(x.len() / k * w.rows());
    for rows in x.chunks(super::MAX_ROWS * k) {
        y.extend(matmul(rows, rows.len() / k, w));
    }
    y
}

/// `x` `[m, k]` (`m` ≤ 64) times `w` transposed, with `x` quantized to int8: `[m, n]`.
///
/// # Panics
/// Unless [`applies`] to `w` and `x` holds `m · k` values.
pub(super) fn matmul(x: &[f32], m: usize, w: &StoredMatrix) -> Vec<f32> {
    assert!(applies(w) && m <= MAX_PANELS * 16 && x.len() == m * w.cols());
    let (n, k) = (w.rows(), w.cols());
    let sub = unsigned::subblock(w.dtype()).expect("applies");
    let mut y = vec![0f32; m * n];
    let out = Out(y.as_mut_ptr());
    let vnni = vnni(w);
    // The AVX2 kernel reads one row per lane.
    let g = if vnni { groups(m, sub) } else { 1 };
    let pk = pack(x, m, k, sub, g);
    let chunk = super::thread_chunk(n, k, T);
    super::super::pool::run(n.div_ceil(chunk), &|c| {
        let (o0, o1) = (c * chunk, ((c + 1) * chunk).min(n));
        // SAFETY: `applies` checked the CPU (`vnni`: which kernel); `pk` is packed for it; this
        // chunk alone writes columns `o0..o1`.
        unsafe {
            if vnni {
                part(&pk, m, w, o0, o1, out, n)
            } else {
                avx2::part(&pk, m, w, o0, o1, out, n)
            }
        };
    });
    y
}

/// Outputs `o0..o1` of all `m` rows, a strip of [`T`] outputs at a time.
///
/// # Safety
/// The CPU has AVX-512 VNNI and BW; `y` points to `m * ldy` values of which no one else
/// writes columns `o0..o1` meanwhile.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn part(pk: &Packed, m: usize, w: &StoredMatrix, o0: usize, o1: usize, y: Out, ldy: usize) {
    let mut u = [0u8; T * CHUNK];
    let (mut a, mut b) = ([0f32; T * SUBS], [0f32; T * SUBS]);
    let mut acc = [_mm512_setzero_ps(); MAX_PANELS * T];
    let mut sums = [_mm512_setzero_ps(); MAX_PANELS * T];
    let mut o = o0;
    while o < o1 {
        let rows = T.min(o1 - o);
        acc.fill(_mm512_setzero_ps());
        let next = T.min(o1 - o - rows);
        strip(
            w,
            o,
            rows,
            next,
            &mut u,
            &mut a,
            &mut b,
            |c0, c1, u, a, b| {
                let acc = acc.as_mut_ptr();
                // SAFETY: as this function's; the strip's bytes and factors are unpacked.
                unsafe {
                    match (pk.g, pk.sub) {
                        (1, 32) => tile::<1, 32>(pk, c0, c1 - c0, u, a, b, acc),
                        (2, 32) => tile::<2, 32>(pk, c0, c1 - c0, u, a, b, acc),
                        (4, 32) => tile::<4, 32>(pk, c0, c1 - c0, u, a, b, acc),
                        (8, 32) => tile::<8, 32>(pk, c0, c1 - c0, u, a, b, acc),
                        (1, 16) => tile::<1, 16>(pk, c0, c1 - c0, u, a, b, acc),
                        (2, 16) => tile::<2, 16>(pk, c0, c1 - c0, u, a, b, acc),
                        (4, 16) => tile::<4, 16>(pk, c0, c1 - c0, u, a, b, acc),
                        (g, s) => unreachable!("{g} groups over subblocks of {s}"),
                    }
                }
            },
        );
        // `finish` reads the sums as `[panel][rows]`.
        for p in 0..pk.panels {
            for i in 0..rows {
                sums[p * rows + i] = acc[p * T + i];
            }
        }
        transposed::finish(sums.as_ptr(), pk.g, m, rows, y.add(o).0, ldy);
        o += rows;
    }
}

/// A strip of `rows` outputs from `o` of `w`, a [`CHUNK`] of positions at a time: each
/// chunk's bytes and subblock factors unpacked into `u` (`[outputs][CHUNK]`), `a` and `b`
/// (`[outputs][SUBS]`), then `tile(c0, c1, u, a, b)` over them. Outputs past `rows` get zero
/// factors (they multiply by zero). Short rows prefetch the `next` outputs' bytes, to travel
/// from memory while this strip is multiplied (as the exact kernel's strips); long ones a
/// chunk ahead in each row. Both int8 tilings (VNNI's and AVX2's) run their strips through it.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `w` is in a format [`unsigned::unpack`] takes and `u`,
/// `a`, `b` hold at least `rows` outputs.
#[allow(clippy::too_many_arguments)]
unsafe fn strip(
    w: &StoredMatrix,
    o: usize,
    rows: usize,
    next: usize,
    u: &mut [u8],
    a: &mut [f32],
    b: &mut [f32],
    mut tile: impl FnMut(usize, usize, *const u8, *const f32, *const f32),
) {
    let k = w.cols();
    assert!(u.len() >= rows * CHUNK && a.len() >= rows * SUBS && b.len() >= rows * SUBS);
    a[rows * SUBS..].fill(0.0);
    b[rows * SUBS..].fill(0.0);
    if k < BLOCKED_MIN_K {
        w.prefetch_rows(o + rows, next);
    }
    let mut c0 = 0;
    while c0 < k {
        let c1 = (c0 + CHUNK).min(k);
        for i in 0..rows {
            unsigned::unpack(
                w.dtype(),
                w.row_blocks(o + i, c0, c1),
                u.as_mut_ptr().add(i * CHUNK),
                a.as_mut_ptr().add(i * SUBS),
                b.as_mut_ptr().add(i * SUBS),
            );
        }
        if k >= BLOCKED_MIN_K {
            w.prefetch_cols(o, rows, c0 + CHUNK, c1 + CHUNK);
        }
        tile(c0, c1, u.as_ptr(), a.as_ptr(), b.as_ptr());
        c0 = c1;
    }
}

/// Carry on the sums `acc` (`[panel][T]`) over positions `c0..c0 + kb` of the strip whose
/// bytes `u` (`[T][CHUNK]`, from position `c0`) and subblock factors `a`, `b`
/// (`[T][SUBS]`) are unpacked.
///
/// # Safety
/// As [`part`]; `kb` a multiple of `SUB`, `G` as `pk.g` and `SUB` as `pk.sub`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const G: usize, const SUB: usize>(
    pk: &Packed,
    c0: usize,
    kb: usize,
    u: *const u8,
    a: *const f32,
    b: *const f32,
    acc: *mut __m512,
) {
    let step = 4 * G;
    let (nq, nsub) = (pk.k / QBLOCK, pk.k / SUB);
    for p in 0..pk.panels {
        let mut f = [_mm512_setzero_ps(); T];
        for (o, f) in f.iter_mut().enumerate() {
            *f = *acc.add(p * T + o);
        }
        let q = pk.q.as_ptr().add(p * pk.k * 16 / G);
        let da = pk.da.as_ptr().add(p * nq * 16);
        let dbs = pk.dbs.as_ptr().add(p * nsub * 16);
        for s in 0..kb / SUB {
            let at = s * SUB;
            let mut sum = [_mm512_setzero_si512(); T];
            for t in 0..SUB / step {
                let pos = at + t * step;
                let xv = _mm512_loadu_si512(q.add((c0 + pos) / step * 64).cast());
                for (o, sum) in sum.iter_mut().enumerate() {
                    let wv = broadcast::<G>(u.add(o * CHUNK + pos));
                    *sum = _mm512_dpbusd_epi32(*sum, wv, xv);
                }
            }
            let d = _mm512_loadu_ps(da.add((c0 + at) / QBLOCK * 16));
            let ds = _mm512_loadu_ps(dbs.add((c0 + at) / SUB * 16));
            for (o, (f, sum)) in f.iter_mut().zip(&sum).enumerate() {
                let v = _mm512_mul_ps(_mm512_cvtepi32_ps(*sum), d);
                *f = _mm512_fmadd_ps(v, _mm512_set1_ps(*a.add(o * SUBS + s)), *f);
                *f = _mm512_fnmadd_ps(ds, _mm512_set1_ps(*b.add(o * SUBS + s)), *f);
            }
        }
        for (o, f) in f.iter().enumerate() {
            *acc.add(p * T + o) = *f;
        }
    }
}

/// `4G` bytes at `p` in every `4G`-byte group of a vector.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn broadcast<const G: usize>(p: *const u8) -> __m512i {
    match G {
        1 => _mm512_set1_epi32(p.cast::<i32>().read_unaligned()),
        2 => _mm512_set1_epi64(p.cast::<i64>().read_unaligned()),
        4 => _mm512_broadcast_i32x4(_mm_loadu_si128(p.cast())),
        8 => _mm512_broadcast_i64x4(_mm256_loadu_si256(p.cast())),
        _ => unreachable!(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::{Device, Tensor};

    /// The formats the int8 kernels take.
    pub(super) const FORMATS: [GgmlDType; 8] = {
        use GgmlDType::*;
        [Q8_0, Q4K, Q5K, Q6K, Q4_0, Q4_1, Q5_0, Q5_1]
    };

    /// Shapes `(m, k, n)` for `dtype`: whole and odd numbers of blocks, outputs that leave
    /// tails, and `m` up to 64.
    pub(super) fn shapes(dtype: GgmlDType) -> Vec<(usize, usize, usize)> {
        let kq = dtype.block_size();
        let odd = if kq == 32 { 96 } else { 768 };
        let mut shapes = vec![
            (1, 2 * kq.max(256), 9),
            (1, odd, 19),
            (2, 256, 17),
            (2, odd, 5),
            (3, 512, 8),
            (5, 256, 23),
        ];
        shapes.extend([4, 7, 8, 9, 16, 17, 33, 64].map(|m| (m, odd, 13)));
        shapes
    }

    /// `product(x, m, w)` of a random `[n, k]` weight in `dtype` and `m` random rows computes
    /// exactly what the int8 kernels say: the int8 rounding of `x` (its scales from
    /// [`quantize_row`], each value recomputed here plainly) times the dequantised weights, up
    /// to f32 summation order; and it stays within the rounding's own bound of the exact
    /// product: `Σ_i |w_i| · d_i / 2`.
    pub(super) fn check(
        dtype: GgmlDType,
        (m, k, n): (usize, usize, usize),
        product: impl Fn(&[f32], usize, &StoredMatrix) -> Vec<f32>,
    ) {
        let t = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let x = (x.clone() * x.abs().unwrap().exp().unwrap()).unwrap();
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        compare(dtype, &t, &x, product);
    }

    /// [`check`] of the weight `t` (`[n, k]`, quantized to `dtype`) and the input `x`.
    pub(super) fn compare(
        dtype: GgmlDType,
        t: &Tensor,
        x: &[f32],
        product: impl Fn(&[f32], usize, &StoredMatrix) -> Vec<f32>,
    ) {
        let (n, k) = t.dims2().unwrap();
        let m = x.len() / k;
        let w = StoredMatrix::quantize(t, dtype).unwrap();
        let mut dq = vec![0f32; n * k];
        w.dequantize_rows(0, n, &mut dq);
        let y = product(x, m, &w);
        let (mut q, mut d) = (vec![0i8; k], vec![0f32; k / QBLOCK]);
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            quantize_row(xr, &mut q, &mut d);
            for (i, (&q, &x)) in q.iter().zip(xr).enumerate() {
                let d = d[i / QBLOCK];
                let plain = if d > 0.0 {
                    (x * (1.0 / d)).round()
                } else {
                    0.0
                };
                // `x / d` against `x · (127 / max|x|)`: they may round apart at a half.
                assert!((q as f32 - plain).abs() <= 1.0, "{x} / {d}: {q}");
                assert!((x - d * q as f32).abs() <= d * 0.5001, "{x} / {d}: {q}");
            }
            for o in 0..n {
                let wr = &dq[o * k..(o + 1) * k];
                let (mut rounded, mut exact, mut bound, mut mag) = (0f64, 0f64, 0f64, 0f64);
                for i in 0..k {
                    let xq = d[i / QBLOCK] as f64 * q[i] as f64;
                    rounded += xq * wr[i] as f64;
                    exact += xr[i] as f64 * wr[i] as f64;
                    bound += wr[i].abs() as f64 * d[i / QBLOCK] as f64 / 2.0;
                    mag += (xq * wr[i] as f64).abs();
                }
                let got = y[r * n + o] as f64;
                assert!(
                    (got - rounded).abs() <= 1e-5 * mag + 1e-6,
                    "{dtype:?} {m}x{k}x{n} ({r}, {o}): {got} vs {rounded}"
                );
                assert!(
                    (got - exact).abs() <= bound * 1.001 + 1e-5 * mag,
                    "{dtype:?} {m}x{k}x{n} ({r}, {o}): {got} vs exact {exact}, bound {bound}"
                );
            }
        }
    }

    /// The kernel this CPU has (VNNI, else AVX2: every format but Q8_0), at every shape
    /// (the AVX2 kernel's too, below the rows from which it is taken).
    #[test]
    fn int8_products_are_the_rounded_inputs_times_the_weights() {
        for dtype in FORMATS {
            let probe = StoredMatrix::quantize(
                &Tensor::zeros((1, 256), candle_core::DType::F32, &Device::Cpu).unwrap(),
                dtype,
            )
            .unwrap();
            if !applies(&probe) {
                continue;
            }
            for shape in shapes(dtype) {
                check(dtype, shape, matmul);
            }
        }
    }

    /// The largest sums the kernels' integers hold: every input byte 127 (a constant row)
    /// against weights whose every byte but one per 16 is its format's largest (-1 then +1s:
    /// the -1 sets the scale, or the min, and each +1 is the top value). A 16-bit sum of more
    /// steps than [`avx2`]'s would wrap here.
    #[test]
    fn int8_sums_hold_the_largest_bytes() {
        let (m, k, n) = (16, 512, 9);
        let pattern: Vec<f32> = (0..n * k)
            .map(|i| if i % 16 == 0 { -1.0 } else { 1.0 })
            .collect();
        let t = Tensor::from_vec(pattern, (n, k), &Device::Cpu).unwrap();
        for dtype in FORMATS {
            let w = StoredMatrix::quantize(&t, dtype).unwrap();
            if applies(&w) {
                compare(dtype, &t, &vec![0.5f32; m * k], matmul);
            }
        }
    }

    /// Where AVX2 runs the int8 kernel: every format it unpacks but Q8_0, from
    /// [`AVX2_MIN_ROWS`] rows.
    #[test]
    fn avx2_takes_the_formats_whose_bytes_stay_below_64() {
        if !(is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        {
            return;
        }
        for dtype in FORMATS {
            let w = StoredMatrix::quantize(
                &Tensor::zeros((1, 256), candle_core::DType::F32, &Device::Cpu).unwrap(),
                dtype,
            )
            .unwrap();
            assert_eq!(avx2::applies(&w), dtype != GgmlDType::Q8_0, "{dtype:?}");
            if !vnni(&w) {
                assert!(
                    !takes(AVX2_MIN_ROWS - 1, &w) && takes(AVX2_MIN_ROWS, &w) == avx2::applies(&w)
                );
            }
        }
    }
}

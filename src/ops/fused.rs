//! The adapter math over plain slices on the CPU: the unmerged terms of a decode step, and
//! merged weights.
//!
//! For each run of rows that shares an adapter module, `y = g ⊙ (base + (x·Aᵀ)·(s·Bᵀ))`, in
//! place on the base output. Written with tensor ops this is five ops per adapter group per
//! projection (two matmuls, add, scale, narrow) plus a concatenation: with 8 adapters that is
//! ~8,000 small candle ops per step of SmolLM2, whose fixed cost outweighed the arithmetic
//! (`r·(in + out)` multiply-adds per row). Here each row is two short loops over slices.
//! [`super::AdaptedLinear`] uses the tensor version (`apply_module`) wherever this does not
//! apply (other devices and dtypes), and as the reference in tests.

use candle_core::{Result, Tensor};

use super::cpu::{view, Out, View};

use super::lora::LoraModule;

/// Below this many multiply-adds the rows run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// `base` `[m, n]` with each group `(start, len, module)` of rows of `x` `[m, k]` given its
/// adapter term; `None` where the fused path does not apply (then nothing was computed).
pub(super) fn unmerged(
    x: &Tensor,
    base: &Tensor,
    groups: &[(usize, usize, &LoraModule)],
) -> Result<Option<Tensor>> {
    let (Ok((m, k)), Ok((m2, n))) = (x.dims2(), base.dims2()) else {
        return Ok(None);
    };
    let (Some(xv), Some(bv)) = (view(x), view(base)) else {
        return Ok(None);
    };
    if m != m2 {
        return Ok(None);
    }
    // Every module's tensors first, so that nothing is computed unless all of them apply.
    let mut views = Vec::with_capacity(groups.len());
    for &(start, len, module) in groups {
        let (a, b_t, g) = module.parts();
        let (Some(a), Some(b_t)) = (view(a), view(b_t)) else {
            return Ok(None);
        };
        let g = match g.map(view) {
            None => None,
            Some(Some(g)) => Some(g),
            Some(None) => return Ok(None),
        };
        if start + len > m
            || a.values().len() != module.rank() * k
            || b_t.values().len() != module.rank() * n
            || g.as_ref().is_some_and(|g| g.values().len() != n)
        {
            return Ok(None);
        }
        views.push((start, len, a, b_t, g));
    }
    let x = xv.values();
    let mut y = bv.values().to_vec();
    // One part per adapted row: rows are independent, and the kernel pool's threads (idle
    // between matmuls otherwise) take them as they come.
    let work: Vec<(usize, usize)> = views
        .iter()
        .enumerate()
        .flat_map(|(v, (start, len, ..))| (*start..start + len).map(move |row| (v, row)))
        .collect();
    let rank_sum: usize = views
        .iter()
        .map(|(_, len, a, ..)| len * a.values().len() / k)
        .sum();
    let out = Out(y.as_mut_ptr());
    let one = |i: usize| {
        let (v, row) = work[i];
        let (_, _, a, b_t, g) = &views[v];
        // SAFETY: `y` has `m * n` values, `row < m`, and each row is written by one part only.
        let y_row = unsafe { out.slice(row * n, n) };
        rows(
            &x[row * k..(row + 1) * k],
            a.values(),
            b_t.values(),
            g.as_ref().map(View::values),
            y_row,
        );
    };
    if rank_sum * (k + n) >= PARALLEL_MIN_MACS {
        super::pool::run(work.len(), &one);
    } else {
        (0..work.len()).for_each(one);
    }
    Ok(Some(Tensor::from_vec(y, (m, n), base.device())?))
}

simd_dispatch!(
    fn rows(x: &[f32], a: &[f32], b_t: &[f32], g: Option<&[f32]>, y: &mut [f32]) = row_plain
);

/// One row: `xa = x·Aᵀ` (`r` dot products over `in`), then `y += xa·(s·Bᵀ)` (`r` passes over
/// the `out` values), then `y *= g`. Plain loops the compiler vectorises for the features of
/// the function it is inlined into (no closures: those would be compiled without them).
#[inline(always)]
fn row_plain(x: &[f32], a: &[f32], b_t: &[f32], g: Option<&[f32]>, y: &mut [f32]) {
    const L: usize = 16;
    let k = x.len();
    for (j, b_row) in b_t.chunks_exact(y.len()).enumerate() {
        let a_row = &a[j * k..(j + 1) * k];
        let mut acc = [0f32; L];
        let (xc, ac) = (x.chunks_exact(L), a_row.chunks_exact(L));
        let mut tail = 0f32;
        for (p, q) in xc.remainder().iter().zip(ac.remainder()) {
            tail = p.mul_add(*q, tail);
        }
        for (xv, av) in xc.zip(ac) {
            for l in 0..L {
                acc[l] = xv[l].mul_add(av[l], acc[l]);
            }
        }
        let xa = acc.iter().sum::<f32>() + tail;
        for (yo, &bo) in y.iter_mut().zip(b_row) {
            *yo = xa.mul_add(bo, *yo);
        }
    }
    if let Some(g) = g {
        for (yo, &go) in y.iter_mut().zip(g) {
            *yo *= go;
        }
    }
}

/// `W' = g ⊙_rows (W0 + s·B·A)`, `[out, in]`, one output row at a time in one pass (the
/// tensor version made five passes over whole-matrix temporaries); `None` where it does not
/// apply. Rows are spread over the kernel pool.
pub(super) fn merged(w0: &Tensor, module: &LoraModule) -> Result<Option<Tensor>> {
    let Ok((out, inp)) = w0.dims2() else {
        return Ok(None);
    };
    let (a, b_t, g) = module.parts();
    let r = module.rank();
    let (Some(wv), Some(av), Some(bv)) = (view(w0), view(a), view(b_t)) else {
        return Ok(None);
    };
    let gv = match g.map(view) {
        None => None,
        Some(Some(g)) => Some(g),
        Some(None) => return Ok(None),
    };
    let (w, a, b_t) = (wv.values(), av.values(), bv.values());
    let g = gv.as_ref().map(View::values);
    if a.len() != r * inp || b_t.len() != r * out || g.is_some_and(|g| g.len() != out) {
        return Ok(None);
    }
    let mut y = vec![0f32; out * inp];
    let dst = Out(y.as_mut_ptr());
    const ROWS: usize = 64;
    super::pool::run(out.div_ceil(ROWS), &|part| {
        for o in part * ROWS..((part + 1) * ROWS).min(out) {
            // SAFETY: `y` has `out * inp` values and each row belongs to one part.
            let row = unsafe { dst.slice(o * inp, inp) };
            merge_row(&w[o * inp..(o + 1) * inp], a, b_t, g, o, out, row);
        }
    });
    Ok(Some(Tensor::from_vec(y, (out, inp), w0.device())?))
}

simd_dispatch!(
    fn merge_row(
        w: &[f32],
        a: &[f32],
        b_t: &[f32],
        g: Option<&[f32]>,
        o: usize,
        out: usize,
        y: &mut [f32],
    ) = merge_row_plain
);

/// `y = g_o · (w + Σ_j (s·B)[o, j] · A[j, ..])` for output row `o`.
#[inline(always)]
fn merge_row_plain(
    w: &[f32],
    a: &[f32],
    b_t: &[f32],
    g: Option<&[f32]>,
    o: usize,
    out: usize,
    y: &mut [f32],
) {
    let inp = w.len();
    y.copy_from_slice(w);
    for (j, a_row) in a.chunks_exact(inp).enumerate() {
        let c = b_t[j * out + o];
        for (yi, &ai) in y.iter_mut().zip(a_row) {
            *yi = c.mul_add(ai, *yi);
        }
    }
    if let Some(g) = g {
        let go = g[o];
        for yi in y.iter_mut() {
            *yi *= go;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Against the tensor formula, in groups large enough to run on the pool and small enough
    /// to run on the caller, DoRA and plain LoRA, with a base row between groups.
    #[test]
    fn equals_the_tensor_formula() {
        let dev = Device::Cpu;
        for (k, n, r, rows) in [(576, 1536, 16, [3, 1, 4]), (32, 64, 4, [1, 2, 1])] {
            let module = |dora: bool| {
                let a = Tensor::randn(0f32, 0.1, (r, k), &dev).unwrap();
                let b = Tensor::randn(0f32, 0.1, (n, r), &dev).unwrap();
                let g = Tensor::rand(0.5f32, 1.5, n, &dev).unwrap();
                LoraModule::new(&a, &b, 2.0, dora.then_some(&g), DType::F32).unwrap()
            };
            let (m1, m2) = (module(true), module(false));
            let m = rows.iter().sum::<usize>();
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let base = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();
            // Rows 0..a on m1, then one base row, then the rest on m2.
            let groups = [(0, rows[0], &m1), (rows[0] + rows[1], rows[2], &m2)];
            let fused = unmerged(&x, &base, &groups)
                .unwrap()
                .expect("applies on CPU f32");
            let mut want = base.to_vec2::<f32>().unwrap();
            for &(start, len, module) in &groups {
                let xs = x.narrow(0, start, len).unwrap();
                let bs = base.narrow(0, start, len).unwrap();
                let mut y = (bs + module.delta(&xs).unwrap()).unwrap();
                if let Some(g) = module.g() {
                    y = y.broadcast_mul(g).unwrap();
                }
                for (i, row) in y.to_vec2::<f32>().unwrap().into_iter().enumerate() {
                    want[start + i] = row;
                }
            }
            let got = fused.to_vec2::<f32>().unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let d = g
                    .iter()
                    .zip(w)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-4, "{k}x{n} r{r} row {i}: {d}");
            }
        }
    }

    #[test]
    fn merged_equals_the_tensor_formula() {
        let dev = Device::Cpu;
        for (out, inp, r, dora) in [(1536, 576, 16, true), (70, 33, 3, false), (5, 8, 1, true)] {
            let w0 = Tensor::randn(0f32, 0.1, (out, inp), &dev).unwrap();
            let a = Tensor::randn(0f32, 0.1, (r, inp), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.1, (out, r), &dev).unwrap();
            let g = Tensor::rand(0.5f32, 1.5, out, &dev).unwrap();
            let module = LoraModule::new(&a, &b, 0.7, dora.then_some(&g), DType::F32).unwrap();
            let got = merged(&w0, &module).unwrap().expect("applies on CPU f32");
            let mut want = (&w0 + (b.matmul(&a).unwrap() * 0.7).unwrap()).unwrap();
            if dora {
                want = want.broadcast_mul(&g.unsqueeze(1).unwrap()).unwrap();
            }
            let d = crate::ops::max_abs_diff(&got, &want);
            assert!(d < 1e-5, "{out}x{inp} r{r}: {d}");
        }
    }
}

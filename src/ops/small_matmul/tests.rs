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

/// The AVX2 tiles (their own shapes, for 16 registers) sum each output as the portable tiles
/// do, so a row's result does not depend on which of the two runs, nor on how many rows share
/// the step.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_tiles_equal_the_portable_tiles_bit_for_bit() {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        return;
    }
    for m in 1..=MAX_ROWS {
        for (k, n) in [(7, 3), (8, 15), (17, 25), (70, 50), (576, 23)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
            let avx2 = small_m(&x, &w, Some(Isa::Avx2))
                .unwrap()
                .expect("kernel applies");
            let portable = small_m(&x, &w, Some(Isa::Portable))
                .unwrap()
                .expect("kernel applies");
            let (a, p) = (
                avx2.to_vec2::<f32>().unwrap(),
                portable.to_vec2::<f32>().unwrap(),
            );
            assert_eq!(a, p, "{m}x{k}x{n}");
            // And one row alone gives that row's values.
            let r = m / 2;
            let alone = small_m(&x.narrow(0, r, 1).unwrap(), &w, Some(Isa::Avx2))
                .unwrap()
                .unwrap();
            assert_eq!(
                alone.to_vec2::<f32>().unwrap()[0],
                a[r],
                "{m}x{k}x{n} row {r} alone"
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
                let xt = transposed::pack(&xv, m, k, b);
                let mut y = vec![f32::NAN; m * n];
                // SAFETY: AVX-512F checked above; `xt` packs `m` rows with `b`, a divisor
                // of `k`; `w` is `[n, k]` and `y` `[m, n]`.
                unsafe {
                    transposed::columns(xt.as_ptr(), b, m, k, wv.as_ptr(), 0, n, y.as_mut_ptr(), n)
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
    assert_eq!(transposed::positions(8, 2048), Some(2));
    assert_eq!(transposed::positions(8, 2047), None);
    assert_eq!(transposed::positions(16, 7), Some(1));
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
fn blocked_stored_tiling_equals_whole_strips_bit_for_bit() {
    // Reading stored weights a block of positions at a time changes where the dequantised
    // values wait, not the sums: each lane still runs over its positions in order. Rows of
    // several blocks and a part block (k = 2 · 256 + 64 for the 32-value formats), every
    // panel shape, and outputs that leave every tile tail.
    use candle_core::quantized::GgmlDType::*;
    let dev = Device::Cpu;
    for (dtype, k) in [
        (Q8_0, 576),
        (Q4_0, 576),
        (F16, 600),
        (Q4K, 768),
        (Q6K, 1024),
    ] {
        for n in [7, 50] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = StoredMatrix::quantize(&w, dtype).unwrap();
            let deq = q.dequantize_all().unwrap();
            for m in [5, 8, 9, 16, 17, 33, MAX_ROWS] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let blocked = small_m_stored_with(&xv, m, &q, best_isa(), 0);
                let whole = small_m_stored_with(&xv, m, &q, best_isa(), usize::MAX);
                let diff = crate::ops::max_abs_diff(&blocked, &whole);
                assert_eq!(diff, 0.0, "{dtype:?} {m}x{k}x{n}");
                let reference = x.matmul(&deq.t().unwrap()).unwrap();
                let diff = crate::ops::max_abs_diff(&blocked, &reference);
                assert!(
                    diff <= 1e-5 * (k as f32).sqrt() * 4.0,
                    "{dtype:?} {m}x{k}x{n}: {diff}"
                );
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
    // The fallback (candle's gemm on dequantised tiles), which other CPUs take.
    let tiled = prefill_stored(&x, &q).unwrap();
    assert_eq!(tiled.dims(), &[MAX_ROWS + 3, 300]);
    assert!(crate::ops::max_abs_diff(&tiled, &reference) < 1e-3);
}

/// The prefill tiling against candle's matmul, and against the decode tiling bit for bit: row
/// counts with a part panel and more than one row group, rows of part blocks (k = 576 is two
/// blocks and a quarter; 100 is less than one), output counts past one output group with a
/// part strip; dense weights and stored ones (whose products must be the dense ones on the
/// dequantised values, bit for bit).
#[cfg(target_arch = "x86_64")]
#[test]
fn prefill_tiling_equals_candle_and_the_decode_tiling_bit_for_bit() {
    use candle_core::quantized::GgmlDType::*;
    if !is_x86_feature_detected!("avx512f") {
        return;
    }
    let dev = Device::Cpu;
    // (n = 24 · 20 + 5: each of 2 threads' outputs spans two output groups.)
    for (m, k, n) in [
        (65, 100, 7),
        (100, 576, 24 * 9 + 5),
        (70, 576, 24 * 20 + 5),
        (300, 576, 50),
        (529, 256, 30),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let (xv, wv) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        // SAFETY: AVX-512F checked above; `xv` is `[m, k]`, `wv` `[n, k]`.
        let y = unsafe { prefill::matmul(&xv, m, prefill::Weights::Dense(&wv, n, k)) };
        let got = Tensor::from_vec(y.clone(), (m, n), &dev).unwrap();
        let diff = crate::ops::max_abs_diff(&got, &x.matmul(&w.t().unwrap()).unwrap());
        assert!(diff <= 1e-4 * (k as f32).sqrt(), "{m}x{k}x{n}: {diff}");
        // Each panel of 16 rows through the decode tiling: the same sums in the same order.
        for r0 in (0..m).step_by(16) {
            let rows = (m - r0).min(16);
            let xt = transposed::pack(&xv[r0 * k..(r0 + rows) * k], rows, k, 1);
            let mut yd = vec![f32::NAN; rows * n];
            // SAFETY: as above; `xt` packs `rows` rows with 1 position per vector.
            unsafe {
                transposed::columns(
                    xt.as_ptr(),
                    1,
                    rows,
                    k,
                    wv.as_ptr(),
                    0,
                    n,
                    yd.as_mut_ptr(),
                    n,
                )
            };
            assert_eq!(
                &y[r0 * n..(r0 + rows) * n],
                &yd[..],
                "{m}x{k}x{n} rows {r0}.."
            );
        }
        if k % 32 == 0 {
            for dtype in [Q8_0, Q4_0, Q5_1, F16] {
                let q = StoredMatrix::quantize(&w, dtype).unwrap();
                let deq = q.dequantize_all().unwrap();
                let dv = deq.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                // SAFETY: as above.
                let (ys, yd) = unsafe {
                    (
                        prefill::matmul(&xv, m, prefill::Weights::Stored(&q)),
                        prefill::matmul(&xv, m, prefill::Weights::Dense(&dv, n, k)),
                    )
                };
                assert_eq!(ys, yd, "{dtype:?} {m}x{k}x{n}");
            }
        }
    }
    // A k-quant row of several 256-value blocks.
    let (m, k, n) = (70, 768, 31);
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
    for dtype in [Q4K, Q6K] {
        let q = StoredMatrix::quantize(&w, dtype).unwrap();
        let dv = q
            .dequantize_all()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // SAFETY: as above.
        let (ys, yd) = unsafe {
            (
                prefill::matmul(&xv, m, prefill::Weights::Stored(&q)),
                prefill::matmul(&xv, m, prefill::Weights::Dense(&dv, n, k)),
            )
        };
        assert_eq!(ys, yd, "{dtype:?}");
    }
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

#[cfg(target_arch = "x86_64")]
#[test]
fn transpose_16x16_moves_every_lane() {
    use std::arch::x86_64::*;
    if !is_x86_feature_detected!("avx512f") {
        return;
    }
    let src: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let mut got = [0f32; 256];
    // SAFETY: AVX-512F checked above; 16 loads and stores of 16 values each, in bounds.
    unsafe {
        let mut v = [_mm512_setzero_ps(); 16];
        for (i, v) in v.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(src.as_ptr().add(16 * i));
        }
        transposed::transpose(&mut v);
        for (i, v) in v.iter().enumerate() {
            _mm512_storeu_ps(got.as_mut_ptr().add(16 * i), *v);
        }
    }
    for i in 0..16 {
        for j in 0..16 {
            assert_eq!(got[16 * i + j], src[16 * j + i], "({i}, {j})");
        }
    }
}

#[test]
fn weights_of_one_input_in_one_job_equal_each_alone_bit_for_bit() {
    // A layer's q, k and v (or gate and up) share their input: in one job each product must
    // be what it is alone, for every row count the kernels take (1: dot rows; 2–8: dot
    // tiles or 8-row panels; 9–64: 16-row panels; rows of 2048 read blocks of positions),
    // mixed formats and output counts, and prefill (one weight at a time) as well.
    use candle_core::quantized::GgmlDType::*;
    let dev = Device::Cpu;
    for k in [256, 2048] {
        let ws: Vec<StoredMatrix> = [(Q4K, 50), (Q6K, 24), (Q8_0, 7), (Q5_0, 33)]
            .into_iter()
            .map(|(dtype, n)| {
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                StoredMatrix::quantize(&w, dtype).unwrap()
            })
            .collect();
        let refs: Vec<&StoredMatrix> = ws.iter().collect();
        for m in [1, 2, 5, 8, 9, 16, 33, 64, 70] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let many = matmul_t_stored_many(&x, &refs).unwrap();
            assert_eq!(many.len(), ws.len());
            for (w, y) in ws.iter().zip(&many) {
                let alone = matmul_t_stored(&x, w).unwrap();
                assert_eq!(y.dims(), alone.dims());
                let (a, b) = (
                    y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert!(
                    a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{:?} {m}x{k}x{}",
                    w.dtype(),
                    w.rows()
                );
            }
        }
    }
}

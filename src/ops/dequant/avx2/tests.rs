//! The AVX2 kernels against candle's values and the portable kernels' sums, bit for bit.

use super::super::{f16_to_f32, Interleaved, MANY_ROWS};
use super::*;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

type Dequantise = unsafe fn(&[u8], &mut [f32]);
type Dot = unsafe fn(&Rows, &[f32], &mut [f32]);

/// The formats this module has.
const FORMATS: [GgmlDType; 8] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// `rows` random rows of `k` values at scales from 1e-3 to 1e2 (so every bit pattern of the
/// packed values occurs) in `dtype`: its bytes and candle's dequantised values.
fn quantized(dtype: GgmlDType, rows: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let dev = Device::Cpu;
    let t = Tensor::randn(0f32, 1.0, (rows, k), &dev)
        .unwrap()
        .broadcast_mul(&Tensor::rand(1e-3f32, 100.0, (rows, 1), &dev).unwrap())
        .unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let values = q
        .dequantize(&dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (q.data().unwrap().into_owned(), values)
}

/// `n` random values.
fn random(n: usize) -> Vec<f32> {
    Tensor::randn(0f32, 1.0, n, &Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// F16C's conversion equals the integer one for all 65,536 bit patterns (NaNs: both NaN),
/// in all eight lanes.
#[test]
fn f16c_scales_equal_the_integer_conversion() {
    if !available() {
        return;
    }
    for bits in 0..=u16::MAX {
        let want = f16_to_f32(bits);
        let mut got = [0f32; 8];
        // SAFETY: the CPU has what `half` needs, checked above.
        unsafe { _mm256_storeu_ps(got.as_mut_ptr(), half(&bits.to_le_bytes(), 0)) };
        for g in got {
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "{bits:#06x}: {g:e} != {want:e}"
            );
        }
    }
}

/// Values and one-row products of every format here equal candle's values and the portable
/// kernels' products bit for bit.
#[test]
fn formats_equal_the_portable_kernels_bit_for_bit() {
    if !available() {
        return;
    }
    // One row of Q4_K, Q5_K or Q6_K scales each sub-block's sum (`kdot.rs`, tested there).
    let kernels: [(Dequantise, Option<Dot>); 8] = [
        (q4_0, Some(q4_0_dot)),
        (q4_1, Some(q4_1_dot)),
        (q5_0, Some(q5_0_dot)),
        (q5_1, Some(q5_1_dot)),
        (q8_0, Some(q8_0_dot)),
        (q4_k, None),
        (q5_k, None),
        (q6_k, None),
    ];
    let (rows, k) = (9, 768);
    for (dtype, (deq, dot)) in FORMATS.into_iter().zip(kernels) {
        let (bytes, candle) = quantized(dtype, rows, k);
        let (mut ours, mut portable) = (vec![f32::NAN; rows * k], vec![f32::NAN; rows * k]);
        // SAFETY: checked above.
        unsafe { deq(&bytes, &mut ours) };
        assert!(super::super::plain(dtype, &bytes, &mut portable));
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ours), bits(&candle), "{dtype:?} values");
        assert_eq!(bits(&ours), bits(&portable), "{dtype:?} values");
        let Some(dot) = dot else { continue };
        let x = random(k);
        let map = [3u32, 8, 0, 5, 1];
        let sel = Rows {
            bytes: &bytes,
            row_bytes: k / dtype.block_size() * dtype.type_size(),
            map: Some(&map),
        };
        let (mut got, mut want) = (vec![f32::NAN; map.len()], vec![f32::NAN; map.len()]);
        // SAFETY: checked above.
        unsafe { dot(&sel, &x, &mut got) };
        assert!(super::super::dot_plain(dtype, &sel, &x, &mut want));
        assert_eq!(bits(&got), bits(&want), "{dtype:?} products");
    }
}

/// The products of 2–8 input rows equal the decode tiles' sums (each output an 8-lane
/// multiply-add chain over the positions in order, then the lanes added in order: the
/// portable tile, which the AVX2 tile equals) on the dequantised rows, bit for bit, through
/// a row map, and write nothing past their outputs. Without a map, more rows than a tile
/// (and a tail) over several passes of positions (and a short last one).
#[test]
fn many_rows_equal_the_tiles_sums_bit_for_bit() {
    if !available() {
        return;
    }
    let map = [3u32, 8, 0, 5, 1];
    let tiles: Vec<u32> = (0..2 * TILE as u32 + 3).collect();
    for dtype in FORMATS {
        for (k, stored, map) in [
            (768, 9, Some(&map[..])),
            (2 * PASS + 256, tiles.len(), None),
        ] {
            let (bytes, w) = quantized(dtype, stored, k);
            let sel = Rows {
                bytes: &bytes,
                row_bytes: k / dtype.block_size() * dtype.type_size(),
                map,
            };
            let rows = map.map_or_else(|| tiles.clone(), <[u32]>::to_vec);
            let n = rows.len();
            for m in 2..=MANY_ROWS {
                let x = random(m * k);
                let ldy = n + 3;
                let mut got = vec![f32::NAN; m * ldy];
                // SAFETY: checked above; `got` holds `m` rows of `ldy >= n`.
                let xi = Interleaved::new(&x, m).expect("2–8 rows of whole blocks");
                // The AVX2 kernel itself: the dispatcher declines on AVX-512 CPUs, which take
                // the dequantised-strip tiles instead.
                assert!(unsafe {
                    dot_rows_many(dtype, &sel, n, &xi.values, xi.m, got.as_mut_ptr(), ldy)
                });
                for r in 0..m {
                    for (i, &row) in rows.iter().enumerate() {
                        let mut lanes = [0f32; 8];
                        for p in 0..k {
                            let wv = w[row as usize * k + p];
                            lanes[p % 8] = wv.mul_add(x[r * k + p], lanes[p % 8]);
                        }
                        let want: f32 = lanes.iter().sum();
                        assert_eq!(
                            got[r * ldy + i].to_bits(),
                            want.to_bits(),
                            "{dtype:?}, {m} rows of {k}: row {r} output {i}"
                        );
                    }
                    assert!(got[r * ldy + n..(r + 1) * ldy].iter().all(|v| v.is_nan()));
                }
            }
        }
        let (bytes, _) = quantized(dtype, 9, 768);
        let sel = Rows {
            bytes: &bytes,
            row_bytes: 768 / dtype.block_size() * dtype.type_size(),
            map: Some(&map),
        };
        let k = 768;
        // One row and more than `MANY_ROWS` are not this kernel's.
        let mut y = [0f32; 1];
        // SAFETY: nothing is written when the call declines.
        assert!(!unsafe { dot_rows_many(dtype, &sel, 1, &random(k), 1, y.as_mut_ptr(), 1) });
        for m in [1, MANY_ROWS + 1] {
            assert!(Interleaved::new(&random(m * k), m).is_none());
        }
    }
}

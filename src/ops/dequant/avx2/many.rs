//! Products of 2–[`MANY_ROWS`] input rows (decode steps of several sequences) on AVX2, their
//! rows [`Interleaved`](super::super::Interleaved): the format's many-row kernel
//! (`kernels!`'s `*_many`).

use candle_core::quantized::GgmlDType;

use super::super::{Rows, MANY_ROWS};
use super::{
    available, q4_0_many, q4_1_many, q4_k_many, q5_0_many, q5_1_many, q5_k_many, q6_k_many,
    q8_0_many,
};

/// Positions per pass of the many-row kernels over a tile of [`TILE`] weight rows: 8 input
/// rows' 512 positions are 16 KiB, which stay in L1 while the tile's rows take them.
pub(super) const PASS: usize = 512;

/// Weight rows per tile of the many-row kernels; while a tile's rows are multiplied, the
/// same positions of the next tile's rows are prefetched.
pub(super) const TILE: usize = 16;

/// `y[r * ldy + i] = x[r] · rows.row(i)` for `m` input rows (`x` [`Interleaved`]), `i < n`, each
/// weight block dequantised into registers once for all `m` rows: the sums of the AVX2 and
/// portable decode tiles bit for bit (each an 8-lane multiply-add chain over the positions
/// in order, then the lanes added in order), without their dequantised strip. `false`
/// (nothing written) where this module lacks `dtype`, the CPU what it needs, or `m` is not
/// in `2..=MANY_ROWS`.
///
/// The kernels read `x` interleaved (each 32 positions of every row, one row after the
/// other), [`PASS`] positions at a time over a tile of [`TILE`] weight rows, with
/// each row's sums carried from pass to pass. 1B-shaped model at 8 sequences, 3 interleaved
/// rounds, tok/s: Q8_0 30 → 36 (interleaved) → 40 (passes) → 48 (next tile prefetched),
/// Q4_K_M 28 → 37 → 36 → 38. Rows `k` apart (8 or 32 KiB) fell in the same few sets of L1 and
/// evicted each other; the 8 rows' whole length (up to 256 KiB) was read back from L2 for
/// every weight row.
///
/// # Safety
/// `y` takes writes at `r * ldy + i` for `r < m`, `i < n`.
pub(in super::super) unsafe fn dot_rows_many(
    dtype: GgmlDType,
    rows: &Rows,
    n: usize,
    x: &[f32],
    m: usize,
    y: *mut f32,
    ldy: usize,
) -> bool {
    use GgmlDType::*;
    let format = matches!(dtype, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q5K | Q6K);
    if !available() || !(2..=MANY_ROWS).contains(&m) || !format {
        return false;
    }
    many(dtype, rows, n, x, m, y, ldy);
    true
}

/// [`dot_rows_many`] with `x` interleaved, for a format it has and `m` in `2..=MANY_ROWS`.
///
/// # Safety
/// As [`dot_rows_many`]; the CPU has what these kernels need.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn many(
    dtype: GgmlDType,
    rows: &Rows,
    n: usize,
    x: &[f32],
    m: usize,
    y: *mut f32,
    ldy: usize,
) {
    macro_rules! by_rows {
        ($f:ident) => {
            match m {
                2 => $f::<2>(rows, n, x, y, ldy),
                3 => $f::<3>(rows, n, x, y, ldy),
                4 => $f::<4>(rows, n, x, y, ldy),
                5 => $f::<5>(rows, n, x, y, ldy),
                6 => $f::<6>(rows, n, x, y, ldy),
                7 => $f::<7>(rows, n, x, y, ldy),
                _ => $f::<8>(rows, n, x, y, ldy),
            }
        };
    }
    // The CPU has what these kernels need, checked by the caller, which vouches for `y`.
    match dtype {
        GgmlDType::Q4_0 => by_rows!(q4_0_many),
        GgmlDType::Q4_1 => by_rows!(q4_1_many),
        GgmlDType::Q5_0 => by_rows!(q5_0_many),
        GgmlDType::Q5_1 => by_rows!(q5_1_many),
        GgmlDType::Q8_0 => by_rows!(q8_0_many),
        GgmlDType::Q4K => by_rows!(q4_k_many),
        GgmlDType::Q5K => by_rows!(q5_k_many),
        GgmlDType::Q6K => by_rows!(q6_k_many),
        _ => unreachable!("checked by the caller"),
    }
}

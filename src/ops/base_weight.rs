//! [`BaseWeight`]: what every projection, the embedding and `lm_head` hold: a dense candle
//! tensor (f32, or whatever `--dtype` converted to), or a [`StoredMatrix`] kept in its stored
//! format. Products, embedding lookups and the descriptions the start-up log and `/v1/models`
//! show, whichever it is.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::stored::{format_name, StoredMatrix};

/// A base weight, `[out, in]`: a dense tensor, or a matrix kept in its stored format.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    Dense(Tensor),
    Stored(Arc<StoredMatrix>),
}

impl BaseWeight {
    /// `x` `[m, in]` times this weight transposed: `[m, out]` (f32 for a stored matrix).
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(w) => super::small_matmul::matmul_t(x, w),
            BaseWeight::Stored(w) => super::small_matmul::matmul_t_stored(x, w),
        }
    }

    /// `x` times each of `ws` transposed (weights of one input, e.g. a layer's q, k and v):
    /// stored weights in one job of the kernels' threads
    /// ([`matmul_t_stored_many`](super::small_matmul::matmul_t_stored_many)), the same
    /// products as [`matmul_t`](Self::matmul_t) one at a time.
    pub fn matmul_t_many(ws: &[&BaseWeight], x: &Tensor) -> Result<Vec<Tensor>> {
        let stored: Option<Vec<&StoredMatrix>> = ws
            .iter()
            .map(|w| match w {
                BaseWeight::Stored(s) => Some(&**s),
                BaseWeight::Dense(_) => None,
            })
            .collect();
        match stored {
            Some(stored) => super::small_matmul::matmul_t_stored_many(x, &stored),
            None => ws.iter().map(|w| w.matmul_t(x)).collect(),
        }
    }

    /// The rows `ids` (an embedding lookup), in `dtype`.
    pub fn rows(&self, ids: &[u32], dtype: DType, device: &Device) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(w) => {
                let ids = Tensor::from_slice(ids, ids.len(), device)?;
                w.index_select(&ids, 0)
            }
            BaseWeight::Stored(w) => {
                let cols = w.cols();
                let mut out = vec![0f32; ids.len() * cols];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(cols)) {
                    let id = id as usize;
                    if id >= w.rows() {
                        candle_core::bail!("row {id} of a {}-row matrix", w.rows());
                    }
                    w.dequantize_rows(id, 1, row);
                }
                Tensor::from_vec(out, (ids.len(), cols), device)?.to_dtype(dtype)
            }
        }
    }

    /// The weight as f32 values, `[out, in]` (dequantised for a stored matrix).
    pub fn to_f32(&self) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(w) => w.to_dtype(DType::F32),
            BaseWeight::Stored(w) => w.dequantize_all(),
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            BaseWeight::Dense(w) => {
                let d = w.dims();
                (d[0], d[1])
            }
            BaseWeight::Stored(w) => (w.rows(), w.cols()),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            BaseWeight::Dense(w) => w.device().clone(),
            BaseWeight::Stored(_) => Device::Cpu,
        }
    }

    /// The dtype products with this weight come out in.
    pub fn dtype(&self) -> DType {
        match self {
            BaseWeight::Dense(w) => w.dtype(),
            BaseWeight::Stored(_) => DType::F32,
        }
    }

    /// The format's name as llama.cpp writes it (`Q4_K`, `F32`, `BF16`, …).
    pub fn format(&self) -> &'static str {
        match self {
            BaseWeight::Dense(w) => match w.dtype() {
                DType::F32 => "F32",
                DType::F16 => "F16",
                DType::BF16 => "BF16",
                DType::F64 => "F64",
                _ => "other",
            },
            BaseWeight::Stored(w) => format_name(w.dtype()),
        }
    }

    /// Bytes the values occupy in memory (or in the mapped file).
    pub fn bytes(&self) -> usize {
        match self {
            BaseWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            BaseWeight::Stored(w) => w.storage_bytes(),
        }
    }
}

//! Per-sequence key/value cache.

use candle_core::{Result, Tensor};

/// Keys and values of one sequence for every layer, each `[num_kv_heads, len, head_dim]`.
///
/// Owned by whoever owns the sequence (the engine's worker); the model appends to it during a
/// forward pass. A forward that fails half-way is rolled back at the start of the next one, so
/// the cache always holds exactly `len()` positions.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Positions held (prompt and generated tokens already run through the model).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes held by the cached tensors.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Drop anything a failed forward appended past `len`.
    pub(crate) fn rollback(&mut self) -> Result<()> {
        let len = self.len;
        for slot in self.layers.iter_mut() {
            if let Some((k, v)) = slot {
                if k.dim(1)? != len {
                    *slot = if len == 0 {
                        None
                    } else {
                        Some((k.narrow(1, 0, len)?, v.narrow(1, 0, len)?))
                    };
                }
            }
        }
        Ok(())
    }

    /// Append `[num_kv_heads, n, head_dim]` keys and values to `layer`; returns the whole
    /// cached keys and values of that layer, contiguous.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let slot = &mut self.layers[layer];
        let (k, v) = match slot.take() {
            None => (k.contiguous()?, v.contiguous()?),
            Some((ck, cv)) => (Tensor::cat(&[&ck, k], 1)?, Tensor::cat(&[&cv, v], 1)?),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Record that a forward over `n` new positions completed on every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

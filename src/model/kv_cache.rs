//! Per-sequence key/value cache.

use candle_core::{Result, Tensor};

/// Keys and values of one sequence for every layer, each `[num_kv_heads, len, head_dim]`.
///
/// Owned by whoever owns the sequence (the engine's worker); the model appends to it during a
/// forward pass. A forward that fails half-way is rolled back at the start of the next one, so
/// the cache always holds exactly `len()` positions.
///
/// Each layer's keys and values live in buffers `[num_kv_heads, capacity, head_dim]` written
/// in place, whose capacity doubles when full: appending one token copies one token (the
/// concatenation it replaced copied the whole cache every step, 6% of decode time at 8
/// sequences and growing with length). Not `Clone`: clones would share the buffers written in
/// place.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
}

#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    /// Positions written (may run ahead of `KvCache::len` until a forward completes).
    used: usize,
}

/// The smallest buffer a layer starts with, in positions.
const MIN_CAPACITY: usize = 64;

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
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
            .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// Drop anything a failed forward appended past `len`.
    pub(crate) fn rollback(&mut self) -> Result<()> {
        let len = self.len;
        for slot in self.layers.iter_mut() {
            if let Some(l) = slot {
                l.used = l.used.min(len);
                if l.used == 0 {
                    *slot = None;
                }
            }
        }
        Ok(())
    }

    /// Append `[num_kv_heads, n, head_dim]` keys and values to `layer`; returns the whole
    /// cached keys and values of that layer, `[num_kv_heads, len, head_dim]` views of the
    /// buffers (each head's rows contiguous).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (heads, n, hd) = k.dims3()?;
        let slot = &mut self.layers[layer];
        let used = slot.as_ref().map_or(0, |l| l.used);
        let cap = slot.as_ref().map_or(0, |l| l.k.dim(1).unwrap_or(0));
        if used + n > cap {
            let new_cap = (used + n).max(2 * cap).max(MIN_CAPACITY);
            let grow = |old: Option<&Tensor>, like: &Tensor| -> Result<Tensor> {
                let buf = Tensor::zeros((heads, new_cap, hd), like.dtype(), like.device())?;
                if let Some(old) = old {
                    if used > 0 {
                        buf.slice_set(&old.narrow(1, 0, used)?.contiguous()?, 1, 0)?;
                    }
                }
                Ok(buf)
            };
            let (nk, nv) = (
                grow(slot.as_ref().map(|l| &l.k), k)?,
                grow(slot.as_ref().map(|l| &l.v), v)?,
            );
            *slot = Some(LayerKv { k: nk, v: nv, used });
        }
        let l = slot.as_mut().expect("allocated above");
        l.k.slice_set(&k.contiguous()?, 1, used)?;
        l.v.slice_set(&v.contiguous()?, 1, used)?;
        l.used = used + n;
        Ok((l.k.narrow(1, 0, l.used)?, l.v.narrow(1, 0, l.used)?))
    }

    /// A copy of positions `start..start + n` (all held) of `layer`'s keys and values, each
    /// `[num_kv_heads, n, head_dim]`, sharing nothing with the buffers.
    pub(crate) fn positions(
        &self,
        layer: usize,
        start: usize,
        n: usize,
    ) -> Result<(Tensor, Tensor)> {
        if start + n > self.len {
            candle_core::bail!(
                "positions {start}..{} of a cache of {}",
                start + n,
                self.len
            );
        }
        let l = self.layers[layer]
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg(format!("layer {layer} holds nothing")))?;
        Ok((
            l.k.narrow(1, start, n)?.force_contiguous()?,
            l.v.narrow(1, start, n)?.force_contiguous()?,
        ))
    }

    /// Record that a forward over `n` new positions completed on every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Appends of every size, across several capacity doublings, hold exactly what
    /// concatenation would; a rolled-back append is overwritten by the next one.
    #[test]
    fn grows_in_place_and_rolls_back() {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(1);
        let mut all_k: Vec<Tensor> = Vec::new();
        for (i, n) in [1usize, 5, 70, 1, 1, 130, 3].into_iter().enumerate() {
            let k = Tensor::randn(0f32, 1.0, (2, n, 4), &dev).unwrap();
            let v = (&k * 2.0).unwrap();
            if i == 4 {
                // A forward that fails after appending: rolled back, then redone.
                cache.append(0, &(&k + 100.0).unwrap(), &v).unwrap();
                cache.rollback().unwrap();
            }
            let (ck, cv) = cache.append(0, &k, &v).unwrap();
            cache.advance(n);
            all_k.push(k);
            let want = Tensor::cat(&all_k, 1).unwrap();
            assert_eq!(ck.dims(), want.dims());
            let dk = (ck - &want).unwrap().abs().unwrap().sum_all().unwrap();
            let dv = (cv - (&want * 2.0).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap();
            assert_eq!(dk.to_scalar::<f32>().unwrap(), 0.0, "keys after append {i}");
            assert_eq!(
                dv.to_scalar::<f32>().unwrap(),
                0.0,
                "values after append {i}"
            );
        }
        assert_eq!(cache.len(), 211);
        assert!(cache.bytes() >= 2 * 2 * 211 * 4 * 4);
    }
}

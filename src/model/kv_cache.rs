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
///
/// A layer with a sliding window `w` keeps only what a later query can still see: before an
/// append at position `p`, positions below `p + 1 − w` are dropped (moved out of the buffer
/// when it would otherwise grow), so its memory stays within about twice `w` plus one chunk,
/// however long the sequence. Such a layer's views start at `LayerView::start`.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    windows: Vec<Option<usize>>,
    len: usize,
}

#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    /// Absolute position of the buffer's first row (0 unless a window dropped positions).
    start: usize,
    /// Absolute positions written (may run ahead of `KvCache::len` until a forward completes).
    used: usize,
}

/// One layer's cached keys and values after an append: `[num_kv_heads, used − start,
/// head_dim]` views of the buffers, the first row at absolute position `start`.
pub struct LayerView {
    pub k: Tensor,
    pub v: Tensor,
    pub start: usize,
}

/// The smallest buffer a layer starts with, in positions.
const MIN_CAPACITY: usize = 64;

impl KvCache {
    /// A cache without windows.
    pub fn new(num_layers: usize) -> Self {
        Self::with_windows(vec![None; num_layers])
    }

    /// A cache whose layer `i` keeps the window `windows[i]` (`None`: every position).
    pub fn with_windows(windows: Vec<Option<usize>>) -> Self {
        Self {
            layers: windows.iter().map(|_| None).collect(),
            windows,
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
                l.used = l.used.min(len).max(l.start);
                if l.used == 0 {
                    *slot = None;
                }
            }
        }
        Ok(())
    }

    /// Append `[num_kv_heads, n, head_dim]` keys and values to `layer`; returns the layer's
    /// cached keys and values (see [`LayerView`]; each head's rows contiguous).
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<LayerView> {
        let (heads, n, hd) = k.dims3()?;
        let window = self.windows[layer];
        let slot = &mut self.layers[layer];
        let (start, used) = slot.as_ref().map_or((0, 0), |l| (l.start, l.used));
        let cap = slot.as_ref().map_or(0, |l| l.k.dim(1).unwrap_or(0));
        // What the first new query (at `used`) can still see.
        let keep = window.map_or(start, |w| (used + 1).saturating_sub(w).max(start));
        if used + n - start > cap {
            let (old_k, old_v) = match slot.as_ref() {
                Some(l) => (Some(&l.k), Some(&l.v)),
                None => (None, None),
            };
            let held = used - keep;
            // Grow, or (with a window) move the rows still seen to the front of a buffer of
            // the same size when they fit there.
            let new_cap = if held + n <= cap {
                cap
            } else {
                (held + n).max(2 * cap).max(MIN_CAPACITY)
            };
            let moved = |old: Option<&Tensor>, like: &Tensor| -> Result<Tensor> {
                let buf = Tensor::zeros((heads, new_cap, hd), like.dtype(), like.device())?;
                if let Some(old) = old {
                    if held > 0 {
                        buf.slice_set(&old.narrow(1, keep - start, held)?.contiguous()?, 1, 0)?;
                    }
                }
                Ok(buf)
            };
            let (nk, nv) = (moved(old_k, k)?, moved(old_v, v)?);
            *slot = Some(LayerKv {
                k: nk,
                v: nv,
                start: keep,
                used,
            });
        }
        let l = slot.as_mut().expect("allocated above");
        l.k.slice_set(&k.contiguous()?, 1, l.used - l.start)?;
        l.v.slice_set(&v.contiguous()?, 1, l.used - l.start)?;
        l.used += n;
        let rows = l.used - l.start;
        Ok(LayerView {
            k: l.k.narrow(1, 0, rows)?,
            v: l.v.narrow(1, 0, rows)?,
            start: l.start,
        })
    }

    /// A copy of positions `start..start + n` of `layer`'s keys and values, each
    /// `[num_kv_heads, n, head_dim]`, sharing nothing with the buffers.
    ///
    /// A windowed layer may have dropped the first of them. That is allowed only where no
    /// query after the last of them can see what was dropped (the query at `start + n` sees
    /// keys from `start + n + 1 − w` on); those rows come back as zeros, which every later
    /// query's window masks. Otherwise (a copy taken too late) it is an error.
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
        if start >= l.start {
            return Ok((
                l.k.narrow(1, start - l.start, n)?.force_contiguous()?,
                l.v.narrow(1, start - l.start, n)?.force_contiguous()?,
            ));
        }
        let unseen = match self.windows[layer] {
            Some(w) => (start + n + 1).saturating_sub(w),
            None => 0,
        };
        if l.start > unseen {
            candle_core::bail!(
                "positions {start}..{} of layer {layer} are no longer held (it keeps {}..)",
                start + n,
                l.start
            );
        }
        let dropped = (l.start - start).min(n);
        let part = |t: &Tensor| -> Result<Tensor> {
            let (heads, _, hd) = t.dims3()?;
            let zeros = Tensor::zeros((heads, dropped, hd), t.dtype(), t.device())?;
            if dropped == n {
                return Ok(zeros);
            }
            Tensor::cat(&[zeros, t.narrow(1, 0, n - dropped)?.contiguous()?], 1)
        };
        Ok((part(&l.k)?, part(&l.v)?))
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
            let view = cache.append(0, &k, &v).unwrap();
            let (ck, cv) = (view.k, view.v);
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

#[cfg(test)]
mod window_tests {
    use super::*;
    use candle_core::Device;

    /// A windowed layer holds what later queries see, and its buffer stops growing: after
    /// 1000 single-token appends with a window of 16 it is at most a minimum buffer, and the
    /// view's rows are exactly the last positions, at the start it reports.
    #[test]
    fn window_bounds_memory_and_keeps_the_last_positions() {
        let dev = Device::Cpu;
        let mut cache = KvCache::with_windows(vec![Some(16), None]);
        let mut all = Vec::new();
        for step in 0..1000usize {
            let n = if step % 97 == 0 { 40 } else { 1 };
            let k = Tensor::randn(0f32, 1.0, (2, n, 4), &dev).unwrap();
            all.push(k.clone());
            let pos = cache.len();
            let view = cache.append(0, &k, &k).unwrap();
            let full = cache.append(1, &k, &k).unwrap();
            cache.advance(n);
            assert!(view.start <= (pos + 1).saturating_sub(16), "step {step}");
            assert_eq!(view.start + view.k.dim(1).unwrap(), pos + n);
            assert_eq!(full.start, 0);
            let want = Tensor::cat(&all, 1).unwrap();
            let want = want.narrow(1, view.start, pos + n - view.start).unwrap();
            let d = (view.k - want).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "step {step}");
        }
        let windowed = cache.layers[0].as_ref().unwrap().k.dim(1).unwrap();
        assert!(windowed <= 2 * (16 + 40) + MIN_CAPACITY, "{windowed} rows");
        // Old positions of the windowed layer are gone (a later query could need them: an
        // error, not zeros); the full layer still has them.
        assert!(cache.positions(0, 0, 16).is_err());
        assert!(cache.positions(1, 0, 16).is_ok());
    }

    /// A block partly older than the window comes back with zeros where it was dropped, but
    /// only when no query after the block can see those rows.
    #[test]
    fn a_partly_dropped_block_is_zero_padded_only_where_unseen() {
        let dev = Device::Cpu;
        let mut cache = KvCache::with_windows(vec![Some(8)]);
        let k = Tensor::randn(0f32, 1.0, (1, 24, 2), &dev).unwrap();
        cache.append(0, &k, &k).unwrap();
        cache.advance(24);
        let k2 = Tensor::randn(0f32, 1.0, (1, 48, 2), &dev).unwrap();
        let view = cache.append(0, &k2, &k2).unwrap();
        cache.advance(48);
        // Appending at 24 kept keys from 17: the buffer was not full, so nothing moved yet;
        // force a move with another append that does not fit.
        assert!(view.start <= 17);
        let k3 = Tensor::randn(0f32, 1.0, (1, 200, 2), &dev).unwrap();
        let view = cache.append(0, &k3, &k3).unwrap();
        cache.advance(200);
        assert_eq!(view.start, 72 - 7);
        // Block 64..80: rows 64 (dropped) … 79; the query at 80 sees keys from 73 on.
        let (got, _) = cache.positions(0, 64, 16).unwrap();
        let want = Tensor::cat(&[&k2, &k3], 1)
            .unwrap()
            .narrow(1, 40, 16)
            .unwrap();
        let d = (got.narrow(1, 1, 15).unwrap() - want.narrow(1, 1, 15).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
        let z = got
            .narrow(1, 0, 1)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(z.to_scalar::<f32>().unwrap(), 0.0);
        // Block 48..64: the query at 64 sees keys from 57, which were dropped: refused.
        assert!(cache.positions(0, 48, 16).is_err());
    }
}

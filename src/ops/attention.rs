//! Attention of one new token over a sequence's cached keys and values, on the CPU.
//!
//! A decode step attends each sequence's single query row over its cache: per kv head a
//! `[groups, hd] × [hd, len]` product, a softmax and a `[groups, len] × [len, hd]` product.
//! candle's gemm costs more to set up for these than they cost to compute (7–8% of decode at
//! 8 sequences once the cache became a strided view of a growing buffer), so here they are
//! three loops over the cache rows. Prefill (several query rows, a causal mask) stays on
//! candle's ops, which remain the reference.

use candle_core::{DType, Result, Storage, Tensor};

/// `softmax(q·kᵀ · scale)·v` for `q` `[heads, 1, hd]` and `k`, `v` `[kv_heads, len, hd]` (rows
/// contiguous, any head stride), query head `h` reading kv head `h / (heads / kv_heads)`.
/// `None` where it does not apply (other devices, dtypes or layouts).
pub fn decode(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Option<Tensor>> {
    let (Ok((nh, 1, hd)), Ok((kvh, len, hd2))) = (q.dims3(), k.dims3()) else {
        return Ok(None);
    };
    if hd != hd2 || v.dims() != k.dims() || kvh == 0 || nh % kvh != 0 || len == 0 {
        return Ok(None);
    }
    if [q, k, v]
        .iter()
        .any(|t| t.dtype() != DType::F32 || !super::kernels::fast_on(t.device()))
    {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
        return Ok(None);
    };
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[1] != hd || kst[2] != 1 || vst[1] != hd || vst[2] != 1 {
        return Ok(None);
    }
    let q = &qs.as_slice::<f32>()?[ql.start_offset()..ql.start_offset() + nh * hd];
    let (kall, vall) = (ks.as_slice::<f32>()?, vs.as_slice::<f32>()?);
    let rows = |all, start: usize, head_stride: usize, g: usize| {
        head_rows(all, start + g * head_stride, len * hd)
    };
    let groups = nh / kvh;
    let mut out = vec![0f32; nh * hd];
    let mut scores = vec![0f32; len];
    for g in 0..kvh {
        let (Some(kg), Some(vg)) = (
            rows(kall, kl.start_offset(), kst[0], g),
            rows(vall, vl.start_offset(), vst[0], g),
        ) else {
            return Ok(None);
        };
        for h in g * groups..(g + 1) * groups {
            let qh = &q[h * hd..(h + 1) * hd];
            let mut max = f32::NEG_INFINITY;
            for (s, krow) in scores.iter_mut().zip(kg.chunks_exact(hd)) {
                *s = dot(qh, krow) * scale;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[h * hd..(h + 1) * hd];
            for (&p, vrow) in scores.iter().zip(vg.chunks_exact(hd)) {
                let p = p / sum;
                for (oi, &vi) in o.iter_mut().zip(vrow) {
                    *oi += p * vi;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(
        out,
        (nh, 1, hd),
        &candle_core::Device::Cpu,
    )?))
}

/// `len` values of `all` from `at`, or `None` if the layout points outside the storage.
fn head_rows(all: &[f32], at: usize, len: usize) -> Option<&[f32]> {
    all.get(at..at + len)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = 0f32;
    for (x, y) in ac.remainder().iter().zip(bc.remainder()) {
        tail += x * y;
    }
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against candle's ops (as the prefill path computes it), with grouped query heads and
    /// keys and values that are views into larger buffers, as the KV cache returns them.
    #[test]
    fn equals_candle_attention_on_strided_cache_views() {
        let dev = Device::Cpu;
        let (nh, kvh, hd, cap) = (6, 2, 16, 40);
        for len in [1, 7, 33] {
            let q = Tensor::randn(0f32, 1.0, (nh, 1, hd), &dev).unwrap();
            let kb = Tensor::randn(0f32, 1.0, (kvh, cap, hd), &dev).unwrap();
            let vb = Tensor::randn(0f32, 1.0, (kvh, cap, hd), &dev).unwrap();
            let (k, v) = (kb.narrow(1, 0, len).unwrap(), vb.narrow(1, 0, len).unwrap());
            let scale = 1.0 / (hd as f32).sqrt();
            let got = decode(&q, &k, &v, scale).unwrap().expect("applies");
            let qg = q.reshape((kvh, nh / kvh, hd)).unwrap();
            let att = (qg.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
            let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
            let want = att.matmul(&v).unwrap().reshape((nh, 1, hd)).unwrap();
            let d = crate::ops::max_abs_diff(&got, &want);
            assert!(d < 1e-5, "len {len}: {d}");
        }
    }
}

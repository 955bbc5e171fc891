//! Attention of one new token over a sequence's cached keys and values, on the CPU.
//!
//! A decode step attends each sequence's single query row over its cache: per kv head a
//! `[groups, hd] × [hd, len]` product, a softmax and a `[groups, len] × [len, hd]` product.
//! candle's gemm costs more to set up for these than they cost to compute (7–8% of decode at
//! 8 sequences once the cache became a strided view of a growing buffer), so here they are
//! three loops over the cache rows.
//!
//! A prefill chunk (several query rows, causal) is tiled flash-style ([`prefill`]): per query
//! head and block of [`BQ`] query rows, the keys are read in blocks of [`BK`] with an online
//! softmax (running max and sum, the output rescaled when the max grows), so no `len × total`
//! score matrix is ever formed and keys past a row's position are never read. Parts run on
//! [`crate::ops::pool`]. candle's ops (scores, mask, softmax, product) remain the reference and the
//! path of every other device and dtype.

use candle_core::{DType, Result, Storage, Tensor};

mod prefill;

pub use prefill::{exp, prefill, BK, BQ};

/// What shapes the scores besides `q·kᵀ`: the scale, Gemma 2's soft-cap, and which keys a
/// query sees (a sliding window over keys whose first row sits at `key_start`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// Scores are `q·kᵀ · scale`.
    pub scale: f32,
    /// Then `cap · tanh(score / cap)`.
    pub softcap: Option<f32>,
    /// Query at position `p` sees keys `p − window + 1 ..= p` (and `0 ..= p` without one).
    pub window: Option<usize>,
    /// Absolute position of the first key row given.
    pub key_start: usize,
}

impl Scores {
    /// Plain causal attention over keys from position 0.
    pub fn causal(scale: f32) -> Self {
        Scores {
            scale,
            softcap: None,
            window: None,
            key_start: 0,
        }
    }

    /// The first key row (relative to `key_start`) the query at absolute position `p` sees.
    #[inline]
    pub fn first_key(&self, p: usize) -> usize {
        match self.window {
            Some(w) => (p + 1).saturating_sub(w).saturating_sub(self.key_start),
            None => 0,
        }
    }

    /// A raw `q·k` made a score.
    #[inline(always)]
    fn score(&self, dot: f32) -> f32 {
        let s = dot * self.scale;
        match self.softcap {
            Some(cap) => cap * (s / cap).tanh(),
            None => s,
        }
    }
}

/// `softmax(q·kᵀ · scale)·v` for `q` `[heads, 1, hd]` and `k`, `v` `[kv_heads, len, hd]` (rows
/// contiguous, any head stride), query head `h` reading kv head `h / (heads / kv_heads)`; the
/// query sits at the last key's position, and sees the keys `sc` allows.
/// `None` where it does not apply (other devices, dtypes or layouts).
pub fn decode(q: &Tensor, k: &Tensor, v: &Tensor, sc: &Scores) -> Result<Option<Tensor>> {
    let (Ok((nh, 1, _)), Ok((_, len, hd))) = (q.dims3(), k.dims3()) else {
        return Ok(None);
    };
    let Some(out) = with_views(q, k, v, |q, heads_kv| {
        let mut out = vec![0f32; nh * hd];
        let mut scores = vec![0f32; len];
        let groups = nh / heads_kv.len();
        for (g, &(kg, vg)) in heads_kv.iter().enumerate() {
            let at = g * groups * hd;
            let out = &mut out[at..at + groups * hd];
            decode_group(&q[at..at + groups * hd], kg, vg, hd, sc, &mut scores, out);
        }
        out
    })?
    else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(
        out,
        (nh, 1, hd),
        &candle_core::Device::Cpu,
    )?))
}

/// One decode step of several sequences at once: `q` `[n, heads, hd]` holds one query row per
/// sequence, and `kv[i]` sequence `i`'s cached keys and values `[kv_heads, len_i, hd]` (any
/// head stride) with the scores that shape them. Returns `[n, heads · hd]`, each row what
/// [`decode`] gives for that sequence alone, bit for bit; the `(sequence, kv head)` pairs run
/// as parts on the helper pool (`ops::pool`). `None` where it does not apply.
pub fn decode_batch(q: &Tensor, kv: &[(&Tensor, &Tensor, Scores)]) -> Result<Option<Tensor>> {
    let Ok((n, nh, hd)) = q.dims3() else {
        return Ok(None);
    };
    if n != kv.len() || n == 0 || q.dtype() != DType::F32 || !super::kernels::fast_on(q.device()) {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let Some(qv) = super::cpu::view(&q) else {
        return Ok(None);
    };
    let qall = qv.values();
    // Hold every cache's storage for as long as the parts read it.
    let mut held = Vec::with_capacity(n);
    for (k, v, _) in kv {
        let Ok((kvh, keys, hd2)) = k.dims3() else {
            return Ok(None);
        };
        if hd2 != hd || v.dims() != k.dims() || kvh == 0 || nh % kvh != 0 || keys == 0 {
            return Ok(None);
        }
        if [k, v]
            .iter()
            .any(|t| t.dtype() != DType::F32 || !super::kernels::fast_on(t.device()))
        {
            return Ok(None);
        }
        held.push((k.storage_and_layout(), v.storage_and_layout(), kvh, keys));
    }
    let mut seqs = Vec::with_capacity(n);
    for ((ks, kl), (vs, vl), kvh, keys) in &held {
        let Some(heads) = kv_heads(ks, kl, vs, vl, *kvh, *keys, hd)? else {
            return Ok(None);
        };
        seqs.push(heads);
    }
    let kvh = seqs[0].len();
    if seqs.iter().any(|h| h.len() != kvh) {
        return Ok(None);
    }
    let groups = nh / kvh;
    let mut out = vec![0f32; n * nh * hd];
    let dst = super::cpu::Out(out.as_mut_ptr());
    let seqs = &seqs;
    super::pool::run(n * kvh, &|part| {
        let (i, g) = (part / kvh, part % kvh);
        let (kg, vg) = seqs[i][g];
        let at = (i * nh + g * groups) * hd;
        // SAFETY: `out` has `n · nh · hd` values and part `(i, g)` alone writes the `groups`
        // heads of kv head `g` in row `i`.
        let o = unsafe { dst.slice(at, groups * hd) };
        SCORES.with(|s| {
            let mut s = s.borrow_mut();
            let len = kg.len() / hd;
            if s.len() < len {
                s.resize(len, 0.0);
            }
            decode_group(
                &qall[at..at + groups * hd],
                kg,
                vg,
                hd,
                &kv[i].2,
                &mut s[..len],
                o,
            );
        });
    });
    Ok(Some(Tensor::from_vec(
        out,
        (n, nh * hd),
        &candle_core::Device::Cpu,
    )?))
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

simd_dispatch!(
    /// The query heads `q` (`groups · hd` values) that read one kv head's `kg`, `vg` (`len ·
    /// hd` each, `scores` has `len` values), written into `out` (`groups · hd`, zeroed).
    /// Compiled for the vector extensions the CPU has: the same operations in the same order
    /// (no multiply-add is fused), so the same values as the baseline build, 4 lanes wide
    /// there and 16 here.
    fn decode_group(
        q: &[f32],
        kg: &[f32],
        vg: &[f32],
        hd: usize,
        sc: &Scores,
        scores: &mut [f32],
        out: &mut [f32],
    ) = decode_group_plain
);

#[inline(always)]
fn decode_group_plain(
    q: &[f32],
    kg: &[f32],
    vg: &[f32],
    hd: usize,
    sc: &Scores,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let len = kg.len() / hd;
    let lo = sc.first_key(sc.key_start + len - 1);
    let (kg, vg, scores) = (&kg[lo * hd..], &vg[lo * hd..], &mut scores[lo..]);
    for (qh, o) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
        let mut max = f32::NEG_INFINITY;
        for (s, krow) in scores.iter_mut().zip(kg.chunks_exact(hd)) {
            *s = sc.score(dot(qh, krow));
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        for (&p, vrow) in scores.iter().zip(vg.chunks_exact(hd)) {
            let p = p / sum;
            for (oi, &vi) in o.iter_mut().zip(vrow) {
                *oi += p * vi;
            }
        }
    }
}

/// One kv head's key rows and value rows.
type HeadRows<'a> = (&'a [f32], &'a [f32]);

/// Each kv head's key and value rows (`keys · hd` values each) in the storages of `k` and `v`
/// (`[kv_heads, keys, hd]`, rows contiguous, any head stride); `None` for other layouts.
fn kv_heads<'a>(
    ks: &'a Storage,
    kl: &candle_core::Layout,
    vs: &'a Storage,
    vl: &candle_core::Layout,
    kvh: usize,
    keys: usize,
    hd: usize,
) -> Result<Option<Vec<HeadRows<'a>>>> {
    let (Storage::Cpu(ks), Storage::Cpu(vs)) = (ks, vs) else {
        return Ok(None);
    };
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[1] != hd || kst[2] != 1 || vst[1] != hd || vst[2] != 1 {
        return Ok(None);
    }
    let (kall, vall) = (ks.as_slice::<f32>()?, vs.as_slice::<f32>()?);
    let mut heads_kv = Vec::with_capacity(kvh);
    for g in 0..kvh {
        let (Some(kg), Some(vg)) = (
            head_rows(kall, kl.start_offset() + g * kst[0], keys * hd),
            head_rows(vall, vl.start_offset() + g * vst[0], keys * hd),
        ) else {
            return Ok(None);
        };
        heads_kv.push((kg, vg));
    }
    Ok(Some(heads_kv))
}

/// The f32 CPU slices attention reads, handed to `f`: `q`'s rows (`[heads, rows, hd]`, made
/// contiguous) and each kv head's key and value rows (`keys · hd`, from views with contiguous
/// rows and any head stride). `None` where the fast paths do not apply (other devices, dtypes
/// or layouts, shapes that do not match).
fn with_views<R>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    f: impl FnOnce(&[f32], &[(&[f32], &[f32])]) -> R,
) -> Result<Option<R>> {
    let (Ok((nh, rows, hd)), Ok((kvh, keys, hd2))) = (q.dims3(), k.dims3()) else {
        return Ok(None);
    };
    if hd != hd2 || v.dims() != k.dims() || kvh == 0 || nh % kvh != 0 || rows == 0 || keys == 0 {
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
    let Storage::Cpu(qs) = &*qs else {
        return Ok(None);
    };
    let Some(heads_kv) = kv_heads(&ks, kl, &vs, vl, kvh, keys, hd)? else {
        return Ok(None);
    };
    let qall = &qs.as_slice::<f32>()?[ql.start_offset()..ql.start_offset() + nh * rows * hd];
    Ok(Some(f(qall, &heads_kv)))
}

/// `len` values of `all` from `at`, or `None` if the layout points outside the storage.
fn head_rows(all: &[f32], at: usize, len: usize) -> Option<&[f32]> {
    all.get(at..at + len)
}

#[inline(always)]
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
            let got = decode(&q, &k, &v, &Scores::causal(scale))
                .unwrap()
                .expect("applies");
            let qg = q.reshape((kvh, nh / kvh, hd)).unwrap();
            let att = (qg.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
            let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
            let want = att.matmul(&v).unwrap().reshape((nh, 1, hd)).unwrap();
            let d = crate::ops::max_abs_diff(&got, &want);
            assert!(d < 1e-5, "len {len}: {d}");
        }
    }

    /// A batch of sequences of different lengths, windows and key starts gives, row by row,
    /// what each sequence gives alone (bit for bit), on cache views with a head stride.
    #[test]
    fn a_decode_batch_equals_each_sequence_alone() {
        let dev = Device::Cpu;
        let (nh, kvh, hd, cap) = (6, 2, 16, 48);
        let lens = [1usize, 5, 17, 33, 40];
        let q = Tensor::randn(0f32, 1.0, (lens.len(), nh, hd), &dev).unwrap();
        let mut caches = Vec::new();
        for &len in &lens {
            let kb = Tensor::randn(0f32, 1.0, (kvh, cap, hd), &dev).unwrap();
            let vb = Tensor::randn(0f32, 1.0, (kvh, cap, hd), &dev).unwrap();
            let (k, v) = (kb.narrow(1, 0, len).unwrap(), vb.narrow(1, 0, len).unwrap());
            let sc = Scores {
                scale: 0.25,
                softcap: (len % 2 == 1).then_some(5.0),
                window: (len > 16).then_some(9),
                key_start: len / 4,
            };
            caches.push((k, v, sc));
        }
        let kv: Vec<_> = caches.iter().map(|(k, v, sc)| (k, v, *sc)).collect();
        let got = decode_batch(&q, &kv).unwrap().expect("applies");
        assert_eq!(got.dims(), &[lens.len(), nh * hd]);
        for (i, (k, v, sc)) in caches.iter().enumerate() {
            let qi = q.get(i).unwrap().reshape((nh, 1, hd)).unwrap();
            let alone = decode(&qi, k, v, sc).unwrap().expect("applies");
            let a = alone.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = got.get(i).unwrap().to_vec1::<f32>().unwrap();
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "row {i}"
            );
            let pos = sc.key_start + k.dim(1).unwrap() - 1;
            let want = reference_with(&qi, k, v, pos, sc);
            let d = crate::ops::max_abs_diff(&alone, &want);
            assert!(d < 1e-5, "row {i}: {d}");
        }
        let other = Tensor::randn(0f32, 1.0, (2, nh, hd), &dev).unwrap();
        assert!(decode_batch(&other, &kv).unwrap().is_none());
    }

    /// candle's masked attention, as `Decoder::attend` computes it off the fast path.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, pos: usize, scale: f32) -> Tensor {
        reference_with(q, k, v, pos, &Scores::causal(scale))
    }

    /// The same with a window, soft-cap and keys starting at `sc.key_start`: the mask and cap
    /// written out on the full score matrix.
    fn reference_with(q: &Tensor, k: &Tensor, v: &Tensor, pos: usize, sc: &Scores) -> Tensor {
        let (nh, len, hd) = q.dims3().unwrap();
        let (kvh, total, _) = k.dims3().unwrap();
        let groups = nh / kvh;
        let qg = q.reshape((kvh, groups * len, hd)).unwrap();
        let att = (qg.matmul(&k.t().unwrap()).unwrap() * sc.scale as f64).unwrap();
        let att = match sc.softcap {
            Some(cap) => ((att / cap as f64).unwrap().tanh().unwrap() * cap as f64).unwrap(),
            None => att,
        };
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    let (p, kj) = (pos + i, sc.key_start + j);
                    let seen = kj <= p && sc.window.is_none_or(|w| kj + w > p);
                    if seen {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (len, total), q.device()).unwrap();
        let att = att
            .reshape((kvh, groups, len, total))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap()
            .reshape((kvh, groups * len, total))
            .unwrap();
        let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
        att.matmul(&v.contiguous().unwrap())
            .unwrap()
            .reshape((nh, len, hd))
            .unwrap()
    }

    /// Sliding windows (smaller and larger than a key block, with keys that start past 0 as
    /// a windowed cache's views do) and Gemma 2's soft-cap, in prefill and decode, against
    /// the mask and cap written out.
    #[test]
    fn windows_and_softcap_equal_the_written_out_mask() {
        let dev = Device::Cpu;
        let cases = [
            // (heads, kv heads, hd, key_start, pos, len, window, softcap)
            (4, 2, 16, 0, 0, 40, Some(8), None),
            (4, 2, 16, 0, 0, 40, Some(8), Some(5.0)),
            (4, 1, 32, 3, 20, 70, Some(17), None),
            (6, 2, 64, 100, 150, 130, Some(100), Some(50.0)),
            (4, 4, 64, 0, 5, 33, None, Some(2.0)),
            (2, 1, 256, 10, 70, 1, Some(64), None),
            (2, 1, 16, 0, 0, 200, Some(1), None),
        ];
        for (nh, kvh, hd, key_start, pos, len, window, softcap) in cases {
            let total = pos + len - key_start;
            let q = Tensor::randn(0f32, 1.0, (nh, len, hd), &dev).unwrap();
            let k = (Tensor::randn(0f32, 1.0, (kvh, total, hd), &dev).unwrap() * 3.0).unwrap();
            let v = Tensor::randn(0f32, 1.0, (kvh, total, hd), &dev).unwrap();
            let sc = Scores {
                scale: 1.0 / (hd as f32).sqrt(),
                softcap,
                window,
                key_start,
            };
            let want = reference_with(&q, &k, &v, pos, &sc);
            let got = prefill(&q, &k, &v, pos, &sc).unwrap().expect("applies");
            let d = crate::ops::max_abs_diff(&got, &want);
            let case = format!("hd {hd}, keys from {key_start}, pos {pos}, len {len}, window {window:?}, cap {softcap:?}");
            assert!(d < 2e-5, "prefill, {case}: {d}");
            // Decode of the last row alone, over the same keys.
            let q1 = q.narrow(1, len - 1, 1).unwrap();
            let got = decode(&q1, &k, &v, &sc).unwrap().expect("applies");
            let want = want.narrow(1, len - 1, 1).unwrap();
            let d = crate::ops::max_abs_diff(&got, &want);
            assert!(d < 2e-5, "decode, {case}: {d}");
        }
    }

    /// Flash-style prefill against candle's masked attention: odd lengths around the query
    /// and key block sizes, chunks that start mid-sequence (and mid-block), GQA ratios 1, 3
    /// and 4, every supported head size, over strided views of a larger cache buffer.
    #[test]
    fn prefill_equals_masked_attention() {
        let dev = Device::Cpu;
        let cases = [
            // (heads, kv heads, hd, pos, len)
            (4, 4, 64, 0, 1),
            (4, 2, 8, 3, 21),
            (4, 2, 16, 0, 40),
            (4, 4, 64, 0, 2),
            (6, 2, 64, 0, 17),
            (6, 2, 64, 5, 16),
            (8, 2, 64, 63, 65),
            (9, 3, 64, 100, 37),
            (4, 1, 32, 0, 130),
            (4, 2, 80, 31, 33),
            (4, 2, 96, 1, 64),
            (4, 2, 128, 64, 64),
            (2, 1, 256, 7, 29),
            (6, 2, 64, 0, 300),
        ];
        for (nh, kvh, hd, pos, len) in cases {
            let total = pos + len;
            let cap = total + 9;
            let q = Tensor::randn(0f32, 1.0, (nh, len, hd), &dev).unwrap();
            let kb = Tensor::randn(0f32, 1.0, (kvh, cap, hd), &dev).unwrap();
            let vb = Tensor::randn(0f32, 1.0, (kvh, cap, hd), &dev).unwrap();
            // Large logits make the running max move and stress the rescaling.
            let kb = (kb * 3.0).unwrap();
            let (k, v) = (
                kb.narrow(1, 0, total).unwrap(),
                vb.narrow(1, 0, total).unwrap(),
            );
            let scale = 1.0 / (hd as f32).sqrt();
            let got = prefill(&q, &k, &v, pos, &Scores::causal(scale))
                .unwrap()
                .expect("applies");
            let want = reference(&q, &k, &v, pos, scale);
            let d = crate::ops::max_abs_diff(&got, &want);
            assert!(
                d < 2e-5,
                "{nh}/{kvh} heads, hd {hd}, pos {pos}, len {len}: {d}"
            );
        }
    }

    /// Where the fast path does not apply it says so, leaving the caller on candle's ops.
    #[test]
    fn prefill_declines_what_it_does_not_cover() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 4, 48), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 4, 48), DType::F32, &dev).unwrap();
        assert!(
            prefill(&q, &k, &k, 0, &Scores::causal(1.0))
                .unwrap()
                .is_none(),
            "hd 48"
        );
        let q = Tensor::zeros((2, 4, 64), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 5, 64), DType::F32, &dev).unwrap();
        assert!(
            prefill(&q, &k, &k, 0, &Scores::causal(1.0))
                .unwrap()
                .is_none(),
            "total ≠ pos + len"
        );
        let k = Tensor::zeros((1, 4, 64), DType::BF16, &dev).unwrap();
        let q16 = q.to_dtype(DType::BF16).unwrap();
        assert!(
            prefill(&q16, &k, &k, 0, &Scores::causal(1.0))
                .unwrap()
                .is_none(),
            "bf16"
        );
    }

    /// [`exp`] within 2 ulp of `f32::exp` over the range softmax uses, and ≈0 below it.
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x), x.exp());
            let ulp = (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32;
            worst = worst.max(ulp);
            x += 1.0e-3;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert!(exp(f32::NEG_INFINITY) < 1.3e-38);
        assert_eq!(exp(0.0), 1.0);
    }
}

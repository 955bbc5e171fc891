//! The one decoder of every supported family (Llama 2/3, TinyLlama, SmolLM2, Mistral, Qwen2/2.5,
//! Qwen3, Gemma 2, Gemma 3, Phi-3), written the candle way and matching transformers' modeling
//! files numerically. How a family differs is read from its [`Traits`] and [`ModelConfig`]: no
//! copied model file per family.
//!
//! The forward pass is *packed*: the tokens of every sequence in a step (prefill chunks and
//! single decode tokens alike) are stacked into one `[tokens, hidden]` matrix, so each
//! projection is one matmul over all of them; only attention runs per sequence, against that
//! sequence's own [`KvCache`]. Rotary embeddings are applied by absolute position per token,
//! so sequences at different positions share a step.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::layer::{DecoderLayer, RmsNorm, Rope, Segment, Step};
use super::weights::{Source, StoredWeights, WeightsSummary};
use crate::ops::{
    AdaptedLinear, AdapterWeights, Apply, BaseLinears, BaseWeight, MergedWeights, ProjKind,
    RowGroup, StoredMatrix,
};

/// Which positions of a sequence need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last token's (generation).
    Last,
    /// Every new token's (prompt log-probabilities).
    All,
}

/// One sequence's part of a forward step: its new tokens, its cache, and its adapter.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: LogitsFor,
    /// `None` runs the base model.
    pub adapter: Option<&'a AdapterWeights>,
    /// The sequence's whole prompt length, or 0 when the caller does not know it. Only
    /// LongRoPE reads it: transformers picks the long factors for a prompt longer than the
    /// original context (its prefill sees the whole prompt at once) and for every later
    /// token past it, so a chunked prefill must decide by the whole prompt, not the chunk,
    /// for its answer not to depend on how the engine happened to split the prompt.
    pub prompt_len: usize,
}

/// A rotary embedding's tables: inverse frequencies (LongRoPE's short and long sets), and
/// the factor on cos/sin.
#[derive(Debug, Clone)]
struct RopeTables {
    inv_freq: Vec<f32>,
    /// LongRoPE: the length past which a sequence switches to `long_inv_freq`.
    long: Option<(usize, Vec<f32>)>,
    attention_factor: f32,
}

impl RopeTables {
    fn new(spec: &super::rope::RopeSpec, head_dim: usize) -> Self {
        RopeTables {
            inv_freq: spec.inv_freq(head_dim, false),
            long: spec
                .long_after()
                .map(|n| (n, spec.inv_freq(head_dim, true))),
            attention_factor: spec.attention_factor(),
        }
    }
}

/// A causal language model of any supported family.
#[derive(Debug, Clone)]
pub struct Decoder {
    embed_tokens: BaseWeight,
    /// `√hidden` for Gemma's scaled embeddings.
    embed_scale: Option<f64>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `lm_head`, `[vocab, hidden]` (the embedding itself when tied: no copy).
    lm_head: BaseWeight,
    /// Global rope, then local (Gemma 3).
    ropes: Vec<RopeTables>,
    cfg: ModelConfig,
    device: Device,
    dtype: DType,
    /// What merged weights over a stored base are kept in.
    merged_dtype: GgmlDType,
}

impl Decoder {
    /// Build from checkpoint tensors named as HF names them (`model.layers.N.…`, `lm_head.weight`).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_stored(cfg, vb, &StoredWeights::new())
    }

    /// As [`new`](Self::new), with the matrices in `stored` kept in their stored format
    /// (`vb` need not hold them); activations are in `vb`'s dtype.
    pub fn with_stored(cfg: &ModelConfig, vb: VarBuilder, stored: &StoredWeights) -> Result<Self> {
        let t = cfg.family.traits();
        let src = Source {
            vb: vb.clone(),
            stored,
        };
        let m = src.pp("model");
        let embed_tokens = m
            .pp("embed_tokens")
            .matrix((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, &t, i, m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(
            cfg.hidden_size,
            cfg.rms_norm_eps,
            t.norm_plus_one,
            m.vb.pp("norm"),
        )?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            src.pp("lm_head")
                .matrix((cfg.vocab_size, cfg.hidden_size), "weight")?
        };
        let ropes = std::iter::once(&cfg.rope)
            .chain(cfg.local_rope.as_ref())
            .map(|r| RopeTables::new(r, cfg.head_dim))
            .collect();
        Ok(Self {
            lm_head,
            embed_tokens,
            embed_scale: t.embed_scale.then(|| (cfg.hidden_size as f64).sqrt()),
            layers,
            norm,
            ropes,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
            merged_dtype: GgmlDType::F32,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The projection `kind` of decoder layer `layer`.
    pub fn linear(&self, layer: usize, kind: ProjKind) -> Option<&AdaptedLinear> {
        self.layers.get(layer).and_then(|l| l.linear(kind))
    }

    /// The rotary tables of one rope for every packed token: `segs` give each sequence's
    /// positions (and, for LongRoPE, whether the sequence — its whole prompt, or any token up
    /// to this one — is longer than the original context, as transformers' generate decides).
    fn rope(&self, tables: &RopeTables, segs: &[Segment], n: usize) -> Result<Rope> {
        let half = tables.inv_freq.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for seg in segs {
            let inv = match &tables.long {
                Some((after, long)) if (seg.pos + seg.len).max(seg.prompt_len) > *after => long,
                _ => &tables.inv_freq,
            };
            for p in seg.pos..seg.pos + seg.len {
                for &f in inv {
                    // transformers forms the angle as an f32 product, then takes cos/sin in
                    // f32, scaled by the attention factor (1 but for YaRN and LongRoPE).
                    let angle = p as f32 * f;
                    if tables.attention_factor == 1.0 {
                        cos.push(angle.cos());
                        sin.push(angle.sin());
                    } else {
                        cos.push(angle.cos() * tables.attention_factor);
                        sin.push(angle.sin() * tables.attention_factor);
                    }
                }
            }
        }
        let shape = (n, half);
        Ok(Rope {
            cos: Tensor::from_vec(cos, shape, &self.device)?.to_dtype(self.dtype)?,
            sin: Tensor::from_vec(sin, shape, &self.device)?.to_dtype(self.dtype)?,
        })
    }

    /// Run the new tokens of every sequence through the model in one packed pass, appending
    /// to each sequence's cache. Returns, per sequence, f32 logits `[rows, vocab]`: one row for
    /// [`LogitsFor::Last`], one per new token for [`LogitsFor::All`].
    ///
    /// Without `merged`, each sequence's adapter applies unmerged to its own rows (any mix of
    /// adapters). With `merged`, those merged weights serve every row, and every sequence must
    /// name the adapter they were merged from: a mismatch is an error, never a silent mix-up.
    pub fn forward(
        &self,
        seqs: &mut [SeqInput],
        merged: Option<&MergedWeights>,
    ) -> Result<Vec<Tensor>> {
        let mut tokens = Vec::new();
        let mut segs = Vec::with_capacity(seqs.len());
        for seq in seqs.iter_mut() {
            seq.cache.rollback()?;
            if seq.cache.num_layers() != self.layers.len() {
                candle_core::bail!(
                    "kv cache has {} layers, the model {}",
                    seq.cache.num_layers(),
                    self.layers.len()
                );
            }
            let pos = seq.cache.len();
            let len = seq.tokens.len();
            if len == 0 {
                candle_core::bail!("a sequence in the batch has no new tokens");
            }
            if pos + len > self.cfg.max_context {
                candle_core::bail!(
                    "sequence of {} tokens exceeds the model's context of {}",
                    pos + len,
                    self.cfg.max_context
                );
            }
            if let Some(&t) = seq
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                candle_core::bail!(
                    "token id {t} is outside the vocabulary of {}",
                    self.cfg.vocab_size
                );
            }
            segs.push(Segment {
                start: tokens.len(),
                len,
                pos,
                prompt_len: seq.prompt_len,
            });
            tokens.extend_from_slice(seq.tokens);
        }
        let n = tokens.len();
        let groups = row_groups(&segs, seqs);
        let apply = match merged {
            Some(m) => {
                if let Some(seq) = seqs
                    .iter()
                    .find(|s| s.adapter.map(|a| a.id()) != Some(m.adapter_id()))
                {
                    candle_core::bail!(
                        "merged weights of adapter #{} cannot serve a sequence on {}",
                        m.adapter_id(),
                        seq.adapter
                            .map_or("the base model".to_string(), |a| format!(
                                "adapter #{}",
                                a.id()
                            ))
                    );
                }
                Apply::Merged(m)
            }
            None if groups.iter().all(|g| g.adapter.is_none()) => Apply::Base,
            None => Apply::Rows(&groups),
        };
        let step = Step {
            ropes: self
                .ropes
                .iter()
                .map(|t| self.rope(t, &segs, n))
                .collect::<Result<Vec<_>>>()?,
            segs,
            apply,
        };
        let mut x = self.embed_tokens.rows(&tokens, self.dtype, &self.device)?;
        if let Some(s) = self.embed_scale {
            // transformers multiplies by √hidden rounded to the embedding's dtype.
            x = (x * f64::from(s as f32))?;
        }
        for layer in &self.layers {
            x = layer.forward(&x, &step, seqs)?;
        }
        let segs = step.segs;
        for (seq, seg) in seqs.iter_mut().zip(&segs) {
            seq.cache.advance(seg.len);
        }

        // Only the rows that need logits go through the norm and the (large) lm_head.
        let rows: Vec<u32> = segs
            .iter()
            .zip(seqs.iter())
            .flat_map(|(seg, seq)| match seq.logits {
                LogitsFor::Last => (seg.start + seg.len - 1)..(seg.start + seg.len),
                LogitsFor::All => seg.start..(seg.start + seg.len),
            })
            .map(|r| r as u32)
            .collect();
        let picked = if rows.len() == n {
            x
        } else {
            let idx = Tensor::from_vec(rows.clone(), rows.len(), &self.device)?;
            x.index_select(&idx, 0)?
        };
        let h = self.norm.forward(&picked)?;
        let logits = self.lm_head.matmul_t(&h)?.to_dtype(DType::F32)?;
        let logits = match self.cfg.final_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        };
        let mut out = Vec::with_capacity(segs.len());
        let mut at = 0;
        for (seq, seg) in seqs.iter().zip(&segs) {
            let k = match seq.logits {
                LogitsFor::Last => 1,
                LogitsFor::All => seg.len,
            };
            out.push(logits.narrow(0, at, k)?);
            at += k;
        }
        debug_assert_eq!(at, logits.dim(D::Minus2)?);
        Ok(out)
    }

    /// The base weight of every projection of every layer.
    fn projection_weights(&self) -> impl Iterator<Item = &BaseWeight> {
        self.layers.iter().flat_map(|l| {
            ProjKind::ALL
                .into_iter()
                .filter_map(|k| l.linear(k).map(|p| p.weight()))
        })
    }

    /// How the weights are held: tensors per format and their bytes.
    pub fn weights_summary(&self) -> WeightsSummary {
        let mut sum = WeightsSummary::default();
        let mut add = |format: &'static str, bytes: usize| {
            *sum.formats.entry(format).or_default() += 1;
            sum.bytes += bytes;
        };
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let name = |t: &Tensor| BaseWeight::Dense(t.clone()).format();
        for w in [&self.embed_tokens]
            .into_iter()
            .chain((!self.cfg.tie_word_embeddings).then_some(&self.lm_head))
            .chain(self.projection_weights())
        {
            add(w.format(), w.bytes());
        }
        for n in std::iter::once(&self.norm).chain(self.layers.iter().flat_map(|l| l.norms())) {
            add(name(&n.weight), dense(&n.weight));
        }
        sum
    }

    /// Whether merged copies of the projections would hold more bytes per weight than the
    /// base they replace: a base kept in a block format (at most 8.5 bits a weight, against
    /// merged weights of 16 or 32), or a 16-bit one with f32 merged weights. Decode reads every
    /// weight each step, so `auto` does not merge over such a base: on the 1B-shaped Q4_K_M
    /// file one r16 DoRA adapter merged decoded at 6.1 tok/s against 16 unmerged (1 sequence)
    /// and 41 against 46 (8), in 4.5 GB instead of 0.75; on SmolLM2 Q8_0 and Q4_1 merged
    /// lost 10–18% at 1 sequence, was even at 8, and doubled the resident weights.
    pub fn merging_grows_weights(&self) -> bool {
        let merged = if self.merged_dtype == GgmlDType::F32 {
            4
        } else {
            2
        };
        self.projection_weights().any(|w| match w {
            BaseWeight::Stored(s) => s.storage_bytes() < merged * s.rows() * s.cols(),
            // Merged weights over a converted base are in its own dtype.
            BaseWeight::Dense(_) => false,
        })
    }

    /// Round the input rows of products over the base's stored matrices to int8 where an int8
    /// kernel applies (`--int8-activations`; see
    /// [`StoredMatrix::set_int8_activations`](crate::ops::stored::StoredMatrix::set_int8_activations):
    /// 2 or more rows with AVX-512 VNNI, one row over the K-quants there and on AVX2 CPUs
    /// without AVX-512). Returns how
    /// many matrices it applies to. Dense weights and merged adapter weights stay exact.
    pub fn set_int8_activations(&self, on: bool) -> usize {
        let mut n = 0;
        for w in std::iter::once(&self.lm_head).chain(self.projection_weights()) {
            if let BaseWeight::Stored(w) = w {
                w.set_int8_activations(on);
                n += usize::from(on && crate::ops::small_matmul::int8_applies(w));
            }
        }
        n
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::with_windows(self.cfg.layer_windows.clone())
    }

    /// Merge `adapter` into new weights for the modules it targets; the base is untouched.
    ///
    /// Over a dense base, merged weights are in the serving dtype. Over a base kept as stored,
    /// they are computed in f32 from the dequantised rows and kept in the
    /// [`merged_dtype`](Self::set_merged_dtype) (f32 unless set): never requantized to the
    /// base's format.
    pub fn merge(&self, adapter: &AdapterWeights) -> Result<MergedWeights> {
        let mut merged = MergedWeights::new(adapter.id(), self.layers.len());
        for (layer, kind, module) in adapter.iter() {
            let lin = self.layers[layer]
                .linear(kind)
                .ok_or_else(|| candle_core::Error::Msg(format!("layer {layer} has no {kind}")))?;
            let w = lin.merged_weight(module)?;
            let w = match (lin.weight(), self.merged_dtype) {
                (BaseWeight::Stored(_), d @ (GgmlDType::BF16 | GgmlDType::F16)) => {
                    BaseWeight::Stored(std::sync::Arc::new(StoredMatrix::quantize(&w, d)?))
                }
                _ => BaseWeight::Dense(w),
            };
            merged.insert(layer, kind, w);
        }
        Ok(merged)
    }

    /// The format merged weights over a stored base are kept in: F32 (the default), BF16 or
    /// F16.
    /// What merged weights over a stored base are kept in.
    pub fn merged_dtype(&self) -> GgmlDType {
        self.merged_dtype
    }

    pub fn set_merged_dtype(&mut self, dtype: GgmlDType) -> Result<()> {
        if !matches!(dtype, GgmlDType::F32 | GgmlDType::BF16 | GgmlDType::F16) {
            candle_core::bail!("merged weights are kept in F32, BF16 or F16, not {dtype:?}");
        }
        self.merged_dtype = dtype;
        Ok(())
    }
}

impl BaseLinears for Decoder {
    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn linear(&self, layer: usize, kind: ProjKind) -> Option<&AdaptedLinear> {
        Decoder::linear(self, layer, kind)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Row groups for the unmerged apply: consecutive sequences on the same adapter share one.
fn row_groups<'a>(segs: &[Segment], seqs: &[SeqInput<'a>]) -> Vec<RowGroup<'a>> {
    let mut groups: Vec<RowGroup<'a>> = Vec::with_capacity(segs.len());
    for (seg, seq) in segs.iter().zip(seqs) {
        let id = seq.adapter.map(|a| a.id());
        match groups.last_mut() {
            Some(g) if g.adapter.map(|a| a.id()) == id && g.start + g.len == seg.start => {
                g.len += seg.len
            }
            _ => groups.push(RowGroup {
                start: seg.start,
                len: seg.len,
                adapter: seq.adapter,
            }),
        }
    }
    groups
}

//! A llama-family decoder (Llama 2/3, TinyLlama, SmolLM2, Mistral without sliding window),
//! written the candle way and matching transformers' `LlamaForCausalLM` numerically.
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
}

/// Where one sequence's tokens sit in the packed batch.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: usize,
    len: usize,
    /// Absolute position of the first new token (= tokens already cached).
    pos: usize,
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps: eps as f32,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Computes in f32 for half dtypes, as transformers' LlamaRMSNorm does.
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

fn linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    layer: usize,
    kind: ProjKind,
    src: Source,
) -> Result<AdaptedLinear> {
    let src = src.pp(kind.module_name());
    let weight = src.matrix((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(src.vb.get(out_dim, "bias")?)
    } else {
        None
    };
    AdaptedLinear::with_base(weight, bias, layer, kind)
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: AdaptedLinear,
    k_proj: AdaptedLinear,
    v_proj: AdaptedLinear,
    o_proj: AdaptedLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    layer: usize,
}

impl Attention {
    fn new(cfg: &ModelConfig, layer: usize, vb: Source) -> Result<Self> {
        let (h, q, kv, b) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.attention_bias,
        );
        Ok(Self {
            q_proj: linear(h, q, b, layer, ProjKind::Q, vb.clone())?,
            k_proj: linear(h, kv, b, layer, ProjKind::K, vb.clone())?,
            v_proj: linear(h, kv, b, layer, ProjKind::V, vb.clone())?,
            o_proj: linear(q, h, b, layer, ProjKind::O, vb)?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            layer,
        })
    }

    fn forward(&self, x: &Tensor, step: &Step, seqs: &mut [SeqInput]) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (rope, segs, apply) = (&step.rope, &step.segs, step.apply);
        let q = self.q_proj.forward(x, apply)?.reshape((1, n, nh, hd))?;
        let k = self.k_proj.forward(x, apply)?.reshape((1, n, nkv, hd))?;
        let v = self.v_proj.forward(x, apply)?.reshape((n, nkv, hd))?;
        let q = candle_nn::rotary_emb::rope_thd(&q, &rope.cos, &rope.sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope_thd(&k, &rope.cos, &rope.sin)?.squeeze(0)?;

        let mut outs = Vec::with_capacity(segs.len());
        for (seg, seq) in segs.iter().zip(seqs.iter_mut()) {
            // [len, heads, hd] → [heads, len, hd]
            let q = q
                .narrow(0, seg.start, seg.len)?
                .transpose(0, 1)?
                .contiguous()?;
            let k = k.narrow(0, seg.start, seg.len)?.transpose(0, 1)?;
            let v = v.narrow(0, seg.start, seg.len)?.transpose(0, 1)?;
            let (k, v) = seq.cache.append(self.layer, &k, &v)?;
            let y = self.attend(&q, &k, &v, seg.pos)?;
            outs.push(y.transpose(0, 1)?.reshape((seg.len, nh * hd))?);
        }
        let y = if outs.len() == 1 {
            outs.pop().expect("one segment")
        } else {
            Tensor::cat(&outs, 0)?
        };
        self.o_proj.forward(&y, apply)
    }

    /// Causal attention of `q` `[heads, len, hd]` at absolute position `pos` over the cached
    /// `k`, `v` `[kv_heads, total, hd]`. Query heads are grouped by their kv head (head `h`
    /// reads kv head `h / groups`, as transformers' `repeat_kv`), so no kv copy is made.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, pos: usize) -> Result<Tensor> {
        let (nh, len, hd) = q.dims3()?;
        let fast_scale = 1.0 / (hd as f32).sqrt();
        let fast = if len == 1 {
            crate::ops::attention::decode(q, k, v, fast_scale)?
        } else {
            crate::ops::attention::prefill(q, k, v, pos, fast_scale)?
        };
        if let Some(y) = fast {
            return Ok(y);
        }
        let total = k.dim(1)?;
        let groups = nh / self.num_kv_heads;
        let in_dtype = q.dtype();
        // Scores and softmax in f32 whatever the serving dtype.
        let q = q
            .to_dtype(DType::F32)?
            .reshape((self.num_kv_heads, groups * len, hd))?;
        let k = k.to_dtype(DType::F32)?;
        let v = v.to_dtype(DType::F32)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = if len > 1 {
            let mask = causal_mask(len, pos, total, q.device())?;
            att.reshape((self.num_kv_heads, groups, len, total))?
                .broadcast_add(&mask)?
                .reshape((self.num_kv_heads, groups * len, total))?
        } else {
            att
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        att.matmul(&v)?.reshape((nh, len, hd))?.to_dtype(in_dtype)
    }
}

/// `[len, total]`: 0 where query `i` (at position `pos + i`) may see key `j`, −∞ elsewhere.
fn causal_mask(len: usize, pos: usize, total: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (len, total), device)
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: AdaptedLinear,
    up_proj: AdaptedLinear,
    down_proj: AdaptedLinear,
}

impl Mlp {
    fn new(cfg: &ModelConfig, layer: usize, vb: Source) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear(h, i, b, layer, ProjKind::Gate, vb.clone())?,
            up_proj: linear(h, i, b, layer, ProjKind::Up, vb.clone())?,
            down_proj: linear(i, h, b, layer, ProjKind::Down, vb)?,
        })
    }

    fn forward(&self, x: &Tensor, apply: Apply) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x, apply)?.silu()?;
        let up = self.up_proj.forward(x, apply)?;
        self.down_proj.forward(&(gate * up)?, apply)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, layer: usize, vb: Source) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.vb.pp("input_layernorm"),
            )?,
            self_attn: Attention::new(cfg, layer, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.vb.pp("post_attention_layernorm"),
            )?,
            mlp: Mlp::new(cfg, layer, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, x: &Tensor, step: &Step, seqs: &mut [SeqInput]) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let x = (x + self.self_attn.forward(&h, step, seqs)?)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        x + self.mlp.forward(&h, step.apply)?
    }

    fn linear(&self, kind: ProjKind) -> &AdaptedLinear {
        match kind {
            ProjKind::Q => &self.self_attn.q_proj,
            ProjKind::K => &self.self_attn.k_proj,
            ProjKind::V => &self.self_attn.v_proj,
            ProjKind::O => &self.self_attn.o_proj,
            ProjKind::Gate => &self.mlp.gate_proj,
            ProjKind::Up => &self.mlp.up_proj,
            ProjKind::Down => &self.mlp.down_proj,
        }
    }
}

/// cos/sin rows for every packed token, `[tokens, head_dim / 2]` each.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// What every layer needs to know about the step: where each sequence's rows are, their
/// rotary tables, and how adapters apply.
struct Step<'a> {
    rope: Rope,
    segs: Vec<Segment>,
    apply: Apply<'a>,
}

/// A llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: BaseWeight,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `lm_head`, `[vocab, hidden]` (the embedding itself when tied: no copy).
    lm_head: BaseWeight,
    inv_freq: Vec<f32>,
    cfg: ModelConfig,
    device: Device,
    dtype: DType,
    /// What merged weights over a stored base are kept in.
    merged_dtype: GgmlDType,
}

impl Llama {
    /// Build from checkpoint tensors named as HF names them (`model.layers.N.…`, `lm_head.weight`).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_stored(cfg, vb, &StoredWeights::new())
    }

    /// As [`new`](Self::new), with the matrices in `stored` kept in their stored format
    /// (`vb` need not hold them); activations are in `vb`'s dtype.
    pub fn with_stored(cfg: &ModelConfig, vb: VarBuilder, stored: &StoredWeights) -> Result<Self> {
        let src = Source {
            vb: vb.clone(),
            stored,
        };
        let m = src.pp("model");
        let embed_tokens = m
            .pp("embed_tokens")
            .matrix((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, i, m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, m.vb.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            src.pp("lm_head")
                .matrix((cfg.vocab_size, cfg.hidden_size), "weight")?
        };
        Ok(Self {
            lm_head,
            embed_tokens,
            layers,
            norm,
            inv_freq: cfg.inv_freq(),
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
        self.layers.get(layer).map(|l| l.linear(kind))
    }

    fn rope(&self, positions: &[usize]) -> Result<Rope> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                // transformers forms the angle as an f32 product, then takes cos/sin in f32.
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), half);
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
        let mut positions = Vec::new();
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
            });
            tokens.extend_from_slice(seq.tokens);
            positions.extend(pos..pos + len);
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
            rope: self.rope(&positions)?,
            segs,
            apply,
        };
        let mut x = self.embed_tokens.rows(&tokens, self.dtype, &self.device)?;
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
            .chain(
                self.layers
                    .iter()
                    .flat_map(|l| ProjKind::ALL.map(|k| l.linear(k).weight())),
            )
        {
            add(w.format(), w.bytes());
        }
        for n in std::iter::once(&self.norm).chain(
            self.layers
                .iter()
                .flat_map(|l| [&l.input_layernorm, &l.post_attention_layernorm]),
        ) {
            add(name(&n.weight), dense(&n.weight));
        }
        sum
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
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
            let lin = self.layers[layer].linear(kind);
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

impl BaseLinears for Llama {
    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn linear(&self, layer: usize, kind: ProjKind) -> Option<&AdaptedLinear> {
        Llama::linear(self, layer, kind)
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

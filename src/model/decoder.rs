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
use super::family::{Activation, Traits};
use super::kv_cache::KvCache;
use super::weights::{Source, StoredWeights, WeightsSummary};
use crate::ops::attention::Scores;
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
    /// The factor `x̂` is multiplied by: `w`, or `1 + w` (computed once, in f32) for Gemma.
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, plus_one: bool, vb: VarBuilder) -> Result<Self> {
        let w = vb.get(size, "weight")?;
        let weight = if plus_one {
            (w.to_dtype(DType::F32)? + 1.0)?.to_dtype(w.dtype())?
        } else {
            w
        };
        Ok(Self {
            weight,
            eps: eps as f32,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Computes in f32 for half dtypes, as transformers' RMSNorms do.
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

/// The q, k and v projections: three matrices, or one fused `qkv_proj` (Phi-3).
#[derive(Debug, Clone)]
enum Qkv {
    Separate {
        q_proj: AdaptedLinear,
        k_proj: AdaptedLinear,
        v_proj: AdaptedLinear,
    },
    Fused(AdaptedLinear),
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Qkv,
    o_proj: AdaptedLinear,
    /// Per-head RMSNorms on q and k before rope (Qwen3, Gemma 3).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    layer: usize,
    /// Which rope table of the step this layer reads.
    rope: usize,
    scores: Scores,
}

impl Attention {
    fn new(cfg: &ModelConfig, t: &Traits, layer: usize, vb: Source) -> Result<Self> {
        let (h, q, kv) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let qkv = if t.fused_qkv {
            Qkv::Fused(linear(
                h,
                q + 2 * kv,
                cfg.qkv_bias,
                layer,
                ProjKind::Qkv,
                vb.clone(),
            )?)
        } else {
            Qkv::Separate {
                q_proj: linear(h, q, cfg.qkv_bias, layer, ProjKind::Q, vb.clone())?,
                k_proj: linear(h, kv, cfg.qkv_bias, layer, ProjKind::K, vb.clone())?,
                v_proj: linear(h, kv, cfg.qkv_bias, layer, ProjKind::V, vb.clone())?,
            }
        };
        let norm = |name: &str| {
            RmsNorm::new(
                cfg.head_dim,
                cfg.rms_norm_eps,
                t.norm_plus_one,
                vb.vb.pp(name),
            )
        };
        let (q_norm, k_norm) = if t.qk_norm {
            (Some(norm("q_norm")?), Some(norm("k_norm")?))
        } else {
            (None, None)
        };
        let window = cfg.layer_windows[layer];
        Ok(Self {
            qkv,
            o_proj: linear(q, h, cfg.o_bias, layer, ProjKind::O, vb)?,
            q_norm,
            k_norm,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            layer,
            rope: usize::from(cfg.local_rope.is_some() && window.is_some()),
            scores: Scores {
                scale: cfg.attn_scale as f32,
                softcap: cfg.attn_softcap.map(|c| c as f32),
                window,
                key_start: 0,
            },
        })
    }

    fn linear(&self, kind: ProjKind) -> Option<&AdaptedLinear> {
        match (&self.qkv, kind) {
            (Qkv::Separate { q_proj, .. }, ProjKind::Q) => Some(q_proj),
            (Qkv::Separate { k_proj, .. }, ProjKind::K) => Some(k_proj),
            (Qkv::Separate { v_proj, .. }, ProjKind::V) => Some(v_proj),
            (Qkv::Fused(qkv), ProjKind::Qkv) => Some(qkv),
            (_, ProjKind::O) => Some(&self.o_proj),
            _ => None,
        }
    }

    fn forward(&self, x: &Tensor, step: &Step, seqs: &mut [SeqInput]) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (rope, segs, apply) = (&step.ropes[self.rope], &step.segs, step.apply);
        let (q, k, v) = match &self.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => (
                q_proj.forward(x, apply)?,
                k_proj.forward(x, apply)?,
                v_proj.forward(x, apply)?,
            ),
            Qkv::Fused(qkv) => {
                let y = qkv.forward(x, apply)?;
                (
                    y.narrow(1, 0, nh * hd)?,
                    y.narrow(1, nh * hd, nkv * hd)?,
                    y.narrow(1, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        let mut q = q.reshape((1, n, nh, hd))?;
        let mut k = k.reshape((1, n, nkv, hd))?;
        let v = v.reshape((n, nkv, hd))?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q.contiguous()?)?;
            k = kn.forward(&k.contiguous()?)?;
        }
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
            let view = seq.cache.append(self.layer, &k, &v)?;
            let sc = Scores {
                key_start: view.start,
                ..self.scores
            };
            let y = self.attend(&q, &view.k, &view.v, seg.pos, &sc)?;
            outs.push(y.transpose(0, 1)?.reshape((seg.len, nh * hd))?);
        }
        let y = if outs.len() == 1 {
            outs.pop().expect("one segment")
        } else {
            Tensor::cat(&outs, 0)?
        };
        self.o_proj.forward(&y, apply)
    }

    /// Attention of `q` `[heads, len, hd]` at absolute position `pos` over the cached `k`, `v`
    /// `[kv_heads, keys, hd]` whose first row is at `sc.key_start`: causal, within the layer's
    /// window, soft-capped where the family does. Query heads are grouped by their kv head
    /// (head `h` reads kv head `h / groups`, as transformers' `repeat_kv`), so no kv copy is
    /// made.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
        sc: &Scores,
    ) -> Result<Tensor> {
        let (nh, len, hd) = q.dims3()?;
        let fast = if len == 1 {
            crate::ops::attention::decode(q, k, v, sc)?
        } else {
            crate::ops::attention::prefill(q, k, v, pos, sc)?
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
        let att = (q.matmul(&k.t()?)? * sc.scale as f64)?;
        let att = match sc.softcap {
            Some(cap) => ((att / cap as f64)?.tanh()? * cap as f64)?,
            None => att,
        };
        let masked = len > 1 || sc.first_key(pos) > 0;
        let att = if masked {
            let mask = attention_mask(len, pos, total, sc, q.device())?;
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

/// `[len, total]`: 0 where query `i` (at position `pos + i`) may see key `j` (at position
/// `key_start + j`): not after it, and within the window; −∞ elsewhere.
fn attention_mask(
    len: usize,
    pos: usize,
    total: usize,
    sc: &Scores,
    device: &Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| {
            let lo = sc.first_key(pos + i);
            let hi = pos + i - sc.key_start;
            (0..total).map(move |j| {
                if j < lo || j > hi {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (len, total), device)
}

/// The gate and up projections: two matrices, or one fused `gate_up_proj`, gate rows first
/// (Phi-3).
#[derive(Debug, Clone)]
enum GateUp {
    Separate {
        gate_proj: AdaptedLinear,
        up_proj: AdaptedLinear,
    },
    Fused(AdaptedLinear),
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_up: GateUp,
    down_proj: AdaptedLinear,
    act: Activation,
    intermediate: usize,
}

impl Mlp {
    fn new(cfg: &ModelConfig, t: &Traits, layer: usize, vb: Source) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let gate_up = if t.fused_gate_up {
            GateUp::Fused(linear(h, 2 * i, b, layer, ProjKind::GateUp, vb.clone())?)
        } else {
            GateUp::Separate {
                gate_proj: linear(h, i, b, layer, ProjKind::Gate, vb.clone())?,
                up_proj: linear(h, i, b, layer, ProjKind::Up, vb.clone())?,
            }
        };
        Ok(Self {
            gate_up,
            down_proj: linear(i, h, b, layer, ProjKind::Down, vb)?,
            act: cfg.activation,
            intermediate: i,
        })
    }

    fn linear(&self, kind: ProjKind) -> Option<&AdaptedLinear> {
        match (&self.gate_up, kind) {
            (GateUp::Separate { gate_proj, .. }, ProjKind::Gate) => Some(gate_proj),
            (GateUp::Separate { up_proj, .. }, ProjKind::Up) => Some(up_proj),
            (GateUp::Fused(gu), ProjKind::GateUp) => Some(gu),
            (_, ProjKind::Down) => Some(&self.down_proj),
            _ => None,
        }
    }

    fn forward(&self, x: &Tensor, apply: Apply) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                (gate_proj.forward(x, apply)?, up_proj.forward(x, apply)?)
            }
            GateUp::Fused(gu) => {
                let y = gu.forward(x, apply)?;
                let i = self.intermediate;
                (y.narrow(1, 0, i)?, y.narrow(1, i, i)?)
            }
        };
        let gate = match self.act {
            Activation::Silu => gate.silu()?,
            // candle's `gelu` is the tanh approximation, as `gelu_pytorch_tanh`.
            Activation::GeluTanh => gate.gelu()?,
        };
        self.down_proj.forward(&(gate * up)?, apply)
    }
}

/// Gemma's extra norms: on the attention output, before the MLP, and on the MLP output.
#[derive(Debug, Clone)]
struct Sandwich {
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    /// Before the MLP (llama), or on the attention output (Gemma, with `sandwich`).
    post_attention_layernorm: RmsNorm,
    sandwich: Option<Sandwich>,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, t: &Traits, layer: usize, vb: Source) -> Result<Self> {
        let norm = |name: &str| {
            RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                t.norm_plus_one,
                vb.vb.pp(name),
            )
        };
        let sandwich = if t.sandwich_norms {
            Some(Sandwich {
                pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
                post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            })
        } else {
            None
        };
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(cfg, t, layer, vb.pp("self_attn"))?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            sandwich,
            mlp: Mlp::new(cfg, t, layer, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, x: &Tensor, step: &Step, seqs: &mut [SeqInput]) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let a = self.self_attn.forward(&h, step, seqs)?;
        match &self.sandwich {
            None => {
                let x = (x + a)?;
                let h = self.post_attention_layernorm.forward(&x)?;
                x + self.mlp.forward(&h, step.apply)?
            }
            Some(s) => {
                let x = (x + self.post_attention_layernorm.forward(&a)?)?;
                let h = s.pre_feedforward_layernorm.forward(&x)?;
                let m = self.mlp.forward(&h, step.apply)?;
                x + s.post_feedforward_layernorm.forward(&m)?
            }
        }
    }

    fn linear(&self, kind: ProjKind) -> Option<&AdaptedLinear> {
        self.self_attn
            .linear(kind)
            .or_else(|| self.mlp.linear(kind))
    }

    fn norms(&self) -> impl Iterator<Item = &RmsNorm> {
        [&self.input_layernorm, &self.post_attention_layernorm]
            .into_iter()
            .chain(
                self.sandwich
                    .iter()
                    .flat_map(|s| [&s.pre_feedforward_layernorm, &s.post_feedforward_layernorm]),
            )
            .chain(self.self_attn.q_norm.iter())
            .chain(self.self_attn.k_norm.iter())
    }
}

/// cos/sin rows for every packed token, `[tokens, head_dim / 2]` each.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// What every layer needs to know about the step: where each sequence's rows are, their
/// rotary tables (global, and local for Gemma 3's sliding layers), and how adapters apply.
struct Step<'a> {
    ropes: Vec<Rope>,
    segs: Vec<Segment>,
    apply: Apply<'a>,
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
    /// positions (and, for LongRoPE, whether it has passed the original length, as
    /// transformers decides per forward from the largest position).
    fn rope(&self, tables: &RopeTables, segs: &[Segment], n: usize) -> Result<Rope> {
        let half = tables.inv_freq.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for seg in segs {
            let inv = match &tables.long {
                Some((after, long)) if seg.pos + seg.len > *after => long,
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
            .chain(self.layers.iter().flat_map(|l| {
                ProjKind::ALL
                    .into_iter()
                    .filter_map(|k| l.linear(k).map(|p| p.weight()))
            }))
        {
            add(w.format(), w.bytes());
        }
        for n in std::iter::once(&self.norm).chain(self.layers.iter().flat_map(|l| l.norms())) {
            add(name(&n.weight), dense(&n.weight));
        }
        sum
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

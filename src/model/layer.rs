//! The pieces of a decoder layer, each family's differences read from its [`Traits`] and
//! [`ModelConfig`]: RMSNorm (with Gemma's `1 + w`), attention (separate or fused q/k/v,
//! per-head q/k norms, rope by layer type, windows and soft-caps through
//! [`crate::ops::attention::Scores`]), the gated MLP (separate or fused gate/up, SiLU or
//! tanh-GELU), and the layer with llama's or Gemma's placement of norms.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::ModelConfig;
use super::decoder::SeqInput;
use super::family::{Activation, Traits};
use super::weights::Source;
use crate::ops::attention::Scores;
use crate::ops::{AdaptedLinear, Apply, ProjKind};

/// Where one sequence's tokens sit in the packed batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Segment {
    pub(super) start: usize,
    pub(super) len: usize,
    /// Absolute position of the first new token (= tokens already cached).
    pub(super) pos: usize,
    /// The sequence's whole prompt length (0: unknown), for LongRoPE.
    pub(super) prompt_len: usize,
}

#[derive(Debug, Clone)]
pub(super) struct RmsNorm {
    /// The factor `x̂` is multiplied by: `w`, or `1 + w` (computed once, in f32) for Gemma.
    pub(super) weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub(super) fn new(size: usize, eps: f64, plus_one: bool, vb: VarBuilder) -> Result<Self> {
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
            } => {
                let ys = AdaptedLinear::forward_many(&[q_proj, k_proj, v_proj], x, apply)?;
                let [q, k, v]: [Tensor; 3] = ys.try_into().expect("three products");
                (q, k, v)
            }
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

        let mut views = Vec::with_capacity(segs.len());
        for (seg, seq) in segs.iter().zip(seqs.iter_mut()) {
            // [len, kv_heads, hd] → [kv_heads, len, hd]
            let k = k.narrow(0, seg.start, seg.len)?.transpose(0, 1)?;
            let v = v.narrow(0, seg.start, seg.len)?.transpose(0, 1)?;
            views.push(seq.cache.append(self.layer, &k, &v)?);
        }
        let scores = |view: &crate::model::kv_cache::LayerView| Scores {
            key_start: view.start,
            ..self.scores
        };
        // A decode step (one new token per sequence): every sequence's attention at once.
        let batched = if segs.len() > 1 && segs.iter().all(|s| s.len == 1) {
            let kv: Vec<_> = views.iter().map(|w| (&w.k, &w.v, scores(w))).collect();
            crate::ops::attention::decode_batch(&q, &kv)?
        } else {
            None
        };
        let y = match batched {
            Some(y) => y,
            None => {
                let mut outs = Vec::with_capacity(segs.len());
                for (seg, view) in segs.iter().zip(&views) {
                    // [len, heads, hd] → [heads, len, hd]
                    let q = q
                        .narrow(0, seg.start, seg.len)?
                        .transpose(0, 1)?
                        .contiguous()?;
                    let y = self.attend(&q, &view.k, &view.v, seg.pos, &scores(view))?;
                    outs.push(y.transpose(0, 1)?.reshape((seg.len, nh * hd))?);
                }
                if outs.len() == 1 {
                    outs.pop().expect("one segment")
                } else {
                    Tensor::cat(&outs, 0)?
                }
            }
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
                let ys = AdaptedLinear::forward_many(&[gate_proj, up_proj], x, apply)?;
                let [gate, up]: [Tensor; 2] = ys.try_into().expect("two products");
                (gate, up)
            }
            GateUp::Fused(gu) => {
                let y = gu.forward(x, apply)?;
                let i = self.intermediate;
                (y.narrow(1, 0, i)?, y.narrow(1, i, i)?)
            }
        };
        let h = match self.act {
            Activation::Silu => crate::ops::silu_mul(&gate, &up)?,
            // candle's `gelu` is the tanh approximation, as `gelu_pytorch_tanh`.
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        self.down_proj.forward(&h, apply)
    }
}

/// Gemma's extra norms: on the attention output, before the MLP, and on the MLP output.
#[derive(Debug, Clone)]
struct Sandwich {
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
}

#[derive(Debug, Clone)]
pub(super) struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    /// Before the MLP (llama), or on the attention output (Gemma, with `sandwich`).
    post_attention_layernorm: RmsNorm,
    sandwich: Option<Sandwich>,
    mlp: Mlp,
}

impl DecoderLayer {
    pub(super) fn new(cfg: &ModelConfig, t: &Traits, layer: usize, vb: Source) -> Result<Self> {
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

    pub(super) fn forward(&self, x: &Tensor, step: &Step, seqs: &mut [SeqInput]) -> Result<Tensor> {
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

    pub(super) fn linear(&self, kind: ProjKind) -> Option<&AdaptedLinear> {
        self.self_attn
            .linear(kind)
            .or_else(|| self.mlp.linear(kind))
    }

    pub(super) fn norms(&self) -> impl Iterator<Item = &RmsNorm> {
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
pub(super) struct Rope {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
}

/// What every layer needs to know about the step: where each sequence's rows are, their
/// rotary tables (global, and local for Gemma 3's sliding layers), and how adapters apply.
pub(super) struct Step<'a> {
    pub(super) ropes: Vec<Rope>,
    pub(super) segs: Vec<Segment>,
    pub(super) apply: Apply<'a>,
}

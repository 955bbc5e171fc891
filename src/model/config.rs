//! The model's configuration: the HF `config.json` as written (serde, HF field names), and the
//! validated [`ModelConfig`] the decoder is built from. GGUF metadata is mapped onto the same
//! validated type by the GGUF loader.

use serde::Deserialize;

use super::family::{Activation, Family};
use super::rope::{parse_scaling, RawRopeParameters, RopeSpec};
use super::ModelError;

/// `eos_token_id` / `bos_token_id` may be one id or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `config.json` of a supported checkpoint, field names exactly as HF writes them (the union
/// of the families' fields; each family reads its own).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RawRopeParameters>,
    /// transformers ≥ 5: one parameter object, or one per layer type (Gemma 3).
    pub rope_parameters: Option<serde_json::Value>,
    /// Gemma 3 before transformers 5: the local layers' rope base.
    pub rope_local_base_freq: Option<f64>,
    /// Phi-3 keeps LongRoPE's pretraining length outside `rope_scaling`.
    pub original_max_position_embeddings: Option<usize>,
    pub partial_rotary_factor: Option<f64>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub hidden_act: Option<String>,
    /// Gemma's name for the MLP activation.
    pub hidden_activation: Option<String>,
    pub sliding_window: Option<usize>,
    /// Qwen2/3: the window applies only when this is true, from `max_window_layers` on.
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<usize>,
    /// Gemma 3 before transformers 5: every `n`-th layer is global.
    pub sliding_window_pattern: Option<usize>,
    /// `"sliding_attention"` / `"full_attention"` per layer (transformers ≥ 4.5x writes it).
    pub layer_types: Option<Vec<String>>,
    pub query_pre_attn_scalar: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub use_bidirectional_attention: Option<bool>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_max_position_embeddings() -> usize {
    4096
}

/// A validated decoder configuration: every size consistent, every feature supported.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// The rotary embedding of global (full-attention) layers, and of every layer when
    /// `local_rope` is `None`.
    pub rope: RopeSpec,
    /// Gemma 3: the rotary embedding of its sliding-window layers.
    pub local_rope: Option<RopeSpec>,
    /// Per layer: the sliding window (keys `pos - w + 1 ..= pos` are seen), or `None` for full
    /// causal attention.
    pub layer_windows: Vec<Option<usize>>,
    /// The longest sequence (prompt + generated) this model serves.
    pub max_context: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v.
    pub qkv_bias: bool,
    /// Bias on o.
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub activation: Activation,
    /// The factor attention scores are multiplied by (`head_dim^-½`, or
    /// `query_pre_attn_scalar^-½` for Gemma).
    pub attn_scale: f64,
    /// Gemma 2: scores become `cap · tanh(scores / cap)` before the mask.
    pub attn_softcap: Option<f64>,
    /// Gemma 2: logits become `cap · tanh(logits / cap)`.
    pub final_softcap: Option<f64>,
}

impl ModelConfig {
    /// Check what the model code relies on; `origin` names the file in errors.
    pub fn validate(self, origin: &str) -> Result<Self, ModelError> {
        let bad = |msg: String| ModelError::InvalidConfig {
            path: origin.to_string(),
            msg,
        };
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_context),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} must be positive")));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            )));
        }
        self.rope.check(self.head_dim).map_err(&bad)?;
        if let Some(r) = &self.local_rope {
            r.check(self.head_dim).map_err(&bad)?;
        }
        if self.layer_windows.len() != self.num_hidden_layers {
            return Err(bad(format!(
                "{} layer types for {} layers",
                self.layer_windows.len(),
                self.num_hidden_layers
            )));
        }
        if self.layer_windows.contains(&Some(0)) {
            return Err(bad("sliding_window must be positive".into()));
        }
        for (name, v) in [
            ("attention scale", Some(self.attn_scale)),
            ("attn_logit_softcapping", self.attn_softcap),
            ("final_logit_softcapping", self.final_softcap),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(bad(format!("{name} must be positive, got {v}")));
                }
            }
        }
        Ok(self)
    }

    /// Query projection width: `num_attention_heads · head_dim` (not always `hidden_size`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Key/value projection width.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The rotary embedding of `layer`.
    pub fn layer_rope(&self, layer: usize) -> &RopeSpec {
        match (&self.local_rope, self.layer_windows.get(layer)) {
            (Some(local), Some(Some(_))) => local,
            _ => &self.rope,
        }
    }

    /// The rotary inverse frequencies of global layers, `[head_dim / 2]`.
    pub fn inv_freq(&self) -> Vec<f32> {
        self.rope.inv_freq(self.head_dim, false)
    }
}

/// The window pattern of `n` layers: every layer sliding, or the `period`-th global.
pub fn windows_every(n: usize, window: Option<usize>, period: usize) -> Vec<Option<usize>> {
    (0..n)
        .map(|i| {
            if period > 0 && (i + 1) % period == 0 {
                None
            } else {
                window
            }
        })
        .collect()
}

impl HfConfig {
    /// Resolve the HF config into a validated [`ModelConfig`]; `origin` names the file in errors.
    pub fn into_model_config(self, origin: &str) -> Result<ModelConfig, ModelError> {
        let bad = |msg: String| ModelError::InvalidConfig {
            path: origin.to_string(),
            msg,
        };
        let model_type = self.model_type.clone().unwrap_or_else(|| "llama".into());
        if model_type == "gemma3" {
            return Err(bad(
                "model_type \"gemma3\" is Gemma 3's multimodal checkpoint, which is not supported: \
                 serve a text-only (gemma3_text) checkpoint or its GGUF file"
                    .into(),
            ));
        }
        let family = Family::from_model_type(&model_type).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                path: origin.to_string(),
                arch: model_type.clone(),
            }
        })?;
        let traits = family.traits();
        if self.use_bidirectional_attention == Some(true) {
            return Err(bad(
                "use_bidirectional_attention (an embedding model) is not supported: dora-serve serves causal decoders".into(),
            ));
        }
        let activation = match self.hidden_activation.as_ref().or(self.hidden_act.as_ref()) {
            None => family.default_activation(),
            Some(a) => match a.as_str() {
                "silu" | "swish" => Activation::Silu,
                "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
                other => {
                    return Err(bad(format!(
                        "hidden_act {other:?} is not supported (supported: silu, gelu_pytorch_tanh)"
                    )))
                }
            },
        };
        if let Some(p) = self.partial_rotary_factor {
            if p != 1.0 {
                return Err(bad(format!(
                    "partial_rotary_factor {p} is not supported (rope over the whole head only)"
                )));
            }
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let n = self.num_hidden_layers;

        // Rope: one parameter object, or one per layer type.
        let parse = |v: &serde_json::Value| -> Result<RawRopeParameters, ModelError> {
            serde_json::from_value(v.clone()).map_err(|e| bad(format!("rope parameters: {e}")))
        };
        let (global_raw, local_raw) = match &self.rope_parameters {
            Some(v)
                if v.get("full_attention").is_some() || v.get("sliding_attention").is_some() =>
            {
                (
                    v.get("full_attention").map(parse).transpose()?,
                    v.get("sliding_attention").map(parse).transpose()?,
                )
            }
            Some(v) if !v.is_null() => (Some(parse(v)?), None),
            _ => (self.rope_scaling.clone(), None),
        };
        let spec =
            |raw: Option<&RawRopeParameters>, theta: Option<f64>| -> Result<RopeSpec, ModelError> {
                let theta = theta.or(raw.and_then(|r| r.rope_theta)).unwrap_or(10_000.0);
                let scaling = match raw {
                    None => super::rope::RopeScaling::None,
                    Some(r) => parse_scaling(
                        r,
                        self.max_position_embeddings,
                        self.original_max_position_embeddings,
                    )
                    .map_err(&bad)?,
                };
                Ok(RopeSpec {
                    theta,
                    scaling,
                    freq_factors: None,
                })
            };
        let rope = spec(global_raw.as_ref(), self.rope_theta)?;
        let local_rope = match family {
            Family::Gemma3 => Some(match &local_raw {
                Some(r) => spec(Some(r), None)?,
                None => RopeSpec::plain(self.rope_local_base_freq.unwrap_or(10_000.0)),
            }),
            _ => None,
        };

        // Which layers slide: `layer_types` when written, else each family's rule.
        let window = match family {
            Family::Gemma2 | Family::Gemma3 => self.sliding_window.or(Some(4096)),
            _ => self.sliding_window,
        }
        .filter(|&w| w > 0);
        let layer_windows = match &self.layer_types {
            Some(types) => {
                if types.len() != n {
                    return Err(bad(format!(
                        "layer_types has {} entries for {n} layers",
                        types.len()
                    )));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "full_attention" => Ok(None),
                        "sliding_attention" => window
                            .map(Some)
                            .ok_or_else(|| bad("a sliding_attention layer needs sliding_window".into())),
                        other => Err(bad(format!(
                            "layer type {other:?} is not supported (supported: full_attention, sliding_attention)"
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            None => match family {
                Family::Llama => vec![None; n],
                Family::Mistral | Family::Phi3 => vec![window; n],
                Family::Qwen2 | Family::Qwen3 => {
                    let from = self.max_window_layers.unwrap_or(n);
                    (0..n)
                        .map(|i| match self.use_sliding_window {
                            Some(true) if i >= from => window,
                            _ => None,
                        })
                        .collect()
                }
                Family::Gemma2 => windows_every(n, window, 2),
                Family::Gemma3 => {
                    windows_every(n, window, self.sliding_window_pattern.unwrap_or(6))
                }
            },
        };
        // Gemma's defaults (transformers' config classes) where the file leaves them out.
        let attn_scale = match family {
            Family::Gemma2 | Family::Gemma3 => {
                self.query_pre_attn_scalar.unwrap_or(256.0).powf(-0.5)
            }
            _ => (head_dim as f64).powf(-0.5),
        };
        let softcap = |v: Option<f64>| v.filter(|&c| c > 0.0);
        let (attn_softcap, final_softcap) = match family {
            Family::Gemma2 => (
                softcap(self.attn_logit_softcapping.or(Some(50.0))),
                softcap(self.final_logit_softcapping.or(Some(30.0))),
            ),
            Family::Gemma3 => (
                softcap(self.attn_logit_softcapping),
                softcap(self.final_logit_softcapping),
            ),
            _ => (None, None),
        };
        // transformers' default for tie_word_embeddings differs per family (Gemma ties).
        let tie = self
            .tie_word_embeddings
            .unwrap_or(matches!(family, Family::Gemma2 | Family::Gemma3));
        ModelConfig {
            family,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            vocab_size: self.vocab_size,
            num_hidden_layers: n,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope,
            local_rope,
            layer_windows,
            max_context: self.max_position_embeddings,
            tie_word_embeddings: tie,
            qkv_bias: self.attention_bias || traits.qkv_bias,
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            activation,
            attn_scale,
            attn_softcap,
            final_softcap,
        }
        .validate(origin)
    }
}

//! The model's configuration: the HF `config.json` as written (serde, HF field names), and the
//! validated [`ModelConfig`] the model is built from. GGUF metadata is mapped onto the same
//! validated type by the GGUF loader.

use serde::Deserialize;

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

/// Rotary-embedding parameters: transformers ≥ 5 writes them as `rope_parameters` (theta
/// included); older configs have `rope_theta` plus an optional `rope_scaling` of the same shape.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RawRopeParameters {
    /// transformers 4.x wrote `type` before `rope_type`.
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

/// `config.json` of a llama-family checkpoint, field names exactly as HF writes them.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
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
    pub rope_parameters: Option<RawRopeParameters>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub hidden_act: Option<String>,
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_max_position_embeddings() -> usize {
    4096
}

/// How rotary frequencies are derived from the base `theta`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `inv_freq_i = theta^(-2i/d)`.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's band-wise scaling (transformers' `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// A validated llama-family configuration: every size consistent, every feature supported.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Per-frequency divisors read from a GGUF `rope_freqs.weight` (llama.cpp's form of
    /// llama3 scaling); `None` elsewhere.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// The longest sequence (prompt + generated) this model serves.
    pub max_context: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
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
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(bad(format!(
                "rope_theta must be positive, got {}",
                self.rope_theta
            )));
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != self.head_dim / 2 {
                return Err(bad(format!(
                    "rope_freqs has {} entries, expected head_dim/2 = {}",
                    f.len(),
                    self.head_dim / 2
                )));
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

    /// The rotary inverse frequencies, `[head_dim / 2]`, computed in f32 like transformers.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base = self.rope_theta as f32;
        let mut inv: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / d as f32))
            .collect();
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= factor as f32),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                );
                let old_ctx = original_max_position_embeddings as f32;
                let low_wavelen = old_ctx / low;
                let high_wavelen = old_ctx / high;
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    // transformers: low-frequency bands are divided by `factor`, high ones kept,
                    // and the medium band is interpolated smoothly between the two.
                    let scaled = if wavelen > low_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    let is_medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    *f = if is_medium {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        if let Some(factors) = &self.rope_freq_factors {
            inv.iter_mut().zip(factors).for_each(|(f, d)| *f /= d);
        }
        inv
    }
}

impl LlamaConfig {
    /// Resolve the HF config into a validated [`ModelConfig`]; `origin` names the file in errors.
    pub fn into_model_config(self, origin: &str) -> Result<ModelConfig, ModelError> {
        let bad = |msg: String| ModelError::InvalidConfig {
            path: origin.to_string(),
            msg,
        };
        const SUPPORTED: [&str; 2] = ["llama", "mistral"];
        if let Some(mt) = &self.model_type {
            if !SUPPORTED.contains(&mt.as_str()) {
                return Err(ModelError::UnsupportedArchitecture {
                    path: origin.to_string(),
                    arch: mt.clone(),
                });
            }
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(bad(format!(
                    "hidden_act {act:?} is not supported (llama uses \"silu\")"
                )));
            }
        }
        let rope = self.rope_parameters.clone().or(self.rope_scaling.clone());
        let rope_theta = self
            .rope_theta
            .or(rope.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0);
        let rope_scaling = match &rope {
            None => RopeScaling::None,
            Some(r) => parse_rope_scaling(r).map_err(bad)?,
        };
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        // Mistral's sliding window only matters past its length: serve up to it, exactly.
        let max_context = match self.sliding_window {
            Some(w) if w > 0 => self.max_position_embeddings.min(w),
            _ => self.max_position_embeddings,
        };
        ModelConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            vocab_size: self.vocab_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            max_context,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
        }
        .validate(origin)
    }
}

fn parse_rope_scaling(r: &RawRopeParameters) -> Result<RopeScaling, String> {
    let need = |v: Option<f64>, name: &str| {
        v.ok_or_else(|| format!("rope scaling {:?} needs {name}", r.rope_type))
    };
    match r.rope_type.as_deref().unwrap_or("default") {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: need(r.factor, "factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: need(r.factor, "factor")?,
            low_freq_factor: need(r.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(r.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: r
                .original_max_position_embeddings
                .ok_or("rope scaling \"llama3\" needs original_max_position_embeddings")?,
        }),
        other => Err(format!(
            "rope scaling type {other:?} is not supported (supported: default, linear, llama3)"
        )),
    }
}

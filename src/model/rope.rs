//! Rotary embeddings: a layer type's base, scaling and the inverse frequencies and cos/sin
//! factor transformers derives from them (`modeling_rope_utils.py`), computed in f32 as it does.

use serde::Deserialize;

/// Rotary-embedding parameters: transformers ≥ 5 writes them as `rope_parameters` (theta
/// included, nested by layer type for Gemma 3); older configs have `rope_theta` plus an
/// optional `rope_scaling` of the same shape.
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
    pub attention_factor: Option<f64>,
    pub beta_fast: Option<f64>,
    pub beta_slow: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub truncate: Option<bool>,
    pub short_factor: Option<Vec<f64>>,
    pub long_factor: Option<Vec<f64>>,
    pub partial_rotary_factor: Option<f64>,
}

/// How rotary frequencies are derived from the base `theta`.
#[derive(Debug, Clone, PartialEq)]
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
    /// YaRN (`_compute_yarn_parameters`): frequencies ramped between interpolated and
    /// extrapolated, cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
        attention_factor: f64,
    },
    /// Phi-3's LongRoPE (`_compute_longrope_parameters`): per-frequency divisors, the long set
    /// once a sequence is longer than `original_max_position_embeddings`, cos/sin scaled by
    /// `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

/// The rotary embedding of one layer type.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Per-frequency divisors read from a GGUF `rope_freqs.weight` (llama.cpp's form of
    /// llama3 scaling); `None` elsewhere.
    pub freq_factors: Option<Vec<f32>>,
}

impl RopeSpec {
    pub fn plain(theta: f64) -> Self {
        RopeSpec {
            theta,
            scaling: RopeScaling::None,
            freq_factors: None,
        }
    }

    /// The factor transformers multiplies cos and sin by (1 but for YaRN and LongRoPE).
    pub fn attention_factor(&self) -> f32 {
        match &self.scaling {
            RopeScaling::Yarn {
                attention_factor, ..
            }
            | RopeScaling::LongRope {
                attention_factor, ..
            } => *attention_factor as f32,
            _ => 1.0,
        }
    }

    /// With LongRoPE: the length past which a sequence uses the long factors.
    pub fn long_after(&self) -> Option<usize> {
        match &self.scaling {
            RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            } => Some(*original_max_position_embeddings),
            _ => None,
        }
    }

    /// Check the parameters against the head size; `Err` says what is wrong.
    pub fn check(&self, head_dim: usize) -> Result<(), String> {
        if !(self.theta.is_finite() && self.theta > 0.0) {
            return Err(format!("rope_theta must be positive, got {}", self.theta));
        }
        if let Some(f) = &self.freq_factors {
            if f.len() != head_dim / 2 {
                return Err(format!(
                    "rope_freqs has {} entries, expected head_dim/2 = {}",
                    f.len(),
                    head_dim / 2
                ));
            }
        }
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &self.scaling
        {
            for (name, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if f.len() != head_dim / 2 {
                    return Err(format!(
                        "longrope {name} has {} entries, expected head_dim/2 = {}",
                        f.len(),
                        head_dim / 2
                    ));
                }
            }
        }
        Ok(())
    }

    /// The inverse frequencies, `[head_dim / 2]`, in f32 like transformers; `long` picks
    /// LongRoPE's long factors (ignored by other scalings).
    pub fn inv_freq(&self, head_dim: usize, long: bool) -> Vec<f32> {
        let d = head_dim;
        let base = self.theta as f32;
        // transformers: base ** (arange(0, d, 2).float() / d), in f32.
        let pos_freqs: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| base.powf(i as f32 / d as f32))
            .collect();
        let mut inv: Vec<f32> = pos_freqs.iter().map(|p| 1.0 / p).collect();
        match &self.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= *factor as f32),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => llama3(
                &mut inv,
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *original_max_position_embeddings as f32,
            ),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let corr = |rot: f64| {
                    (d as f64
                        * (*original_max_position_embeddings as f64
                            / (rot * 2.0 * std::f64::consts::PI))
                            .ln())
                        / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0) as f32, high.min(d as f64 - 1.0) as f32);
                if low == high {
                    high += 0.001;
                }
                let factor = *factor as f32;
                for (i, (f, p)) in inv.iter_mut().zip(&pos_freqs).enumerate() {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    let interp = 1.0 / (factor * p);
                    let extra = 1.0 / p;
                    *f = interp * (1.0 - extrapolation) + extra * extrapolation;
                }
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                ..
            } => {
                let ext = if long { long_factor } else { short_factor };
                // transformers: 1 / (ext_factors * base ** inv_freq_shape), in f32.
                for ((f, p), e) in inv.iter_mut().zip(&pos_freqs).zip(ext) {
                    *f = 1.0 / (*e as f32 * p);
                }
            }
        }
        if let Some(factors) = &self.freq_factors {
            inv.iter_mut().zip(factors).for_each(|(f, d)| *f /= d);
        }
        inv
    }
}

/// Llama 3.1's band-wise scaling, in place.
fn llama3(inv: &mut [f32], factor: f32, low: f32, high: f32, old_ctx: f32) {
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    for f in inv.iter_mut() {
        let wavelen = 2.0 * std::f32::consts::PI / *f;
        // transformers: low-frequency bands are divided by `factor`, high ones kept, and the
        // medium band is interpolated smoothly between the two.
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

/// YaRN's `get_mscale`.
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// The scaling a `rope_parameters` / `rope_scaling` object asks for; `max_position_embeddings`
/// and a top-level `original_max_position_embeddings` (Phi-3) fill in what it leaves out.
pub fn parse_scaling(
    r: &RawRopeParameters,
    max_position_embeddings: usize,
    top_original_max: Option<usize>,
) -> Result<RopeScaling, String> {
    let need = |v: Option<f64>, name: &str| {
        v.ok_or_else(|| format!("rope scaling {:?} needs {name}", r.rope_type))
    };
    if let Some(p) = r.partial_rotary_factor {
        if p != 1.0 {
            return Err(format!(
                "partial_rotary_factor {p} is not supported (rope over the whole head only)"
            ));
        }
    }
    let original = top_original_max.or(r.original_max_position_embeddings);
    match r.rope_type.as_deref().unwrap_or("default") {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: need(r.factor, "factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: need(r.factor, "factor")?,
            low_freq_factor: need(r.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(r.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: original
                .ok_or("rope scaling \"llama3\" needs original_max_position_embeddings")?,
        }),
        "yarn" => {
            let original = original.unwrap_or(max_position_embeddings);
            let factor = match r.factor {
                Some(f) => f,
                None => max_position_embeddings as f64 / original as f64,
            };
            let attention_factor = match r.attention_factor {
                Some(a) => a,
                None => match (r.mscale, r.mscale_all_dim) {
                    (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                        yarn_mscale(factor, m) / yarn_mscale(factor, all)
                    }
                    _ => yarn_mscale(factor, 1.0),
                },
            };
            Ok(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: r.beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0),
                beta_slow: r.beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0),
                truncate: r.truncate.unwrap_or(true),
                attention_factor,
            })
        }
        "longrope" | "su" => {
            let original =
                original.ok_or("rope scaling \"longrope\" needs original_max_position_embeddings")?;
            let factor = match r.factor {
                Some(f) => f,
                None => max_position_embeddings as f64 / original as f64,
            };
            let attention_factor = match r.attention_factor {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            Ok(RopeScaling::LongRope {
                short_factor: r
                    .short_factor
                    .clone()
                    .ok_or("rope scaling \"longrope\" needs short_factor")?,
                long_factor: r
                    .long_factor
                    .clone()
                    .ok_or("rope scaling \"longrope\" needs long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            })
        }
        other => Err(format!(
            "rope scaling type {other:?} is not supported (supported: default, linear, llama3, yarn, longrope)"
        )),
    }
}

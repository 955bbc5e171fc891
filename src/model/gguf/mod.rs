//! Loading a GGUF file of a supported family (`general.architecture` llama, qwen2, qwen3,
//! gemma2, gemma3, phi3; typed metadata reads in `meta.rs`, the tokenizer in `vocab.rs`): metadata → [`ModelConfig`], every tensor renamed to its HF name with
//! what llama.cpp's converter changed undone (the llama Q/K row permutation, Gemma's `+ 1` on
//! norm weights), so adapters trained on the HF checkpoint line up row for row; matrices kept
//! as stored or dequantised to the serving dtype; and the tokenizer rebuilt from
//! `tokenizer.ggml.*`.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::config::{windows_every, ModelConfig};
use super::family::Family;
use super::rope::{RopeScaling, RopeSpec};
use super::weights::StoredWeights;
use super::{model_id, Decoder, LoadOptions, LoadedModel, ModelError, ModelFormat, ModelInfo};
use crate::ops::stored::{self, StoredMatrix};

mod meta;
mod vocab;

use meta::Meta;
pub use vocab::load_tokenizer;

/// The HF name of a GGUF tensor of `family`, or `None` when it is not part of such a model.
fn hf_name(gguf: &str, family: Family) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let t = family.traits();
    let hf = match module {
        "attn_q" if !t.fused_qkv => "self_attn.q_proj",
        "attn_k" if !t.fused_qkv => "self_attn.k_proj",
        "attn_v" if !t.fused_qkv => "self_attn.v_proj",
        "attn_qkv" if t.fused_qkv => "self_attn.qkv_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" if t.qk_norm => "self_attn.q_norm",
        "attn_k_norm" if t.qk_norm => "self_attn.k_norm",
        "ffn_gate" if !t.fused_gate_up => "mlp.gate_proj",
        "ffn_up" if t.fused_gate_up => "mlp.gate_up_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        // Gemma: ffn_norm is the norm before the MLP, post_attention_norm the one after
        // attention; llama's ffn_norm is HF's post_attention_layernorm.
        "ffn_norm" if t.sandwich_norms => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" if t.sandwich_norms => "post_attention_layernorm",
        "post_ffw_norm" if t.sandwich_norms => "post_feedforward_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// GGUF tensors that are not weights of a module: rope factors.
fn rope_tensor(name: &str) -> bool {
    matches!(
        name,
        "rope_freqs.weight" | "rope_factors_long.weight" | "rope_factors_short.weight"
    )
}

/// The stored row of each HF row of a Q/K matrix that llama.cpp permuted: what [`unpermute`]
/// does, as a row map for a matrix kept as stored. HF row `h·d + j·d/2 + i` (head `h` of
/// `d = rows / n_head` rows, half `j`, index `i`) is stored row `h·d + 2i + j`.
fn unpermute_rows(rows: usize, n_head: usize) -> Vec<u32> {
    let d = rows / n_head;
    let half = d / 2;
    (0..rows)
        .map(|r| {
            let (h, within) = (r / d, r % d);
            let (j, i) = (within / half, within % half);
            (h * d + 2 * i + j) as u32
        })
        .collect()
}

/// Undo llama.cpp's `permute(w, n_head)` of Q/K rows (interleaved rope → HF's rotate-half).
fn unpermute(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let rest: usize = dims[1..].iter().product();
    w.reshape((n_head, out / n_head / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The file opened and its header (metadata and tensor directory) read.
fn open(path: &Path) -> Result<(BufReader<File>, Content), ModelError> {
    let mut reader = BufReader::new(File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?);
    let content = Content::read(&mut reader).map_err(|e| ModelError::Gguf {
        path: path.to_path_buf(),
        msg: format!("not a readable GGUF file: {e}"),
    })?;
    Ok((reader, content))
}

pub(super) fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (mut reader, content) = open(path)?;
    let meta = Meta {
        md: &content.metadata,
        path,
    };
    let arch = meta
        .string("general.architecture")?
        .ok_or_else(|| meta.err("metadata general.architecture is missing".into()))?;
    let family =
        Family::from_gguf_arch(&arch).ok_or_else(|| ModelError::UnsupportedArchitecture {
            path: path.display().to_string(),
            arch: arch.clone(),
        })?;
    let traits = family.traits();
    let a = |k: &str| format!("{arch}.{k}");
    let hidden = meta.req_usize(&a("embedding_length"))?;
    let heads = meta.req_usize(&a("attention.head_count"))?;
    let kv_heads = meta.usize(&a("attention.head_count_kv"))?.unwrap_or(heads);
    let head_dim = match meta.usize(&a("attention.key_length"))? {
        Some(d) => d,
        None => meta
            .usize(&a("rope.dimension_count"))?
            .unwrap_or(hidden / heads.max(1)),
    };
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let vocab = match meta.usize(&a("vocab_size"))? {
        Some(v) => v,
        None => tokens.len(),
    };
    let rope_scaling = match meta.string(&a("rope.scaling.type"))?.as_deref() {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: meta.f64(&a("rope.scaling.factor"))?.ok_or_else(|| {
                meta.err(format!(
                    "linear rope scaling without {}",
                    a("rope.scaling.factor")
                ))
            })?,
        },
        Some("yarn") => {
            let factor = meta.f64(&a("rope.scaling.factor"))?.ok_or_else(|| {
                meta.err(format!(
                    "yarn rope scaling without {}",
                    a("rope.scaling.factor")
                ))
            })?;
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: meta
                    .req_usize(&a("rope.scaling.original_context_length"))?,
                beta_fast: meta.f64(&a("rope.scaling.yarn_beta_fast"))?.unwrap_or(32.0),
                beta_slow: meta.f64(&a("rope.scaling.yarn_beta_slow"))?.unwrap_or(1.0),
                truncate: true,
                attention_factor: if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * factor.ln() + 1.0
                },
            }
        }
        Some(other) => {
            return Err(meta.err(format!("rope scaling type {other:?} is not supported")))
        }
    };

    // Every tensor under its HF name: base matrices kept as stored (memory-mapped) when asked
    // and the device is the CPU, everything else dequantised to the serving dtype.
    let device = &opts.device;
    let keep = opts.stored && crate::ops::kernels::fast_on(device);
    let map = if keep {
        // SAFETY: the file is mapped read-only; like every server that maps its weights (and
        // llama.cpp), we rely on no one truncating the model file while it is served.
        Some(std::sync::Arc::new(
            unsafe { memmap2::Mmap::map(reader.get_ref()) }.map_err(io)?,
        ))
    } else {
        None
    };
    let mut tensors = HashMap::with_capacity(content.tensor_infos.len());
    let mut stored = StoredWeights::new();
    let mut rope_tensors: HashMap<String, Vec<f32>> = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let info = &content.tensor_infos[name];
        if !stored::supported(info.ggml_dtype) {
            return Err(meta.err(format!(
                "tensor {name} has type {}, which dora-serve cannot serve (supported: F32, F16, \
                 BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)",
                stored::format_name(info.ggml_dtype)
            )));
        }
        let hf = if rope_tensor(name) {
            None
        } else {
            Some(hf_name(name, family).ok_or_else(|| {
                meta.err(format!(
                    "tensor {name:?} is not part of a {arch} model; refusing to guess what it is"
                ))
            })?)
        };
        let n_head = match hf.as_deref() {
            _ if !traits.gguf_qk_permuted => None,
            Some(h) if h.ends_with("q_proj.weight") => Some(heads),
            Some(h) if h.ends_with("k_proj.weight") => Some(kv_heads),
            _ => None,
        };
        if let (Some(map), Some(hf), &[rows, cols]) = (&map, &hf, info.shape.dims()) {
            if info.ggml_dtype != GgmlDType::F32 && hf.ends_with(".weight") {
                let start = (content.tensor_data_offset + info.offset) as usize;
                let m = StoredMatrix::mapped(map.clone(), start, info.ggml_dtype, rows, cols)
                    .and_then(|m| match n_head {
                        Some(n) => m.with_row_map(unpermute_rows(rows, n)),
                        None => Ok(m),
                    })
                    .map_err(|e| meta.err(format!("tensor {name}: {e}")))?;
                stored.insert(hf.clone(), std::sync::Arc::new(m));
                continue;
            }
        }
        let read = |reader: &mut BufReader<File>| -> candle_core::Result<Tensor> {
            content.tensor(reader, name, device)?.dequantize(device)
        };
        let t = read(&mut reader).map_err(|e| meta.err(format!("tensor {name}: {e}")))?;
        let Some(hf) = hf else {
            rope_tensors.insert(
                name.clone(),
                t.to_dtype(DType::F32)
                    .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                    .map_err(|e| meta.err(format!("tensor {name}: {e}")))?,
            );
            continue;
        };
        let t = match n_head {
            Some(n) => unpermute(&t, n),
            // llama.cpp stored Gemma's norms as `1 + w`; the decoder adds the 1 itself.
            None if traits.gguf_norms_plus_one && hf.ends_with("norm.weight") => {
                t.to_dtype(DType::F32).and_then(|t| t - 1.0)
            }
            None => Ok(t),
        }
        .and_then(|t| t.to_dtype(opts.dtype))
        .map_err(|e| meta.err(format!("tensor {name}: {e}")))?;
        tensors.insert(hf, t);
    }
    let has = |n: &str| tensors.contains_key(n) || stored.contains_key(n);

    let layers = meta.req_usize(&a("block_count"))?;
    let window = meta
        .usize(&a("attention.sliding_window"))?
        .filter(|&w| w > 0);
    let pattern = match meta.get(&a("attention.sliding_window_pattern")) {
        Some(Value::Array(flags)) => Some(
            flags
                .iter()
                .map(|f| f.to_bool().map(|swa| if swa { window } else { None }))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| meta.err(format!("sliding_window_pattern: {e}")))?,
        ),
        Some(_) => Some(windows_every(
            layers,
            window,
            meta.req_usize(&a("attention.sliding_window_pattern"))?,
        )),
        None => None,
    };
    // Each family's rule where the file states no pattern (as llama.cpp loads them).
    let layer_windows = match (pattern, family) {
        (Some(p), _) => p,
        (None, Family::Gemma2) => windows_every(layers, window.or(Some(4096)), 2),
        (None, Family::Gemma3) => windows_every(layers, window, 6),
        // A llama file states a window only when its converter kept Mistral's (llama.cpp's
        // drops it); Phi-3's applies to every layer, as transformers does.
        (None, Family::Phi3 | Family::Llama) => vec![window; layers],
        (None, _) => vec![None; layers],
    };
    let theta = meta.f64(&a("rope.freq_base"))?.unwrap_or(10_000.0);
    let mut rope = RopeSpec {
        theta,
        scaling: rope_scaling,
        freq_factors: rope_tensors.remove("rope_freqs.weight"),
    };
    if let (Some(long), Some(short)) = (
        rope_tensors.remove("rope_factors_long.weight"),
        rope_tensors.remove("rope_factors_short.weight"),
    ) {
        let original = meta.req_usize(&a("rope.scaling.original_context_length"))?;
        let ctx = meta.req_usize(&a("context_length"))?;
        let factor = ctx as f64 / original as f64;
        let attention_factor = match meta.f64(&a("rope.scaling.attn_factor"))? {
            Some(f) => f,
            None if factor <= 1.0 => 1.0,
            None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
        };
        let widen = |v: Vec<f32>| v.into_iter().map(f64::from).collect();
        rope.scaling = RopeScaling::LongRope {
            short_factor: widen(short),
            long_factor: widen(long),
            original_max_position_embeddings: original,
            attention_factor,
        };
    }
    let local_rope = match family {
        Family::Gemma3 => Some(RopeSpec::plain(
            meta.f64(&a("rope.freq_base_swa"))?.unwrap_or(10_000.0),
        )),
        _ => None,
    };
    // llama.cpp (after gemma_pytorch) scales Gemma's queries by 1/√(hidden/heads) for the 27B
    // models and by 1/√head_dim otherwise; the file does not say query_pre_attn_scalar.
    let attn_scale = match (family, layers) {
        (Family::Gemma2, 46) | (Family::Gemma3, 62) => (hidden as f64 / heads as f64).powf(-0.5),
        _ => (head_dim as f64).powf(-0.5),
    };
    let softcap =
        |k: &str| -> Result<Option<f64>, ModelError> { Ok(meta.f64(&a(k))?.filter(|&c| c > 0.0)) };
    let (attn_softcap, final_softcap) = match family {
        Family::Gemma2 => (
            softcap("attn_logit_softcapping")?,
            softcap("final_logit_softcapping")?,
        ),
        Family::Gemma3 => (None, softcap("final_logit_softcapping")?),
        _ => (None, None),
    };
    let cfg = ModelConfig {
        family,
        hidden_size: hidden,
        intermediate_size: meta.req_usize(&a("feed_forward_length"))?,
        vocab_size: vocab,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: meta
            .f64(&a("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rope,
        local_rope,
        layer_windows,
        max_context: meta.req_usize(&a("context_length"))?,
        tie_word_embeddings: !has("lm_head.weight"),
        qkv_bias: has("model.layers.0.self_attn.q_proj.bias")
            || has("model.layers.0.self_attn.qkv_proj.bias"),
        o_bias: has("model.layers.0.self_attn.o_proj.bias"),
        mlp_bias: has("model.layers.0.mlp.down_proj.bias"),
        activation: family.default_activation(),
        attn_scale,
        attn_softcap,
        final_softcap,
    }
    .validate(&path.display().to_string())?;

    let vb = VarBuilder::from_tensors(tensors, opts.dtype, device);
    let model = Decoder::with_stored(&cfg, vb, &stored).map_err(|source| ModelError::Weights {
        path: path.to_path_buf(),
        source,
    })?;

    let tokenizer = vocab::gguf_tokenizer(&meta, tokens)?;
    let bos = meta.u32("tokenizer.ggml.bos_token_id")?;
    let mut eos: Vec<u32> = meta
        .u32("tokenizer.ggml.eos_token_id")?
        .into_iter()
        .collect();
    let named = family
        .end_of_turn_tokens()
        .iter()
        .filter_map(|t| tokenizer.token_id(t));
    super::dedup_push(
        &mut eos,
        meta.u32("tokenizer.ggml.eot_token_id")?
            .into_iter()
            .chain(named),
    );
    Ok(LoadedModel {
        model,
        tokenizer,
        info: ModelInfo {
            id: model_id(path),
            name: meta.string("general.name")?.filter(|s| !s.is_empty()),
            path: path.to_path_buf(),
            format: ModelFormat::Gguf,
            bos_token_id: bos,
            eos_token_ids: eos,
            chat_template: meta
                .string("tokenizer.chat_template")?
                .or_else(|| family.default_chat_template().map(str::to_string)),
        },
    })
}

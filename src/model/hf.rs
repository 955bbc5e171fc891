//! Loading an HF model folder: `config.json`, (sharded) safetensors, `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`, `chat_template.jinja`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_nn::VarBuilder;

use super::weights::StoredWeights;
use serde::Deserialize;

use super::{
    dedup_push, model_id, read_json, Decoder, HfConfig, LoadOptions, LoadedModel, ModelError,
    ModelFormat, ModelInfo, TokenIds, Tokenizer,
};

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    fn content(&self) -> &str {
        match self {
            SpecialToken::Text(s) => s,
            SpecialToken::Added { content } => content,
        }
    }
}

/// A chat template: one string, or a list of named templates (the `default` one is used).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ChatTemplate {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Debug, Deserialize, Default)]
struct TokenizerConfig {
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
    chat_template: Option<ChatTemplate>,
}

#[derive(Debug, Deserialize, Default)]
struct GenerationConfig {
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
}

#[derive(Debug, Deserialize)]
struct ShardIndex {
    weight_map: std::collections::HashMap<String, String>,
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let idx: ShardIndex = read_json(&index)?;
        let names: BTreeSet<&String> = idx.weight_map.values().collect();
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            // Shard names come from the file: never let them leave the folder.
            if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                return Err(ModelError::InvalidConfig {
                    path: index.display().to_string(),
                    msg: format!("shard name {name:?} is not a plain file name"),
                });
            }
            let f = dir.join(name);
            if !f.is_file() {
                return Err(ModelError::MissingFile {
                    path: f,
                    what: "a weight shard named in model.safetensors.index.json",
                });
            }
            files.push(f);
        }
        return Ok(files);
    }
    if dir.join("pytorch_model.bin").is_file() {
        return Err(ModelError::MissingFile {
            path: single,
            what: "model.safetensors (only pickle weights were found; convert them to safetensors)",
        });
    }
    Err(ModelError::MissingFile {
        path: single,
        what: "the weights (model.safetensors or model.safetensors.index.json)",
    })
}

/// The 16-bit (bf16, f16) weight matrices of a checkpoint, kept as they are stored.
fn stored_matrices(files: &[std::path::PathBuf]) -> candle_core::Result<StoredWeights> {
    use candle_core::quantized::GgmlDType;
    // SAFETY: as for the VarBuilder above: the files are mapped read-only.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files)? };
    let mut out = StoredWeights::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::BF16 => GgmlDType::BF16,
            safetensors::Dtype::F16 => GgmlDType::F16,
            _ => continue,
        };
        let &[rows, cols] = view.shape() else {
            continue;
        };
        if !name.ends_with(".weight") || name.contains("norm") {
            continue;
        }
        let m = crate::ops::StoredMatrix::from_bytes(view.data(), dtype, rows, cols)
            .map_err(|e| candle_core::Error::msg(format!("tensor {name}: {e}")))?;
        out.insert(name, std::sync::Arc::new(m));
    }
    Ok(out)
}

pub(super) fn load(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel, ModelError> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(ModelError::MissingFile {
            path: config_path,
            what: "the model configuration (config.json)",
        });
    }
    let raw: HfConfig = read_json(&config_path)?;
    let mut eos = Vec::new();
    dedup_push(&mut eos, raw.eos_token_id.iter().flat_map(|t| t.to_vec()));
    let mut bos = raw
        .bos_token_id
        .as_ref()
        .and_then(|t| t.to_vec().first().copied());
    let cfg = raw.into_model_config(&config_path.display().to_string())?;

    let files = weight_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; dora-serve never writes model weights, and
    // replacing a model's files while it is being loaded is outside what we support.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, opts.dtype, &opts.device) }
        .map_err(|source| ModelError::Weights {
            path: dir.to_path_buf(),
            source,
        })?;
    let stored = if opts.stored && crate::ops::kernels::fast_on(&opts.device) {
        stored_matrices(&files).map_err(|source| ModelError::Weights {
            path: dir.to_path_buf(),
            source,
        })?
    } else {
        StoredWeights::new()
    };
    let model = Decoder::with_stored(&cfg, vb, &stored).map_err(|source| ModelError::Weights {
        path: dir.to_path_buf(),
        source,
    })?;

    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc: TokenizerConfig = if tc_path.is_file() {
        read_json(&tc_path)?
    } else {
        TokenizerConfig::default()
    };
    let gc_path = dir.join("generation_config.json");
    if gc_path.is_file() {
        let gc: GenerationConfig = read_json(&gc_path)?;
        dedup_push(&mut eos, gc.eos_token_id.iter().flat_map(|t| t.to_vec()));
        bos = bos.or(gc.bos_token_id.and_then(|t| t.to_vec().first().copied()));
    }
    if let Some(id) = tc
        .eos_token
        .as_ref()
        .and_then(|t| tokenizer.token_id(t.content()))
    {
        dedup_push(&mut eos, [id]);
    }
    bos = bos.or(tc
        .bos_token
        .as_ref()
        .and_then(|t| tokenizer.token_id(t.content())));
    let chat_template = match tc.chat_template {
        Some(ChatTemplate::One(t)) => Some(t),
        Some(ChatTemplate::Named(list)) => list
            .into_iter()
            .find(|t| t.name == "default")
            .map(|t| t.template),
        None => {
            // transformers ≥ 4.43 may write the template to its own file.
            let f = dir.join("chat_template.jinja");
            if f.is_file() {
                Some(
                    std::fs::read_to_string(&f)
                        .map_err(|source| ModelError::Io { path: f, source })?,
                )
            } else {
                None
            }
        }
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        info: ModelInfo {
            id: model_id(dir),
            name: None,
            path: dir.to_path_buf(),
            format: ModelFormat::HfFolder,
            bos_token_id: bos,
            eos_token_ids: eos,
            chat_template,
        },
    })
}

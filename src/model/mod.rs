//! The base model: one decoder on candle for every supported family, its loaders (HF folder,
//! GGUF file) and its tokenizer.

mod config;
mod decoder;
mod family;
mod gguf;
mod hf;
mod kv_cache;
mod layer;
mod rope;
mod tokenizer;
mod weights;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

pub use config::{HfConfig, ModelConfig, TokenIds};
pub use decoder::{Decoder, LogitsFor, SeqInput};
pub use family::{Activation, Family, Traits};
pub use kv_cache::KvCache;
pub use rope::{RopeScaling, RopeSpec};
pub use tokenizer::{GgufBpe, Tokenizer};
pub use weights::{StoredWeights, WeightsSummary};

/// Everything that can go wrong loading or running the base model. Each variant names the
/// file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {what} is missing", path.display())]
    MissingFile { path: PathBuf, what: &'static str },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not valid JSON for this field set: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: invalid model configuration: {msg}")]
    InvalidConfig { path: String, msg: String },
    #[error(
        "{path}: architecture {arch:?} is not supported (dora-serve serves: {})",
        Family::supported_names()
    )]
    UnsupportedArchitecture { path: String, arch: String },
    #[error("{}: {msg}", path.display())]
    Gguf { path: PathBuf, msg: String },
    #[error("{}: weights do not fit the configuration: {source}", path.display())]
    Weights {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{}: tokenizer: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Encode(String),
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The serving dtype: of activations, and of every weight not kept as stored.
    pub dtype: DType,
    pub device: Device,
    /// Keep base matrices in their stored format (GGUF block formats and 16-bit floats,
    /// dequantised on the fly by the matmuls) instead of converting them to `dtype`. Applies on
    /// the CPU; elsewhere weights are converted.
    pub stored: bool,
}

/// Where the model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    HfFolder,
    Gguf,
}

/// What the loaders know about the model besides its weights.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The id the model is served under: the path as given to the loader (vLLM's convention:
    /// what the user typed), unless the caller renames it (`--served-model-name`).
    pub id: String,
    /// The name the file gives itself (GGUF `general.name`), shown as metadata only.
    pub name: Option<String>,
    pub path: PathBuf,
    pub format: ModelFormat,
    pub bos_token_id: Option<u32>,
    /// Generation stops at any of these.
    pub eos_token_ids: Vec<u32>,
    /// The Jinja chat template, kept for the chat endpoint.
    pub chat_template: Option<String>,
}

/// A loaded base model: weights, tokenizer and metadata.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub model: Decoder,
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
}

/// Load an HF folder or a `.gguf` file.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, ModelError> {
    if path.is_dir() {
        hf::load(path, opts)
    } else if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
            gguf::load(path, opts)
        } else {
            Err(ModelError::InvalidConfig {
                path: path.display().to_string(),
                msg: "expected an HF model folder or a .gguf file".into(),
            })
        }
    } else {
        Err(ModelError::MissingFile {
            path: path.to_path_buf(),
            what: "the model (an HF folder or a .gguf file)",
        })
    }
}

/// The tokenizer of a GGUF file alone, without loading its weights.
pub fn load_gguf_tokenizer(path: &Path) -> Result<Tokenizer, ModelError> {
    gguf::load_tokenizer(path)
}

fn model_id(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn dedup_push(ids: &mut Vec<u32>, more: impl IntoIterator<Item = u32>) {
    for id in more {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
}

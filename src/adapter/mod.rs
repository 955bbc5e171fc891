//! PEFT LoRA/DoRA adapters: configuration, loading and validation against the base model,
//! the per-module tensors the model's linear layers apply, the byte-budgeted cache, the
//! crash-safe store, and the catalog that owns every adapter name.

pub mod cache;
mod catalog;
mod config;
mod load;
pub mod store;
mod synth;

use std::path::PathBuf;

pub use cache::{AdapterCache, CacheStats, Lease};
pub use catalog::{Catalog, CatalogError, Described, Resolved, Source, Upload};
pub use config::{AdapterConfig, ModuleSelector};
pub use load::{
    digest, load_bytes, load_dir, next_adapter_id, Adapter, AdapterInfo, AdapterKind, ModuleInfo,
};
pub use store::{
    AdapterStore, DiskCacheStats, ObjectAdapterStore, RemoteOptions, StoreError, StoreHealth,
};
pub use synth::{write_random_adapter, SynthSpec};

/// Whether `name` is a valid adapter name: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` (so it is
/// always one plain path component of the store).
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Why an adapter cannot be served. Every variant says which field, tensor or module is at
/// fault and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{}: {what} is missing", path.display())]
    MissingFile { path: PathBuf, what: &'static str },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}: pickle weights are not loaded (they can run code); convert them to safetensors: \
         python -c \"import torch; from safetensors.torch import save_file; \
         save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\"",
        path.display()
    )]
    Pickle { path: PathBuf },
    #[error("adapter_config.json is not valid JSON: {0}")]
    ConfigJson(String),
    #[error("adapter_config.json: field {field:?} {msg}")]
    ConfigField { field: String, msg: String },
    #[error("adapter_config.json: {field:?} {msg}")]
    Unsupported { field: String, msg: String },
    #[error("adapter_model.safetensors is not a valid safetensors file: {0}")]
    Safetensors(String),
    #[error("adapter_model.safetensors: tensor {tensor:?}: {msg}")]
    Tensor { tensor: String, msg: String },
    #[error("adapter module {module:?}: {msg}")]
    Module { module: String, msg: String },
    #[error("adapter computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The object store could not be reached to fetch the adapter (and no cached copy).
    #[error("{0}")]
    StoreUnavailable(String),
    /// The object store's copy does not match its manifest.
    #[error("{0}")]
    StoreCorrupt(String),
    /// The name left the store between the request and its load.
    #[error("adapter {0:?} is not in the adapter store")]
    StoreGone(String),
}

impl AdapterError {
    /// A stable machine-readable code for API clients.
    pub fn code(&self) -> &'static str {
        match self {
            AdapterError::MissingFile { .. } => "adapter_file_missing",
            AdapterError::Io { .. } => "adapter_io_error",
            AdapterError::Pickle { .. } => "adapter_pickle_refused",
            AdapterError::ConfigJson(_) => "adapter_config_invalid_json",
            AdapterError::ConfigField { .. } => "adapter_config_invalid",
            AdapterError::Unsupported { .. } => "adapter_unsupported",
            AdapterError::Safetensors(_) => "adapter_weights_invalid",
            AdapterError::Tensor { .. } => "adapter_tensor_invalid",
            AdapterError::Module { .. } => "adapter_module_mismatch",
            AdapterError::Candle(_) => "adapter_internal_error",
            AdapterError::StoreUnavailable(_) => "adapter_store_unavailable",
            AdapterError::StoreCorrupt(_) => "adapter_store_corrupt",
            AdapterError::StoreGone(_) => "adapter_not_found",
        }
    }

    /// A store failure met while loading.
    pub fn from_store(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(n) => AdapterError::StoreGone(n),
            e @ StoreError::Corrupt { .. } => AdapterError::StoreCorrupt(e.to_string()),
            StoreError::Io { path, source } => AdapterError::Io { path, source },
            e => AdapterError::StoreUnavailable(e.to_string()),
        }
    }
}

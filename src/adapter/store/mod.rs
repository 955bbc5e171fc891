//! Where adapters are stored, named by `--adapter-store URL`:
//!
//! - `file://DIR` ([`DirStore`], the default, `--adapters-dir`): adapter `NAME` is the folder
//!   `DIR/NAME`, written through a temporary folder, fsync and a one-step swap;
//! - `s3://bucket/prefix` ([`ObjectAdapterStore`]): objects through the `object_store`
//!   crate, shared by every replica. A version's two files go under a key of their own, then
//!   one small manifest names that version and its digest, written with a conditional put;
//!   readers trust manifests only, so no one ever sees two versions mixed or a half upload.
//!   Fetched adapters are kept in a byte-budgeted [`DiskCache`] below the in-memory LRU.
//!
//! [`AdapterStore`] is the one type the catalog sees: the same verbs on either backend.

mod dir;
mod disk_cache;
mod object;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use dir::DirStore;
pub use disk_cache::{DiskCache, DiskCacheStats};
pub use object::{Fetched, ObjectAdapterStore, RemoteOptions};

/// Why a store operation did not happen. Nothing stored changed, except where a variant says.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("adapter name {0:?} is invalid: use 1–64 characters from A-Z a-z 0-9 . _ - starting with a letter or digit")]
    InvalidName(String),
    #[error("adapter {0:?} already exists; pass replace=true to replace it")]
    Exists(String),
    #[error("adapter {0:?} is not in the adapter store")]
    NotFound(String),
    #[error("adapter store {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A conditional write lost to a concurrent writer of the same name (on another replica):
    /// the winner's version is whole and current; ours was not published.
    #[error("adapter {0:?} was changed by another writer at the same moment, and that version won; nothing was written: check its current version and retry if you still want to replace it")]
    Conflict(String),
    /// The object store cannot be reached (or refused our credentials).
    #[error("the adapter store is unavailable ({0}); adapters already cached keep serving, retry once the store is back")]
    Unavailable(String),
    /// What the store holds does not match its manifest (digest or size).
    #[error("adapter {name:?} in the store is damaged: {msg}; upload it again")]
    Corrupt { name: String, msg: String },
    /// A `--adapter-store` URL or its settings cannot be used.
    #[error("--adapter-store: {0}")]
    Config(String),
}

/// The store's reachability, for readiness and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHealth {
    /// The store's URL (no credentials).
    pub url: String,
    /// Whether the store is shared (an object store) rather than a local folder.
    pub remote: bool,
    /// Whether the last operation on the store succeeded.
    pub up: bool,
    /// The last failure, while `up` is false (no credentials in it).
    pub error: Option<String>,
}

/// The adapter store (see the module doc).
#[derive(Debug)]
pub enum AdapterStore {
    Dir(DirStore),
    Object(ObjectAdapterStore),
}

impl AdapterStore {
    /// The folder store at `root` (created if needed; interrupted writes recovered).
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        Ok(Self::Dir(DirStore::open(root)?))
    }

    /// The store a `--adapter-store` URL names: `file://DIR` or `s3://bucket/prefix`.
    pub fn open_url(url: &str, remote: RemoteOptions) -> Result<Self, StoreError> {
        if let Some(dir) = url.strip_prefix("file://") {
            if dir.is_empty() {
                return Err(StoreError::Config(
                    "file:// needs a folder, e.g. file:///srv/adapters or file://adapters".into(),
                ));
            }
            return Self::open(Path::new(dir));
        }
        if url.starts_with("s3://") || url.starts_with("s3a://") {
            return Ok(Self::Object(ObjectAdapterStore::open_s3(url, remote)?));
        }
        Err(StoreError::Config(format!(
            "{url:?} is not a store URL this build serves: use file://DIR or s3://bucket/prefix"
        )))
    }

    /// The local folder of a folder store (`None` for an object store).
    pub fn root(&self) -> Option<&Path> {
        match self {
            Self::Dir(d) => Some(d.root()),
            Self::Object(_) => None,
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, Self::Object(_))
    }

    /// The store's URL as it may be shown (no credentials).
    pub fn url(&self) -> String {
        match self {
            Self::Dir(d) => format!("file://{}", d.root().display()),
            Self::Object(o) => o.url().to_string(),
        }
    }

    /// Whether `name` is stored (for an object store: in the manifests last seen).
    pub fn exists(&self, name: &str) -> bool {
        match self {
            Self::Dir(d) => d.exists(name),
            Self::Object(o) => o.exists(name),
        }
    }

    /// Names of the stored adapters, sorted.
    pub fn list(&self) -> Vec<String> {
        match self {
            Self::Dir(d) => d.list(),
            Self::Object(o) => o.list(),
        }
    }

    /// The stored `adapter_config.json` of `name`.
    pub fn config(&self, name: &str) -> Option<Vec<u8>> {
        match self {
            Self::Dir(d) => std::fs::read(d.dir(name).ok()?.join("adapter_config.json")).ok(),
            Self::Object(o) => o.config(name),
        }
    }

    /// Write an adapter so that readers see the whole old version or the whole new one.
    /// The caller has validated the bytes.
    pub fn write(
        &self,
        name: &str,
        config: &[u8],
        weights: &[u8],
        replace: bool,
    ) -> Result<(), StoreError> {
        match self {
            Self::Dir(d) => d.write(name, config, weights, replace),
            Self::Object(o) => o.write(name, config, weights, replace),
        }
    }

    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        match self {
            Self::Dir(d) => d.delete(name),
            Self::Object(o) => o.delete(name),
        }
    }

    /// Read what changed in a shared store since the last look; the names whose version
    /// changed (written, replaced or deleted elsewhere). A folder store has nothing to read.
    pub fn refresh(&self) -> Result<Vec<String>, StoreError> {
        match self {
            Self::Dir(_) => Ok(Vec::new()),
            Self::Object(o) => o.refresh(),
        }
    }

    /// A request named `name`, unknown here: look it up in a shared store now rather than at
    /// the next refresh (rate-limited per name). True if the name's version changed.
    pub fn lookup(&self, name: &str) -> bool {
        match self {
            Self::Dir(_) => false,
            Self::Object(o) => o.lookup(name),
        }
    }

    pub fn health(&self) -> StoreHealth {
        match self {
            Self::Dir(d) => StoreHealth {
                url: format!("file://{}", d.root().display()),
                remote: false,
                up: true,
                error: None,
            },
            Self::Object(o) => o.health(),
        }
    }

    /// The disk cache below the in-memory LRU (object stores only).
    pub fn disk_cache(&self) -> Option<DiskCacheStats> {
        match self {
            Self::Dir(_) => None,
            Self::Object(o) => Some(o.disk_cache_stats()),
        }
    }

    /// Test hook: pause this long in the middle of every write (between the two files, or
    /// before an object store's manifest), so that a test can kill the process mid-write.
    pub fn with_write_pause(self, pause: Duration) -> Self {
        match self {
            Self::Dir(d) => Self::Dir(d.with_write_pause(pause)),
            Self::Object(o) => Self::Object(o.with_write_pause(pause)),
        }
    }
}

//! Adapters on object storage (`s3://bucket/prefix`), shared by every replica.
//!
//! Layout under the prefix:
//!
//! ```text
//! versions/NAME/VERSION/adapter_config.json
//! versions/NAME/VERSION/adapter_model.safetensors
//! manifests/NAME.json      {"format":1,"name","version","digest","weights_bytes","config"}
//! ```
//!
//! - A write puts the version's two files under a fresh `VERSION` key, then the manifest,
//!   with a conditional put: `If-None-Match: *` for a new name, `If-Match: <etag>` of the
//!   manifest it read for a replace. Of two concurrent writers exactly one manifest lands;
//!   the other is told ([`StoreError::Conflict`], or `Exists` for two creates) and its
//!   version objects are removed. A writer killed before its manifest leaves only unnamed
//!   objects, which readers never look at.
//! - Readers trust manifests only: the manifest carries the configuration itself and the
//!   digest of both files, and fetched weights are checked against it.
//! - Delete removes the manifest first; a replaced or deleted version's objects are removed
//!   after a grace period (replicas that read the old manifest an instant earlier can still
//!   fetch it), and versions no manifest names are swept when a replica starts.
//! - Each replica keeps the manifests it last saw ([`ObjectAdapterStore::refresh`] lists
//!   them; changed ones are read again), and a load reads its manifest conditionally
//!   (`If-None-Match`) so a cache miss always loads the current version.
//! - Credentials come from the environment, as the AWS tools read them (`AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT` for
//!   S3-compatible servers). They are never logged and never part of an error: errors carry
//!   the store's own message with any secret value removed.
//!
//! The `object_store` client is async; this store runs it on a runtime of its own and blocks
//! the calling thread (callers are load threads and blocking tasks, never the async workers).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::path::Path as ObjPath;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use super::{DiskCache, DiskCacheStats, StoreError, StoreHealth};
use crate::adapter::valid_name;

mod remote;
#[cfg(test)]
mod tests;

const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A key no other writer produces: time, process, counter and the address of a local.
pub(super) fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let local = 0u8;
    let mix = (std::process::id() as u64) << 32
        ^ COUNTER.fetch_add(1, Ordering::Relaxed)
        ^ (&local as *const u8 as u64).rotate_left(17);
    format!("{nanos:x}-{mix:016x}")
}

/// Settings of a shared store.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// The local disk tier (`--adapter-disk-cache-dir`).
    pub disk_cache_dir: PathBuf,
    /// Its byte budget (`--adapter-disk-cache-bytes`).
    pub disk_cache_bytes: u64,
    /// How long a replaced or deleted version's objects stay for replicas mid-fetch.
    pub old_version_grace: Duration,
    /// Per-request timeout against the store.
    pub timeout: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            disk_cache_dir: std::env::temp_dir().join("dora-serve-adapter-cache"),
            disk_cache_bytes: 4 << 30,
            old_version_grace: Duration::from_secs(60),
            timeout: Duration::from_secs(120),
        }
    }
}

/// The manifest of one adapter: the only object readers trust.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    name: String,
    version: String,
    /// [`digest`] of the configuration and the weights.
    digest: String,
    weights_bytes: u64,
    /// `adapter_config.json`, verbatim.
    config: String,
}

#[derive(Debug, Clone)]
struct Known {
    manifest: Manifest,
    e_tag: Option<String>,
    /// When this replica learned it (a listing older than this cannot overrule it).
    seen: Instant,
}

/// An adapter's files as fetched (or read from the disk cache), checked against its manifest.
#[derive(Debug)]
pub struct Fetched {
    pub config: Vec<u8>,
    pub weights: Vec<u8>,
    pub version: String,
    pub digest: String,
}

struct Inner {
    /// Manifests, listings and deletes: small requests, a short timeout.
    store: Arc<dyn ObjectStore>,
    /// Version objects (the weights), with `RemoteOptions::timeout`.
    data: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    url: String,
    index: RwLock<HashMap<String, Known>>,
    disk: DiskCache,
    health: Mutex<StoreHealth>,
    /// Last direct lookup of each unknown name (rate limit).
    lookups: Mutex<HashMap<String, Instant>>,
    secrets: Vec<String>,
    opts: RemoteOptions,
    write_pause: Duration,
}

/// An adapter store on object storage (see the module doc).
pub struct ObjectAdapterStore {
    inner: Arc<Inner>,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for ObjectAdapterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectAdapterStore")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

impl Drop for ObjectAdapterStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which async callers may not do; pending deletions of old
        // versions are left to the next start-up sweep.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl ObjectAdapterStore {
    /// Open `s3://bucket/prefix` with credentials and endpoint from the environment.
    pub fn open_s3(url: &str, opts: RemoteOptions) -> Result<Self, StoreError> {
        use object_store::aws::AmazonS3Builder;
        use object_store::{BackoffConfig, ClientOptions, RetryConfig};
        let rest = url.split_once("://").map(|(_, r)| r).unwrap_or("");
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() || bucket.contains('@') || bucket.contains(':') {
            return Err(StoreError::Config(format!(
                "{} must be s3://BUCKET/PREFIX (credentials go in AWS_* variables, never in the URL)",
                redact_url(url)
            )));
        }
        let endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
        let b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(50),
                    max_backoff: Duration::from_millis(500),
                    base: 2.0,
                },
                max_retries: 2,
                retry_timeout: Duration::from_secs(5),
            });
        let b = match &endpoint {
            Some(e) => b.with_endpoint(e),
            None => b,
        };
        let client = |timeout| {
            ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(2))
                .with_timeout(timeout)
                .with_allow_http(
                    endpoint
                        .as_deref()
                        .is_some_and(|e| e.starts_with("http://")),
                )
        };
        let secrets = ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
            .iter()
            .filter_map(|k| std::env::var(k).ok().filter(|v| v.len() >= 4))
            .collect::<Vec<_>>();
        let build = |timeout| {
            b.clone()
                .with_client_options(client(timeout))
                .build()
                .map_err(|e| StoreError::Config(scrub(&e.to_string(), &secrets)))
        };
        let meta = build(Duration::from_secs(10))?;
        let data = build(opts.timeout)?;
        let url = format!("s3://{bucket}/{prefix}");
        Self::new(Arc::new(meta), Arc::new(data), prefix, url, secrets, opts)
    }

    /// A store over any `object_store` backend (tests use the in-memory one): `store` for
    /// manifests and listings, `data` for version objects (the same store, with a longer
    /// timeout for large adapters).
    pub fn new(
        store: Arc<dyn ObjectStore>,
        data: Arc<dyn ObjectStore>,
        prefix: &str,
        url: String,
        secrets: Vec<String>,
        opts: RemoteOptions,
    ) -> Result<Self, StoreError> {
        let disk = DiskCache::open(&opts.disk_cache_dir, opts.disk_cache_bytes).map_err(|e| {
            StoreError::Io {
                path: opts.disk_cache_dir.clone(),
                source: e,
            }
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("adapter-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Config(format!("cannot start the store's runtime: {e}")))?;
        let inner = Arc::new(Inner {
            store,
            data,
            prefix: ObjPath::from(prefix.trim_matches('/')),
            url: url.clone(),
            index: RwLock::default(),
            disk,
            health: Mutex::new(StoreHealth {
                url: url.clone(),
                remote: true,
                up: true,
                error: None,
            }),
            lookups: Mutex::default(),
            secrets,
            opts,
            write_pause: Duration::ZERO,
        });
        let s = Self {
            inner,
            rt: Some(rt),
        };
        // The first listing: an unreachable store is not fatal (cached adapters serve, and
        // the refresh loop recovers), but it is said.
        match s.refresh() {
            Ok(_) => {
                let inner = Arc::clone(&s.inner);
                let _ = s.block(async move { inner.sweep().await });
            }
            Err(e) => tracing::warn!("adapter store {}: {e}", s.inner.url),
        }
        Ok(s)
    }

    pub fn with_write_pause(mut self, pause: Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.write_pause = pause;
        }
        self
    }

    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Run `f` on the store's runtime and wait for it (from any thread, async or not).
    fn block<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt
            .as_ref()
            .expect("runtime until drop")
            .spawn(async move {
                let _ = tx.send(f.await);
            });
        rx.recv().expect("the store's runtime stopped")
    }

    pub fn exists(&self, name: &str) -> bool {
        self.inner.read_index().contains_key(name)
    }

    pub fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.read_index().keys().cloned().collect();
        names.sort();
        names
    }

    pub fn config(&self, name: &str) -> Option<Vec<u8>> {
        let index = self.inner.read_index();
        index
            .get(name)
            .map(|k| k.manifest.config.clone().into_bytes())
    }

    pub fn health(&self) -> StoreHealth {
        self.inner
            .health
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn disk_cache_stats(&self) -> DiskCacheStats {
        self.inner.disk.stats()
    }

    pub fn write(
        &self,
        name: &str,
        config: &[u8],
        weights: &[u8],
        replace: bool,
    ) -> Result<(), StoreError> {
        if !valid_name(name) {
            return Err(StoreError::InvalidName(name.to_string()));
        }
        let config = String::from_utf8(config.to_vec()).map_err(|_| {
            StoreError::Config("adapter_config.json must be UTF-8 text".to_string())
        })?;
        let (inner, name, weights) = (Arc::clone(&self.inner), name.to_string(), weights.to_vec());
        let handle = self.rt.as_ref().expect("runtime").handle().clone();
        self.block(async move { inner.write(&name, config, weights, replace, &handle).await })
    }

    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        if !valid_name(name) {
            return Err(StoreError::InvalidName(name.to_string()));
        }
        let (inner, name) = (Arc::clone(&self.inner), name.to_string());
        let handle = self.rt.as_ref().expect("runtime").handle().clone();
        self.block(async move { inner.delete(&name, &handle).await })
    }

    pub fn refresh(&self) -> Result<Vec<String>, StoreError> {
        let inner = Arc::clone(&self.inner);
        self.block(async move { inner.refresh().await })
    }

    pub fn lookup(&self, name: &str) -> bool {
        if !valid_name(name) {
            return false;
        }
        {
            let mut last = self.inner.lookups.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if last
                .get(name)
                .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1))
            {
                return false;
            }
            if last.len() > 10_000 {
                last.clear();
            }
            last.insert(name.to_string(), now);
        }
        let before = self
            .inner
            .read_index()
            .get(name)
            .map(|k| k.manifest.version.clone());
        let (inner, n) = (Arc::clone(&self.inner), name.to_string());
        let _ = self.block(async move { inner.current(&n).await });
        let after = self
            .inner
            .read_index()
            .get(name)
            .map(|k| k.manifest.version.clone());
        before != after
    }

    /// The current files of `name`: its manifest read again (conditionally), then the disk
    /// cache or the store. While the store is unreachable, a disk-cached copy of the version
    /// last seen serves.
    pub fn fetch(&self, name: &str) -> Result<Fetched, StoreError> {
        let (inner, n) = (Arc::clone(&self.inner), name.to_string());
        self.block(async move { inner.fetch(&n).await })
    }
}

/// `msg` with every secret value replaced.
fn scrub(msg: &str, secrets: &[String]) -> String {
    let mut out = msg.to_string();
    for s in secrets {
        out = out.replace(s.as_str(), "***");
    }
    out
}

fn redact_url(url: &str) -> String {
    match url.split_once('@') {
        Some((scheme_user, rest)) => {
            let scheme = scheme_user.split("://").next().unwrap_or("s3");
            format!("{scheme}://***@{rest}")
        }
        None => url.to_string(),
    }
}

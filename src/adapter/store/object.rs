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

use futures_util::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{
    GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion,
};
use serde::{Deserialize, Serialize};

use super::{DiskCache, DiskCacheStats, StoreError, StoreHealth};
use crate::adapter::{digest, valid_name};

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

impl Inner {
    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Known>> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_index(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Known>> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    fn manifest_path(&self, name: &str) -> ObjPath {
        self.prefix
            .clone()
            .join("manifests")
            .join(format!("{name}.json"))
    }

    fn version_path(&self, name: &str, version: &str, file: &str) -> ObjPath {
        self.prefix
            .clone()
            .join("versions")
            .join(name)
            .join(version)
            .join(file)
    }

    /// Record the outcome of a call against the store: any answer from it means it is up.
    fn note<T>(&self, r: Result<T, object_store::Error>) -> Result<T, object_store::Error> {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match &r {
            Err(e) if is_unreachable(e) => {
                if h.up {
                    tracing::warn!(
                        "adapter store {} is unavailable: {}",
                        self.url,
                        self.scrub(e)
                    );
                }
                h.up = false;
                h.error = Some(self.scrub(e));
            }
            _ => {
                if !h.up {
                    tracing::info!("adapter store {} is reachable again", self.url);
                }
                h.up = true;
                h.error = None;
            }
        }
        r
    }

    fn scrub(&self, e: &object_store::Error) -> String {
        scrub(&e.to_string(), &self.secrets)
    }

    /// A store error as ours, for `name`.
    fn error(&self, name: &str, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound(name.to_string()),
            object_store::Error::Precondition { .. } => StoreError::Conflict(name.to_string()),
            object_store::Error::AlreadyExists { .. } => StoreError::Exists(name.to_string()),
            e => StoreError::Unavailable(self.scrub(&e)),
        }
    }

    /// Read `name`'s manifest; `None` if there is none.
    async fn get_manifest(
        &self,
        name: &str,
        if_none_match: Option<String>,
    ) -> Result<Option<(Manifest, Option<String>)>, object_store::Error> {
        let opts = GetOptions {
            if_none_match,
            ..Default::default()
        };
        let r = match self.note(self.store.get_opts(&self.manifest_path(name), opts).await) {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let e_tag = r.meta.e_tag.clone();
        let bytes = self.note(r.bytes().await)?;
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| object_store::Error::Generic {
                store: "manifest",
                source: format!("manifest of {name} does not parse: {e}").into(),
            })?;
        if m.name != name || m.format != 1 {
            return Err(object_store::Error::Generic {
                store: "manifest",
                source: format!(
                    "manifest of {name} names {:?} (format {})",
                    m.name, m.format
                )
                .into(),
            });
        }
        Ok(Some((m, e_tag)))
    }

    fn remember(&self, name: &str, manifest: Manifest, e_tag: Option<String>) {
        self.write_index().insert(
            name.to_string(),
            Known {
                manifest,
                e_tag,
                seen: Instant::now(),
            },
        );
    }

    /// Read `name`'s manifest again (304 if unchanged) and update what we know.
    async fn current(&self, name: &str) -> Result<Option<Manifest>, StoreError> {
        let known = self.read_index().get(name).cloned();
        let etag = known.as_ref().and_then(|k| k.e_tag.clone());
        match self.get_manifest(name, etag).await {
            Ok(Some((m, e_tag))) => {
                self.remember(name, m.clone(), e_tag);
                Ok(Some(m))
            }
            Ok(None) => {
                self.write_index().remove(name);
                Ok(None)
            }
            Err(object_store::Error::NotModified { .. }) => Ok(known.map(|k| k.manifest)),
            Err(e) => Err(self.error(name, e)),
        }
    }

    async fn fetch(&self, name: &str) -> Result<Fetched, StoreError> {
        let manifest = match self.current(name).await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(StoreError::NotFound(name.to_string())),
            Err(StoreError::Unavailable(msg)) => {
                // The store is down: what the disk holds of the version last seen still serves.
                let known = self.read_index().get(name).map(|k| k.manifest.clone());
                let Some(m) = known else {
                    return Err(StoreError::Unavailable(msg));
                };
                let Some((config, weights)) = self.disk.get(name, &m.version, &m.digest) else {
                    return Err(StoreError::Unavailable(msg));
                };
                return Ok(Fetched {
                    config,
                    weights,
                    version: m.version,
                    digest: m.digest,
                });
            }
            Err(e) => return Err(e),
        };
        if let Some((config, weights)) = self.disk.get(name, &manifest.version, &manifest.digest) {
            return Ok(Fetched {
                config,
                weights,
                version: manifest.version,
                digest: manifest.digest,
            });
        }
        let path = self.version_path(name, &manifest.version, WEIGHTS);
        let got = self.note(self.data.get(&path).await);
        let weights = match got {
            Ok(r) => self
                .note(r.bytes().await)
                .map_err(|e| self.error(name, e))?,
            // The manifest names a version whose objects are gone: damaged, not missing.
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::Corrupt {
                    name: name.to_string(),
                    msg: format!("version {} has no weights object", manifest.version),
                })
            }
            Err(e) => return Err(self.error(name, e)),
        };
        let config = manifest.config.clone().into_bytes();
        if weights.len() as u64 != manifest.weights_bytes
            || digest(&config, &weights) != manifest.digest
        {
            return Err(StoreError::Corrupt {
                name: name.to_string(),
                msg: format!(
                    "version {}: the weights ({} bytes) do not match the manifest's digest",
                    manifest.version,
                    weights.len()
                ),
            });
        }
        let weights = weights.to_vec();
        self.disk.put(name, &manifest.version, &config, &weights);
        Ok(Fetched {
            config,
            weights,
            version: manifest.version,
            digest: manifest.digest,
        })
    }

    async fn write(
        &self,
        name: &str,
        config: String,
        weights: Vec<u8>,
        replace: bool,
        rt: &tokio::runtime::Handle,
    ) -> Result<(), StoreError> {
        let current = self
            .get_manifest(name, None)
            .await
            .map_err(|e| self.error(name, e))?;
        if current.is_some() && !replace {
            return Err(StoreError::Exists(name.to_string()));
        }
        let version = unique();
        let manifest = Manifest {
            format: 1,
            name: name.to_string(),
            version: version.clone(),
            digest: digest(config.as_bytes(), &weights),
            weights_bytes: weights.len() as u64,
            config: config.clone(),
        };
        let wpath = self.version_path(name, &version, WEIGHTS);
        let cpath = self.version_path(name, &version, CONFIG);
        // The version's objects first; nothing names them until the manifest lands.
        self.note(
            self.data
                .put(&wpath, PutPayload::from(weights.clone()))
                .await,
        )
        .map_err(|e| self.error(name, e))?;
        self.note(
            self.data
                .put(&cpath, PutPayload::from(config.clone().into_bytes()))
                .await,
        )
        .map_err(|e| self.error(name, e))?;
        if !self.write_pause.is_zero() {
            tokio::time::sleep(self.write_pause).await;
        }
        let mode = match &current {
            None => PutMode::Create,
            Some((_, e_tag)) => PutMode::Update(UpdateVersion {
                e_tag: e_tag.clone(),
                version: None,
            }),
        };
        let body = serde_json::to_vec(&manifest).expect("a manifest serialises");
        let put = self
            .store
            .put_opts(
                &self.manifest_path(name),
                PutPayload::from(body),
                PutOptions::from(mode),
            )
            .await;
        match self.note(put) {
            Ok(r) => {
                self.remember(name, manifest, r.e_tag);
                self.disk.put(name, &version, config.as_bytes(), &weights);
                if let Some((old, _)) = current {
                    self.remove_version_later(name, old.version, rt);
                }
                Ok(())
            }
            Err(
                e @ (object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. }),
            ) => {
                // Another writer's manifest won: ours was never visible; drop its objects.
                let _ = self.store.delete(&wpath).await;
                let _ = self.store.delete(&cpath).await;
                // Two creates: "exists" answers a plain upload; a replace lost a race.
                Err(if replace {
                    StoreError::Conflict(name.to_string())
                } else {
                    self.error(name, e)
                })
            }
            // Unknown outcome (the manifest may have landed): the objects stay.
            Err(e) => Err(self.error(name, e)),
        }
    }

    async fn delete(&self, name: &str, rt: &tokio::runtime::Handle) -> Result<(), StoreError> {
        let current = self
            .get_manifest(name, None)
            .await
            .map_err(|e| self.error(name, e))?;
        let Some((m, _)) = current else {
            self.write_index().remove(name);
            return Err(StoreError::NotFound(name.to_string()));
        };
        self.note(self.store.delete(&self.manifest_path(name)).await)
            .map_err(|e| self.error(name, e))?;
        self.write_index().remove(name);
        self.remove_version_later(name, m.version, rt);
        Ok(())
    }

    /// Remove an unnamed version's objects after the grace period.
    fn remove_version_later(&self, name: &str, version: String, rt: &tokio::runtime::Handle) {
        let (store, grace) = (Arc::clone(&self.store), self.opts.old_version_grace);
        let paths = [WEIGHTS, CONFIG].map(|f| self.version_path(name, &version, f));
        rt.spawn(async move {
            tokio::time::sleep(grace).await;
            for p in &paths {
                let _ = store.delete(p).await;
            }
        });
    }

    /// List the manifests; read the changed ones again. Returns the names whose version
    /// changed (new, replaced or gone) since we last knew.
    async fn refresh(&self) -> Result<Vec<String>, StoreError> {
        let started = Instant::now();
        let dir = self.prefix.clone().join("manifests");
        let mut listed: HashMap<String, Option<String>> = HashMap::new();
        let mut stream = self.store.list(Some(&dir));
        while let Some(meta) = stream.next().await {
            let meta = self.note(meta).map_err(|e| self.error("", e))?;
            let Some(file) = meta.location.filename() else {
                continue;
            };
            if let Some(name) = file.strip_suffix(".json").filter(|n| valid_name(n)) {
                listed.insert(name.to_string(), meta.e_tag.clone());
            }
        }
        let mut changed = Vec::new();
        let known: HashMap<String, Known> = self.read_index().clone();
        for (name, e_tag) in &listed {
            let k = known.get(name);
            if k.is_some_and(|k| k.e_tag.is_some() && k.e_tag == *e_tag) {
                continue;
            }
            match self.get_manifest(name, None).await {
                Ok(Some((m, e_tag))) => {
                    let was = self.read_index().get(name).cloned();
                    if was.as_ref().is_some_and(|w| w.seen > started) {
                        continue; // learned meanwhile (our own write): newer than this listing
                    }
                    if was.as_ref().map(|w| &w.manifest.version) != Some(&m.version) {
                        changed.push(name.clone());
                    }
                    self.remember(name, m, e_tag);
                }
                Ok(None) => {} // deleted since the listing; handled below next time
                Err(e) => {
                    if is_unreachable(&e) {
                        return Err(self.error(name, e));
                    }
                    tracing::warn!("adapter store: skipping {name}: {}", self.scrub(&e));
                }
            }
        }
        let mut index = self.write_index();
        let gone: Vec<String> = index
            .iter()
            .filter(|(n, k)| !listed.contains_key(*n) && k.seen < started)
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            index.remove(&n);
            changed.push(n);
        }
        changed.sort();
        Ok(changed)
    }

    /// Remove version objects that no manifest names and that are older than an hour (a
    /// writer killed before its manifest, or a grace-period removal cut short by a restart).
    async fn sweep(&self) -> Result<(), object_store::Error> {
        let dir = self.prefix.clone().join("versions");
        let cutoff = chrono_like_now() - 3600;
        let named: HashMap<String, String> = self
            .read_index()
            .iter()
            .map(|(n, k)| (n.clone(), k.manifest.version.clone()))
            .collect();
        let mut stream = self.store.list(Some(&dir));
        let mut doomed = Vec::new();
        while let Some(meta) = stream.next().await {
            let meta = meta?;
            let parts: Vec<String> = meta
                .location
                .prefix_match(&dir)
                .map(|p| p.map(|s| s.as_ref().to_string()).collect())
                .unwrap_or_default();
            let [name, version, _file] = parts.as_slice() else {
                continue;
            };
            if named.get(name) != Some(version) && meta.last_modified.timestamp() < cutoff {
                doomed.push(meta.location);
            }
        }
        for p in doomed {
            tracing::info!("adapter store: removing unnamed version object {p}");
            let _ = self.store.delete(&p).await;
        }
        Ok(())
    }
}

fn chrono_like_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Whether an error means the store did not answer (or refused us), as opposed to an answer
/// about the object.
fn is_unreachable(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::AlreadyExists { .. }
            | object_store::Error::NotModified { .. }
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn open(mem: &Arc<InMemory>, cache: &std::path::Path) -> ObjectAdapterStore {
        let opts = RemoteOptions {
            disk_cache_dir: cache.to_path_buf(),
            disk_cache_bytes: 1 << 20,
            old_version_grace: Duration::from_millis(50),
            timeout: Duration::from_secs(5),
        };
        let store: Arc<dyn ObjectStore> = mem.clone();
        ObjectAdapterStore::new(
            store.clone(),
            store,
            "team/a",
            "memory://".into(),
            vec!["s3cr3t".into()],
            opts,
        )
        .unwrap()
    }

    fn objects(mem: &Arc<InMemory>, s: &ObjectAdapterStore) -> Vec<String> {
        let mem = Arc::clone(mem);
        s.block(async move {
            let mut out: Vec<String> = mem
                .list(None)
                .map(|m| m.unwrap().location.to_string())
                .collect()
                .await;
            out.sort();
            out
        })
    }

    #[test]
    fn two_replicas_see_one_whole_version_and_conditional_writes_pick_one_winner() {
        let mem = Arc::new(InMemory::new());
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (open(&mem, d1.path()), open(&mem, d2.path()));
        a.write("x", b"{\"r\":1}", b"w1", false).unwrap();
        assert!(matches!(
            a.write("x", b"{}", b"w", false),
            Err(StoreError::Exists(_))
        ));
        // B learns of it by refreshing, and fetches exactly what A wrote.
        assert!(!b.exists("x"));
        assert_eq!(b.refresh().unwrap(), vec!["x"]);
        let f = b.fetch("x").unwrap();
        assert_eq!(
            (f.config.as_slice(), f.weights.as_slice()),
            (&b"{\"r\":1}"[..], &b"w1"[..])
        );
        assert_eq!(f.digest, digest(b"{\"r\":1}", b"w1"));
        assert_eq!(b.config("x").unwrap(), b"{\"r\":1}");
        // B replaces; A's next fetch reads the manifest again and gets the new version even
        // before its refresh (a cache miss always loads what is current).
        b.write("x", b"{\"r\":2}", b"w2", true).unwrap();
        assert_eq!(a.fetch("x").unwrap().weights, b"w2");
        assert!(a.refresh().unwrap().is_empty(), "already current");
        // A writer that read the manifest before another replaced it loses, and is told.
        let inner = Arc::clone(&a.inner);
        let stale = a.block(async move { inner.get_manifest("x", None).await.unwrap() });
        b.write("x", b"{\"r\":3}", b"w3", true).unwrap();
        let inner = Arc::clone(&a.inner);
        let put = a.block(async move {
            let body = serde_json::to_vec(&stale.clone().unwrap().0).unwrap();
            let mode = PutMode::Update(UpdateVersion {
                e_tag: stale.unwrap().1,
                version: None,
            });
            inner
                .store
                .put_opts(&inner.manifest_path("x"), body.into(), mode.into())
                .await
        });
        assert!(matches!(put, Err(object_store::Error::Precondition { .. })));
        assert_eq!(b.fetch("x").unwrap().weights, b"w3");
        // Delete: manifest first; the others see it gone at their next refresh; old version
        // objects go after the grace period.
        a.delete("x").unwrap();
        assert!(matches!(a.delete("x"), Err(StoreError::NotFound(_))));
        assert_eq!(b.refresh().unwrap(), vec!["x"]);
        assert!(!b.exists("x"));
        assert!(matches!(b.fetch("x"), Err(StoreError::NotFound(_))));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(objects(&mem, &a), Vec::<String>::new());
    }

    #[test]
    fn a_damaged_version_is_refused_and_unnamed_objects_are_never_read() {
        let mem = Arc::new(InMemory::new());
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = open(&mem, d1.path());
        a.write("y", b"{}", b"good", false).unwrap();
        // Objects of a writer that died before its manifest: nobody sees them.
        let inner = Arc::clone(&a.inner);
        a.block(async move {
            let p = inner.version_path("z", "dead", WEIGHTS);
            inner.store.put(&p, b"half".to_vec().into()).await.unwrap();
        });
        let b = open(&mem, d2.path());
        assert_eq!(b.list(), vec!["y"]);
        // Weights overwritten behind the manifest's back: refused, not served.
        let version = b.inner.read_index()["y"].manifest.version.clone();
        let inner = Arc::clone(&b.inner);
        b.block(async move {
            let p = inner.version_path("y", &version, WEIGHTS);
            inner.store.put(&p, b"evil".to_vec().into()).await.unwrap();
        });
        assert!(matches!(b.fetch("y"), Err(StoreError::Corrupt { .. })));
        // A's disk cache holds the good bytes it wrote, checked against the digest.
        assert_eq!(a.fetch("y").unwrap().weights, b"good");
        assert!(a.disk_cache_stats().hits >= 1);
        assert_eq!(
            scrub("key s3cr3t in it", &["s3cr3t".into()]),
            "key *** in it"
        );
        assert_eq!(redact_url("s3://AK:SK@bkt/p"), "s3://***@bkt/p");
    }
}

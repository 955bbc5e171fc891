//! The store's protocol against the object store: manifests read (conditionally) and
//! remembered, versions written under a fresh key and named by a conditional manifest put,
//! deletes and late removal of replaced versions, listing refreshes, and the start-up sweep of
//! versions no manifest names (the layout and its rules are in the parent module's doc).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{
    GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion,
};

use super::super::StoreError;
use super::{scrub, unique, Fetched, Inner, Known, Manifest, CONFIG, WEIGHTS};
use crate::adapter::{digest, valid_name};

impl Inner {
    pub(super) fn read_index(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Known>> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn write_index(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Known>> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn manifest_path(&self, name: &str) -> ObjPath {
        self.prefix
            .clone()
            .join("manifests")
            .join(format!("{name}.json"))
    }

    pub(super) fn version_path(&self, name: &str, version: &str, file: &str) -> ObjPath {
        self.prefix
            .clone()
            .join("versions")
            .join(name)
            .join(version)
            .join(file)
    }

    /// Record the outcome of a call against the store: any answer from it means it is up.
    pub(super) fn note<T>(
        &self,
        r: Result<T, object_store::Error>,
    ) -> Result<T, object_store::Error> {
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

    pub(super) fn scrub(&self, e: &object_store::Error) -> String {
        scrub(&e.to_string(), &self.secrets)
    }

    /// A store error as ours, for `name`.
    pub(super) fn error(&self, name: &str, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound(name.to_string()),
            object_store::Error::Precondition { .. } => StoreError::Conflict(name.to_string()),
            object_store::Error::AlreadyExists { .. } => StoreError::Exists(name.to_string()),
            e => StoreError::Unavailable(self.scrub(&e)),
        }
    }

    /// Read `name`'s manifest; `None` if there is none.
    pub(super) async fn get_manifest(
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

    pub(super) fn remember(&self, name: &str, manifest: Manifest, e_tag: Option<String>) {
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
    pub(super) async fn current(&self, name: &str) -> Result<Option<Manifest>, StoreError> {
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

    pub(super) async fn fetch(&self, name: &str) -> Result<Fetched, StoreError> {
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

    pub(super) async fn write(
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

    pub(super) async fn delete(
        &self,
        name: &str,
        rt: &tokio::runtime::Handle,
    ) -> Result<(), StoreError> {
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
    pub(super) fn remove_version_later(
        &self,
        name: &str,
        version: String,
        rt: &tokio::runtime::Handle,
    ) {
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
    pub(super) async fn refresh(&self) -> Result<Vec<String>, StoreError> {
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
    pub(super) async fn sweep(&self) -> Result<(), object_store::Error> {
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

pub(super) fn chrono_like_now() -> i64 {
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
